//! Faults, end to end (issue 12): the operator killed with SIGKILL at random, seeded moments
//! while a workload of runs starts, rotates, ends and is revoked; and the API server gone for
//! a while in the middle of a workload. Both backends: the real control plane (where the API
//! server is stopped with SIGSTOP, so every request to it hangs, as a partitioned or frozen
//! server does) and the test API server (where it answers 503 and ends every watch, as an API
//! server without its etcd does).
//!
//! `DEPUTY_CRASH_SEED` and `DEPUTY_CRASH_ITERATIONS` choose the kill moments and how many; a
//! failure prints the seed, so it can be replayed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use deputy::resources::{AgentRun, RunPhase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::{Value, json};
use support::{Env, exchange_form, wait_until};

/// Every token written into a run Secret of the namespace and every phase each run went
/// through, as watches see them (a watch sees each write; a relist, after a watch error, may
/// skip one, which the summary counts).
#[derive(Default)]
struct Seen {
    /// token → the Secret it was written to, and the token's number there
    /// (`deputy.dev/token-number`).
    tokens: BTreeMap<String, (String, u32)>,
    /// run uid → its name and the phases it went through, in order (repeats collapsed).
    phases: BTreeMap<String, (String, Vec<RunPhase>)>,
    restarts: u32,
}

fn watch_everything(env: &Env) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let secrets: Api<Secret> = env.api();
    let runs: Api<AgentRun> = env.api();
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            let secret_events = watcher(secrets, watcher::Config::default()).map(|e| e.map(Either::Secret)).boxed();
            let run_events =
                watcher(runs, watcher::Config::default()).map(|e| e.map(|e| Either::Run(Box::new(e)))).boxed();
            let mut events = futures::stream::select(secret_events, run_events);
            while let Some(ev) = events.next().await {
                let mut seen = seen.lock().unwrap();
                match ev {
                    Ok(Either::Secret(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                        if let Some(t) = s.data.as_ref().and_then(|d| d.get("token")) {
                            let token = String::from_utf8_lossy(&t.0).to_string();
                            let number = deputy::runs::token_number(&s.metadata);
                            seen.tokens.entry(token).or_insert_with(|| (s.name_any(), number));
                        }
                    }
                    Ok(Either::Run(e)) if matches!(*e, watcher::Event::Apply(_) | watcher::Event::InitApply(_)) => {
                        let (watcher::Event::Apply(r) | watcher::Event::InitApply(r)) = *e else { continue };
                        let Some(phase) = r.status.as_ref().and_then(|s| s.phase) else { continue };
                        let entry =
                            seen.phases.entry(r.uid().unwrap_or_default()).or_insert_with(|| (r.name_any(), vec![]));
                        if entry.1.last() != Some(&phase) {
                            entry.1.push(phase);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => seen.restarts += 1,
                }
            }
        }
    });
    (seen, task)
}

#[allow(clippy::large_enum_variant)] // a test-only stream item, one at a time
enum Either {
    Secret(watcher::Event<Secret>),
    Run(Box<watcher::Event<AgentRun>>),
}

/// The claims of a JWT, unverified (the tests verify signatures elsewhere; here only the
/// times and the id matter).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// A run of the GDPR example's Agent and grant, short-lived enough to rotate and expire during
/// the test (the real API server enforces tokenTTL >= 30s and maxDuration >= 1m).
fn short_run(env: &Env, name: &str, long: bool) -> Value {
    let (ttl, duration) = match (env.is_test_api(), long) {
        (true, false) => ("4s", "9s"),
        (true, true) => ("4s", "40s"),
        (false, false) => ("30s", "1m"),
        (false, true) => ("30s", "3m"),
    };
    json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": name, "namespace": env.ns},
        "spec": {"agent": "gdpr-compliance-agent", "principal": "alice@example.com",
                 "task": format!("crash workload {name}"),
                 "scopes": ["compliance:audit:cross_dept"], "audiences": ["gdpr-compliance-service"],
                 "tokenTTL": ttl, "maxDuration": duration},
    })
}

#[derive(Clone, Copy, Debug)]
enum Act {
    EndPod,
    Delete,
    Revoke,
}

async fn act(env: &Env, run: &str, what: Act) {
    match what {
        Act::EndPod => {
            // The pod may not exist yet (a run still Pending); then the run is left to live.
            let pods: Api<Pod> = env.api();
            let patch = json!({"status": {"phase": "Succeeded"}});
            let _ =
                pods.patch_status(&format!("deputy-run-{run}"), &PatchParams::default(), &Patch::Merge(&patch)).await;
        }
        Act::Delete => {
            let _ = env.runs().delete(run, &DeleteParams::default()).await;
        }
        Act::Revoke => {
            let patch = json!({"metadata": {"annotations": {deputy::runs::REVOKE_ANNOTATION: "2026-12-03T00:00:00Z"}}});
            let _ = env.runs().patch(run, &PatchParams::default(), &Patch::Merge(&patch)).await;
        }
    }
}

/// What the cluster looks like once the operator has converged, or why it has not: every run
/// decided; an active run has its ServiceAccount, Secret and Pod, each owned by it; an ended
/// run has no Secret or ServiceAccount; a deleted run is gone with its children.
async fn unconverged(env: &Env, deleted: &BTreeSet<String>) -> Vec<String> {
    let runs = env.runs().list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
    let secrets: Api<Secret> = env.api();
    let sas: Api<ServiceAccount> = env.api();
    let pods: Api<Pod> = env.api();
    let mut wrong = vec![];
    let owned = |meta: &kube::api::ObjectMeta, uid: &str| {
        meta.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid)
    };
    for run in &runs {
        let name = run.name_any();
        let uid = run.uid().unwrap_or_default();
        let child = format!("deputy-run-{name}");
        let phase = run.status.as_ref().and_then(|s| s.phase);
        if run.meta().deletion_timestamp.is_some() {
            wrong.push(format!("{name}: deleted, still held by its finalizer"));
            continue;
        }
        let secret = secrets.get_opt(&child).await.ok().flatten();
        let sa = sas.get_opt(&child).await.ok().flatten();
        match phase {
            None | Some(RunPhase::Pending) => wrong.push(format!("{name}: not decided ({phase:?})")),
            Some(p) if p.is_terminal() => {
                if secret.is_some() || sa.is_some() {
                    wrong.push(format!("{name}: {p:?} but its Secret or ServiceAccount is still there"));
                }
            }
            Some(p) => {
                let pod = pods.get_opt(&child).await.ok().flatten();
                let ok = secret.as_ref().is_some_and(|s| owned(&s.metadata, &uid))
                    && sa.as_ref().is_some_and(|s| owned(&s.metadata, &uid))
                    && pod.as_ref().is_some_and(|s| owned(&s.metadata, &uid));
                let revoked = run.annotations().contains_key(deputy::runs::REVOKE_ANNOTATION);
                let pod_ended =
                    pod.as_ref().and_then(|p| p.status.as_ref()).and_then(|s| s.phase.as_deref()) == Some("Succeeded");
                let recorded = run.status.as_ref().map_or(0, |s| s.rotations + 1);
                let number = secret.as_ref().map_or(0, |s| deputy::runs::token_number(&s.metadata));
                if !ok {
                    wrong.push(format!("{name}: {p:?} without its own ServiceAccount, Secret and Pod"));
                } else if number != recorded {
                    wrong.push(format!("{name}: its Secret holds token {number}, its status records {recorded}"));
                } else if revoked || pod_ended {
                    wrong.push(format!("{name}: {p:?} though revoked ({revoked}) or its pod ended ({pod_ended})"));
                }
            }
        }
    }
    for name in deleted {
        let child = format!("deputy-run-{name}");
        if runs.iter().any(|r| &r.name_any() == name) {
            continue; // reported above
        }
        if secrets.get_opt(&child).await.ok().flatten().is_some() || sas.get_opt(&child).await.ok().flatten().is_some()
        {
            wrong.push(format!("{name}: deleted, but its Secret or ServiceAccount is still there"));
        }
    }
    wrong
}

/// Waits until [`unconverged`] finds nothing wrong: (true, []) or (false, what is still wrong).
async fn converge(env: &Env, deleted: &BTreeSet<String>, timeout: Duration) -> (bool, Vec<String>) {
    let t0 = Instant::now();
    loop {
        let wrong = unconverged(env, deleted).await;
        if wrong.is_empty() || t0.elapsed() > timeout {
            return (wrong.is_empty(), wrong);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The invariants over everything seen so far: every token written has exactly one
/// minted/rotated audit line, after its run's authorized line; none is born expired; the
/// tokens of a run are numbered 1, 2, … with no number twice, and no run has more tokens than
/// rotations + 1 (an active run's next token may be written while its status is listed: one
/// more); no terminal run came back.
fn violations(seen: &Seen, audit: &[Value], runs: &[AgentRun]) -> Vec<String> {
    let mut out = vec![];
    let mut per_run: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (token, (secret, number)) in &seen.tokens {
        let c = claims(token);
        let jti = c["jti"].as_str().unwrap_or_default();
        let run = secret.trim_start_matches("deputy-run-");
        per_run.entry(run.to_string()).or_default().push(*number);
        let (iat, exp) = (c["iat"].as_i64().unwrap_or(0), c["exp"].as_i64().unwrap_or(0));
        if exp <= iat {
            out.push(format!("{run}: token {jti} born expired (iat {iat}, exp {exp})"));
        }
        let lines: Vec<usize> = audit
            .iter()
            .enumerate()
            .filter(|(_, l)| (l["action"] == "minted" || l["action"] == "rotated") && l["jti"] == jti)
            .map(|(i, _)| i)
            .collect();
        if lines.len() != 1 {
            out.push(format!("{run}: token {jti} has {} minted/rotated audit lines", lines.len()));
            continue;
        }
        let authorized = audit.iter().position(|l| l["action"] == "authorized" && l["run"] == run);
        if authorized.is_none_or(|a| a > lines[0]) {
            out.push(format!("{run}: token {jti} audited before (or without) the run's authorized line"));
        }
    }
    for (run, numbers) in &mut per_run {
        numbers.sort_unstable();
        if numbers.contains(&0) || numbers.windows(2).any(|w| w[0] == w[1]) {
            let lines: Vec<String> = audit.iter().filter(|l| l["run"] == run.as_str()).map(|l| l.to_string()).collect();
            out.push(format!(
                "{run}: tokens numbered {numbers:?} (each once, from 1); its audit:\n{}",
                lines.join("\n")
            ));
        }
    }
    for run in runs {
        let name = run.name_any();
        let rotations = run.status.as_ref().map(|s| s.rotations).unwrap_or(0);
        let active = run.status.as_ref().and_then(|s| s.phase).is_some_and(RunPhase::is_active);
        let tokens = per_run.get(&name).map_or(0, |n| n.len() as u32);
        if tokens > rotations + 1 + u32::from(active) {
            out.push(format!("{name}: {tokens} tokens written for {rotations} rotations"));
        }
    }
    for (uid, (name, phases)) in &seen.phases {
        if let Some(end) = phases.iter().position(|p| p.is_terminal())
            && phases[end..].iter().any(|p| !p.is_terminal() || *p != phases[end])
        {
            out.push(format!("{name} ({uid}): went {phases:?} after ending"));
        }
    }
    out
}

fn seed() -> u64 {
    std::env::var("DEPUTY_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_203)
}

fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_killed_at_random_moments_keeps_every_invariant() {
    let mut env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", Duration::from_secs(30)).await;
    let seed = seed();
    // About 30 s on either backend by default.
    let iterations: u32 = std::env::var("DEPUTY_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if env.is_test_api() { 30 } else { 14 });
    let mut rng = rng(seed);
    let (seen, watch) = watch_everything(&env);
    let mut audits = vec![];
    let mut live: Vec<String> = vec!["gdpr-check-q4".into()];
    let mut deleted = BTreeSet::new();
    let mut acts = 0;
    let mut converge_times = vec![];
    let t0 = Instant::now();
    for i in 0..iterations {
        // A workload: two new runs (one short, one longer-lived), and an end, a deletion or a
        // revocation for about a third of the live ones.
        for (k, long) in [("a", false), ("b", true)] {
            env.apply_value(short_run(&env, &format!("c{i}{k}"), long)).await;
            live.push(format!("c{i}{k}"));
        }
        let mut keep = vec![];
        for run in std::mem::take(&mut live) {
            let what = match rng.next_u32() % 9 {
                0 => Some(Act::EndPod),
                1 => Some(Act::Delete),
                2 => Some(Act::Revoke),
                _ => None,
            };
            match what {
                Some(w) => {
                    act(&env, &run, w).await;
                    acts += 1;
                    if matches!(w, Act::Delete) {
                        deleted.insert(run);
                    }
                }
                None => keep.push(run),
            }
        }
        live = keep;
        // The kill: anywhere in the next 2.5 s of the operator's work on it (5 s on the real
        // control plane, whose tokens live 30 s at least: so that the test lives through
        // rotations there too).
        let window = if env.is_test_api() { 2500 } else { 5000 };
        let at = Duration::from_millis(rng.next_u64() % window);
        tokio::time::sleep(at).await;
        let op = env.operator.take().expect("the operator runs");
        audits.push(op.audit.clone());
        drop(op); // SIGKILL
        // While it is down, sometimes one more change.
        if rng.next_u32().is_multiple_of(2)
            && let Some(run) = live.pop()
        {
            act(&env, &run, Act::EndPod).await;
            acts += 1;
        }
        env.start_operator().await;
        let started = Instant::now();
        let (converged, last) = converge(&env, &deleted, Duration::from_secs(60)).await;
        converge_times.push(started.elapsed());
        let mut audit: Vec<Value> = audits.iter().flat_map(|a| a.lock().unwrap().clone()).collect();
        audit.extend(env.audit());
        let runs = env.runs().list(&Default::default()).await.unwrap().items;
        let mut bad = violations(&seen.lock().unwrap(), &audit, &runs);
        if !converged {
            bad.extend(last.iter().map(|w| format!("not converged after 60 s: {w}")));
        }
        assert!(
            bad.is_empty(),
            "seed {seed}, iteration {i} (killed {at:?} into the workload): invariants broken:\n{}\noperator log:\n{}",
            bad.join("\n"),
            env.operator_log()
        );
        live.retain(|r| {
            runs.iter()
                .any(|x| &x.name_any() == r && x.status.as_ref().and_then(|s| s.phase).is_some_and(RunPhase::is_active))
        });
    }
    watch.abort();
    let seen = seen.lock().unwrap();
    let audit: Vec<Value> = audits.iter().flat_map(|a| a.lock().unwrap().clone()).chain(env.audit()).collect();
    let count = |action: &str| audit.iter().filter(|l| l["action"] == action).count();
    converge_times.sort();
    eprintln!(
        "crash anywhere ({:?}, seed {seed}): {iterations} kills in {:.0} s, {} runs, {acts} ends/deletions/revocations, \
         {} tokens written ({} minted, {} rotated audit lines), {} watch restarts; convergence after restart \
         p50 {:?}, max {:?}; 0 invariant violations",
        env.backend(),
        t0.elapsed().as_secs_f64(),
        seen.phases.len(),
        seen.tokens.len(),
        count("minted"),
        count("rotated"),
        seen.restarts,
        converge_times[converge_times.len() / 2],
        converge_times.last().unwrap(),
    );
    assert!(count("rotated") > 0, "the workload rotated tokens");
}

/// The API server gone for a while: the token endpoint keeps exchanging for a run whose actor
/// token it reviewed before, answers 503 with Retry-After for one it cannot review, keeps
/// serving its keys and readiness, and never panics; once the API server is back, everything
/// converges and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_keeps_cached_exchanges_and_converges_after() {
    let mut env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    for name in ["before-a", "before-b", "gone-during"] {
        // Tokens that outlive the outage (no rotation can be written while it lasts).
        let mut run = short_run(&env, name, true);
        run["spec"]["tokenTTL"] = json!("2m");
        run["spec"]["maxDuration"] = json!("10m");
        env.apply_value(run).await;
    }
    for name in ["gdpr-check-q4", "before-a", "before-b", "gone-during"] {
        env.wait_phase(name, "Authorized", Duration::from_secs(30)).await;
    }
    // before-a has exchanged once (its actor token's review is cached); before-b has not.
    let exchange = |run: &'static str| {
        let env = &env;
        async move {
            let subject = env.run_token(run).await.unwrap();
            let actor = env.actor_token(run).await;
            (subject, actor)
        }
    };
    let (a_subject, a_actor) = exchange("before-a").await;
    let (b_subject, b_actor) = exchange("before-b").await;
    let (status, body) = env.post("/token", &exchange_form(&a_subject, &a_actor), None).await;
    assert_eq!(status, 200, "{body}");

    let outage = if env.is_test_api() { Duration::from_secs(10) } else { Duration::from_secs(30) };
    let down = Outage::start(&env);
    let t0 = Instant::now();
    let (mut ok, mut unavailable, mut other) = (0, 0, vec![]);
    let mut b_answered = None;
    while t0.elapsed() < outage {
        let (status, body) = env.post("/token", &exchange_form(&a_subject, &a_actor), None).await;
        if status == 200 {
            ok += 1
        } else {
            other.push(format!("cached run: {status} {body}"))
        }
        if b_answered.is_none() {
            let asked = Instant::now();
            let r = deputy::http_client::post_form(
                &format!("{}/token", env.token_url()),
                &exchange_form(&b_subject, &b_actor),
                None,
                Duration::from_secs(20),
            )
            .await
            .unwrap();
            if r.status == 503 {
                unavailable += 1;
                assert!(r.headers.contains_key("retry-after"), "503 without Retry-After: {:?}", r.headers);
            } else {
                other.push(format!("uncached run: {} {}", r.status, String::from_utf8_lossy(&r.body)));
            }
            b_answered = Some(asked.elapsed());
        }
        let jwks = deputy::http_client::get(&format!("{}/jwks.json", env.token_url()), Duration::from_secs(5)).await;
        let ready = deputy::http_client::get(&format!("{}/livez", env.admin_url()), Duration::from_secs(5)).await;
        assert!(jwks.is_ok_and(|r| r.status == 200), "the JWKS is served from memory");
        assert!(ready.is_ok_and(|r| r.status == 200), "the operator is alive");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    down.end().await;
    let back = Instant::now();
    // A leader whose lease ran out during the outage ends once the API server answers again
    // (its caches stopped with its controller), to start afresh; the kubelet would start it
    // again, and so does the test.
    let exited = wait_until(Duration::from_secs(7), || {
        let op = env.operator.as_mut().map(|o| o.child.try_wait());
        async move { matches!(op, Some(Ok(Some(_)))) }
    })
    .await;
    if exited {
        env.operator = None;
        env.start_operator().await;
    }
    assert!(other.is_empty(), "answers during the outage: {other:#?}\noperator log:\n{}", env.operator_log());
    assert_eq!(unavailable, 1, "the uncached run was told 503");
    // After: a change made now is carried out, a run deleted now leaves nothing, and the run
    // that could not exchange can.
    env.apply_value(short_run(&env, "after", true)).await;
    env.runs().delete("gone-during", &DeleteParams::default()).await.unwrap();
    env.wait_phase("after", "Authorized", Duration::from_secs(60)).await;
    let recovered = back.elapsed();
    let (converged, wrong) =
        converge(&env, &BTreeSet::from(["gone-during".to_string()]), Duration::from_secs(60)).await;
    assert!(converged, "{wrong:#?}\noperator log:\n{}", env.operator_log());
    let b_ok = wait_until(Duration::from_secs(30), || async {
        env.post("/token", &exchange_form(&b_subject, &b_actor), None).await.0 == 200
    })
    .await;
    assert!(b_ok, "the uncached run exchanges once the API server is back");
    let log = env.operator_log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "API server outage ({:?}, {:?}): {ok} cached exchanges answered 200 during it, the uncached one 503 in {:?}; \
         a run created after it Authorized {:?} after the API server was back (the operator {})",
        env.backend(),
        outage,
        b_answered.unwrap_or_default(),
        recovered,
        if exited { "ended when it answered, having lost its lease, and was started again" } else { "kept running" }
    );
}

/// The API server down: SIGSTOP of kube-apiserver (every request hangs), or the test API
/// server answering 503 to everything.
struct Outage<'a> {
    env: &'a Env,
}

impl<'a> Outage<'a> {
    fn start(env: &'a Env) -> Outage<'a> {
        match (&env.api, env.cluster) {
            (Some(api), _) => api.outage(true),
            (None, Some(cp)) => assert!(cp.pause("kube-apiserver"), "kube-apiserver paused"),
            _ => unreachable!(),
        }
        Outage { env }
    }

    async fn end(self) {
        match (&self.env.api, self.env.cluster) {
            (Some(api), _) => api.outage(false),
            (None, Some(cp)) => assert!(cp.resume("kube-apiserver"), "kube-apiserver resumed"),
            _ => unreachable!(),
        }
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        // A test that failed during the outage must not leave the API server stopped.
        match (&self.env.api, self.env.cluster) {
            (Some(api), _) => api.outage(false),
            (None, Some(cp)) => {
                cp.resume("kube-apiserver");
            }
            _ => {}
        }
    }
}
