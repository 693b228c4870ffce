//! End-to-end: the real `deputy run` process against the test API server and the real control
//! plane (`DEPUTY_E2E_BACKEND`). The tests play the kubelet by patching pod status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use deputy::resources::RunPhase;
use deputy::tokens::AudienceCheck;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::DeleteParams;
use serde_json::json;
use support::{Env, exists, wait_until};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_become_active_runs_with_the_specified_children() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.apply_example("deny.yaml").await;

    let run = env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let st = run.status.clone().unwrap();
    let ns = env.ns.clone();
    assert_eq!(
        st.identity.as_deref(),
        Some(format!("spiffe://cluster.local/ns/{ns}/agent/gdpr-compliance-agent/run/gdpr-check-q4").as_str())
    );
    assert_eq!(st.granted_scopes, ["compliance:audit:cross_dept", "compliance:privacy:check"]);
    assert_eq!(st.denied_scopes[0].scope, "marketing:write");
    assert_eq!(st.service_account.as_deref(), Some("deputy-run-gdpr-check-q4"));
    assert_eq!(st.grant.as_deref(), Some("alice-gdpr"));
    assert!(st.token_expires_at.is_some() && st.deadline.is_some());
    let authorized = st.conditions.iter().find(|c| c.type_ == "Authorized").unwrap();
    assert_eq!((authorized.status.as_str(), authorized.observed_generation), ("True", run.metadata.generation));

    // ServiceAccount without an API token.
    let sa: ServiceAccount = env.api().get("deputy-run-gdpr-check-q4").await.unwrap();
    assert_eq!(sa.automount_service_account_token, Some(false));
    let owner = &sa.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("AgentRun", Some(true)));

    // The Secret's token verifies with the published keys and names both principals.
    let token = env.run_token("gdpr-check-q4").await.unwrap();
    // Its audience is Deputy itself: a downstream service refuses it, and only gets exchanged tokens.
    assert!(env.verifier().await.verify(&token, AudienceCheck::Exactly("gdpr-compliance-service")).is_err());
    let claims = env.verifier().await.verify(&token, AudienceCheck::Exactly(&env.token_url())).unwrap();
    assert_eq!(claims.authority.len(), 1, "{:?}", claims.authority);
    assert_eq!(claims.authority["gdpr-compliance-service"], "compliance:audit:cross_dept compliance:privacy:check");
    assert_eq!(claims.sub, "alice@example.com");
    assert_eq!(claims.act.sub, st.identity.clone().unwrap());
    assert_eq!(claims.scope, "compliance:audit:cross_dept compliance:privacy:check");
    assert_eq!(claims.client_id, claims.act.sub);
    assert_eq!(claims.exp - claims.iat, 600);
    assert_eq!(claims.run.uid, run.metadata.uid.clone().unwrap());
    let secret: Secret = env.api().get("deputy-run-gdpr-check-q4").await.unwrap();
    let info: serde_json::Value = serde_json::from_slice(&secret.data.unwrap()["run.json"].0).unwrap();
    assert_eq!(info["tokenEndpoint"], format!("{}/token", env.token_url()));
    assert!(info["nextRotationAt"].as_str().unwrap() < info["tokenExpiresAt"].as_str().unwrap());

    // The pod, as specified.
    let pod: Pod = env.pod("deputy-run-gdpr-check-q4").await;
    let spec = pod.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("deputy-run-gdpr-check-q4"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(spec.active_deadline_seconds.unwrap() > 3500);
    let vol = spec.volumes.unwrap().into_iter().find(|v| v.name == "deputy-token").unwrap();
    let sat = vol.projected.unwrap().sources.unwrap()[1].service_account_token.clone().unwrap();
    assert_eq!(sat.audience.as_deref(), Some(env.token_url().as_str()));
    let env_names: Vec<String> = spec.containers[0].env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(
        env_names.contains(&"DEPUTY_TOKEN_FILE".to_string())
            && env_names.contains(&"DEPUTY_TOKEN_ENDPOINT".to_string())
    );

    // Bob is denied and gets nothing.
    let bob = env.wait_phase("bob-gdpr-check", "Denied", T).await;
    assert_eq!(bob.status.unwrap().reason.as_deref(), Some("DeniedByGrant"));
    assert!(!exists(&env.api::<Secret>(), "deputy-run-bob-gdpr-check").await);
    assert!(!exists(&env.api::<ServiceAccount>(), "deputy-run-bob-gdpr-check").await);
    assert!(!exists(&env.api::<Pod>(), "deputy-run-bob-gdpr-check").await);

    // Running once the pod runs.
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Running").await;
    env.wait_phase("gdpr-check-q4", "Running", T).await;

    // Audit lines carry both principals and never the token.
    let audit = env.audit();
    let minted = audit.iter().find(|l| l["action"] == "minted" && l["run"] == "gdpr-check-q4").unwrap();
    assert_eq!(minted["principal"], "alice@example.com");
    assert_eq!(minted["actor_chain"][0], st.identity.clone().unwrap());
    assert!(
        audit.iter().any(|l| l["action"] == "denied" && l["run"] == "bob-gdpr-check" && l["reason"] == "DeniedByGrant")
    );
    assert!(!audit.iter().any(|l| l.to_string().contains(&token)), "no audit line carries a token");

    // Grant and agent status count the active run.
    let ok = wait_until(T, || async {
        let g = env.grants().get("alice-gdpr").await.unwrap();
        let a = env.agents().get("gdpr-compliance-agent").await.unwrap();
        g.status.as_ref().is_some_and(|s| s.active_runs == 1 && s.phase == Some(deputy::resources::GrantPhase::Active))
            && a.status.as_ref().is_some_and(|s| s.active_runs == 1)
    })
    .await;
    assert!(ok, "grant/agent status: {}", env.operator_log());

    // The pod never lost its label: it was never relabelled (a pod read from the cache, which
    // selects on that label, carries it; once, every reconcile of an active run "put it back").
    let events = env.events_for("gdpr-check-q4").await;
    assert!(events.iter().any(|(_, r)| r == "Authorized"), "{events:?}");
    assert!(!events.iter().any(|(_, r)| r == "PodRelabelled"), "{events:?}");
    assert!(!env.operator_log().contains("lost its"), "no relabel in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_end_removes_every_credential_within_two_seconds() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Running").await;
    env.wait_phase("gdpr-check-q4", "Running", T).await;

    env.set_pod_phase("deputy-run-gdpr-check-q4", "Succeeded").await;
    let t0 = std::time::Instant::now();
    let gone = wait_until(Duration::from_secs(2), || async {
        !exists(&env.api::<Secret>(), "deputy-run-gdpr-check-q4").await
            && !exists(&env.api::<ServiceAccount>(), "deputy-run-gdpr-check-q4").await
    })
    .await;
    assert!(gone, "credentials still there after {:?}\n{}", t0.elapsed(), env.operator_log());
    let run = env.wait_phase("gdpr-check-q4", "Succeeded", T).await;
    let st = run.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("PodSucceeded"));
    assert!(st.completed_at.is_some());
    env.wait_run("gdpr-check-q4", T, |r| r.status.as_ref().is_some_and(|s| s.revoked_at.is_some())).await;
    // The finished pod is kept for its logs.
    assert!(exists(&env.api::<Pod>(), "deputy-run-gdpr-check-q4").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_grant_revokes_its_runs() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    env.grants().delete("alice-gdpr", &DeleteParams::default()).await.unwrap();
    let run = env.wait_phase("gdpr-check-q4", "Revoked", T).await;
    assert_eq!(run.status.unwrap().reason.as_deref(), Some("GrantDeleted"));
    let gone = wait_until(T, || async {
        !exists(&env.api::<Secret>(), "deputy-run-gdpr-check-q4").await
            && !exists(&env.api::<Pod>(), "deputy-run-gdpr-check-q4").await
    })
    .await;
    assert!(gone, "a revoked run's Secret and pod are deleted");
    assert!(env.audit().iter().any(|l| l["action"] == "revoked" && l["reason"] == "GrantDeleted"));
    // Re-creating the grant does not bring the run back.
    env.apply_example("gdpr-compliance.yaml").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let run = env.runs().get("gdpr-check-q4").await.unwrap();
    assert_eq!(run.status.unwrap().phase, Some(RunPhase::Revoked), "a terminal run is never re-activated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agent_chain_narrows_and_ends_with_its_parent() {
    let env = Env::start().await;
    env.apply_example("supply-chain.yaml").await;
    let parent = env.wait_phase("supply-chain-planner-7", "Authorized", T).await;
    let child = env.wait_phase("optimise-routes-7", "Authorized", T).await;
    let pst = parent.status.unwrap();
    let cst = child.status.unwrap();
    assert_eq!(
        pst.granted_audiences,
        ["inventory-service", "orders-service"],
        "payments-service taken by the Deny grant"
    );
    assert_eq!(cst.granted_scopes, ["inventory:read"]);
    assert_eq!(cst.delegation_chain.len(), 3);

    let token = env.run_token("optimise-routes-7").await.unwrap();
    let claims = env.verifier().await.verify(&token, AudienceCheck::Exactly(&env.token_url())).unwrap();
    assert_eq!(claims.authority["inventory-service"], "inventory:read");
    assert_eq!(claims.sub, "alice@example.com");
    assert_eq!(claims.act.sub, cst.identity.clone().unwrap());
    assert_eq!(claims.act.act.as_ref().unwrap().sub, pst.identity.clone().unwrap(), "the planner is nested in act");
    assert_eq!(claims.scope, "inventory:read");

    // The parent ends: the child is revoked.
    env.set_pod_phase("deputy-run-supply-chain-planner-7", "Succeeded").await;
    env.wait_phase("supply-chain-planner-7", "Succeeded", Duration::from_secs(180)).await;
    let child = env.wait_phase("optimise-routes-7", "Revoked", T).await;
    assert_eq!(child.status.unwrap().reason.as_deref(), Some("ParentEnded"));
    let gone = wait_until(T, || async { !exists(&env.api::<Secret>(), "deputy-run-optimise-routes-7").await }).await;
    assert!(gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_operator_leaks_nothing_and_reactivates_nothing() {
    let mut env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.apply_example("supply-chain.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    env.wait_phase("supply-chain-planner-7", "Authorized", T).await;
    env.wait_phase("optimise-routes-7", "Authorized", T).await;

    env.kill_operator();
    // While it is down: one pod finishes, one run is deleted.
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Succeeded").await;
    env.runs().delete("optimise-routes-7", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(exists(&env.runs(), "optimise-routes-7").await, "the finalizer holds the run until Deputy cleans up");

    env.start_operator().await;
    env.wait_phase("gdpr-check-q4", "Succeeded", T).await;
    let ok = wait_until(T, || async {
        !exists(&env.runs(), "optimise-routes-7").await
            && !exists(&env.api::<Secret>(), "deputy-run-optimise-routes-7").await
            && !exists(&env.api::<Secret>(), "deputy-run-gdpr-check-q4").await
            && !exists(&env.api::<ServiceAccount>(), "deputy-run-gdpr-check-q4").await
    })
    .await;
    assert!(ok, "nothing leaked:\n{}", env.operator_log());
    // D5: the deletion of an active run is one audit line, however often its cleanup runs.
    let deleted = env.audit().iter().filter(|l| l["reason"] == "RunDeleted" && l["run"] == "optimise-routes-7").count();
    assert_eq!(deleted, 1, "RunDeleted audit lines:\n{}", env.operator_log());
    // The surviving run was not re-minted by the new process.
    let planner = env.runs().get("supply-chain-planner-7").await.unwrap();
    assert_eq!(planner.status.unwrap().rotations, 0);
    assert_eq!(
        env.audit().iter().filter(|l| l["action"] == "minted").count(),
        0,
        "the restarted operator minted nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conflicts_are_retried_not_lost() {
    let env = Env::start().await;
    match &env.api {
        Some(api) => {
            // The operator's own writes fail: its status patches and its first Secret writes.
            api.fail_next_writes("agentruns/status", 3, 409);
            api.fail_next_writes("secrets", 2, 409);
            env.apply_example("gdpr-compliance.yaml").await;
            env.wait_phase("gdpr-check-q4", "Authorized", Duration::from_secs(30)).await;
            let token = env.run_token("gdpr-check-q4").await.unwrap();
            // Write-ahead audit: the token in the Secret has its `minted` line, after the run's
            // `authorized` line; the tokens whose Secret write was refused have lines too
            // (a line for a token never used, never a token without one).
            let jti = env.verifier().await.verify(&token, AudienceCheck::Exactly(&env.token_url())).unwrap().jti;
            let audit = env.audit();
            let at = |action: &str, jti: Option<&str>| {
                audit.iter().position(|l| {
                    l["run"] == "gdpr-check-q4" && l["action"] == action && jti.is_none_or(|j| l["jti"] == j)
                })
            };
            let (authorized, minted) = (at("authorized", None), at("minted", Some(&jti)));
            assert!(authorized.is_some() && minted.is_some() && authorized < minted, "{audit:?}");
            let lines = audit.iter().filter(|l| l["run"] == "gdpr-check-q4" && l["action"] == "minted").count();
            assert!(lines >= 2, "the refused writes' tokens were audited too: {audit:?}");
            let stats = api.stats();
            // The Secret is created (POST), and later written at its uid (PATCH).
            let writes = stats.count("secrets", "CREATE") + stats.count("secrets", "PATCH");
            assert!(writes >= 3, "the Secret write was retried: {stats:?}");
            assert!(env.operator_log().contains("conflict"), "the conflicts were seen and retried");
        }
        None => {
            // A real API server never answers a forced server-side apply with 409, so the
            // operator's writes are refused by an admission policy instead (422), until the
            // policy is removed: the same retry path (a stale or refused write is retried in
            // 200 ms, without growing the backoff).
            let fault = support::kube_backend::refuse_operator_writes(&env).await;
            env.apply_example("gdpr-compliance.yaml").await;
            let refused = wait_until(T, || async {
                // The Secret is created (a create, as every child first is), then written at its uid.
                let requests = env.operator_requests().await;
                let count = |verb: &str| requests.get("secrets").and_then(|v| v.get(verb)).copied().unwrap_or(0);
                count("create") + count("patch") >= 3
            })
            .await;
            assert!(refused, "the operator retried its refused Secret write: {:?}", env.operator_requests().await);
            assert!(env.run_token("gdpr-check-q4").await.is_none(), "no Secret while writes are refused");
            fault.remove().await;
            env.wait_phase("gdpr-check-q4", "Authorized", Duration::from_secs(30)).await;
            assert!(env.run_token("gdpr-check-q4").await.is_some());
            assert!(env.operator_log().contains("injected fault"), "the refusals were seen and retried");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_at_half_life_and_runs_expire_at_their_deadline() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    // A short-lived run. testapi does not evaluate CEL, so it can run at 4 s / 9 s; a real API
    // server enforces the CRD's bounds (tokenTTL >= 30s, maxDuration >= 1m), so there the test
    // takes about a minute.
    let (ttl, duration) = if env.is_test_api() { (4_i64, 9_i64) } else { (30, 60) };
    if let Some(api) = &env.api {
        // D2, driven: the run watch lags 1.5 s behind the API server, so each rotation's
        // Secret event reaches the controller while its run cache still holds the status from
        // before that rotation. Deputy must not mint again on that copy (checked below: one
        // audit line and one jti per rotation). A real API server's watch cannot be held back;
        // there the same checks run on the natural interleaving.
        api.delay_watch("agentruns", Duration::from_millis(1500));
    }
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gdpr-compliance.yaml"))
            .unwrap();
    let mut run: serde_json::Value = serde_yaml::from_str(text.split("---").last().unwrap()).unwrap();
    run["metadata"]["name"] = json!("short");
    run["metadata"]["namespace"] = json!(env.ns);
    run["spec"]["tokenTTL"] = json!(format!("{ttl}s"));
    run["spec"]["maxDuration"] =
        json!(if duration % 60 == 0 { format!("{}m", duration / 60) } else { format!("{duration}s") });
    env.apply_value(run).await;
    let first = env.wait_phase("short", "Authorized", T).await.status.unwrap();
    let first_token = env.run_token("short").await.unwrap();
    let secs = |s: i64| Duration::from_secs(s.unsigned_abs());
    let rotated =
        env.wait_run("short", secs(ttl * 6 / 10 + 3), |r| r.status.as_ref().is_some_and(|s| s.rotations >= 1)).await;
    let st = rotated.status.unwrap();
    assert!(st.token_expires_at > first.token_expires_at);
    let issued = st.token_issued_at.unwrap().as_second() - first.token_issued_at.unwrap().as_second();
    // Half the lifetime plus a jitter of up to a tenth, and a second of reconcile latency.
    let window = ttl / 2..=ttl / 2 + (ttl / 10).max(1) + 1;
    assert!(window.contains(&issued), "rotated {issued}s after issue, expected {window:?} for a {ttl}s token");
    let second_token = env.run_token("short").await.unwrap();
    assert_ne!(first_token, second_token);
    assert!(env.audit().iter().any(|l| l["action"] == "rotated" && l["run"] == "short"));

    let expired = env.wait_phase("short", "Expired", secs(duration + 5)).await;
    let end = expired.status.unwrap();
    assert_eq!(end.reason.as_deref(), Some("DeadlineExceeded"));

    // Every token of the run's life, from the audit lines: one per rotation (D2: never two),
    // none re-minted in a loop before the deadline (D1), none born expired.
    let deadline = end.deadline.unwrap();
    let mints: Vec<(jiff::Timestamp, i64, String)> = env
        .audit()
        .iter()
        .filter(|l| l["run"] == "short" && (l["action"] == "minted" || l["action"] == "rotated"))
        .map(|l| {
            let ts: jiff::Timestamp = l["ts"].as_str().unwrap().parse().unwrap();
            (ts, l["exp"].as_i64().unwrap(), l["jti"].as_str().unwrap().to_string())
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = mints.iter().map(|(_, _, j)| j).collect();
    let last_5s = mints.iter().filter(|(ts, _, _)| *ts >= deadline - jiff::SignedDuration::from_secs(5)).count();
    eprintln!(
        "tokenTTL {ttl}s, maxDuration {duration}s ({:?}): {} mints over the life, {last_5s} in the last 5 s, rotations {}",
        env.backend(),
        mints.len(),
        end.rotations
    );
    assert_eq!(distinct.len(), mints.len(), "no token is minted twice: {mints:?}");
    assert_eq!(mints.len(), usize::try_from(end.rotations).unwrap() + 1, "one audit line per token: {mints:?}");
    assert!(last_5s <= 2, "at most 2 mints in the last 5 s: {mints:?}");
    // About one per half-lifetime (the last one lives until the deadline).
    let most = usize::try_from(duration / (ttl / 2) + 1).unwrap();
    assert!(mints.len() <= most, "at most {most} tokens for a {duration}s run of {ttl}s tokens: {mints:?}");
    for (ts, exp, jti) in &mints {
        assert!(*exp > ts.as_second(), "token {jti} was born expired ({exp} at {ts})");
        assert!(*exp <= deadline.as_second(), "token {jti} outlives the deadline");
    }
    let gone = wait_until(T, || async {
        !exists(&env.api::<Secret>(), "deputy-run-short").await && !exists(&env.api::<Pod>(), "deputy-run-short").await
    })
    .await;
    assert!(gone, "an expired run's pod is stopped and its Secret deleted");
}
