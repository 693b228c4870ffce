//! The controller: watches Agents, DelegationGrants and AgentRuns and, for every run,
//! authorises it, mints its identity, projects and rotates its token, and revokes everything
//! it held when it ends (DESIGN.md, "What the controller does for a run").

pub mod children;
pub mod events;
mod grants;
mod owned;
pub mod plan;
mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller::Action, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use crate::authorization::Policy;
use crate::metrics::Metrics;
use crate::registration::Registrations;
use crate::resources::{Agent, AgentRun, DelegationGrant, ResourceServer};
use crate::runs::PodPhase;
use crate::signing::KeyStore;
pub use children::ChildConfig;

/// The field manager of every server-side apply Deputy makes.
pub const MANAGER: &str = "deputy";
/// The finalizer that guarantees a run's credentials are removed even if Deputy was down.
pub const FINALIZER: &str = "deputy.dev/cleanup";

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub policy: Policy,
    pub children: ChildConfig,
    /// The longest delay between retries of a failing reconcile.
    pub max_backoff: Duration,
    /// How many runs are reconciled at once (0: unbounded). Bounds the operator's memory and
    /// its in-flight requests to the API server when thousands of runs start together.
    pub max_concurrent_reconciles: u16,
    /// Where the controller's time comes from.
    pub clock: Clock,
}

/// The controller's source of time: the system clock, or any other (a test's).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>);

impl Clock {
    pub fn system() -> Clock {
        Clock(Arc::new(jiff::Timestamp::now))
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> jiff::Timestamp + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
    }

    pub fn now(&self) -> jiff::Timestamp {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Errors of one reconcile. Each has a static category for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("signing: {0}")]
    Signing(#[from] crate::tokens::KeyError),
    #[error("serialisation: {0}")]
    Serde(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// A child's name is held by an object the run does not own (see `owned`).
    #[error("{0}")]
    NameTaken(owned::Taken),
    /// The plan kept asking for observations (a bug: each is asked for at most once).
    #[error("the reconcile plan did not settle")]
    Unsettled,
    /// The API server holds a newer copy of a child than the cache shows (written by a
    /// process that stopped, or just now): retried once the cache has it, never written over.
    #[error("the {0} changed since the cache saw it")]
    CacheBehind(String),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(_) => "finalizer",
            Error::Signing(_) => "signing",
            Error::Serde(_) => "serialisation",
            Error::MissingField(_) => "invalid_object",
            Error::NameTaken(_) => "name_taken",
            Error::Unsettled => "unsettled",
            Error::CacheBehind(_) => "cache_behind",
        }
    }
}

/// Caches the controller reads instead of the API server.
#[derive(Clone)]
pub struct Stores {
    pub agents: Store<Agent>,
    pub grants: Store<DelegationGrant>,
    pub runs: Store<AgentRun>,
    pub pods: Store<PodPhase>,
    pub secrets: Store<PartialObjectMeta<Secret>>,
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub resource_servers: Store<ResourceServer>,
    /// Namespaces, name and labels only (ResourceServers select them by label).
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub cfg: ControllerConfig,
    pub keys: Arc<KeyStore>,
    pub stores: Stores,
    pub events: events::Publisher,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for the capped exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The status this process last wrote for each run (by uid), so that a reconcile working
    /// from a cache that has not caught up with that write does nothing (no second mint, no
    /// repeated revocation) and waits for the watch event that brings it.
    written: Mutex<HashMap<String, Written>>,
    /// What each active run's current token carries (by uid), as this process minted it or
    /// read it from the token: the authority a change of grants is compared with (the status
    /// says the same, but anyone allowed to write the status could narrow it to hide a pair).
    held: Mutex<HashMap<String, plan::Held>>,
    /// The number of the last token this process wrote to each run's Secret (by uid), and the
    /// Secret's resourceVersion after the write (`None`: its outcome is unknown): ahead of the
    /// Secret cache, so a failed status write never makes two tokens of one number.
    numbered: Mutex<HashMap<String, (u32, Option<String>)>>,
    /// Grants and Agents whose status (active run counts) may have changed.
    status_triggers: mpsc::UnboundedSender<StatusTrigger>,
}

/// What a reconcile wrote to a run's status.
#[derive(Debug, Clone, Copy)]
struct Written {
    progress: Progress,
    at: std::time::Instant,
}

/// How far along its life a run's status says it is: the stage (0 pending, 1 authorized,
/// 2 running, 3 terminal, 4 terminal with credentials gone), then the number of rotations.
/// Only Deputy moves either forward, so a cached status behind the last one Deputy wrote is
/// stale. The rotation count matters: a rotation does not change the stage, and a reconcile
/// on the pre-rotation copy would mint a second time.
type Progress = (u8, u32);

fn progress_of(status: Option<&crate::resources::AgentRunStatus>) -> Progress {
    use crate::resources::RunPhase;
    let stage = match status.and_then(|s| s.phase.map(|p| (p, s.revoked_at.is_some()))) {
        None | Some((RunPhase::Pending, _)) => 0,
        Some((RunPhase::Authorized, _)) => 1,
        Some((RunPhase::Running, _)) => 2,
        Some((p, false)) if p != RunPhase::Denied => 3,
        Some(_) => 4,
    };
    (stage, status.map_or(0, |s| s.rotations))
}

#[derive(Debug, Clone)]
enum StatusTrigger {
    Grant(ObjectRef<DelegationGrant>),
    Agent(ObjectRef<Agent>),
}

impl Context {
    fn backoff(&self, key: &str, err: &Error) -> Duration {
        // A conflict or a failed JSON-patch test means our copy was stale: retry soon, and do
        // not let it grow the backoff of a healthy object.
        if matches!(err, Error::Kube(kube::Error::Api(s)) if s.code == 409 || s.code == 422)
            || matches!(err, Error::CacheBehind(_))
        {
            return Duration::from_millis(200);
        }
        let mut f = match self.failures.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let millis = 500u64.saturating_mul(1u64 << (*n).min(16));
        Duration::from_millis(millis).min(self.cfg.max_backoff)
    }

    /// Records the status just written for `uid`.
    fn wrote(&self, uid: &str, status: &crate::resources::AgentRunStatus) {
        if let Ok(mut w) = self.written.lock() {
            if w.len() > 100_000 {
                w.retain(|_, v| v.at.elapsed() < std::time::Duration::from_secs(60));
            }
            w.insert(uid.to_string(), Written { progress: progress_of(Some(status)), at: std::time::Instant::now() });
        }
    }

    /// Records that the run `uid` ended without a status write (it is being deleted): no
    /// cached copy of it can be ahead of that.
    fn ended(&self, uid: &str) {
        if let Ok(mut w) = self.written.lock() {
            w.insert(uid.to_string(), Written { progress: (4, u32::MAX), at: std::time::Instant::now() });
        }
    }

    /// What the run's current token carries, if this process knows.
    fn held(&self, uid: &str) -> Option<plan::Held> {
        self.held.lock().ok().and_then(|h| h.get(uid).cloned())
    }

    /// Remembers what the run's current token carries (`None`: forget it, the run ended).
    /// Bounded: a forgotten run only costs one read of its token.
    fn hold(&self, uid: &str, held: Option<plan::Held>) {
        remember(&self.held, uid, held);
    }

    /// The number of the last token this process wrote for the run `uid` (0: none), and the
    /// Secret's resourceVersion that write made, when known.
    fn token_number(&self, uid: &str) -> (u32, Option<String>) {
        self.numbered.lock().ok().and_then(|n| n.get(uid).cloned()).unwrap_or((0, None))
    }

    /// Remembers that token `number` was written for the run `uid`, making the Secret's
    /// resourceVersion `version` (`None`: not yet known; `number` `None`: the run ended).
    /// Bounded: a forgotten run falls back to its Secret's annotation.
    fn numbered(&self, uid: &str, number: Option<(u32, Option<String>)>) {
        remember(&self.numbered, uid, number);
    }

    /// The time, from the controller's clock.
    pub(crate) fn now(&self) -> jiff::Timestamp {
        self.cfg.clock.now()
    }

    /// Whether the cached run is behind a status this process wrote in the last minute.
    fn cache_is_behind(&self, uid: &str, cached: Option<&crate::resources::AgentRunStatus>) -> bool {
        let Ok(w) = self.written.lock() else { return false };
        w.get(uid)
            .is_some_and(|wr| wr.at.elapsed() < std::time::Duration::from_secs(60) && progress_of(cached) < wr.progress)
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// Asks the grant and agent status loops to recount the runs relying on them.
    fn touch_status_of(&self, run: &AgentRun) {
        let ns = run.namespace().unwrap_or_default();
        let grants = run.status.as_ref().and_then(|s| s.grant.clone()).unwrap_or_default();
        for g in grants.split(',').filter(|g| !g.is_empty()) {
            let _ = self.status_triggers.send(StatusTrigger::Grant(ObjectRef::new(g).within(&ns)));
        }
        let _ = self.status_triggers.send(StatusTrigger::Agent(ObjectRef::new(&run.spec.agent).within(&ns)));
    }
}

/// Sets (`Some`) or forgets (`None`) what a per-run memory of the context holds for `uid`.
/// Bounded: at 200,000 runs it starts again empty, so every such memory must be one the
/// controller can do without (it reads the run's token or Secret instead).
fn remember<V>(memory: &Mutex<HashMap<String, V>>, uid: &str, value: Option<V>) {
    let Ok(mut m) = memory.lock() else { return };
    match value {
        Some(value) => {
            if m.len() >= 200_000 {
                m.clear();
            }
            m.insert(uid.to_string(), value);
        }
        None => {
            m.remove(uid);
        }
    }
}

/// Starts the watches and caches; returns the stores and the streams that drive them.
pub struct Watches {
    pub stores: Stores,
    runs: futures::stream::BoxStream<'static, Result<AgentRun, watcher::Error>>,
    agents: futures::stream::BoxStream<'static, Result<Agent, watcher::Error>>,
    grants: futures::stream::BoxStream<'static, Result<DelegationGrant, watcher::Error>>,
    pods: futures::stream::BoxStream<'static, Result<PodPhase, watcher::Error>>,
    secrets: futures::stream::BoxStream<'static, Result<PartialObjectMeta<Secret>, watcher::Error>>,
    service_accounts: futures::stream::BoxStream<'static, Result<PartialObjectMeta<ServiceAccount>, watcher::Error>>,
    resource_servers: futures::stream::BoxStream<'static, Result<ResourceServer, watcher::Error>>,
    namespaces: futures::stream::BoxStream<'static, Result<PartialObjectMeta<Namespace>, watcher::Error>>,
}

/// The label selector of every object Deputy creates for a run.
pub fn children_selector() -> String {
    format!("{}={}", crate::runs::MANAGED_BY.0, crate::runs::MANAGED_BY.1)
}

impl Watches {
    /// Sets up cluster-wide watches with reflector caches (children are selected by label,
    /// and only their metadata is cached for Secrets and ServiceAccounts).
    pub fn new(client: &Client) -> Watches {
        let wc = watcher::Config::default();
        let children = watcher::Config::default().labels(&children_selector());
        let (runs_store, runs_writer) = reflector::store();
        let (agents_store, agents_writer) = reflector::store();
        let (grants_store, grants_writer) = reflector::store();
        let (pods_store, pods_writer) = reflector::store();
        let (secrets_store, secrets_writer) = reflector::store();
        let (sa_store, sa_writer) = reflector::store();
        let (rs_store, rs_writer) = reflector::store();
        let (ns_store, ns_writer) = reflector::store();
        let runs = reflector::reflector(
            runs_writer,
            watcher(Api::<AgentRun>::all(client.clone()), wc.clone()).modify(|r: &mut AgentRun| {
                r.metadata.managed_fields = None;
                // `kubectl apply` keeps a copy of the whole object here; nothing reads it.
                if let Some(a) = r.metadata.annotations.as_mut() {
                    a.remove("kubectl.kubernetes.io/last-applied-configuration");
                }
            }),
        )
        .default_backoff()
        .applied_objects()
        .inspect_err(|e| tracing::warn!(error = %e, kind = "AgentRun", "watch failed; retrying with backoff"))
        .boxed();
        let agents = reflector::reflector(agents_writer, watcher(Api::<Agent>::all(client.clone()), wc.clone()))
            .default_backoff()
            .touched_objects()
            .inspect_err(|e| tracing::warn!(error = %e, kind = "Agent", "watch failed; retrying with backoff"))
            .boxed();
        let grants =
            reflector::reflector(grants_writer, watcher(Api::<DelegationGrant>::all(client.clone()), wc.clone()))
                .default_backoff()
                .touched_objects()
                .inspect_err(
                    |e| tracing::warn!(error = %e, kind = "DelegationGrant", "watch failed; retrying with backoff"),
                )
                .boxed();
        // Only a pod's phase and deletion matter here: keep the cache small.
        let pods = reflector::reflector(
            pods_writer,
            watcher(Api::<PodPhase>::all(client.clone()), children.clone())
                .modify(|pod: &mut PodPhase| keep_identity(&mut pod.metadata)),
        )
        .default_backoff()
        .touched_objects()
        .inspect_err(|e| tracing::warn!(error = %e, kind = "Pod", "watch failed; retrying with backoff"))
        .boxed();
        let secrets = reflector::reflector(
            secrets_writer,
            watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), children.clone())
                .modify(|o| keep_token_number(&mut o.metadata)),
        )
        .default_backoff()
        .touched_objects()
        .inspect_err(|e| tracing::warn!(error = %e, kind = "Secret", "watch failed; retrying with backoff"))
        .boxed();
        let service_accounts = reflector::reflector(
            sa_writer,
            watcher(Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()), children)
                .modify(|o| keep_identity(&mut o.metadata)),
        )
        .default_backoff()
        .touched_objects()
        .inspect_err(|e| tracing::warn!(error = %e, kind = "ServiceAccount", "watch failed; retrying with backoff"))
        .boxed();
        let resource_servers =
            reflector::reflector(rs_writer, watcher(Api::<ResourceServer>::all(client.clone()), wc.clone()))
                .default_backoff()
                .touched_objects()
                .inspect_err(
                    |e| tracing::warn!(error = %e, kind = "ResourceServer", "watch failed; retrying with backoff"),
                )
                .boxed();
        let namespaces = reflector::reflector(
            ns_writer,
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), wc).modify(|o| {
                let m = &mut o.metadata;
                *m = kube::api::ObjectMeta {
                    name: m.name.take(),
                    uid: m.uid.take(),
                    resource_version: m.resource_version.take(),
                    labels: m.labels.take(),
                    ..Default::default()
                };
            }),
        )
        .default_backoff()
        .touched_objects()
        .inspect_err(|e| tracing::warn!(error = %e, kind = "Namespace", "watch failed; retrying with backoff"))
        .boxed();
        Watches {
            stores: Stores {
                agents: agents_store,
                grants: grants_store,
                runs: runs_store,
                pods: pods_store,
                secrets: secrets_store,
                service_accounts: sa_store,
                resource_servers: rs_store,
                namespaces: ns_store,
            },
            runs: detach(runs, run_trigger),
            agents: detach(agents, |a| a),
            grants: detach(grants, |g| g),
            pods: detach(pods, |p| p),
            secrets: detach(secrets, |s| s),
            service_accounts: detach(service_accounts, |s| s),
            resource_servers: detach(resource_servers, |s| s),
            namespaces: detach(namespaces, |s| s),
        }
    }
}

impl Watches {
    /// Keeps the caches current without reconciling (a replica that is not the leader still
    /// serves tokens from them) until `until` resolves; then hands the streams back.
    pub async fn drain_until(mut self, until: impl std::future::Future<Output = ()>) -> Watches {
        {
            let merged = futures::stream::select_all([
                self.runs.by_ref().map(|_| ()).boxed(),
                self.agents.by_ref().map(|_| ()).boxed(),
                self.grants.by_ref().map(|_| ()).boxed(),
                self.pods.by_ref().map(|_| ()).boxed(),
                self.secrets.by_ref().map(|_| ()).boxed(),
                self.service_accounts.by_ref().map(|_| ()).boxed(),
                self.resource_servers.by_ref().map(|_| ()).boxed(),
                self.namespaces.by_ref().map(|_| ()).boxed(),
            ]);
            let drain = merged.for_each(|_| async {});
            tokio::pin!(until);
            tokio::select! {
                _ = until => {}
                _ = drain => {}
            }
        }
        self
    }
}

impl Stores {
    /// Waits until every cache has its initial list.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.runs.wait_until_ready().await?;
        self.agents.wait_until_ready().await?;
        self.grants.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        self.service_accounts.wait_until_ready().await?;
        self.resource_servers.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        Ok(())
    }

    /// The audiences the ResourceServers register for `namespace`, from the caches.
    pub fn registrations(&self, namespace: &str) -> Registrations {
        let ns = self.namespaces.get(&ObjectRef::new(namespace));
        Registrations::for_namespace(
            &self.resource_servers.state(),
            namespace,
            ns.as_ref().and_then(|n| n.metadata.labels.as_ref()),
        )
    }
}

/// Runs the AgentRun controller and the grant/agent status loops until `shutdown` resolves.
pub async fn run(
    client: Client,
    cfg: ControllerConfig,
    keys: Arc<KeyStore>,
    watches: Watches,
    metrics: Arc<Metrics>,
    reporter_instance: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let Watches { stores, runs, agents, grants, pods, secrets, service_accounts, resource_servers, namespaces } =
        watches;
    let events = events::Publisher::new(client.clone(), "deputy", reporter_instance);
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        client: client.clone(),
        cfg,
        keys,
        stores: stores.clone(),
        events,
        metrics,
        failures: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
        held: Mutex::new(HashMap::new()),
        numbered: Mutex::new(HashMap::new()),
        status_triggers: tx,
    });

    // Which runs an Agent, grant or parent change concerns.
    let agent_changed = changed_filter(stores.agents.clone());
    let grant_changed = changed_filter(stores.grants.clone());
    let runs_for_agent = {
        let runs = stores.runs.clone();
        move |agent: Agent| {
            if !agent_changed(&agent) {
                return vec![];
            }
            let (ns, name) = (agent.namespace(), agent.name_any());
            runs.state()
                .into_iter()
                .filter(|r| r.namespace() == ns && r.spec.agent == name)
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        }
    };
    let runs_for_grant = {
        let runs = stores.runs.clone();
        move |g: DelegationGrant| {
            if !grant_changed(&g) {
                return vec![];
            }
            let ns = g.namespace();
            runs.state()
                .into_iter()
                .filter(|r| r.namespace() == ns && r.spec.agent == g.spec.agent && r.spec.principal == g.spec.principal)
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        }
    };
    // A ResourceServer concerns the runs that ask for its audience (its audience may have
    // changed: the runs of the old one are found by the audiences they hold).
    let rs_changed = changed_filter(stores.resource_servers.clone());
    let runs_for_server = {
        let runs = stores.runs.clone();
        move |rs: ResourceServer| {
            if !rs_changed(&rs) {
                return vec![];
            }
            runs.state()
                .into_iter()
                .filter(|r| {
                    r.spec.audiences.contains(&rs.spec.audience)
                        || r.status.as_ref().is_some_and(|s| s.granted_audiences.contains(&rs.spec.audience))
                })
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        }
    };
    // A namespace's labels decide which ResourceServers select it.
    let runs_in_namespace = {
        let runs = stores.runs.clone();
        let seen: Mutex<HashMap<String, Option<std::collections::BTreeMap<String, String>>>> =
            Mutex::new(HashMap::new());
        move |ns: PartialObjectMeta<Namespace>| {
            let name = ns.name_any();
            let changed = match seen.lock() {
                Ok(mut s) => s.insert(name.clone(), ns.metadata.labels.clone()) != Some(ns.metadata.labels.clone()),
                Err(_) => true,
            };
            if !changed {
                return vec![];
            }
            runs.state()
                .into_iter()
                .filter(|r| r.namespace().as_deref() == Some(name.as_str()))
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        }
    };
    let children_of = {
        let runs = stores.runs.clone();
        move |parent: AgentRun| {
            let (ns, name) = (parent.namespace(), parent.name_any());
            runs.state()
                .into_iter()
                .filter(|r| r.namespace() == ns && r.spec.parent_run.as_deref() == Some(name.as_str()))
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        }
    };

    // The runs stream drives both the controller (as its main stream) and the parent→child
    // mapping: split it.
    let (runs_main, runs_parent) = split(runs);

    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let status_loop = grants::status_loop(ctx.clone(), rx, shutdown_tx.subscribe());
    let mut stop = shutdown_tx.subscribe();
    let controller = Controller::for_stream(runs_main, stores.runs.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.cfg.max_concurrent_reconciles))
        .owns_stream(pods)
        .owns_stream(secrets)
        .owns_stream(service_accounts)
        .watches_stream(agents, runs_for_agent)
        .watches_stream(grants, runs_for_grant)
        .watches_stream(resource_servers, runs_for_server)
        .watches_stream(namespaces, runs_in_namespace)
        .watches_stream(runs_parent, children_of)
        // A replica that takes over has already seen every object: reconcile them all once.
        .reconcile_all_on(futures::stream::once({
            let stores = stores.clone();
            async move {
                let _ = stores.wait_until_ready().await;
            }
        }))
        .graceful_shutdown_on(async move {
            let _ = stop.recv().await;
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile stream");
            }
        });
    // The stop is immediate, not graceful: it comes when the process ends or when this
    // replica can no longer be sure it leads, and then no reconcile in flight may go on
    // writing next to the new leader's (each is idempotent: the new leader redoes it).
    let work = async move {
        tokio::join!(controller, status_loop);
    };
    tokio::select! {
        _ = work => {}
        _ = shutdown => {
            let _ = shutdown_tx.send(());
        }
    }
}

/// Of a run's children Deputy reads back only which object it is, whose it is (the owner
/// reference, which also routes its events to the run) and whether it is being deleted. The
/// rest of the metadata (labels, annotations, managed fields) was about 1 KB per object, three
/// objects per run.
fn keep_identity(meta: &mut kube::api::ObjectMeta) {
    *meta = kube::api::ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        owner_references: meta.owner_references.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..Default::default()
    };
}

/// A run's Secret keeps its identity and the number of the token it holds
/// ([`crate::runs::TOKEN_NUMBER_ANNOTATION`]): after a restart, that number is how a token
/// whose status write was lost is counted.
fn keep_token_number(meta: &mut kube::api::ObjectMeta) {
    let number = meta.annotations.as_mut().and_then(|a| a.remove_entry(crate::runs::TOKEN_NUMBER_ANNOTATION));
    keep_identity(meta);
    meta.annotations = number.map(|(k, v)| std::iter::once((k, v)).collect());
}

/// A filter that passes an object when its spec (generation) changed, when it is being
/// deleted, or when it is gone from the cache (deleted) — but not for status-only updates,
/// which Deputy itself makes to grants and agents and which would otherwise re-reconcile
/// every run relying on them.
fn changed_filter<K>(store: Store<K>) -> impl Fn(&K) -> bool + Send + Sync + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let seen: Mutex<HashMap<String, i64>> = Mutex::new(HashMap::new());
    move |obj: &K| {
        let meta = obj.meta();
        let uid = meta.uid.clone().unwrap_or_default();
        let in_cache = store.get(&ObjectRef::from_obj(obj)).is_some();
        if !in_cache || meta.deletion_timestamp.is_some() {
            if let Ok(mut s) = seen.lock() {
                s.remove(&uid);
            }
            return true;
        }
        let generation = meta.generation.unwrap_or(0);
        match seen.lock() {
            Ok(mut s) => s.insert(uid, generation) != Some(generation),
            Err(_) => true,
        }
    }
}

/// Duplicates a stream of results so two consumers each see every item.
type WatchStream<T> = futures::stream::BoxStream<'static, Result<T, watcher::Error>>;

/// Polls a reflector's stream in a task of its own, so that its cache follows the API server
/// however far behind the consumer is. The controller polls its input streams only when it has
/// a free reconcile slot; fed directly, the caches (which the token endpoint reads to refuse a
/// finished run's tokens) would trail the API server by the controller's whole backlog. The
/// consumer reads the same items, through `shrink`, from an unbounded channel; the task ends
/// when the consumer is gone.
fn detach<T: Send + 'static>(mut stream: WatchStream<T>, shrink: fn(T) -> T) -> WatchStream<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                item = stream.next() => {
                    let Some(item) = item else { return };
                    if tx.send(item.map(shrink)).is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed()
}

/// What the controller needs of a run that changed: which run it is (and its parent). The
/// reconcile itself reads the whole run from the cache, so the queue between the cache and a
/// busy controller need not hold the args, env and status of every version it passes on.
fn run_trigger(run: AgentRun) -> AgentRun {
    let AgentRun { mut metadata, spec, .. } = run;
    keep_identity(&mut metadata);
    AgentRun { metadata, spec: crate::resources::AgentRunSpec { args: vec![], env: vec![], ..spec }, status: None }
}

fn split<T: Clone + Send + 'static>(stream: WatchStream<T>) -> (WatchStream<T>, WatchStream<T>) {
    let (tx, rx) = mpsc::unbounded_channel::<T>();
    let first = stream
        .inspect(move |item| {
            if let Ok(obj) = item {
                let _ = tx.send(obj.clone());
            }
        })
        .boxed();
    let second = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok).boxed();
    (first, second)
}

/// An action to requeue after `d`, bounded below by one second.
fn requeue(d: Duration) -> Action {
    Action::requeue(d.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_run_trigger_names_the_same_run_and_carries_no_args_env_or_status() {
        let run: AgentRun = serde_json::from_value(json!({
            "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
            "metadata": {"name": "r1", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                         "labels": {"a": "b"}, "finalizers": ["deputy.dev/cleanup"]},
            "spec": {"agent": "a", "principal": "alice@example.com", "task": "t", "scopes": ["x:y"],
                     "audiences": ["svc"], "maxDuration": "1h", "parentRun": "p1",
                     "args": ["--long"], "env": [{"name": "E", "value": "v"}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        let t = run_trigger(run.clone());
        assert_eq!(ObjectRef::from_obj(&t), ObjectRef::from_obj(&run));
        assert_eq!(t.spec.parent_run.as_deref(), Some("p1"));
        assert!(t.spec.args.is_empty() && t.spec.env.is_empty() && t.status.is_none() && t.metadata.labels.is_none());
    }

    #[test]
    fn a_cached_status_is_behind_when_its_stage_or_rotation_count_is() {
        use crate::resources::{AgentRunStatus, RunPhase};
        let at: jiff::Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let st = |phase: RunPhase, rotations: u32, revoked: bool| AgentRunStatus {
            phase: Some(phase),
            rotations,
            revoked_at: revoked.then_some(at),
            ..Default::default()
        };
        let p = |s: AgentRunStatus| progress_of(Some(&s));
        let cases = [
            // (cached, written, behind)
            (p(st(RunPhase::Pending, 0, false)), p(st(RunPhase::Authorized, 0, false)), true),
            (p(st(RunPhase::Authorized, 0, false)), p(st(RunPhase::Authorized, 0, false)), false),
            // D2: the copy from before a rotation would mint again.
            (p(st(RunPhase::Running, 3, false)), p(st(RunPhase::Running, 4, false)), true),
            (p(st(RunPhase::Authorized, 4, false)), p(st(RunPhase::Running, 4, false)), true),
            // Ending moves the stage on, whatever the count.
            (p(st(RunPhase::Revoked, 4, false)), p(st(RunPhase::Running, 5, false)), false),
            (p(st(RunPhase::Revoked, 4, false)), p(st(RunPhase::Revoked, 4, true)), true),
            (p(st(RunPhase::Denied, 0, false)), p(st(RunPhase::Pending, 0, false)), false),
            (progress_of(None), p(st(RunPhase::Authorized, 0, false)), true),
        ];
        for (i, (cached, written, behind)) in cases.into_iter().enumerate() {
            assert_eq!(cached < written, behind, "case {i}: {cached:?} vs {written:?}");
        }
    }

    #[test]
    fn a_cached_secret_keeps_only_its_identity_and_its_token_number() {
        let annotations = |pairs: &[(&str, &str)]| {
            Some(
                pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            )
        };
        let mut meta = kube::api::ObjectMeta {
            name: Some("deputy-run-a".into()),
            uid: Some("u1".into()),
            resource_version: Some("7".into()),
            annotations: annotations(&[(crate::runs::TOKEN_NUMBER_ANNOTATION, "3"), ("other", "x")]),
            labels: annotations(&[("app", "deputy")]),
            ..Default::default()
        };
        keep_token_number(&mut meta);
        assert_eq!(meta.annotations, annotations(&[(crate::runs::TOKEN_NUMBER_ANNOTATION, "3")]));
        assert_eq!((meta.uid.as_deref(), meta.resource_version.as_deref()), (Some("u1"), Some("7")));
        assert!(meta.labels.is_none());
        assert_eq!(crate::runs::token_number(&meta), 3);
        let mut bare = kube::api::ObjectMeta { name: Some("deputy-run-b".into()), ..Default::default() };
        keep_token_number(&mut bare);
        assert_eq!((bare.annotations, crate::runs::token_number(&kube::api::ObjectMeta::default())), (None, 0));
    }
}
