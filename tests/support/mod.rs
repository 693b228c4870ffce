//! End-to-end test support: a Kubernetes API (the project's test API server, or a real
//! cluster when `DEPUTY_E2E_KUBECONFIG` is set), the CRDs, and the real `deputy run` process.
//!
//! Against the test API server the tests play the kubelet's part by patching pod status; on a
//! real cluster they wait for the kubelet instead.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

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

pub const OPERATOR_NS: &str = "deputy-system";

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

pub struct Env {
    pub api: Option<TestApiServer>,
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    pub ns: String,
    pub port: u16,
    pub admin_port: u16,
    pub operator: Option<Operator>,
    pub extra_args: Vec<String>,
}

async fn client_for(path: &PathBuf) -> Client {
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
        let (api, kubeconfig) = match std::env::var_os("DEPUTY_E2E_KUBECONFIG") {
            Some(path) => (None, PathBuf::from(path)),
            None => {
                let api = TestApiServer::start().await.unwrap();
                let path = dir.join("kubeconfig");
                api.write_kubeconfig(&path).unwrap();
                (Some(api), path)
            }
        };
        let client = client_for(&kubeconfig).await;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in deputy::resources::crds() {
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(&name, &PatchParams::apply("deputy-e2e").force(), &Patch::Apply(&crd)).await.unwrap();
        }
        let ns = format!("e2e-{}", &uuid::Uuid::new_v4().to_string()[..8]);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for n in [ns.as_str(), OPERATOR_NS] {
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": n}})).unwrap();
            let _ = namespaces.create(&PostParams::default(), &obj).await;
        }
        // Give a real API server a moment to serve the new CRDs.
        wait_until(Duration::from_secs(30), || async {
            Api::<AgentRun>::namespaced(client.clone(), &ns).list(&Default::default()).await.is_ok()
        })
        .await;
        Env {
            api,
            client,
            kubeconfig,
            dir,
            ns,
            port: free_port(),
            admin_port: free_port(),
            operator: None,
            extra_args: vec![],
        }
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
        let log = self.dir.join(format!("operator-{instance}-{}.log", uuid::Uuid::new_v4()));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_deputy"))
            .arg("run")
            .args(["--issuer", &self.token_url()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--namespace", OPERATOR_NS])
            .args(["--instance", instance])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,deputy=debug")
            .env_remove("DEPUTY_E2E_KUBECONFIG")
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
            v["metadata"]["namespace"] = json!(self.ns);
            if !self.is_test_api() {
                // On a real cluster the kubelet ends the pods: make them end soon.
                let text = v.to_string().replace("sleep 300", "sleep 20").replace("sleep 120", "sleep 20");
                v = serde_json::from_str(&text).unwrap();
            }
            self.apply_value(v).await;
        }
    }

    pub async fn apply_value(&self, v: Value) {
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

    /// Plays the kubelet: sets the pod's phase (test API server), or waits for the kubelet
    /// to get there (real cluster).
    pub async fn set_pod_phase(&self, pod: &str, phase: &str) {
        let pods: Api<Pod> = self.api();
        if self.is_test_api() {
            let patch = json!({"status": {"phase": phase}});
            pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        } else {
            let ok = wait_until(Duration::from_secs(180), || async {
                pods.get_opt(pod).await.ok().flatten().and_then(|p| p.status).and_then(|s| s.phase).as_deref()
                    == Some(phase)
            })
            .await;
            assert!(ok, "pod {pod} never reached {phase}");
        }
    }

    /// An actor token for a run's pod, as the kubelet would project it (a bound
    /// service-account token with Deputy's issuer as audience).
    pub async fn actor_token(&self, run: &str) -> String {
        let sa = format!("deputy-run-{run}");
        let pod: Pod = self.api().get(&sa).await.unwrap();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        match &self.api {
            Some(api) => api.issue_token(TokenSpec {
                namespace: self.ns.clone(),
                service_account: sa.clone(),
                audiences: vec![self.token_url()],
                expires_in: Duration::from_secs(600),
                pod: Some((sa.clone(), uid)),
            }),
            None => {
                // A real cluster: a TokenRequest bound to the pod.
                let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = self.api();
                let req: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(json!({
                    "spec": {"audiences": [self.token_url()], "expirationSeconds": 600,
                             "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": sa, "uid": uid}}
                }))
                .unwrap();
                let resp = sas.create_token_request(&sa, &PostParams::default(), &req).await.unwrap();
                resp.status.unwrap().token
            }
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
    use deputy::server::{GRANT_TYPE_EXCHANGE, TOKEN_TYPE_JWT};
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
