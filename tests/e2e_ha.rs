//! High availability: two `deputy run` processes share one Lease; both serve tokens, one
//! reconciles. Killing the leader hands over within the lease duration, and no run is minted
//! twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::json;
use support::{Env, Partition, free_port, wait_until};

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_hands_over_without_minting_twice() {
    let env = Env::api_only().await;
    let (pa, aa, pb, ab) = (free_port(), free_port(), free_port(), free_port());
    let a = env.spawn_operator(pa, aa, "deputy-a").await;
    let b = env.spawn_operator(pb, ab, "deputy-b").await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.operator_ns);
    let elected = wait_until(Duration::from_secs(20), || async {
        leases.get_opt("deputy-controller").await.unwrap().as_ref().and_then(holder).is_some()
    })
    .await;
    assert!(elected, "a leader is elected");
    let leader = holder(&leases.get("deputy-controller").await.unwrap()).unwrap();
    let (mut leader_op, follower_op, follower_port) = if leader == "deputy-a" { (a, b, pb) } else { (b, a, pa) };

    env.apply_example("gdpr-compliance.yaml").await;
    let before = env.wait_phase("gdpr-check-q4", "Authorized", Duration::from_secs(20)).await;

    // Both replicas serve the same keys.
    let jwks = |port: u16| async move {
        let r = deputy::http_client::get(&format!("http://127.0.0.1:{port}/jwks.json"), Duration::from_secs(5))
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };
    assert_eq!(jwks(pa).await, jwks(pb).await);

    // Kill the leader (no chance to release the lease), then ask for more work.
    let _ = leader_op.child.kill();
    let _ = leader_op.child.wait();
    let killed_at = Instant::now();
    let mut run: serde_json::Value = serde_json::to_value(&before).unwrap();
    run["metadata"] = json!({"name": "after-failover", "namespace": env.ns});
    run.as_object_mut().unwrap().remove("status");
    env.apply_value(run).await;
    env.wait_phase("after-failover", "Authorized", Duration::from_secs(30)).await;
    let took = killed_at.elapsed();
    // The lease is 4 s (support::LEASE_DURATION): the follower takes it within about that,
    // then reconciles.
    assert!(took < Duration::from_secs(12), "hand-over took {took:?} (lease 4 s)");
    let new_holder = holder(&leases.get("deputy-controller").await.unwrap()).unwrap();
    assert_ne!(new_holder, leader, "the follower took the lease");

    // Nothing was minted twice: the first run keeps its token, and across both processes
    // every run has exactly one `minted` line.
    let after = env.runs().get("gdpr-check-q4").await.unwrap();
    assert_eq!(after.status.as_ref().unwrap().token_id, before.status.as_ref().unwrap().token_id);
    assert_eq!(after.status.unwrap().rotations, 0);
    // The audit lines are read from each process's stdout by a thread of its own: give it a
    // moment, then require exactly one line per run (and keep watching for a second mint).
    let minted = || {
        let mut m: Vec<String> = leader_op
            .audit
            .lock()
            .unwrap()
            .iter()
            .chain(follower_op.audit.lock().unwrap().iter())
            .filter(|l| l["action"] == "minted")
            .map(|l| l["run"].as_str().unwrap().to_string())
            .collect();
        m.sort();
        m
    };
    wait_until(Duration::from_secs(10), || async { minted().len() >= 2 }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(minted(), ["after-failover", "gdpr-check-q4"], "one mint per run");
    // The survivor serves tokens for the new run.
    let ready =
        deputy::http_client::get(&format!("http://127.0.0.1:{follower_port}/jwks.json"), Duration::from_secs(5))
            .await
            .unwrap();
    assert_eq!(ready.status, 200);
    eprintln!("hand-over to {new_holder} took {took:?}");
}

/// When an operator's log says `what` first (its timestamp), the ANSI colours stripped.
fn logged_at(log: &std::path::Path, what: &str) -> Option<jiff::Timestamp> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.lines().find(|l| l.contains(what)).and_then(|l| l.split_whitespace().next()?.parse().ok())
}

/// A leader cut off from the API server (a partition: its renewals fail, and nothing tells it
/// of another holder; kube-lease-manager alone keeps saying "leader") steps down before its
/// lease runs out, so the follower that then takes over is the only leader. The old leader
/// keeps serving its keys while cut off, and exits once the API server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_steps_down_before_its_lease_ends() {
    let env = Env::api_only().await;
    let partition = Partition::start(&env).await;
    let (pa, aa, pb, ab) = (free_port(), free_port(), free_port(), free_port());
    let mut a = env.spawn_operator_via(pa, aa, "deputy-a", &partition.kubeconfig).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.operator_ns);
    let lease_of = || async { leases.get_opt("deputy-controller").await.unwrap().as_ref().and_then(holder) };
    let elected =
        wait_until(Duration::from_secs(20), || async { lease_of().await.as_deref() == Some("deputy-a") }).await;
    assert!(elected, "deputy-a, alone, is elected");
    let b = env.spawn_operator(pb, ab, "deputy-b").await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", Duration::from_secs(20)).await;

    partition.cut();
    let stepped = wait_until(Duration::from_secs(10), || async {
        logged_at(&a.log, "cannot be sure of the leader lease").is_some()
    })
    .await;
    assert!(stepped, "the cut-off leader steps down; its log:\n{}", std::fs::read_to_string(&a.log).unwrap());
    let took_over =
        wait_until(Duration::from_secs(20), || async { lease_of().await.as_deref() == Some("deputy-b") }).await;
    assert!(took_over, "deputy-b takes the lease");
    let b_elected =
        wait_until(Duration::from_secs(10), || async { logged_at(&b.log, "elected leader").is_some() }).await;
    assert!(b_elected, "deputy-b reconciles");
    let down = logged_at(&a.log, "cannot be sure of the leader lease").unwrap();
    let up = logged_at(&b.log, "elected leader").unwrap();
    assert!(down < up, "the old leader stepped down ({down}) before the new one began ({up})");

    // Cut off, the old leader still serves its keys (and tokens from its caches).
    let jwks =
        deputy::http_client::get(&format!("http://127.0.0.1:{pa}/jwks.json"), Duration::from_secs(5)).await.unwrap();
    assert_eq!(jwks.status, 200);
    // The new leader does the work.
    let mut run = serde_json::to_value(env.runs().get("gdpr-check-q4").await.unwrap()).unwrap();
    run["metadata"] = json!({"name": "after-partition", "namespace": env.ns});
    run.as_object_mut().unwrap().remove("status");
    env.apply_value(run).await;
    env.wait_phase("after-partition", "Authorized", Duration::from_secs(20)).await;

    partition.heal();
    let healed = Instant::now();
    while a.child.try_wait().ok().flatten().is_none() {
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "the old leader exits once the API server answers, to start again as a follower"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let minted: Vec<String> = a
        .audit
        .lock()
        .unwrap()
        .iter()
        .chain(b.audit.lock().unwrap().iter())
        .filter(|l| l["action"] == "minted")
        .map(|l| l["run"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(minted.len(), 2, "one mint per run: {minted:?}");
    eprintln!("stepped down {down}, new leader {up}");
}
