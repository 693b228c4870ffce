//! The RBAC the chart grants is derived from what the code does: run the whole flow, take the
//! requests the operator made (the test API server's counts by `User-Agent`, or the real API
//! server's audit log for the operator's ServiceAccount), and compare them with
//! `charts/deputy/rbac-expected.yaml` (which the chart test compares with the rendered roles).
//! Every request must be granted, and every grant must be used, or be listed below with the
//! reason the flow cannot show it. On the real backend the operator runs with exactly the
//! chart's RBAC, and the real authoriser (SubjectAccessReview) must allow every request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use support::Env;

/// The API group of a resource the operator uses.
fn group_of(resource: &str) -> &'static str {
    match resource {
        "agents" | "agentruns" | "delegationgrants" | "resourceservers" => "deputy.dev",
        "leases" => "coordination.k8s.io",
        "events" => "events.k8s.io",
        "tokenreviews" => "authentication.k8s.io",
        "subjectaccessreviews" => "authorization.k8s.io",
        _ => "",
    }
}

const T: Duration = Duration::from_secs(20);

/// Granted but not exercised by this flow, and why.
const UNUSED_BUT_NEEDED: [(&str, &str, &str); 8] = [
    (
        "agentruns/finalizers",
        "update",
        "checked by the OwnerReferencesPermissionEnforcement admission plugin, not a request",
    ),
    ("secrets", "update", "signing-key rotation (every 720h by default)"),
    ("leases", "update", "kube-lease-manager may replace a lease it recovers"),
    ("secrets", "patch", "the run token's rotation: a server-side apply at the Secret's uid (none in this short test)"),
    ("serviceaccounts", "patch", "a server-side apply at the uid when a create finds the run's own (a cache behind)"),
    ("pods", "get", "a read on a cache miss right after the pod was created"),
    ("pods", "patch", "putting back the managed-by label of a run's pod that lost it (a pod in the cache has it)"),
    ("serviceaccounts", "get", "a read on a cache miss"),
];

fn granted() -> BTreeSet<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/deputy/rbac-expected.yaml");
    let rules: Vec<serde_yaml::Value> = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for r in rules {
        let res = r["resource"].as_str().unwrap().to_string();
        for v in r["verbs"].as_sequence().unwrap() {
            out.insert((res.clone(), v.as_str().unwrap().to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_granted_and_every_grant_is_used() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.apply_example("supply-chain.yaml").await;
    env.apply_example("deny.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    env.wait_phase("optimise-routes-7", "Authorized", T).await;
    env.wait_phase("bob-gdpr-check", "Denied", T).await;
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Running").await;
    env.wait_phase("gdpr-check-q4", "Running", T).await;

    // Token endpoint: exchange (TokenReview), introspect, revoke (annotation patch).
    let subject = env.run_token("gdpr-check-q4").await.unwrap();
    let actor = env.actor_token("gdpr-check-q4").await;
    let (status, _) = env.post("/token", &support::exchange_form(&subject, &actor), None).await;
    assert_eq!(status, 200);
    let rs = env.resource_server_token().await;
    let (status, _) = env.post("/introspect", &[("token", &subject)], Some(&rs)).await;
    assert_eq!(status, 200, "introspection (a SubjectAccessReview for the caller)");
    let (status, _) = env.post("/revoke", &[("token", &subject)], Some(&actor)).await;
    assert_eq!(status, 200);
    env.wait_phase("gdpr-check-q4", "Revoked", T).await;

    // Pod end, grant deletion, run deletion.
    env.set_pod_phase("deputy-run-supply-chain-planner-7", "Succeeded").await;
    env.wait_phase("optimise-routes-7", "Revoked", T).await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.runs().delete("supply-chain-planner-7", &DeleteParams::default()).await.unwrap();
    let gone = support::wait_until(T, || async { !support::exists(&env.runs(), "supply-chain-planner-7").await }).await;
    assert!(gone);
    env.grants().delete("alice-optimiser", &DeleteParams::default()).await.unwrap();
    // Let the grant/agent status loop (1 s ticks) catch up.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let requests = env.operator_requests().await;
    assert!(!requests.is_empty(), "the operator names itself with User-Agent deputy/<version>");
    let used: BTreeSet<(String, String)> =
        requests.iter().flat_map(|(res, verbs)| verbs.keys().map(move |v| (res.clone(), v.clone()))).collect();
    let granted = granted();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(ungranted.is_empty(), "requests the chart does not grant: {ungranted:?}\nall used: {used:?}");
    let allowed: BTreeSet<(String, String)> =
        UNUSED_BUT_NEEDED.iter().map(|(r, v, _)| (r.to_string(), v.to_string())).collect();
    let unused: Vec<_> = granted.difference(&used).filter(|g| !allowed.contains(*g)).collect();
    assert!(unused.is_empty(), "grants the code never used (remove them or list why): {unused:?}");
    eprintln!("operator requests by resource and verb ({:?}): {requests:?}", env.backend());

    // The real authoriser agrees: each request is allowed to the operator's ServiceAccount
    // (cluster-wide for the namespaced kinds it watches everywhere; in its own namespace for
    // its Lease and signing keys). The test API server has no authoriser.
    if env.cluster.is_some() {
        let sar: Api<SubjectAccessReview> = Api::all(env.client.clone());
        for (resource, verb) in &used {
            let (resource, sub) = resource.split_once('/').map_or((resource.as_str(), None), |(r, s)| (r, Some(s)));
            // Leases only in its own namespace, and by name except to create one; TokenReviews
            // are cluster-scoped; everything else in the test's namespace.
            let (namespace, name) = match (resource, verb.as_str()) {
                ("leases", "create") => (env.operator_ns.as_str(), ""),
                ("leases", _) => (env.operator_ns.as_str(), "deputy-controller"),
                ("tokenreviews" | "subjectaccessreviews", _) => ("", ""),
                _ => (env.ns.as_str(), ""),
            };
            let review: SubjectAccessReview = serde_json::from_value(json!({"spec": {
                "user": env.operator_user(),
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", env.operator_ns), "system:authenticated"],
                "resourceAttributes": {
                    "group": group_of(resource), "resource": resource, "subresource": sub.unwrap_or(""),
                    "verb": verb, "namespace": namespace, "name": name,
                },
            }}))
            .unwrap();
            let answer = sar.create(&Default::default(), &review).await.unwrap();
            let allowed = answer.status.is_some_and(|s| s.allowed);
            assert!(allowed, "SubjectAccessReview refuses {verb} {resource}{sub:?} to {}", env.operator_user());
        }
    }
}
