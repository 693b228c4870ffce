//! A small, stateful Kubernetes API server for tests.
//!
//! Generic object store with real resourceVersions, watches (with history, bookmarks, 410
//! Gone), CRD registration and discovery, status subresources, finalizers, owner-reference
//! garbage collection, merge/JSON/approximate-strategic patches, approximate server-side apply,
//! and TokenRequest/TokenReview. See `README.md` for what differs from a real API server.

mod apply;
mod error;
mod resources;
mod routes;
mod selectors;
mod store;
mod tokens;
mod watch;

pub use error::ApiError;
pub use tokens::{API_AUDIENCE, TokenSpec, UserInfo};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The bearer token written into kubeconfigs. The server accepts every request whatever its
/// credentials; this token also passes a TokenReview as an admin user.
pub const ADMIN_TOKEN: &str = "deputy-testapi-admin-token";

/// Request counts: resource (`pods`, `pods/status`, `tokenreviews`, ...) -> verb
/// (`GET`, `LIST`, `WATCH`, `CREATE`, `UPDATE`, `PATCH`, `DELETE`, `DELETECOLLECTION`) -> count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats(pub BTreeMap<String, BTreeMap<String, u64>>);

impl Stats {
    pub fn count(&self, resource: &str, verb: &str) -> u64 {
        self.0.get(resource).and_then(|v| v.get(verb)).copied().unwrap_or(0)
    }
}

/// A running test API server. Dropping it stops the server.
pub struct TestApiServer {
    shared: store::Shared,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Serve the API on an already bound listener until the future is dropped or fails.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let shared = new_shared();
    serve_shared(listener, shared).await
}

fn new_shared() -> store::Shared {
    let mut state = store::State::new(store::DEFAULT_HISTORY_LIMIT);
    let admin = UserInfo {
        username: "deputy-test-admin".into(),
        uid: "deputy-test-admin".into(),
        groups: vec!["system:masters".into(), "system:authenticated".into()],
        extra: BTreeMap::new(),
    };
    state.register_token(ADMIN_TOKEN.into(), admin, vec![], None);
    Arc::new(Mutex::new(state))
}

async fn serve_shared(listener: TcpListener, shared: store::Shared) -> std::io::Result<()> {
    let addr = listener.local_addr()?.to_string();
    let app = routes::App { shared, addr };
    let router = axum::Router::new().fallback(routes::handle).with_state(app);
    axum::serve(listener, router).await
}

impl TestApiServer {
    /// Bind `127.0.0.1:0` and serve in a background task.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Bind `addr` and serve in a background task.
    pub async fn start_on(addr: &str) -> std::io::Result<Self> {
        let listener = match addr.parse::<SocketAddr>() {
            Ok(a) => TcpListener::bind(a).await?,
            Err(_) => TcpListener::bind(addr).await?,
        };
        let addr = listener.local_addr()?;
        let shared = new_shared();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                if let Err(e) = serve_shared(listener, shared).await {
                    tracing::error!(error = %e, "test API server stopped");
                }
            }
        });
        Ok(TestApiServer { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (context `deputy-test`, bearer token [`ADMIN_TOKEN`]).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, store::State> {
        store::lock(&self.shared)
    }

    pub fn stats(&self) -> Stats {
        Stats(self.state().stats.clone())
    }

    /// Request counts of clients whose `User-Agent` starts with `prefix`.
    pub fn stats_for_user_agent(&self, prefix: &str) -> Stats {
        let st = self.state();
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (_, per) in st.stats_by_agent.iter().filter(|(a, _)| a.starts_with(prefix)) {
            for (res, verbs) in per {
                for (verb, n) in verbs {
                    *out.entry(res.clone()).or_default().entry(verb.clone()).or_default() += n;
                }
            }
        }
        Stats(out)
    }

    pub fn reset_stats(&self) {
        let mut st = self.state();
        st.stats.clear();
        st.stats_by_agent.clear();
    }

    /// How many TokenReviews have been answered.
    pub fn token_reviews(&self) -> u64 {
        self.stats().count("tokenreviews", "CREATE")
    }

    /// Make the next `n` writes (create/update/patch/delete) to `resource` fail with `code`
    /// (409 gives a real Conflict status). `resource` is a plural (`leases`, `foos`) or a
    /// subresource (`foos/status`); a plural also matches its subresources.
    pub fn fail_next_writes(&self, resource: &str, n: u32, code: u16) {
        self.state().faults.insert(resource.to_string(), (n, code));
    }

    /// Let `user` do `verb` on `resource` in API group `group`, as SubjectAccessReviews answer
    /// (nothing is allowed otherwise).
    pub fn allow(&self, user: &str, group: &str, resource: &str, verb: &str) {
        self.state().allowed.insert((user.into(), group.into(), resource.into(), verb.into()));
    }

    /// Make watches of `resource` (a plural) see each event `delay` after it happened, as a
    /// watch cache behind the API server does; `Duration::ZERO` ends it. Reads are not delayed.
    pub fn delay_watch(&self, resource: &str, delay: std::time::Duration) {
        let mut st = self.state();
        if delay.is_zero() {
            st.watch_delays.remove(resource);
        } else {
            st.watch_delays.insert(resource.to_string(), delay);
        }
    }

    /// Starts (`true`) or ends an outage: while it lasts every API request is answered 503, as
    /// by an API server that lost its etcd, and every open watch ends (the clients' re-watches
    /// are answered 503 too). The objects are kept.
    pub fn outage(&self, down: bool) {
        let mut st = self.state();
        st.down = down;
        let rv = st.rv;
        // Wakes every watch, so that it sees the outage.
        st.notify.send_replace(rv);
    }

    /// Issue a service-account token directly (like a TokenRequest, but the service account
    /// need not exist yet; if it does, the token is bound to its current uid).
    pub fn issue_token(&self, spec: TokenSpec) -> String {
        self.state().issue_token(&spec).0
    }

    /// Register a token for an arbitrary user. Empty `audiences` means [`API_AUDIENCE`].
    pub fn register_token(
        &self,
        token: &str,
        user: UserInfo,
        audiences: Vec<String>,
        expires_at: Option<jiff::Timestamp>,
    ) {
        self.state().register_token(token.to_string(), user, audiences, expires_at);
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    /// Forget the watch history: a watch from any resourceVersion before now gets 410 Gone.
    pub fn compact_history(&self) {
        self.state().compact();
    }

    /// Set how many events the watch history keeps (default 10,000).
    pub fn set_history_limit(&self, n: usize) {
        let mut st = self.state();
        st.history_limit = n.max(1);
        while st.history.len() > st.history_limit {
            if let Some(e) = st.history.pop_front() {
                st.compacted = e.rv;
            }
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: deputy-test
  cluster:
    server: {url}
users:
- name: deputy-test-admin
  user:
    token: {ADMIN_TOKEN}
contexts:
- name: deputy-test
  context:
    cluster: deputy-test
    user: deputy-test-admin
    namespace: default
current-context: deputy-test
"
    )
}
