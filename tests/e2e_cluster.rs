//! What only a real API server makes meaningful: the CRDs' CEL rules and schema bounds, strict
//! field validation and pruning, the chart's admission policy against non-admin users, `helm
//! install/upgrade/uninstall`, `kubectl`'s printer columns and `explain`, pod-bound actor tokens
//! that die with their pod, and the garbage collector removing a run's children.
//!
//! These tests run on the real control plane only (`DEPUTY_E2E_BACKEND=kube`, which
//! `scripts/test` and `.ci/run` always run). On the test API server each one says loudly that it
//! did not run there: testapi evaluates no CEL, runs no admission, no garbage collector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use deputy_controlplane::{ALICE, BOB, ORCHESTRATOR};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::{
    Backend, Env, Refusal, backend, collection, create_object, exchange_form, exists, kube_backend, send, wait_until,
};

const T: Duration = Duration::from_secs(30);

/// False (and a loud line) on the test API server.
fn on_real_server(test: &str) -> bool {
    if backend() == Backend::TestApi {
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and this must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "e2e_cluster: WARNING: {test} runs only on the real control plane (DEPUTY_E2E_BACKEND=kube; scripts/test runs it there); it did NOT run on the test API server"
        );
        return false;
    }
    true
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The objects of `examples/gdpr-compliance.yaml`, moved into `ns`: (agent, grant, run).
fn gdpr_objects(ns: &str) -> (Value, Value, Value) {
    let (_, agent, grant, run) = gdpr_objects_and_server(ns);
    (agent, grant, run)
}

/// The same, with the example's ResourceServer (cluster-scoped, renamed after `ns`).
fn gdpr_objects_and_server(ns: &str) -> (Value, Value, Value, Value) {
    let text = std::fs::read_to_string(workspace().join("examples/gdpr-compliance.yaml")).unwrap();
    let mut docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    for d in &mut docs {
        if d["kind"] == "ResourceServer" {
            d["metadata"]["name"] = json!(format!("gdpr-{ns}"));
            d["metadata"]["labels"] = json!({kube_backend::E2E_LABEL: "true"});
        } else {
            d["metadata"]["namespace"] = json!(ns);
        }
    }
    let of = |kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned().unwrap();
    (of("ResourceServer"), of("Agent"), of("DelegationGrant"), of("AgentRun"))
}

/// POST with `fieldValidation=Strict`, as `kubectl apply --validate=strict` does.
async fn create(client: &Client, obj: &Value) -> Result<Value, Refusal> {
    create_object(client, obj, true).await
}

/// A JSON merge patch of the object's main resource.
async fn merge(client: &Client, obj: &Value, patch: &Value) -> Result<Value, Refusal> {
    let path = format!("{}/{}?fieldValidation=Strict", collection(obj), obj["metadata"]["name"].as_str().unwrap());
    let req = http::Request::patch(path)
        .header("content-type", "application/merge-patch+json")
        .body(serde_json::to_vec(patch).unwrap())
        .unwrap();
    send(client, req).await
}

async fn delete(client: &Client, obj: &Value) {
    let path = format!("{}/{}", collection(obj), obj["metadata"]["name"].as_str().unwrap());
    let req = http::Request::delete(path).body(Vec::new()).unwrap();
    let _ = send(client, req).await;
}

/// Every `message` of every `x-kubernetes-validations` rule in the CRDs the code generates.
fn cel_messages() -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                    out.extend(rules.iter().filter_map(|r| r["message"].as_str().map(str::to_string)));
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for crd in deputy::resources::crds() {
        walk(&serde_json::to_value(crd).unwrap(), &mut out);
    }
    out
}

/// A bad object on create: which kind, what to change in the valid example, and what the API
/// server must answer.
struct Bad {
    kind: &'static str,
    set: Vec<(&'static str, Value)>,
    message: &'static str,
}

fn set_path(obj: &mut Value, path: &str, value: Value) {
    let mut at = obj;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        at = &mut at[*p];
    }
    let last = parts[parts.len() - 1];
    if value.is_null() {
        at.as_object_mut().unwrap().remove(last);
    } else {
        at[last] = value;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crd_rule_and_bound_refuses_a_bad_object_with_its_message() {
    if !on_real_server("every_crd_rule_and_bound_refuses_a_bad_object_with_its_message") {
        return;
    }
    let env = Env::api_only().await;
    // The CRDs were accepted (so within the CEL cost budget) and are Established.
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for crd in deputy::resources::crds() {
        let name = crd.metadata.name.clone().unwrap();
        let got = crds.get(&name).await.unwrap();
        let established = got
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is Established");
    }

    let creates: Vec<Bad> = vec![
        // Durations: the grammar, then the bounds.
        Bad {
            kind: "AgentRun",
            set: vec![("spec.maxDuration", json!("1 hour"))],
            message: "must be a duration made of hours, minutes and seconds",
        },
        Bad { kind: "AgentRun", set: vec![("spec.maxDuration", json!("30s"))], message: "must be between 1m and 168h" },
        Bad {
            kind: "AgentRun",
            set: vec![("spec.maxDuration", json!("169h"))],
            message: "must be between 1m and 168h",
        },
        Bad { kind: "AgentRun", set: vec![("spec.tokenTTL", json!("4s"))], message: "must be between 30s and 24h" },
        Bad {
            kind: "AgentRun",
            set: vec![("spec.tokenTTL", json!("10d"))],
            message: "must be a duration made of hours, minutes and seconds",
        },
        Bad { kind: "Agent", set: vec![("spec.maxTokenTTL", json!("25h"))], message: "must be between 30s and 24h" },
        Bad {
            kind: "ResourceServer",
            set: vec![("spec.maxTokenTTL", json!("6m"))],
            message: "must be between 10s and 5m",
        },
        Bad {
            kind: "ResourceServer",
            set: vec![("spec.namespaceSelector", json!({"matchExpressions": [{"key": "k", "operator": "In"}]}))],
            message: "In and NotIn need values; Exists and DoesNotExist take none",
        },
        Bad {
            kind: "ResourceServer",
            set: vec![(
                "spec.namespaceSelector",
                json!({"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["v"]}]}),
            )],
            message: "In and NotIn need values; Exists and DoesNotExist take none",
        },
        Bad {
            kind: "ResourceServer",
            set: vec![("spec.namespaceSelector", json!({"matchExpressions": [{"key": "k", "operator": "Like"}]}))],
            message: "Unsupported value",
        },
        Bad { kind: "ResourceServer", set: vec![("spec.namespaceSelector", Value::Null)], message: "Required value" },
        Bad {
            kind: "Agent",
            set: vec![("spec.maxTokenTTL", json!("-1m"))],
            message: "must be a duration made of hours, minutes and seconds",
        },
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.maxTokenTTL", json!("ten minutes"))],
            message: "must be a duration made of hours, minutes and seconds",
        },
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.maxRunDuration", json!("2 h"))],
            message: "must be a duration made of hours, minutes and seconds",
        },
        // Time windows.
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.notBefore", json!("yesterday"))],
            message: "must be an RFC 3339 timestamp such as 2026-11-01T00:00:00Z",
        },
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.expiresAt", json!("2026-13-01"))],
            message: "must be an RFC 3339 timestamp such as 2026-12-31T00:00:00Z",
        },
        Bad {
            kind: "DelegationGrant",
            set: vec![
                ("spec.notBefore", json!("2026-12-31T00:00:00Z")),
                ("spec.expiresAt", json!("2026-11-01T00:00:00Z")),
            ],
            message: "notBefore must be earlier than expiresAt",
        },
        // An Allow grant says what it allows.
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.scopes", json!([]))],
            message: "an Allow grant must name at least one scope",
        },
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.audiences", json!([]))],
            message: "an Allow grant must name at least one audience",
        },
        // Schema bounds: patterns, enums, sizes, ranges, required fields.
        Bad { kind: "AgentRun", set: vec![("spec.scopes", json!(["data read"]))], message: "should match" },
        Bad { kind: "AgentRun", set: vec![("spec.scopes", json!([]))], message: "should have at least 1 items" },
        Bad { kind: "AgentRun", set: vec![("spec.audiences", json!([]))], message: "should have at least 1 items" },
        Bad { kind: "AgentRun", set: vec![("spec.principal", Value::Null)], message: "Required value" },
        Bad { kind: "AgentRun", set: vec![("spec.task", json!("x".repeat(1025)))], message: "Too long" },
        Bad { kind: "DelegationGrant", set: vec![("spec.effect", json!("Maybe"))], message: "Unsupported value" },
        Bad {
            kind: "DelegationGrant",
            set: vec![("spec.maxDelegationDepth", json!(9))],
            message: "should be less than or equal to 8",
        },
        Bad { kind: "Agent", set: vec![("spec.scopes", json!(["ok", "not ok"]))], message: "should match" },
        // Names whose children could not be named deputy-run-<name>.
        Bad {
            kind: "AgentRun",
            set: vec![("metadata.name", json!("r".repeat(243)))],
            message: "an AgentRun name is at most 242 characters",
        },
        // A run's env: plain, well-named, never Deputy's own variables.
        Bad {
            kind: "AgentRun",
            set: vec![("spec.env", json!([{"name": "DEPUTY_TOKEN_FILE", "value": "/tmp/forged"}]))],
            message: "DEPUTY_* environment variables are reserved for Deputy",
        },
        Bad {
            kind: "AgentRun",
            set: vec![("spec.env", json!([{"name": "1X", "value": "v"}]))],
            message: "should match",
        },
        // Unknown fields are refused under fieldValidation=Strict (an Agent's spec.template keeps
        // them: it is a pod template). A run's pod template is such an unknown field now.
        Bad {
            kind: "AgentRun",
            set: vec![("spec.principals", json!(["bob@example.com"]))],
            message: "unknown field \"spec.principals\"",
        },
        Bad { kind: "DelegationGrant", set: vec![("spec.deny", json!(true))], message: "unknown field \"spec.deny\"" },
        Bad {
            kind: "AgentRun",
            set: vec![("spec.template", json!({"spec": {"hostNetwork": true}}))],
            message: "unknown field \"spec.template\"",
        },
        Bad {
            kind: "AgentRun",
            set: vec![("spec.env", json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]))],
            message: "unknown field \"spec.env[0].valueFrom\"",
        },
    ];
    let (server, agent, grant, run) = gdpr_objects_and_server(&env.ns);
    let base = |kind: &str| match kind {
        "ResourceServer" => server.clone(),
        "Agent" => agent.clone(),
        "DelegationGrant" => grant.clone(),
        _ => run.clone(),
    };
    let mut failures = vec![];
    for (i, bad) in creates.iter().enumerate() {
        let mut obj = base(bad.kind);
        obj["metadata"]["name"] = json!(format!("bad-{i}"));
        for (path, value) in &bad.set {
            set_path(&mut obj, path, value.clone());
        }
        match create(&env.client, &obj).await {
            Ok(_) => failures.push(format!("{} {:?}: accepted", bad.kind, bad.set)),
            // A field the schema does not know fails decoding (400); every other refusal is a
            // validation error (422).
            Err((code, msg))
                if code == if bad.message.starts_with("unknown field") { 400 } else { 422 }
                    && msg.contains(bad.message) => {}
            Err((code, msg)) => {
                failures.push(format!("{} {:?}: {code} {msg}, wanted {:?}", bad.kind, bad.set, bad.message))
            }
        }
    }

    // Immutable fields: a valid object, then an update that changes them.
    for obj in [&agent, &grant, &run] {
        create(&env.client, obj).await.unwrap_or_else(|e| panic!("the example {} is valid: {e:?}", obj["kind"]));
    }
    let updates: Vec<(&Value, Value, &str)> = vec![
        (&run, json!({"spec": {"principal": BOB}}), "principal is immutable"),
        (&run, json!({"spec": {"agent": "another-agent"}}), "agent is immutable"),
        (&run, json!({"spec": {"parentRun": "adopted-by"}}), "parentRun is immutable"),
        (&grant, json!({"spec": {"principal": BOB}}), "principal is immutable"),
        (&grant, json!({"spec": {"agent": "another-agent"}}), "agent is immutable"),
    ];
    for (obj, patch, message) in &updates {
        match merge(&env.client, obj, patch).await {
            Ok(_) => failures.push(format!("{} {patch}: accepted", obj["kind"])),
            Err((422, msg)) if msg.contains(message) => {}
            Err((code, msg)) => failures.push(format!("{} {patch}: {code} {msg}, wanted {message:?}", obj["kind"])),
        }
    }
    // A run created with a parent may not drop it either.
    let mut child = run.clone();
    child["metadata"]["name"] = json!("child");
    child["spec"]["parentRun"] = json!("gdpr-check-q4");
    create(&env.client, &child).await.unwrap();
    match merge(&env.client, &child, &json!({"spec": {"parentRun": null}})).await {
        Err((422, msg)) if msg.contains("parentRun is immutable") => {}
        other => failures.push(format!("dropping parentRun: {other:?}")),
    }
    assert!(failures.is_empty(), "the API server did not refuse as the CRDs say:\n{}", failures.join("\n"));

    // Every CEL rule of the CRDs is covered above: a new rule needs a case here.
    let covered: BTreeSet<&str> = creates.iter().map(|b| b.message).chain(updates.iter().map(|(_, _, m)| *m)).collect();
    let uncovered: Vec<String> =
        cel_messages().into_iter().filter(|m| !covered.iter().any(|c| m.contains(c) && !c.is_empty())).collect();
    assert!(uncovered.is_empty(), "CEL rules without a case in this test: {uncovered:#?}");

    // Without Strict, an unknown field is pruned (structural schema), not stored: a run's
    // `spec.template` (the pod template of v1alpha1 before revision 2) included.
    let mut pruned = run.clone();
    pruned["metadata"]["name"] = json!("pruned");
    pruned["spec"]["bogus"] = json!("x");
    pruned["spec"]["template"] = json!({"spec": {"hostPID": true, "containers": [{"name": "x", "image": "evil"}]}});
    let stored = create_object(&env.client, &pruned, false).await.unwrap();
    assert!(stored["spec"].get("bogus").is_none(), "the unknown field was pruned: {}", stored["spec"]);
    assert!(stored["spec"].get("template").is_none(), "a run has no pod template: {}", stored["spec"]);
    // The Agent's pod template is kept whole (it is a PodTemplateSpec, preserved as written).
    let stored = get_object(&env, "agents", "gdpr-compliance-agent").await;
    assert_eq!(stored["spec"]["template"], agent["spec"]["template"], "the Agent's pod template is kept whole");
}

async fn get_object(env: &Env, plural: &str, name: &str) -> Value {
    let req = http::Request::get(format!("/apis/deputy.dev/v1alpha1/namespaces/{}/{plural}/{name}", env.ns))
        .body(Vec::new())
        .unwrap();
    send(&env.client, req).await.unwrap()
}

fn run_for(run: &Value, name: &str, principal: &str) -> Value {
    let mut r = run.clone();
    r["metadata"]["name"] = json!(name);
    r["spec"]["principal"] = json!(principal);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_policy_lets_users_name_only_themselves_or_whom_they_may_act_for() {
    if !on_real_server("the_admission_policy_lets_users_name_only_themselves_or_whom_they_may_act_for") {
        return;
    }
    let env = Env::api_only().await;
    let cp = env.cluster.unwrap();
    kube_backend::let_users_manage_runs(&env.client, &env.ns).await;
    // The chart's policy exactly as rendered, its binding limited to this test's namespace so
    // no other test sees it.
    let name = format!("deputy-e2e-principal-{}", env.ns);
    let status_policy = format!("deputy-e2e-status-{}", env.ns);
    let mut rendered = kube_backend::render_chart(&env.operator_ns, &[]);
    rendered.retain(|o| o["kind"].as_str().is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy")));
    assert_eq!(rendered.len(), 4, "the chart renders two policies (principal, status) and their bindings");
    for mut o in rendered {
        let ours = if o["metadata"]["name"].as_str().unwrap().ends_with("-status") { &status_policy } else { &name };
        o["metadata"]["name"] = json!(ours);
        if o["kind"] == "ValidatingAdmissionPolicyBinding" {
            o["spec"]["policyName"] = json!(ours);
            o["spec"]["matchResources"] =
                json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.ns}}});
        }
        kube_backend::apply(&env.client, &o).await;
    }
    let (_, grant, run) = gdpr_objects(&env.ns);
    let (alice, bob, orchestrator) = (
        kube_backend::user_client(cp, ALICE).await,
        kube_backend::user_client(cp, BOB).await,
        kube_backend::user_client(cp, ORCHESTRATOR).await,
    );

    // Policies take effect through informers: probe until Bob is refused.
    let probe = run_for(&run, "probe", ALICE);
    let enforced = wait_until(T, || async {
        match create(&bob, &probe).await {
            Err((403, msg)) => msg.contains("may not act for this principal"),
            Ok(_) => {
                delete(&env.client, &probe).await;
                false
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(enforced, "the chart's admission policy was not enforced within {T:?}");

    // Bob may not name Alice, on a run or on a grant; the message says who and why.
    let (code, msg) = create(&bob, &run_for(&run, "bob-as-alice", ALICE)).await.unwrap_err();
    assert_eq!(code, 403);
    assert!(msg.contains(&format!("spec.principal {ALICE}: {BOB} may not act for this principal")), "{msg}");
    let mut g = grant.clone();
    g["metadata"]["name"] = json!("bob-grants-for-alice");
    assert_eq!(create(&bob, &g).await.unwrap_err().0, 403, "Bob may not write Alice's consent");
    // Alice may name herself.
    let mine = run_for(&run, "alice-own", ALICE);
    create(&alice, &mine).await.expect("Alice names herself");
    create(&alice, &grant).await.expect("Alice writes her own grant");
    // Bob may not change Alice's run's spec either (the policy checks the principal it names).
    let (code, _) = merge(&bob, &mine, &json!({"spec": {"task": "exfiltrate"}})).await.unwrap_err();
    assert_eq!(code, 403, "Bob may not edit the spec of Alice's run");
    // Nobody changes the principal on update, Alice included.
    let (code, msg) = merge(&alice, &mine, &json!({"spec": {"principal": BOB}})).await.unwrap_err();
    assert!(code == 422 || code == 403, "{code} {msg}");

    // Bob may not revoke Alice's run, nor drop Deputy's finalizer from it, nor delete her
    // consent (RBAC lets him update and delete runs and grants in this namespace); Alice may.
    let annotate = json!({"metadata": {"annotations": {"deputy.dev/revoke-requested": "2026-12-02T00:00:00Z"}}});
    let (code, msg) = merge(&bob, &mine, &annotate).await.unwrap_err();
    assert_eq!(code, 403, "Bob may not set deputy.dev/* annotations on Alice's run: {msg}");
    let (code, _) = merge(&bob, &mine, &json!({"metadata": {"finalizers": ["deputy.dev/cleanup"]}})).await.unwrap_err();
    assert_eq!(code, 403, "Bob may not change Deputy's finalizers on Alice's run");
    merge(&bob, &mine, &json!({"metadata": {"labels": {"team": "b"}}})).await.expect("a label is no claim");
    let grant_path = format!("{}/{}", collection(&grant), grant["metadata"]["name"].as_str().unwrap());
    let delete_as = |who: Client| {
        let path = grant_path.clone();
        async move { send(&who, http::Request::delete(path).body(Vec::new()).unwrap()).await }
    };
    let (code, msg) = delete_as(bob.clone()).await.unwrap_err();
    assert_eq!(code, 403, "Bob may not delete Alice's grant: {msg}");
    let run_path = format!("{}/{}", collection(&mine), mine["metadata"]["name"].as_str().unwrap());
    let (code, msg) = send(&bob, http::Request::delete(run_path.clone()).body(Vec::new()).unwrap()).await.unwrap_err();
    assert_eq!(code, 403, "Bob may not delete Alice's run: {msg}");
    // Nor make it a dependent of an object of his, which the garbage collector would then
    // delete with his object.
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let bobs = configmaps
        .create(&Default::default(), &serde_json::from_value(json!({"metadata": {"name": "bobs"}})).unwrap())
        .await
        .unwrap();
    let owner = json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "bobs", "uid": bobs.metadata.uid,
    }]}});
    let (code, msg) = merge(&bob, &mine, &owner).await.unwrap_err();
    assert_eq!(code, 403, "Bob may not set an owner reference on Alice's run: {msg}");
    merge(&alice, &mine, &annotate).await.expect("Alice revokes her own run");
    let doomed = run_for(&run, "alice-deletes", ALICE);
    create(&alice, &doomed).await.expect("Alice names herself");
    let doomed_path = format!("{}/{}", collection(&doomed), "alice-deletes");
    send(&alice, http::Request::delete(doomed_path).body(Vec::new()).unwrap()).await.expect("Alice deletes her run");

    // An orchestrator without the permission is refused, and `impersonate` is not it: that
    // would let it be Alice against the whole API.
    let (code, msg) = create(&orchestrator, &run_for(&run, "orch-1", ALICE)).await.unwrap_err();
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains(ORCHESTRATOR), "{msg}");
    let impersonate = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"], "resourceNames": [ALICE]}],
    });
    let impersonate_binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": ORCHESTRATOR}],
    });
    kube_backend::apply(&env.client, &impersonate).await;
    kube_backend::apply(&env.client, &impersonate_binding).await;
    // Give RBAC's informers a moment: the act-for grant below is awaited the same way.
    let still_refused = wait_until(Duration::from_secs(3), || async {
        create(&orchestrator, &run_for(&run, "orch-imp", ALICE)).await.is_ok()
    })
    .await;
    assert!(!still_refused, "impersonate must not let an orchestrator name Alice");
    // With act-for, it is allowed for exactly the principals it names.
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["deputy.dev"], "resources": ["principals"], "verbs": ["act-for"], "resourceNames": [ALICE]}],
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": ORCHESTRATOR}],
    });
    kube_backend::apply(&env.client, &role).await;
    kube_backend::apply(&env.client, &binding).await;
    let allowed =
        wait_until(T, || async { create(&orchestrator, &run_for(&run, "orch-2", ALICE)).await.is_ok() }).await;
    assert!(allowed, "the orchestrator may act for Alice once RBAC says so");
    let (code, msg) = create(&orchestrator, &run_for(&run, "orch-3", BOB)).await.unwrap_err();
    assert_eq!(code, 403, "but not for Bob: {msg}");
    delete_as(orchestrator.clone()).await.expect("an orchestrator acting for Alice deletes her grant");

    // Nobody but Deputy writes a status, even with RBAC for it: Bob (who may patch
    // agentruns/status in this namespace) cannot forge Alice's run's, nor can Alice.
    let status_path = format!("{}/{}/status", collection(&mine), mine["metadata"]["name"].as_str().unwrap());
    let forge = |who: Client| {
        let path = status_path.clone();
        async move {
            let req = http::Request::patch(path)
                .header("content-type", "application/merge-patch+json")
                .body(serde_json::to_vec(&json!({"status": {"phase": "Authorized", "tokenTTL": "999999h"}})).unwrap())
                .unwrap();
            send(&who, req).await
        }
    };
    let refused = wait_until(T, || async { forge(bob.clone()).await.is_err_and(|(code, _)| code == 403) }).await;
    assert!(refused, "the status policy was not enforced within {T:?}");
    let (_, msg) = forge(bob.clone()).await.unwrap_err();
    assert!(msg.contains("is written only by Deputy") && msg.contains(BOB), "{msg}");
    assert_eq!(forge(alice.clone()).await.unwrap_err().0, 403, "not even the principal writes a status");

    // The namespace still holds Alice's run and (re-created) grant: deleting it must not be
    // stuck on the policy. The namespace controller and garbage collector run with their own
    // ServiceAccounts (--use-service-account-credentials), which may delete anything and
    // act-for nobody.
    create(&alice, &grant).await.expect("Alice writes her grant again");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    namespaces.delete(&env.ns, &DeleteParams::default()).await.expect("delete the namespace");
    let gone =
        wait_until(Duration::from_secs(90), || async { matches!(namespaces.get_opt(&env.ns).await, Ok(None)) }).await;
    let left = namespaces.get_opt(&env.ns).await.ok().flatten().and_then(|n| n.status).map(|s| s.conditions);
    assert!(gone, "the namespace holding Alice's run and grant was not deleted within 90 s: {left:?}");

    // Tidy the cluster-scoped objects.
    for obj in [&binding, &role] {
        let ar = kube_backend::resource_of(&env.client, obj).await;
        let api: Api<kube::api::DynamicObject> = Api::all_with(env.client.clone(), &ar);
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    remove_policy(&env.client, &name).await;
    remove_policy(&env.client, &status_policy).await;
}

async fn remove_policy(client: &Client, name: &str) {
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone()).delete(name, &DeleteParams::default()).await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(client.clone()).delete(name, &DeleteParams::default()).await;
}

/// The real helm of `scripts/install-tools`, against the control plane as its admin, with its
/// caches in a directory of the test.
struct Helm {
    kubeconfig: PathBuf,
    home: PathBuf,
    namespace: String,
    release: &'static str,
}

impl Helm {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let helm = workspace().join(".tools/bin/helm");
        assert!(helm.exists(), "{} is missing: run scripts/install-tools (scripts/test does)", helm.display());
        let out = Command::new(helm)
            .args(args)
            .args(["--namespace", &self.namespace, "--kubeconfig"])
            .arg(&self.kubeconfig)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() { Ok(text) } else { Err(text) }
    }

    /// The objects of the release as helm installed them.
    fn manifest(&self) -> Vec<Value> {
        let text = self.run(&["get", "manifest", self.release]).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &Value| !v.is_null())
            .collect()
    }
}

impl Drop for Helm {
    /// The chart has cluster-scoped objects (its admission policy among them): a failed test
    /// must not leave them to the next.
    fn drop(&mut self) {
        let _ = self.run(&["uninstall", self.release, "--wait", "--timeout", "60s"]);
    }
}

/// Stand-ins for the CRDs of cert-manager and the Prometheus Operator, which the chart's
/// optional features use. They accept any spec: the API server checks that the chart's objects
/// are of kinds the cluster serves, not cert-manager's own validation.
async fn install_foreign_crds(client: &Client) {
    for (group, kind, plural) in [
        ("cert-manager.io", "Certificate", "certificates"),
        ("cert-manager.io", "Issuer", "issuers"),
        ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
    ] {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                     "versions": [{"name": "v1", "served": true, "storage": true,
                                   "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
        });
        kube_backend::apply(client, &crd).await;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ok = wait_until(T, || async {
        let mut all = true;
        for name in ["certificates.cert-manager.io", "issuers.cert-manager.io", "servicemonitors.monitoring.coreos.com"]
        {
            let c = crds.get(name).await.unwrap();
            all &= c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
        }
        all
    })
    .await;
    assert!(ok, "the stand-in CRDs are Established");
}

/// Whether each object of a manifest exists on the server, by kind and name.
async fn objects_exist(client: &Client, objects: &[Value], namespace: &str) -> Vec<(String, bool)> {
    let mut out = vec![];
    for o in objects {
        let (ar, caps) = kube_backend::discover(client, o).await;
        let name = o["metadata"]["name"].as_str().unwrap();
        let api: Api<kube::api::DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            Api::namespaced_with(client.clone(), o["metadata"]["namespace"].as_str().unwrap_or(namespace), &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        out.push((format!("{} {name}", ar.kind), api.get_opt(name).await.unwrap().is_some()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_and_uninstalls_the_chart() {
    if !on_real_server("helm_installs_upgrades_and_uninstalls_the_chart") {
        return;
    }
    let env = Env::api_only().await;
    let cp = env.cluster.unwrap();
    let helm = Helm {
        kubeconfig: cp.admin_kubeconfig(),
        home: env.dir.join("helm"),
        namespace: env.ns.clone(),
        release: "deputy-helm",
    };
    let chart = workspace().join("charts/deputy");
    let chart = chart.to_str().unwrap();

    // Default values serve TLS with a cert-manager certificate: on a cluster without
    // cert-manager, helm refuses and says which kind is missing.
    let missing = helm.run(&["install", helm.release, chart]).unwrap_err();
    assert!(missing.contains("Certificate") || missing.contains("cert-manager.io"), "{missing}");
    let _ = helm.run(&["uninstall", helm.release]);

    // With cert-manager's kinds served, the default values install, every object accepted.
    install_foreign_crds(&env.client).await;
    helm.run(&["install", helm.release, chart]).unwrap_or_else(|e| panic!("helm install: {e}"));
    let installed = helm.manifest();
    let kinds: BTreeSet<String> = installed.iter().filter_map(|o| o["kind"].as_str().map(str::to_string)).collect();
    for k in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "ValidatingAdmissionPolicy",
        "Certificate",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(k), "the default release has a {k}: {kinds:?}");
    }
    let present = objects_exist(&env.client, &installed, &env.ns).await;
    assert!(present.iter().all(|(_, p)| *p), "every installed object exists: {present:?}");

    // Every optional feature on.
    helm.run(&[
        "upgrade",
        helm.release,
        chart,
        "--reuse-values",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "replicaCount=3",
        "--set",
        "config.logFormat=text",
    ])
    .unwrap_or_else(|e| panic!("helm upgrade: {e}"));
    let upgraded = helm.manifest();
    let kinds: BTreeSet<String> = upgraded.iter().filter_map(|o| o["kind"].as_str().map(str::to_string)).collect();
    assert!(kinds.contains("NetworkPolicy") && kinds.contains("ServiceMonitor"), "{kinds:?}");
    let present = objects_exist(&env.client, &upgraded, &env.ns).await;
    assert!(present.iter().all(|(_, p)| *p), "every upgraded object exists: {present:?}");
    let deployment = upgraded.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let live = deployments.get(deployment["metadata"]["name"].as_str().unwrap()).await.unwrap();
    assert_eq!(live.spec.unwrap().replicas, Some(3));

    // Uninstall removes every object of the release (helm keeps the CRDs, by design).
    helm.run(&["uninstall", helm.release, "--wait", "--timeout", "60s"])
        .unwrap_or_else(|e| panic!("helm uninstall: {e}"));
    let gone =
        wait_until(T, || async { objects_exist(&env.client, &upgraded, &env.ns).await.iter().all(|(_, p)| !*p) }).await;
    assert!(gone, "left after uninstall: {:?}", objects_exist(&env.client, &upgraded, &env.ns).await);
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    assert!(exists(&crds, "agentruns.deputy.dev").await, "the CRDs stay");
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(workspace().join(".tools/bin/kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_the_printer_columns_and_explains_the_fields() {
    if !on_real_server("kubectl_shows_the_printer_columns_and_explains_the_fields") {
        return;
    }
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let admin = env.cluster.unwrap().admin_kubeconfig();
    let table = kubectl(&admin, &["get", "ar", "-n", &env.ns]);
    let header: Vec<&str> =
        table.lines().next().unwrap().split("  ").map(str::trim).filter(|s| !s.is_empty()).collect();
    assert_eq!(header, ["NAME", "PHASE", "PRINCIPAL", "AGENT", "TOKEN EXPIRES", "AGE"], "{table}");
    let row = table.lines().nth(1).unwrap();
    for v in ["gdpr-check-q4", "Authorized", ALICE, "gdpr-compliance-agent"] {
        assert!(row.contains(v), "{table}");
    }
    // A future time in a `date` column prints as `<invalid>`: the expiry is shown as a timestamp.
    let expires = env.runs().get("gdpr-check-q4").await.unwrap().status.unwrap().token_expires_at.unwrap();
    assert!(row.contains(&expires.to_string()) && !row.contains("<invalid>"), "{table}");
    let wide = kubectl(&admin, &["get", "agentruns", "-n", &env.ns, "-o", "wide"]);
    for col in ["PARENT", "SCOPES", "REASON"] {
        assert!(wide.lines().next().unwrap().contains(col), "{wide}");
    }
    assert!(wide.contains("compliance:privacy:check"), "{wide}");
    // `kubectl get deputy` lists every kind in the category.
    let all = kubectl(&admin, &["get", "deputy", "-n", &env.ns]);
    for v in [
        "agentrun.deputy.dev/gdpr-check-q4",
        "agent.deputy.dev/gdpr-compliance-agent",
        "delegationgrant.deputy.dev/alice-gdpr",
        // Cluster-scoped, listed with the namespace's objects.
        "resourceserver.deputy.dev/gdpr-compliance-service-",
    ] {
        assert!(all.contains(v), "{all}");
    }
    // The API server publishes the CRD's OpenAPI a moment after it is Established.
    let mut explained = String::new();
    let ok = wait_until(T, || {
        let admin = admin.clone();
        let out = Command::new(workspace().join(".tools/bin/kubectl"))
            .arg("--kubeconfig")
            .arg(&admin)
            .args(["explain", "agentrun.spec"])
            .output()
            .unwrap();
        explained = String::from_utf8_lossy(&out.stdout).into_owned();
        let done = out.status.success() && explained.contains("principal");
        async move { done }
    })
    .await;
    assert!(ok, "kubectl explain agentrun.spec: {explained}");
    // kubectl wraps descriptions to the terminal: compare with whitespace collapsed.
    let words = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let explained = words(&explained);
    for text in ["The principal the agent acts for", "maxDuration", "One task execution of an Agent"] {
        assert!(explained.contains(text), "kubectl explain agentrun.spec lacks {text:?}:\n{explained}");
    }
    let field = kubectl(&admin, &["explain", "delegationgrant.spec.effect"]);
    assert!(words(&field).contains("Deny always wins"), "{field}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_token_stops_working_with_its_pod_and_must_be_for_deputy() {
    if !on_real_server("an_actor_token_stops_working_with_its_pod_and_must_be_for_deputy") {
        return;
    }
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let subject = env.run_token("gdpr-check-q4").await.unwrap();
    let pod_name = "deputy-run-gdpr-check-q4";
    let pods: Api<Pod> = env.api();
    // Deputy writes the Authorized status just before it creates the pod (issue 11).
    assert!(wait_until(T, || async { pods.get_opt(pod_name).await.unwrap().is_some() }).await, "the pod exists");
    let first_uid = pods.get(pod_name).await.unwrap().metadata.uid.unwrap();
    let old = env.actor_token("gdpr-check-q4").await;
    let (status, body) = env.post("/token", &exchange_form(&subject, &old), None).await;
    assert_eq!(status, 200, "the pod's token works while the pod exists: {body}");

    // A token of the run's ServiceAccount bound to no pod, and one bound to the pod but for the
    // API server's audience: neither is an actor token.
    let sas: Api<ServiceAccount> = env.api();
    let req: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [env.token_url()], "expirationSeconds": 600}})).unwrap();
    let unbound = sas.create_token_request(pod_name, &Default::default(), &req).await.unwrap().status.unwrap().token;
    let (status, body) = env.post("/token", &exchange_form(&subject, &unbound), None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("unauthorized_client")), "unbound: {body}");
    assert!(body["error_description"].as_str().unwrap().contains("not bound to a pod"), "{body}");
    let foreign = env.pod_token("gdpr-check-q4", deputy_controlplane::SA_ISSUER).await;
    let (status, body) = env.post("/token", &exchange_form(&subject, &foreign), None).await;
    assert!(status == 400 || status == 401, "a token for the API server's audience is refused: {status} {body}");

    // The pod is deleted (the run is Authorized, not yet Running: Deputy creates the pod again).
    pods.delete(pod_name, &DeleteParams::default()).await.unwrap();
    let recreated = wait_until(T, || async {
        pods.get_opt(pod_name).await.unwrap().and_then(|p| p.metadata.uid).is_some_and(|u| u != first_uid)
    })
    .await;
    assert!(recreated, "Deputy creates the missing pod again\noperator log:\n{}", env.operator_log());
    // The old pod's token is refused (the API server caches successful reviews for 10 s, Deputy
    // keys its cache on the pod's uid: poll).
    let refused =
        wait_until(T, || async { env.post("/token", &exchange_form(&subject, &old), None).await.0 != 200 }).await;
    assert!(refused, "the deleted pod's actor token still works");
    let (status, body) = env.post("/token", &exchange_form(&subject, &old), None).await;
    assert_eq!(status, 400, "{body}");
    // The new pod's token works.
    let new = env.actor_token("gdpr-check-q4").await;
    let (status, body) = env.post("/token", &exchange_form(&subject, &new), None).await;
    assert_eq!(status, 200, "the new pod's token works: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_garbage_collector_removes_a_runs_children_through_their_owner() {
    if !on_real_server("the_garbage_collector_removes_a_runs_children_through_their_owner") {
        return;
    }
    let mut env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let child = "deputy-run-gdpr-check-q4";
    // Deputy writes the Authorized status just before it creates the pod (issue 11).
    let made =
        wait_until(T, || async { exists(&env.api::<Pod>(), child).await && exists(&env.api::<Secret>(), child).await })
            .await;
    assert!(made, "the run's pod and Secret exist");
    // Without the operator (it would revoke through its finalizer), only the owner references
    // are left to clean up.
    env.kill_operator();
    let runs = env.runs();
    runs.patch("gdpr-check-q4", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    runs.delete("gdpr-check-q4", &DeleteParams::default()).await.unwrap();
    let gone = wait_until(Duration::from_secs(60), || async {
        !exists(&env.api::<Pod>(), child).await
            && !exists(&env.api::<Secret>(), child).await
            && !exists(&env.api::<ServiceAccount>(), child).await
    })
    .await;
    assert!(gone, "the garbage collector removed the run's pod, Secret and ServiceAccount");
}
