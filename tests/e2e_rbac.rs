//! The RBAC the chart grants is derived from what the code does: run the whole flow against
//! the test API server, take the requests the operator made (by its `User-Agent`), and
//! compare them with `charts/deputy/rbac-expected.yaml` (which the chart test compares with
//! the rendered roles). Every request must be granted, and every grant must be used, or be
//! listed below with the reason the flow cannot show it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::api::DeleteParams;
use support::Env;

const T: Duration = Duration::from_secs(20);

/// Granted but not exercised by this flow, and why.
const UNUSED_BUT_NEEDED: [(&str, &str, &str); 7] = [
    (
        "agentruns/finalizers",
        "update",
        "checked by the OwnerReferencesPermissionEnforcement admission plugin, not a request",
    ),
    ("secrets", "update", "signing-key rotation (every 720h by default)"),
    ("leases", "update", "kube-lease-manager may replace a lease it recovers"),
    ("pods", "create", "server-side apply that creates an object; granted in case the API server checks create"),
    ("serviceaccounts", "create", "as for pods"),
    ("pods", "get", "a read on a cache miss right after the pod was created"),
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
    let Some(api) = &env.api else { return };
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

    let stats = api.stats_for_user_agent("deputy/");
    assert!(!stats.0.is_empty(), "the operator names itself with User-Agent deputy/<version>");
    let verb = |v: &str| match v {
        "GET" => "get",
        "LIST" => "list",
        "WATCH" => "watch",
        "CREATE" => "create",
        "UPDATE" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        "DELETECOLLECTION" => "deletecollection",
        other => panic!("unknown verb {other}"),
    };
    let used: BTreeSet<(String, String)> =
        stats.0.iter().flat_map(|(res, verbs)| verbs.keys().map(move |v| (res.clone(), verb(v).to_string()))).collect();
    let granted = granted();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(ungranted.is_empty(), "requests the chart does not grant: {ungranted:?}\nall used: {used:?}");
    let allowed: BTreeSet<(String, String)> =
        UNUSED_BUT_NEEDED.iter().map(|(r, v, _)| (r.to_string(), v.to_string())).collect();
    let unused: Vec<_> = granted.difference(&used).filter(|g| !allowed.contains(*g)).collect();
    assert!(unused.is_empty(), "grants the code never used (remove them or list why): {unused:?}");
    let summary: BTreeMap<_, _> = stats.0.iter().map(|(r, v)| (r.clone(), v.clone())).collect();
    eprintln!("operator requests by resource and verb: {summary:?}");
}
