//! End-to-end test support: a Kubernetes API, the CRDs, and the real `deputy run` process.
//!
//! Two backends, chosen by `DEPUTY_E2E_BACKEND` (see [`backend`]): the project's test API
//! server (`testapi`, the default, one per test), or a real control plane (`kube`: etcd,
//! kube-apiserver and kube-controller-manager built from the Kubernetes Go modules, one per
//! test binary, a fresh namespace per test, tests run one at a time). On both the tests play
//! the kubelet: they patch pod status and request pod-bound service-account tokens.
//!
//! On the real backend the operator runs as it does in a cluster: with a token of its own
//! ServiceAccount, bound to exactly the RBAC the Helm chart renders, and any request of its
//! that the API server refuses with 403 fails the test.
// The real backend's tests hold a std MutexGuard for the whole test on purpose (one test at a
// time on the shared cluster; each test has its own runtime, so no await can deadlock on it).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

pub mod kube_backend;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deputy::resources::{Agent, AgentRun, DelegationGrant};
use deputy_testapi::{TestApiServer, TokenSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Resource};
use serde_json::{Value, json};

/// The operator's namespace on the test API server (on the real backend each test has its own:
/// [`Env::operator_ns`]).
pub const OPERATOR_NS: &str = "deputy-system";

/// Which API server the end-to-end tests talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The project's test API server (`testapi/`).
    TestApi,
    /// A real control plane built from the Kubernetes Go modules.
    Kube,
}

/// `DEPUTY_E2E_BACKEND=testapi` (default) or `kube`; anything else is a test failure, not a
/// silent fallback.
pub fn backend() -> Backend {
    match std::env::var("DEPUTY_E2E_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("testapi") => Backend::TestApi,
        Ok("kube") => Backend::Kube,
        Ok(other) => panic!("DEPUTY_E2E_BACKEND={other}: expected testapi or kube"),
    }
}

/// Requests by resource (`secrets`, `agentruns/status`) and lower-case RBAC verb (`get`,
/// `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`).
pub type Requests = BTreeMap<String, BTreeMap<String, u64>>;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The running `deputy run` process; killed on drop.
pub struct Operator {
    pub child: Child,
    pub audit: Arc<Mutex<Vec<Value>>>,
    pub log: PathBuf,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The leader-election lease of every operator the suites start (production: 15 s).
pub const LEASE_DURATION: &str = "4s";

pub struct Env {
    /// The test API server (testapi backend only).
    pub api: Option<TestApiServer>,
    /// The real control plane (kube backend only).
    pub cluster: Option<&'static deputy_controlplane::ControlPlane>,
    /// A client for the test itself: the test API server's, or the real cluster's admin.
    pub client: Client,
    /// The kubeconfig the operator runs with: on the real backend its ServiceAccount's token.
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    pub ns: String,
    /// The operator's own namespace (signing keys, Lease).
    pub operator_ns: String,
    pub port: u16,
    pub admin_port: u16,
    pub operator: Option<Operator>,
    pub extra_args: Vec<String>,
    /// Held for the whole test on the real backend: its tests share one cluster, and each
    /// operator reconciles every namespace, so they run one at a time. Dropped last.
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Stop the operator before the check, so nothing is written after it.
        self.operator = None;
        let Some(cp) = self.cluster else { return };
        let forbidden = kube_backend::forbidden_requests(cp, &self.operator_user());
        kube_backend::remove_namespaces_blocking(cp, vec![self.ns.clone(), self.operator_ns.clone()]);
        if !std::thread::panicking() {
            assert!(forbidden.is_empty(), "the API server refused the operator (403): {forbidden:#?}");
        }
    }
}

pub async fn client_for(path: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(cfg).unwrap()
}

impl Env {
    /// An API with the CRDs installed and a namespace for this test, and a running operator.
    pub async fn start() -> Env {
        let mut env = Env::api_only().await;
        env.start_operator().await;
        env
    }

    /// An API with the CRDs and the test namespace, without the operator.
    pub async fn api_only() -> Env {
        let dir = std::env::temp_dir().join(format!("deputy-e2e-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let suffix = uuid::Uuid::new_v4().to_string()[..8].to_string();
        let ns = format!("e2e-{suffix}");
        let (api, cluster, client, kubeconfig, operator_ns, serial) = match backend() {
            Backend::TestApi => {
                let api = TestApiServer::start().await.unwrap();
                let kubeconfig = dir.join("kubeconfig");
                api.write_kubeconfig(&kubeconfig).unwrap();
                let client = client_for(&kubeconfig).await;
                let namespaces: Api<Namespace> = Api::all(client.clone());
                let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": OPERATOR_NS}})).unwrap();
                namespaces.create(&PostParams::default(), &obj).await.unwrap();
                (Some(api), None, client, kubeconfig, OPERATOR_NS.to_string(), None)
            }
            Backend::Kube => {
                let serial = kube_backend::serial();
                let cp = kube_backend::control_plane();
                let client = client_for(&cp.admin_kubeconfig()).await;
                let operator_ns = format!("deputy-{suffix}");
                kube_backend::remove_earlier_tests(&client).await;
                let kubeconfig = kube_backend::install_operator_identity(cp, &client, &operator_ns, &dir).await;
                (None, Some(cp), client, kubeconfig, operator_ns, Some(serial))
            }
        };
        let env = Env {
            api,
            cluster,
            client,
            kubeconfig,
            dir,
            ns: ns.clone(),
            operator_ns,
            port: free_port(),
            admin_port: free_port(),
            operator: None,
            extra_args: vec![],
            _serial: serial,
        };
        let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
        for crd in deputy::resources::crds() {
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(&name, &PatchParams::apply("deputy-e2e").force(), &Patch::Apply(&crd)).await.unwrap();
        }
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        let obj: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": {kube_backend::E2E_LABEL: "true"}}}))
                .unwrap();
        namespaces.create(&PostParams::default(), &obj).await.unwrap();
        // A real API server serves a new CRD once it is Established.
        let ok = wait_until(Duration::from_secs(30), || async {
            Api::<AgentRun>::namespaced(env.client.clone(), &env.ns).list(&Default::default()).await.is_ok()
                && Api::<Agent>::namespaced(env.client.clone(), &env.ns).list(&Default::default()).await.is_ok()
                && Api::<DelegationGrant>::namespaced(env.client.clone(), &env.ns)
                    .list(&Default::default())
                    .await
                    .is_ok()
        })
        .await;
        assert!(ok, "the CRDs were not served within 30 s");
        env
    }

    pub fn backend(&self) -> Backend {
        if self.cluster.is_some() { Backend::Kube } else { Backend::TestApi }
    }

    /// The operator's Kubernetes identity on the real backend.
    pub fn operator_user(&self) -> String {
        format!("system:serviceaccount:{}:deputy", self.operator_ns)
    }

    pub fn is_test_api(&self) -> bool {
        self.api.is_some()
    }

    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// Starts `deputy run` and waits until it is ready.
    pub async fn start_operator(&mut self) {
        let op = self.spawn_operator(self.port, self.admin_port, "deputy-e2e").await;
        self.operator = Some(op);
    }

    /// Starts another `deputy run` process on the given ports (for leader-election tests)
    /// and waits until it is ready.
    pub async fn spawn_operator(&self, port: u16, admin_port: u16, instance: &str) -> Operator {
        self.spawn_operator_via(port, admin_port, instance, &self.kubeconfig).await
    }

    /// Like [`Env::spawn_operator`], with another kubeconfig (one through a [`Partition`]).
    pub async fn spawn_operator_via(
        &self,
        port: u16,
        admin_port: u16,
        instance: &str,
        kubeconfig: &std::path::Path,
    ) -> Operator {
        let log = self.dir.join(format!("operator-{instance}-{}.log", uuid::Uuid::new_v4()));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_deputy"))
            .arg("run")
            .args(["--issuer", &self.token_url()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--namespace", &self.operator_ns])
            .args(["--instance", instance])
            // Short fixed waits, so the suites do not sleep through production defaults.
            .args(["--leader-election-lease-duration", LEASE_DURATION])
            .args(["--tls-reload-interval", "1s"])
            .args(&self.extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,deputy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let audit = Arc::new(Mutex::new(vec![]));
        let stdout = child.stdout.take().unwrap();
        {
            let audit = audit.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        audit.lock().unwrap().push(v);
                    }
                }
            });
        }
        let mut op = Operator { child, audit, log: log.clone() };
        let ready = format!("http://127.0.0.1:{admin_port}/readyz");
        let ok = wait_until(Duration::from_secs(30), || async {
            deputy::http_client::get(&ready, Duration::from_secs(2)).await.is_ok_and(|r| r.status == 200)
        })
        .await;
        if !ok {
            let exited = op.child.try_wait().ok().flatten();
            panic!(
                "operator not ready (process exited: {exited:?}); readyz: {:?}; log:\n{}",
                deputy::http_client::get(&ready, Duration::from_secs(2)).await.map(|r| (r.status, r.body)),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        op
    }

    /// Kills the operator at once (SIGKILL), as a crash would.
    pub fn kill_operator(&mut self) {
        self.operator = None;
    }

    pub fn operator_log(&self) -> String {
        self.operator.as_ref().map(|o| std::fs::read_to_string(&o.log).unwrap_or_default()).unwrap_or_default()
    }

    /// The audit lines written so far.
    pub fn audit(&self) -> Vec<Value> {
        self.operator.as_ref().map(|o| o.audit.lock().unwrap().clone()).unwrap_or_default()
    }

    pub fn runs(&self) -> Api<AgentRun> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn grants(&self) -> Api<DelegationGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn agents(&self) -> Api<Agent> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn api<K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Applies every document of a YAML stream into this test's namespace (Namespace
    /// documents are skipped).
    pub async fn apply_yaml(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() || v["kind"] == "Namespace" {
                continue;
            }
            if v["kind"] == "ResourceServer" {
                // Cluster-scoped: the example's registration, for this test's namespace only.
                let name = format!("{}-{}", v["metadata"]["name"].as_str().unwrap(), self.ns);
                v["metadata"]["name"] = json!(name);
                v["spec"]["namespaceSelector"] =
                    json!({"matchLabels": {deputy::registration::NAMESPACE_NAME_LABEL: self.ns}});
            } else {
                v["metadata"]["namespace"] = json!(self.ns);
            }
            self.apply_value(v).await;
        }
    }

    /// Registers `audience` for this test's namespace with these scopes (a ResourceServer).
    pub async fn register(&self, audience: &str, scopes: &[&str]) {
        self.apply_value(json!({
            "apiVersion": "deputy.dev/v1alpha1", "kind": "ResourceServer",
            "metadata": {"name": format!("{audience}-{}", self.ns)},
            "spec": {"audience": audience, "scopes": scopes,
                     "namespaceSelector": {"matchLabels": {deputy::registration::NAMESPACE_NAME_LABEL: self.ns}}},
        }))
        .await;
    }

    pub async fn apply_value(&self, mut v: Value) {
        if v["kind"] == "ResourceServer" {
            // Cluster-scoped, so outside the namespace the test removes: labelled for removal.
            v["metadata"]["labels"][kube_backend::E2E_LABEL] = json!("true");
            let obj: DynamicObject = serde_json::from_value(v).unwrap();
            let name = obj.metadata.name.clone().unwrap();
            let ar = ApiResource::erase::<deputy::resources::ResourceServer>(&());
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            api.patch(&name, &PatchParams::apply("deputy-e2e").force(), &Patch::Apply(&obj)).await.unwrap();
            return;
        }
        let ar = match v["kind"].as_str().unwrap() {
            "Agent" => ApiResource::erase::<Agent>(&()),
            "DelegationGrant" => ApiResource::erase::<DelegationGrant>(&()),
            "AgentRun" => ApiResource::erase::<AgentRun>(&()),
            other => panic!("apply_yaml: unexpected kind {other}"),
        };
        let obj: DynamicObject = serde_json::from_value(v).unwrap();
        let name = obj.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &self.ns, &ar);
        api.patch(&name, &PatchParams::apply("deputy-e2e").force(), &Patch::Apply(&obj)).await.unwrap();
    }

    /// Applies the examples of `examples/<file>` into this namespace.
    pub async fn apply_example(&self, file: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
        self.apply_yaml(&std::fs::read_to_string(path).unwrap()).await;
    }

    /// Waits until the run satisfies `pred`; panics with its status and the operator log
    /// after `timeout`.
    pub async fn wait_run(&self, name: &str, timeout: Duration, pred: impl Fn(&AgentRun) -> bool) -> AgentRun {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.runs().get_opt(name).await.unwrap();
            if let Some(r) = &run
                && pred(r)
            {
                return r.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "run {name} did not reach the expected state in {timeout:?}; last: {}\noperator log:\n{}",
                    serde_json::to_string_pretty(&run.map(|r| r.status)).unwrap(),
                    self.operator_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> AgentRun {
        self.wait_run(name, timeout, |r| r.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.as_str() == phase))
            .await
    }

    /// The run's pod, once it exists (Deputy writes `Authorized` just before creating it).
    pub async fn pod(&self, name: &str) -> Pod {
        let pods: Api<Pod> = self.api();
        let created =
            wait_until(Duration::from_secs(20), || async { pods.get_opt(name).await.unwrap().is_some() }).await;
        assert!(created, "pod {name} was never created\noperator log:\n{}", self.operator_log());
        pods.get(name).await.unwrap()
    }

    /// The (type, reason) of every Event about the run `name` so far (waiting up to 10 s
    /// for the first: an Event is written after the status it reports).
    pub async fn events_for(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<k8s_openapi::api::events::v1::Event> = self.api();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<(String, String)> = events
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
                .collect();
            if !found.is_empty() || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Plays the kubelet: sets the pod's phase (a status patch, as the kubelet makes; on the real
    /// backend no kubelet runs, and the pods stay unscheduled).
    pub async fn set_pod_phase(&self, pod: &str, phase: &str) {
        let pods: Api<Pod> = self.api();
        // The run's status may be written before its pod is created.
        let created =
            wait_until(Duration::from_secs(20), || async { pods.get_opt(pod).await.unwrap().is_some() }).await;
        assert!(created, "pod {pod} was never created\noperator log:\n{}", self.operator_log());
        let patch = json!({"status": {"phase": phase}});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    /// An actor token for a run's pod, as the kubelet would project it (a bound
    /// service-account token with Deputy's issuer as audience).
    pub async fn actor_token(&self, run: &str) -> String {
        self.pod_token(run, &self.token_url()).await
    }

    /// A service-account token of a run's pod for `audience`, bound to the pod: what the
    /// kubelet projects (TokenRequest on the real backend).
    pub async fn pod_token(&self, run: &str, audience: &str) -> String {
        let sa = format!("deputy-run-{run}");
        let pod: Pod = self.api().get(&sa).await.unwrap();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        match &self.api {
            Some(api) => api.issue_token(TokenSpec {
                namespace: self.ns.clone(),
                service_account: sa.clone(),
                audiences: vec![audience.to_string()],
                expires_in: Duration::from_secs(600),
                pod: Some((sa.clone(), uid)),
            }),
            None => {
                // A real cluster: a TokenRequest bound to the pod.
                let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = self.api();
                let req: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(json!({
                    "spec": {"audiences": [audience], "expirationSeconds": 600,
                             "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": sa, "uid": uid}}
                }))
                .unwrap();
                let resp = sas.create_token_request(&sa, &PostParams::default(), &req).await.unwrap();
                resp.status.unwrap().token
            }
        }
    }

    /// A token a resource server (`gdpr-compliance-service`) presents to `/introspect`: its
    /// ServiceAccount's, for the API server's own audience, allowed to introspect (create on
    /// introspections.deputy.dev).
    pub async fn resource_server_token(&self) -> String {
        let sa = "gdpr-compliance-service";
        let token = self.service_account_token(sa).await;
        match &self.api {
            Some(api) => {
                api.allow(&format!("system:serviceaccount:{}:{sa}", self.ns), "deputy.dev", "introspections", "create")
            }
            None => kube_backend::let_service_introspect(&self.client, &self.ns, sa).await,
        }
        token
    }

    /// A token of the ServiceAccount `sa` in the test's namespace, for the API server's own
    /// audience: a Kubernetes identity with no rights of its own.
    pub async fn service_account_token(&self, sa: &str) -> String {
        match &self.api {
            Some(api) => {
                // JWT-shaped, as every Kubernetes service-account token is.
                let token = format!("sa.{}.sig", uuid::Uuid::new_v4().simple());
                let user = deputy_testapi::UserInfo {
                    username: format!("system:serviceaccount:{}:{sa}", self.ns),
                    uid: sa.into(),
                    groups: vec!["system:serviceaccounts".into()],
                    extra: BTreeMap::new(),
                };
                api.register_token(&token, user, vec![], None);
                token
            }
            None => kube_backend::service_account_token(&self.client, &self.ns, sa).await,
        }
    }

    /// How many TokenReviews the API server has answered so far.
    pub async fn token_reviews(&self) -> u64 {
        match (&self.api, self.cluster) {
            (Some(api), _) => api.token_reviews(),
            (None, Some(_)) => kube_backend::token_reviews(&self.client).await,
            (None, None) => unreachable!("an Env has a backend"),
        }
    }

    /// Every request the operator made so far, by resource and verb: the test API server's
    /// counts by `User-Agent`, or the real API server's audit log for the operator's identity.
    pub async fn operator_requests(&self) -> Requests {
        match (&self.api, self.cluster) {
            (Some(api), _) => {
                let mut out = Requests::new();
                for (res, verbs) in api.stats_for_user_agent("deputy/").0 {
                    for (verb, n) in verbs {
                        *out.entry(res.clone()).or_default().entry(verb.to_lowercase()).or_default() += n;
                    }
                }
                out
            }
            (None, Some(cp)) => kube_backend::audited_requests(cp, &self.operator_user(), "deputy/"),
            (None, None) => unreachable!("an Env has a backend"),
        }
    }

    /// The run token currently in the run's Secret.
    pub async fn run_token(&self, run: &str) -> Option<String> {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = self.api();
        let s = secrets.get_opt(&format!("deputy-run-{run}")).await.unwrap()?;
        s.data.and_then(|d| d.get("token").map(|b| String::from_utf8(b.0.clone()).unwrap()))
    }

    /// The published JWKS.
    pub async fn jwks(&self) -> Value {
        let r =
            deputy::http_client::get(&format!("{}/jwks.json", self.token_url()), Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).unwrap()
    }

    pub async fn verifier(&self) -> deputy::tokens::Verifier {
        deputy::tokens::Verifier::from_jwks(&self.token_url(), &self.jwks().await, 5).unwrap()
    }

    /// POSTs a form to the token endpoint.
    pub async fn post(&self, path: &str, form: &[(&str, &str)], bearer: Option<&str>) -> (u16, Value) {
        let r = deputy::http_client::post_form(
            &format!("{}{path}", self.token_url()),
            form,
            bearer,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }
}

/// A valid token-exchange form for a GDPR example run (`examples/gdpr-compliance.yaml`).
pub fn exchange_form<'a>(subject: &'a str, actor: &'a str) -> Vec<(&'a str, &'a str)> {
    use deputy::runs::contract::{GRANT_TYPE_EXCHANGE, TOKEN_TYPE_JWT};
    vec![
        ("grant_type", GRANT_TYPE_EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("actor_token", actor),
        ("actor_token_type", TOKEN_TYPE_JWT),
        ("audience", "gdpr-compliance-service"),
    ]
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a namespaced object exists.
pub async fn exists<K>(api: &Api<K>, name: &str) -> bool
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.unwrap().is_some()
}

/// What an API server said when it refused a request: (HTTP status, message).
pub type Refusal = (u16, String);

/// Sends a raw request; an API error becomes its (status, message).
pub async fn send(client: &Client, req: http::Request<Vec<u8>>) -> Result<Value, Refusal> {
    match client.request::<Value>(req).await {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(s)) => Err((s.code, s.message)),
        Err(e) => panic!("request failed without an API answer: {e}"),
    }
}

/// The collection URL of a Deputy object (`deputy.dev/v1alpha1`, namespaced), or of a core
/// Secret, ServiceAccount or Pod.
pub fn collection(obj: &Value) -> String {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let plural = match obj["kind"].as_str().unwrap() {
        core @ ("Secret" | "ServiceAccount" | "Pod") => {
            return format!("/api/v1/namespaces/{ns}/{}s", core.to_lowercase());
        }
        "Agent" => "agents",
        "DelegationGrant" => "delegationgrants",
        "AgentRun" => "agentruns",
        // Cluster-scoped.
        "ResourceServer" => return "/apis/deputy.dev/v1alpha1/resourceservers".to_string(),
        other => panic!("not a Deputy kind: {other}"),
    };
    format!("/apis/deputy.dev/v1alpha1/namespaces/{ns}/{plural}")
}

/// POSTs an object (see `collection`) as a client would: with `fieldValidation=Strict` (as `kubectl apply
/// --validate=strict`), or without (the API server's default: unknown fields are pruned).
pub async fn create_object(client: &Client, obj: &Value, strict: bool) -> Result<Value, Refusal> {
    let query = if strict { "?fieldValidation=Strict" } else { "" };
    let req = http::Request::post(format!("{}{query}", collection(obj)))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(obj).unwrap())
        .unwrap();
    send(client, req).await
}

/// A network partition between one client and the API server: a TCP proxy on 127.0.0.1 that
/// forwards to the API server until [`Partition::cut`], then drops every connection and
/// refuses new ones (accepted and closed at once) until [`Partition::heal`].
pub struct Partition {
    pub kubeconfig: PathBuf,
    cut: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    /// A proxy to the API server of `env`'s kubeconfig, and a copy of that kubeconfig through it.
    pub async fn start(env: &Env) -> Partition {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let original = std::fs::read_to_string(&env.kubeconfig).unwrap();
        let server = original
            .lines()
            .find_map(|l| l.trim().strip_prefix("server:"))
            .map(|s| s.trim().trim_matches('"').to_string())
            .expect("the kubeconfig names its server");
        let (scheme, rest) = server.split_once("://").unwrap();
        let upstream = rest.trim_end_matches('/').to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let kubeconfig = env.dir.join(format!("kubeconfig-partition-{port}"));
        std::fs::write(&kubeconfig, original.replace(&server, &format!("{scheme}://127.0.0.1:{port}"))).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (cut, generation) = (cut.clone(), generation.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let (upstream, cut, generation) = (upstream.clone(), cut.clone(), generation.clone());
                    let born = generation.load(Ordering::SeqCst);
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                        let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                        let severed = async {
                            while !cut.load(Ordering::SeqCst) && generation.load(Ordering::SeqCst) == born {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        };
                        tokio::select! { _ = copy => {}, _ = severed => {} }
                    });
                }
            }
        });
        Partition { kubeconfig, cut, generation, task }
    }

    /// Every connection through the proxy is dropped, and new ones are refused.
    pub fn cut(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}
