//! `deputy run`: the controller and the token endpoint in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::authorization::Policy;
use crate::controller::{self, ChildConfig, ControllerConfig, Watches};
use crate::lease;
use crate::metrics::Metrics;
use crate::server::{self, EndpointState, review::Reviewer};
use crate::signing::{self, KeyStore};
use crate::tokens::Alg;
use kube_lease_manager::LeaseManagerBuilder;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The token issuer (`iss`): the public base URL of the token endpoint.
    #[arg(long, env = "DEPUTY_ISSUER", default_value = "https://deputy.deputy-system.svc")]
    pub issuer: String,
    /// The token endpoint URL given to agent pods. Default: `<issuer>/token`.
    #[arg(long, env = crate::runs::contract::ENV_TOKEN_ENDPOINT)]
    pub token_endpoint: Option<String>,
    /// The SPIFFE trust domain of run identities.
    #[arg(long, env = "DEPUTY_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The namespace Deputy runs in (holds the signing-key Secret).
    #[arg(long, env = "POD_NAMESPACE", default_value = "deputy-system")]
    pub namespace: String,
    /// The Secret holding the signing keys (created if absent).
    #[arg(long, env = "DEPUTY_KEYS_SECRET", default_value = "deputy-signing-keys")]
    pub keys_secret: String,
    /// Signature algorithm for new keys: EdDSA or ES256.
    #[arg(long, env = "DEPUTY_SIGNING_ALG", default_value = "EdDSA")]
    pub signing_alg: String,
    /// Rotate the signing key when it is this old (e.g. 720h).
    #[arg(long, env = "DEPUTY_KEY_ROTATION", default_value = "720h")]
    pub key_rotation: String,
    /// No token lives longer than this.
    #[arg(long, env = "DEPUTY_MAX_TOKEN_TTL", default_value = "1h")]
    pub max_token_ttl: String,
    /// Token lifetime of a run that does not ask for one.
    #[arg(long, env = "DEPUTY_DEFAULT_TOKEN_TTL", default_value = "10m")]
    pub default_token_ttl: String,
    /// No run lasts longer than this.
    #[arg(long, env = "DEPUTY_MAX_RUN_DURATION", default_value = "24h")]
    pub max_run_duration: String,
    /// Address of the token endpoint.
    #[arg(long, env = "DEPUTY_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "DEPUTY_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// TLS certificate (PEM) for the token endpoint; reloaded when it changes.
    #[arg(long, env = "DEPUTY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the token endpoint.
    #[arg(long, env = "DEPUTY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name of this replica (for Events); usually the pod name.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// The coordination.k8s.io Lease (in --namespace) that elects the one replica which
    /// reconciles; every replica serves tokens.
    #[arg(long = "leader-election-lease", env = "DEPUTY_LEASE", default_value = "deputy-controller")]
    pub lease: String,
    /// How long a leader's Lease lasts without renewal: the longest hand-over after a leader
    /// dies. It renews a third of this before the end.
    #[arg(long = "leader-election-lease-duration", env = "DEPUTY_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: String,
    /// At most this many TokenReviews per second (burst: twice this), whatever clients send;
    /// beyond it a request that needs a review gets 429 with Retry-After.
    #[arg(long, env = "DEPUTY_TOKEN_REVIEWS_PER_SECOND", default_value_t = 100)]
    pub token_reviews_per_second: u32,
    /// At most this many TokenReviews in flight.
    #[arg(long, env = "DEPUTY_TOKEN_REVIEWS_IN_FLIGHT", default_value_t = 32)]
    pub token_reviews_in_flight: usize,
    /// Review introspection bearers that are not JWTs (opaque tokens of a webhook
    /// authenticator); by default they are refused without a review.
    #[arg(long, env = "DEPUTY_REVIEW_OPAQUE_TOKENS")]
    pub review_opaque_tokens: bool,
    /// Open connections at most, on each of the token and admin ports (keep it below the
    /// process's file-descriptor limit); beyond it a connection gets 429.
    #[arg(long, env = "DEPUTY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Open connections at most from one source address.
    #[arg(long, env = "DEPUTY_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 256)]
    pub max_connections_per_source: usize,
    /// How long a client may take to send a request's headers (also the idle timeout of a
    /// kept-alive connection).
    #[arg(long, env = "DEPUTY_HTTP_HEADER_TIMEOUT", default_value = "10s")]
    pub http_header_timeout: String,
    /// How long a request may take in all, its body included (then 408).
    #[arg(long, env = "DEPUTY_HTTP_REQUEST_TIMEOUT", default_value = "30s")]
    pub http_request_timeout: String,
    /// How often the TLS files are checked for a change (they are reloaded when they change).
    #[arg(long, env = "DEPUTY_TLS_RELOAD_INTERVAL", default_value = "5s")]
    pub tls_reload_interval: String,
    /// How many runs are reconciled at once (0: unbounded).
    #[arg(long, env = "DEPUTY_MAX_CONCURRENT_RECONCILES", default_value_t = 32)]
    pub max_concurrent_reconciles: u16,
    /// Log format on stderr: text or json. Audit lines always go to stdout as JSON.
    #[arg(long, env = "DEPUTY_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

fn dur(name: &str, v: &str) -> Result<jiff::SignedDuration, String> {
    crate::duration::parse(v).map_err(|e| format!("--{name}: {e}"))
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}

async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs until SIGTERM/SIGINT. Returns the exit code.
pub async fn run(args: RunArgs) -> i32 {
    init_logging(&args.log_format);
    match run_inner(args).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "deputy stopped");
            eprintln!("error: {e}");
            1
        }
    }
}

async fn run_inner(args: RunArgs) -> Result<(), String> {
    let alg: Alg = args.signing_alg.parse().map_err(|e| format!("--signing-alg: {e}"))?;
    let policy = Policy {
        trust_domain: args.trust_domain.clone(),
        max_token_ttl: dur("max-token-ttl", &args.max_token_ttl)?,
        default_token_ttl: dur("default-token-ttl", &args.default_token_ttl)?,
        max_run_duration: dur("max-run-duration", &args.max_run_duration)?,
        deputy_namespace: Some(args.namespace.clone()),
    };
    let rotation = dur("key-rotation", &args.key_rotation)?;
    let lease_seconds = lease_seconds(&args.lease_duration)?;
    let http = server::listen::HttpLimits {
        max_connections: args.max_connections,
        max_per_source: args.max_connections_per_source,
        header_timeout: dur("http-header-timeout", &args.http_header_timeout)?.unsigned_abs(),
        request_timeout: dur("http-request-timeout", &args.http_request_timeout)?.unsigned_abs(),
    };
    let reload_every = dur("tls-reload-interval", &args.tls_reload_interval)?
        .unsigned_abs()
        .max(std::time::Duration::from_millis(100));
    // A retired key stays published this long: the longest token plus the verifiers' leeway.
    let lifetime = policy.max_token_ttl
        + jiff::SignedDuration::from_secs(i64::try_from(crate::tokens::verify::DEFAULT_LEEWAY_SECS).unwrap_or(30));
    let issuer = args.issuer.trim_end_matches('/').to_string();
    let token_endpoint = args.token_endpoint.clone().unwrap_or_else(|| format!("{issuer}/token"));

    let mut kube_config = kube::Config::infer().await.map_err(|e| format!("Kubernetes client configuration: {e}"))?;
    // Name ourselves in the API server's audit log.
    kube_config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("deputy/", env!("CARGO_PKG_VERSION"))),
    ));
    let client = kube::Client::try_from(kube_config).map_err(|e| format!("connecting to Kubernetes: {e}"))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let material = signing::load_or_create(&secrets, &issuer, &args.namespace, &args.keys_secret, alg)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(kid = %material.set.active().kid, "signing keys loaded");
    let keys = Arc::new(KeyStore::new(&issuer, material));
    let metrics = Arc::new(Metrics::new());
    let watches = Watches::new(&client);
    let stores = watches.stores.clone();
    let ready = Arc::new(AtomicBool::new(false));
    let state = Arc::new(EndpointState {
        keys: keys.clone(),
        runs: stores.runs.clone(),
        pods: stores.pods.clone(),
        service_accounts: stores.service_accounts.clone(),
        resource_servers: stores.resource_servers.clone(),
        namespaces: stores.namespaces.clone(),
        reviewer: Reviewer::new(
            client.clone(),
            metrics.clone(),
            server::review::ReviewLimits {
                per_second: args.token_reviews_per_second,
                in_flight: args.token_reviews_in_flight,
                opaque_tokens: args.review_opaque_tokens,
            },
        ),
        metrics: metrics.clone(),
        client: client.clone(),
        issuer: issuer.clone(),
        ready: ready.clone(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    let _ = stop_tx.send(true);
                    return;
                }
            };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    // Readiness: caches synced and keys loaded (they are, by now). Exactly one task waits on
    // the stores: kube-runtime's `Store::wait_until_ready` wakes only the most recent of
    // several concurrent waiters (its DelayedInit keeps one waker), so everyone else waits on
    // this channel instead.
    let (synced_tx, synced_rx) = watch::channel(false);
    {
        let stores = stores.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            if stores.wait_until_ready().await.is_ok() {
                ready.store(true, Ordering::Release);
                let _ = synced_tx.send(true);
                tracing::info!("caches synced; ready");
            }
        });
    }
    // Active-runs gauge.
    {
        let runs = stores.runs.clone();
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! { _ = tick.tick() => {}, _ = stop.wait_for(|s| *s) => return }
                let n = runs.state().iter().filter(|r| crate::runs::is_active(r)).count();
                metrics.active_runs.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        });
    }
    // Keep the keys current on every replica: reload on every change of the Secret (another
    // replica may have rotated), write it back if it is deleted or broken, and stop publishing
    // and trusting a retired key at its `publishUntil`.
    tokio::spawn(watch_keys(
        keys.clone(),
        secrets.clone(),
        args.namespace.clone(),
        args.keys_secret.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(prune_keys(keys.clone(), stop_rx.clone()));
    // Servers.
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .map_err(|e| format!("binding {}: {e}", args.admin_listen))?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("binding {}: {e}", args.listen))?;
    tracing::info!(token = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
    // The admin port has its own listener and limits: load on the token port cannot starve
    // the probes.
    let admin_task = tokio::spawn(server::listen::serve(
        admin,
        None,
        server::admin_router(state.clone()),
        http,
        shutdown_signal(stop_rx.clone()),
    ));
    let router = server::router(state.clone());
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let resolver = Arc::new(
                server::tls::ReloadingCert::new(cert.clone(), key.clone(), reload_every).map_err(|e| e.to_string())?,
            );
            Some(server::tls::server_config(resolver))
        }
        _ => {
            tracing::warn!("the token endpoint serves plain HTTP: pass --tls-cert and --tls-key in production");
            None
        }
    };
    let token_task = tokio::spawn(server::listen::serve(listener, tls, router, http, shutdown_signal(stop_rx.clone())));

    // Leader election: one replica reconciles, every replica serves tokens. Until elected,
    // a replica only keeps its caches current.
    let identity = args.instance.clone().unwrap_or_else(|| format!("deputy-{}", uuid::Uuid::new_v4()));
    // Renewed half-way: a renewal has half the lease to land before the leader gives up.
    let grace_seconds = (lease_seconds / 2).max(1);
    let lease = LeaseManagerBuilder::new(client.clone(), &args.lease)
        .with_namespace(&args.namespace)
        .with_identity(&identity)
        .with_duration(lease_seconds)
        .with_grace(grace_seconds)
        .build()
        .await
        .map_err(|e| format!("leader election on Lease {}/{}: {e}", args.namespace, args.lease))?;
    let (mut leader, lease_task) = lease.watch().await;
    // The lease manager does not notice renewals that fail: the leader checks its Lease
    // itself, and steps down before another replica may take it (see `lease`).
    let (margin, every) =
        lease::timings(std::time::Duration::from_secs(lease_seconds), std::time::Duration::from_secs(grace_seconds));
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &args.namespace);
    let mut confirmed = None;
    let mut stop = stop_rx.clone();
    let elected = tokio::select! {
        w = watches.drain_until({
            let mut synced = synced_rx.clone();
            let leader = &mut leader;
            let confirmed = &mut confirmed;
            let (api, name, me) = (&lease_api, &args.lease, &identity);
            async move {
                // Hand the streams to the controller only once the caches are full, so that
                // its first pass sees every object.
                let _ = synced.wait_for(|s| *s).await;
                loop {
                    let _ = leader.wait_for(|l| *l).await;
                    // Elected, and leader once a read of the Lease shows it ours and live.
                    let lost = async {
                        if leader.wait_for(|l| !*l).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        until = lease::confirm(api, name, me, margin, every) => {
                            *confirmed = Some(until);
                            break;
                        }
                        _ = lost => {}
                    }
                }
            }
        }) => Some(w),
        _ = stop.wait_for(|s| *s) => None,
    };
    let mut lost = false;
    if let Some(watches) = elected.filter(|_| !*stop_rx.borrow()) {
        tracing::info!(identity = %identity, "elected leader; reconciling");
        // What only the leader does stops when it stops leading, not only with the process.
        let (leading_tx, leading_stop) = watch::channel(false);
        spawn_key_rotation(
            keys.clone(),
            secrets,
            args.namespace.clone(),
            args.keys_secret.clone(),
            alg,
            rotation,
            lifetime,
            leading_stop,
        );
        let cfg = ControllerConfig {
            policy,
            children: ChildConfig { issuer: issuer.clone(), token_endpoint },
            max_backoff: std::time::Duration::from_secs(300),
            max_concurrent_reconciles: args.max_concurrent_reconciles,
            clock: controller::Clock::system(),
        };
        let mut stop = stop_rx.clone();
        let mut still_leader = leader.clone();
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let until = confirmed.unwrap_or_else(jiff::Timestamp::now);
        let lease_api = lease_api.clone();
        let (lease_name, me) = (args.lease.clone(), identity.clone());
        // A task of its own: the controller's stop signal must be Sync, a client call is not.
        let mut watchdog =
            tokio::spawn(async move { lease::watch(lease_api, &lease_name, &me, until, margin, every).await });
        let ended = async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = still_leader.wait_for(|l| !*l) => {
                    tracing::error!("lost the leader lease; stopping so that another replica reconciles");
                    let _ = lost_tx.send(true);
                }
                lost = &mut watchdog => {
                    let reason = lost.map_or_else(|e| format!("the lease check stopped: {e}"), |l| l.to_string());
                    tracing::error!(%reason, "cannot be sure of the leader lease; stopping before another replica may take it");
                    let _ = lost_tx.send(true);
                }
            }
            watchdog.abort();
            let _ = leading_tx.send(true);
        };
        controller::run(client.clone(), cfg, keys, watches, metrics, args.instance.clone(), ended).await;
        lost = *lost_rx.borrow_and_update();
    }
    drop(leader);
    lease_task.abort();
    if lost {
        // The caches stopped with the controller. A lease is lost when the API server cannot
        // be reached (or another replica took over): while it cannot, nothing there changes,
        // so this replica's endpoint keeps answering from its caches (a restart now would fail
        // to load the keys and serve nothing). Once the API server answers, the process ends,
        // to start afresh as a follower with live caches.
        tracing::error!(
            "lost the leader lease; serving tokens from the caches until the API server answers, then exiting"
        );
        wait_for_api_server(&client, stop_rx.clone()).await;
        return Err("leader lease lost".into());
    }
    let _ = token_task.await;
    let _ = admin_task.await;
    Ok(())
}

/// Returns once the API server answers (or the process is asked to stop).
async fn wait_for_api_server(client: &kube::Client, mut stop: watch::Receiver<bool>) {
    loop {
        let asked = tokio::time::timeout(std::time::Duration::from_secs(5), client.apiserver_version());
        if matches!(asked.await, Ok(Ok(_))) || *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The lease duration in whole seconds: at least 2 (so that the renewal, half-way, comes
/// after the lease was taken, and the grace is shorter than the lease, as kube-lease-manager
/// requires).
fn lease_seconds(v: &str) -> Result<u64, String> {
    let d = dur("leader-election-lease-duration", v)?;
    match u64::try_from(d.as_secs()) {
        Ok(s) if s >= 2 => Ok(s),
        _ => Err(format!("--leader-election-lease-duration: {v} is shorter than 2s")),
    }
}

/// Follows the signing-key Secret: reloads the keys when it changes, writes the keys in memory
/// back when it is deleted or unusable.
async fn watch_keys(
    keys: Arc<KeyStore>,
    secrets: Api<Secret>,
    ns: String,
    name: String,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(secrets.clone(), cfg).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            item = stream.next() => match item {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the signing-key Secret");
                    continue;
                }
                None => return,
            },
        };
        let (secret, gone) = match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => (s, false),
            watcher::Event::Delete(s) => (s, true),
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        let reloaded = if gone { None } else { Some(keys.reload_from(&secret)) };
        match reloaded {
            Some(Ok(true)) => tracing::info!(kid = %keys.get().set.active().kid, "signing keys reloaded"),
            Some(Ok(false)) => {}
            // Deleted or unusable: keep the keys in memory and write them back, so that
            // no token is invalidated and a restarting replica finds them.
            broken => {
                let why = match &broken {
                    Some(Err(e)) => format!("unusable ({e})"),
                    _ => "deleted".to_string(),
                };
                let current = (!gone).then_some(&secret);
                match signing::restore(&secrets, &keys, &ns, &name, current).await {
                    Ok(true) => {
                        tracing::warn!(secret = %name, "the signing-key Secret was {why}; it was written back from the keys in memory")
                    }
                    Ok(false) => {
                        tracing::info!(secret = %name, "the signing-key Secret was {why}; another replica wrote it back")
                    }
                    Err(e) => {
                        tracing::error!(secret = %name, error = %e, "the signing-key Secret was {why} and could not be written back; keeping the keys in memory")
                    }
                }
            }
        }
    }
}

/// Stops publishing and trusting retired keys at their `publishUntil` (checked every 10 s).
async fn prune_keys(keys: Arc<KeyStore>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! { _ = tick.tick() => {}, _ = stop.wait_for(|s| *s) => return }
        match keys.prune(jiff::Timestamp::now()) {
            Ok(true) => {
                tracing::info!("retired signing keys past their publication are no longer published or trusted")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "pruning retired signing keys"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_key_rotation(
    keys: Arc<KeyStore>,
    secrets: Api<Secret>,
    ns: String,
    name: String,
    alg: Alg,
    every: jiff::SignedDuration,
    lifetime: jiff::SignedDuration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! { _ = tick.tick() => {}, _ = stop.wait_for(|s| *s) => return }
            if let Err(e) = signing::rotate_if_due(&secrets, &keys, &ns, &name, alg, every, lifetime).await {
                tracing::warn!(error = %e, "key rotation check failed");
            }
        }
    });
}
