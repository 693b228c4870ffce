//! The real-control-plane backend: one control plane per test binary, the operator's identity
//! from the chart's RBAC, and what the tests read off the real API server (its audit log and
//! its metrics) where the test API server has counters of its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use deputy_controlplane::{ControlPlane, Options};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::Requests;

/// The label on every namespace an end-to-end test creates.
pub const E2E_LABEL: &str = "deputy.dev/e2e";

/// One test at a time on the shared cluster (see [`super::Env`]). A test that panicked
/// poisons the lock; the next test still runs.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The control plane of this test binary, started on first use. Its processes die with the
/// test process (see `deputy_controlplane`). A control plane that cannot start fails the
/// test: the real backend is never skipped.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<Result<&'static ControlPlane, String>> = OnceLock::new();
    let cp = CP.get_or_init(|| {
        // Its own thread and runtime: the tests' runtimes come and go with each test.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            let cp = rt.block_on(ControlPlane::start(Options::default())).map_err(|e| e.to_string())?;
            eprintln!(
                "real control plane: {} ready in {:.1} s ({})",
                cp.server,
                cp.started_in.as_secs_f64(),
                cp.dir.display()
            );
            Ok(&*Box::leak(Box::new(cp)))
        })
        .join()
        .unwrap_or_else(|_| Err("the control-plane thread panicked".into()))
    });
    match cp {
        Ok(cp) => cp,
        Err(e) => panic!("DEPUTY_E2E_BACKEND=kube: the real control plane did not start: {e}"),
    }
}

/// Deletes the namespaces earlier tests left (a test removes its own when it ends; this is
/// for one that could not). Their operators are gone, so the runs' finalizers are dropped
/// first: otherwise the namespaces stay Terminating, and this test's operator would clean
/// up runs that are not its test's.
pub async fn remove_earlier_tests(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let old = namespaces.list(&ListParams::default().labels(&format!("{E2E_LABEL}=true"))).await.unwrap();
    let names: Vec<String> = old.into_iter().filter_map(|ns| ns.metadata.name).collect();
    remove_namespaces(client, &names).await;
    // ResourceServers are cluster-scoped: an earlier test's would register its audiences for a
    // namespace that is gone, and count in this test's operator's decisions.
    let servers: Api<deputy::resources::ResourceServer> = Api::all(client.clone());
    let _ = servers
        .delete_collection(&DeleteParams::default(), &ListParams::default().labels(&format!("{E2E_LABEL}=true")))
        .await;
}

/// Deletes test namespaces, dropping the finalizers of their runs (no operator is left to
/// honour them).
pub async fn remove_namespaces(client: &Client, names: &[String]) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in names {
        let runs: Api<deputy::resources::AgentRun> = Api::namespaced(client.clone(), name);
        for run in runs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let patch = json!({"metadata": {"finalizers": null}});
            let run_name = run.metadata.name.unwrap_or_default();
            let _ = runs.patch(&run_name, &PatchParams::default(), &Patch::Merge(&patch)).await;
        }
        let _ = namespaces.delete(name, &DeleteParams::background()).await;
    }
    // Until they are gone, the next test's operator would see (and write to) them.
    let t0 = std::time::Instant::now();
    let gone = super::wait_until(Duration::from_secs(90), || async {
        let mut left = 0;
        for name in names {
            if namespaces.get_opt(name).await.ok().flatten().is_some() {
                left += 1;
            }
        }
        left == 0
    })
    .await;
    assert!(gone, "test namespaces {names:?} still there after {:?}", t0.elapsed());
}

/// [`remove_namespaces`] from synchronous code (a `Drop`): its own thread, runtime and client.
pub fn remove_namespaces_blocking(cp: &'static ControlPlane, names: Vec<String>) {
    let done = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let client = super::client_for(&cp.admin_kubeconfig()).await;
            remove_namespaces(&client, &names).await;
        });
    })
    .join();
    if done.is_err() {
        eprintln!("could not remove the test namespaces; the next test removes them");
    }
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `helm template` of `charts/deputy` into `namespace`, with the real helm that
/// `scripts/install-tools` installs.
pub fn render_chart(namespace: &str, extra: &[&str]) -> Vec<Value> {
    let helm = workspace().join(".tools/bin/helm");
    assert!(helm.exists(), "{} is missing: run scripts/install-tools (scripts/test does)", helm.display());
    let out = std::process::Command::new(&helm)
        .args(["template", "deputy"])
        .arg(workspace().join("charts/deputy"))
        .args(["--namespace", namespace])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The API resource of a manifest's `apiVersion` and `kind`, found by discovery.
pub async fn resource_of(client: &Client, obj: &Value) -> ApiResource {
    discover(client, obj).await.0
}

/// The API resource of a manifest's `apiVersion` and `kind` and what it supports (its scope),
/// found by discovery.
pub async fn discover(client: &Client, obj: &Value) -> (ApiResource, kube::discovery::ApiCapabilities) {
    let api_version = obj["apiVersion"].as_str().unwrap();
    let kind = obj["kind"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    kube::discovery::pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("{api_version} {kind}: {e}"))
}

/// Server-side applies a manifest (admin), in its own namespace when it has one.
pub async fn apply(client: &Client, obj: &Value) {
    let ar = resource_of(client, obj).await;
    let dynamic: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    let name = dynamic.metadata.name.clone().unwrap();
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.patch(&name, &PatchParams::apply("deputy-e2e").force(), &Patch::Apply(&dynamic))
        .await
        .unwrap_or_else(|e| panic!("apply {} {name}: {e}", obj["kind"]));
}

/// The operator as it runs in a cluster: its namespace, its ServiceAccount and exactly the
/// RBAC the chart renders for it, and a kubeconfig holding a token of that ServiceAccount.
pub async fn install_operator_identity(cp: &ControlPlane, client: &Client, namespace: &str, dir: &Path) -> PathBuf {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": namespace, "labels": {E2E_LABEL: "true"}}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    const IDENTITY: [&str; 5] = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];
    let objects: Vec<Value> = render_chart(namespace, &[])
        .into_iter()
        .filter(|o| IDENTITY.contains(&o["kind"].as_str().unwrap_or("")))
        .collect();
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds.len(), IDENTITY.len(), "the chart renders all of {IDENTITY:?}, got {kinds:?}");
    for obj in &objects {
        apply(client, obj).await;
    }
    let token = service_account_token(client, namespace, "deputy").await;
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, cp.kubeconfig_for_token(&format!("system:serviceaccount:{namespace}:deputy"), &token))
        .unwrap();
    path
}

/// A token of ServiceAccount `name` (created when missing) for the API server's own
/// audience, as `kubectl create token` makes.
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    if sas.get_opt(name).await.unwrap().is_none() {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        sas.create(&PostParams::default(), &sa).await.unwrap();
    }
    let req: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"expirationSeconds": 7200}})).unwrap();
    sas.create_token_request(name, &PostParams::default(), &req).await.unwrap().status.unwrap().token
}

/// TokenReviews the API server has answered (its `apiserver_request_total` counter).
pub async fn token_reviews(client: &Client) -> u64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()))
        .map(|n| n as u64)
        .sum()
}

/// The audit events of `user` so far (each request once: its last stage).
fn audit_events(cp: &ControlPlane, user: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(&cp.audit_log).unwrap_or_default();
    let mut by_id: std::collections::BTreeMap<String, Value> = Default::default();
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else { continue };
        if ev["user"]["username"] != user {
            continue;
        }
        let id = ev["auditID"].as_str().unwrap_or_default().to_string();
        by_id.insert(id, ev);
    }
    by_id.into_values().collect()
}

/// What `user` asked of the API server, by resource (`secrets`, `agentruns/status`) and verb,
/// from the audit log; every request must carry a `User-Agent` starting with `agent_prefix`.
pub fn audited_requests(cp: &ControlPlane, user: &str, agent_prefix: &str) -> Requests {
    let mut out = Requests::new();
    for ev in audit_events(cp, user) {
        let agent = ev["userAgent"].as_str().unwrap_or_default();
        assert!(agent.starts_with(agent_prefix), "a request of {user} with User-Agent {agent:?}: {ev}");
        let Some(resource) = ev["objectRef"]["resource"].as_str() else { continue }; // /api discovery
        let resource = match ev["objectRef"]["subresource"].as_str() {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        };
        let verb = ev["verb"].as_str().unwrap_or_default().to_string();
        *out.entry(resource).or_default().entry(verb).or_default() += 1;
    }
    out
}

/// The requests of `user` that the API server refused with 403.
pub fn forbidden_requests(cp: &ControlPlane, user: &str) -> Vec<String> {
    // The audit log is written before each response (--audit-log-mode=blocking).
    audit_events(cp, user)
        .into_iter()
        .filter(|ev| ev["responseStatus"]["code"] == 403)
        .map(|ev| format!("{} {} ({})", ev["verb"], ev["requestURI"], ev["responseStatus"]["message"]))
        .collect()
}

/// An admission policy that refuses the operator's Secret and AgentRun status writes in a test
/// namespace (422, "injected fault"), until [`Fault::remove`].
pub struct Fault {
    client: Client,
    name: String,
}

pub async fn refuse_operator_writes(env: &super::Env) -> Fault {
    let name = format!("deputy-e2e-fault-{}", env.ns);
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["secrets"]},
                {"apiGroups": ["deputy.dev"], "apiVersions": ["*"], "operations": ["UPDATE"], "resources": ["agentruns/status"]},
            ]},
            "matchConditions": [{"name": "operator-or-probe", "expression": format!(
                "request.userInfo.username == '{}' || (request.userInfo.username == 'admin' && request.name == 'fault-probe')",
                env.operator_user())}],
            "validations": [{"expression": "false", "message": "injected fault (deputy e2e)", "reason": "Invalid"}],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.ns}}}},
    });
    apply(&env.client, &policy).await;
    apply(&env.client, &binding).await;
    // Policies are picked up through informers: probe until it refuses.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let probe: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({"metadata": {"name": "fault-probe"}})).unwrap();
    let active = super::wait_until(Duration::from_secs(30), || async {
        match secrets.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(s)) => s.code == 422 && s.message.contains("injected fault"),
            Ok(_) => {
                let _ = secrets.delete("fault-probe", &DeleteParams::default()).await;
                false
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(active, "the fault-injection policy was not enforced within 30 s");
    Fault { client: env.client.clone(), name }
}

impl Fault {
    /// Removes the policy and waits until writes go through again.
    pub async fn remove(self) {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(self.client.clone());
        let policies: Api<ValidatingAdmissionPolicy> = Api::all(self.client.clone());
        bindings.delete(&self.name, &DeleteParams::default()).await.unwrap();
        policies.delete(&self.name, &DeleteParams::default()).await.unwrap();
    }
}

/// A Role letting the example's users and orchestrators manage runs and grants in `ns`, as a
/// platform team would bind them.
pub async fn let_users_manage_runs(client: &Client, ns: &str) {
    let rules = json!([{"apiGroups": ["deputy.dev"], "resources": ["agentruns", "delegationgrants", "agentruns/status"],
                        "verbs": ["get", "list", "create", "update", "patch", "delete"]}]);
    let subjects = json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "example:users"},
                          {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "example:orchestrators"}]);
    grant(client, Some(ns), "deputy-users", rules, subjects).await;
}

/// Lets `user` make and change Secrets, ServiceAccounts and Pods in `ns`, as the built-in
/// `edit` role would: a tenant who can take the names of a run's children first.
pub async fn let_user_manage_workloads(client: &Client, ns: &str, user: &str) {
    let rules = json!([{"apiGroups": [""], "resources": ["secrets", "serviceaccounts", "pods"],
                        "verbs": ["get", "list", "create", "update", "patch", "delete"]}]);
    let subjects = json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]);
    grant(client, Some(ns), "tenant-workloads", rules, subjects).await;
}

/// Lets the ServiceAccount `ns/sa` introspect Deputy's tokens (create on
/// introspections.deputy.dev, as the chart's `-introspector` ClusterRole grants).
pub async fn let_service_introspect(client: &Client, ns: &str, sa: &str) {
    let rules = json!([{"apiGroups": ["deputy.dev"], "resources": ["introspections"], "verbs": ["create"]}]);
    let subjects = json!([{"kind": "ServiceAccount", "name": sa, "namespace": ns}]);
    grant(client, None, &format!("introspector-{ns}-{sa}"), rules, subjects).await;
}

/// A Role (in `ns`) or ClusterRole (`None`) named `name` with `rules`, bound to `subjects`.
async fn grant(client: &Client, ns: Option<&str>, name: &str, rules: Value, subjects: Value) {
    let (role_kind, binding_kind) =
        if ns.is_some() { ("Role", "RoleBinding") } else { ("ClusterRole", "ClusterRoleBinding") };
    let mut meta = json!({"name": name});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    let role =
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": role_kind, "metadata": meta, "rules": rules});
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": binding_kind, "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": subjects,
    });
    apply(client, &role).await;
    apply(client, &binding).await;
}

pub async fn user_client(cp: &ControlPlane, name: &str) -> Client {
    super::client_for(&cp.user(name).unwrap().kubeconfig).await
}
