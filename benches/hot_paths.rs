//! Micro-benchmarks of Deputy's hot paths (issue 6, part 1):
//!
//! - `authorize/grants/{1,100,10000}`: authorising one run against a namespace holding that
//!   many DelegationGrants (all but a few for other principals or other agents);
//! - `tokens/mint/{EdDSA,ES256}` and `tokens/verify/{EdDSA,ES256}`: minting a run token
//!   (claims + JSON + signature) and verifying one (signature + claims);
//! - `exchange/router_oneshot`: one RFC 8693 exchange through the token endpoint's axum router
//!   in-process (no socket): form parsing, subject-token verification, run lookup in the
//!   reflector store, the actor's TokenReview (answered once by an in-process test API server,
//!   then cached), scope attenuation, minting, the audit line and metrics.
//!
//! Run: `cargo bench --bench hot_paths` (about 1 minute), or one group:
//! `cargo bench --bench hot_paths -- tokens/mint`. Measurement is 3 s per benchmark.
//! The exchange benchmark writes one audit line per exchange to stdout, as `deputy run` does;
//! redirect stdout (`> /dev/null`) to keep the report readable (criterion reports on stderr
//! only with `--quiet`; its report goes to stdout otherwise, so prefer filtering with `grep`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, header};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use deputy::authorization::{Input, Policy, authorize};
use deputy::metrics::Metrics;
use deputy::registration::Registrations;
use deputy::resources::{Agent, AgentRun, DelegationGrant, ResourceServer};
use deputy::runs::PodPhase;
use deputy::server::review::Reviewer;
use deputy::server::{EndpointState, router};
use deputy::signing::{KeyMaterial, KeyStore};
use deputy::tokens::{Alg, AudienceCheck, KeySet, RunRef, RunTokenSpec, Verifier};
use jiff::{SignedDuration, Timestamp};
use kube::runtime::watcher;
use serde_json::json;
use tower::ServiceExt;

const NS: &str = "marketing";
const AGENT: &str = "gdpr-compliance-agent";
const RUN: &str = "gdpr-check-q4";
const PRINCIPAL: &str = "alice@example.com";
const AUDIENCE: &str = "gdpr-compliance-service";

fn policy() -> Policy {
    Policy {
        trust_domain: "cluster.local".into(),
        max_token_ttl: SignedDuration::from_hours(1),
        default_token_ttl: SignedDuration::from_mins(10),
        max_run_duration: SignedDuration::from_hours(24),
        deputy_namespace: Some("deputy-system".into()),
    }
}

fn agent() -> Agent {
    serde_json::from_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": AGENT, "namespace": NS, "uid": "uid-agent"},
        "spec": {"scopes": ["compliance:*", "marketing:read"], "audiences": [AUDIENCE], "maxTokenTTL": "15m",
                 "template": {"spec": {"restartPolicy": "Never",
                     "containers": [{"name": "agent", "image": "docker.io/library/busybox:1.36"}]}}}
    }))
    .unwrap()
}

fn run(uid: &str, status: serde_json::Value) -> AgentRun {
    serde_json::from_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": RUN, "namespace": NS, "uid": uid, "generation": 1},
        "spec": {"agent": AGENT, "principal": PRINCIPAL, "task": "Check the Q4 field campaign",
                 "scopes": ["compliance:audit:cross_dept", "compliance:privacy:check", "marketing:write"],
                 "audiences": [AUDIENCE], "tokenTTL": "10m", "maxDuration": "1h"},
        "status": status
    }))
    .unwrap()
}

/// `n` grants: `matching` of them for (alice, the agent), the rest for other principals or
/// other agents (half each), as in a busy namespace.
fn grants(n: usize, matching: usize) -> Vec<DelegationGrant> {
    (0..n)
        .map(|i| {
            let (principal, agent_name) = if i < matching {
                (PRINCIPAL.to_string(), AGENT.to_string())
            } else if i % 2 == 0 {
                (format!("user{i}@example.com"), AGENT.to_string())
            } else {
                (PRINCIPAL.to_string(), format!("other-agent-{i}"))
            };
            let scopes = if i == 0 {
                json!(["compliance:audit:*", "compliance:privacy:check"])
            } else {
                json!(["compliance:audit:read", "marketing:read"])
            };
            serde_json::from_value(json!({
                "apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant",
                "metadata": {"name": format!("grant-{i}"), "namespace": NS, "uid": format!("uid-grant-{i}")},
                "spec": {"principal": principal, "agent": agent_name, "effect": "Allow", "scopes": scopes,
                         "audiences": [AUDIENCE], "maxTokenTTL": "10m", "maxRunDuration": "2h"}
            }))
            .unwrap()
        })
        .collect()
}

/// The ResourceServer registering AUDIENCE for every namespace.
fn server() -> ResourceServer {
    serde_json::from_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "ResourceServer", "metadata": {"name": AUDIENCE},
        "spec": {"audience": AUDIENCE, "scopes": ["compliance:*"], "namespaceSelector": {}}
    }))
    .unwrap()
}

fn bench_authorize(c: &mut Criterion) {
    let policy = policy();
    let agent = agent();
    let run = run("uid-run", json!({}));
    let now = Timestamp::now();
    let registered = Registrations::for_namespace(&[server()], NS, None);
    let mut g = c.benchmark_group("authorize");
    for n in [1usize, 100, 10_000] {
        let grants = grants(n, n.min(3));
        // Sanity: the run is authorised with the matching grants.
        let d = authorize(Input {
            run: &run,
            agent: Some(&agent),
            grants: &grants,
            parent: None,
            registered: &registered,
            now,
            policy: &policy,
        });
        assert!(d.is_authorized(), "{d:?}");
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("grants", n), &grants, |b, grants| {
            b.iter(|| {
                black_box(authorize(Input {
                    run: black_box(&run),
                    agent: Some(&agent),
                    grants: black_box(grants),
                    parent: None,
                    registered: &registered,
                    now,
                    policy: &policy,
                }))
            })
        });
    }
    g.finish();
}

fn run_token_spec<'a>(audiences: &'a [String], actors: &'a [String], now: Timestamp) -> RunTokenSpec<'a> {
    RunTokenSpec {
        issuer: "https://deputy.deputy-system.svc",
        principal: PRINCIPAL,
        audiences,
        identity: &actors[0],
        scope: "compliance:audit:cross_dept compliance:privacy:check".into(),
        authority: audiences
            .iter()
            .map(|a| (a.clone(), "compliance:audit:cross_dept compliance:privacy:check".to_string()))
            .collect(),
        actors,
        run: RunRef { namespace: NS.into(), name: RUN.into(), uid: "7d1f3b9e-6a0c-4c43-9a55-1f0e2f6f1c11".into() },
        task: "Check the Q4 field campaign for GDPR compliance",
        issued_at: now,
        ttl: SignedDuration::from_mins(10),
        not_after: now + SignedDuration::from_hours(1),
    }
}

fn bench_tokens(c: &mut Criterion) {
    let audiences = vec![AUDIENCE.to_string()];
    let actors = vec![deputy::authorization::run_identity("cluster.local", NS, AGENT, RUN)];
    let mut g = c.benchmark_group("tokens");
    g.throughput(Throughput::Elements(1));
    for alg in [Alg::EdDSA, Alg::ES256] {
        let now = Timestamp::now();
        let set = KeySet::generate(alg, now).unwrap();
        let spec = run_token_spec(&audiences, &actors, now);
        g.bench_function(BenchmarkId::new("mint", alg.as_str()), |b| {
            b.iter(|| set.active().sign(&black_box(&spec).claims()).unwrap())
        });
        let verifier = Verifier::from_key_set(spec.issuer, &set, 30).unwrap();
        let token = set.active().sign(&spec.claims()).unwrap();
        verifier.verify_at(&token, AudienceCheck::Any, now).unwrap();
        g.bench_function(BenchmarkId::new("verify", alg.as_str()), |b| {
            b.iter(|| verifier.verify_at(black_box(&token), AudienceCheck::Any, now).unwrap())
        });
    }
    g.finish();
}

fn bench_exchange(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // kube's Client spawns its buffer task on the current runtime.
    let _runtime = rt.enter();
    let api = rt.block_on(deputy_testapi::TestApiServer::start()).unwrap();
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let issuer = "http://deputy.bench.invalid".to_string();

    // Keys, as `deputy run` loads them.
    let now = Timestamp::now();
    let set = KeySet::generate(Alg::EdDSA, now).unwrap();
    let material = KeyMaterial::new(&issuer, set, None).unwrap();

    // The run, active, in the reflector store the endpoint reads.
    let uid = uuid::Uuid::new_v4().to_string();
    let status = json!({
        "phase": "Running",
        "grantedScopes": ["compliance:audit:cross_dept", "compliance:privacy:check"],
        "grantedAudiences": [AUDIENCE],
        "deadline": (now + SignedDuration::from_hours(1)).to_string(),
    });
    let (resource_servers, mut rs_writer) = kube::runtime::reflector::store::<ResourceServer>();
    rs_writer.apply_watcher_event(&watcher::Event::Apply(server()));
    let (runs, mut writer) = kube::runtime::reflector::store::<AgentRun>();
    writer.apply_watcher_event(&watcher::Event::Apply(run(&uid, status)));
    // Its pod, running (the endpoint looks it up on every exchange).
    let (pods, mut pod_writer) = kube::runtime::reflector::store::<PodPhase>();
    let pod: PodPhase = serde_json::from_value(json!({
        "metadata": {"name": format!("deputy-run-{RUN}"), "namespace": NS,
                     "ownerReferences": [{"apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun", "name": RUN,
                                          "uid": uid, "controller": true}]},
        "status": {"phase": "Running"},
    }))
    .unwrap();
    pod_writer.apply_watcher_event(&watcher::Event::Apply(pod));

    // The subject token (the run token) and the actor token (the pod's service-account token,
    // answered by the test API server's TokenReview).
    let audiences = vec![AUDIENCE.to_string()];
    let actors = vec![deputy::authorization::run_identity("cluster.local", NS, AGENT, RUN)];
    let mut spec = run_token_spec(&audiences, &actors, now);
    spec.issuer = &issuer;
    spec.run.uid = uid.clone();
    let subject = material.set.active().sign(&spec.claims()).unwrap();
    let actor = format!("actor.{}.sig", uuid::Uuid::new_v4().simple());
    let user = deputy_testapi::UserInfo {
        username: format!("system:serviceaccount:{NS}:deputy-run-{RUN}"),
        uid: "sa-uid".into(),
        groups: vec!["system:serviceaccounts".into()],
        extra: Default::default(),
    };
    api.register_token(&actor, user, vec![issuer.clone()], None);

    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(EndpointState {
        keys: Arc::new(KeyStore::new(&issuer, material)),
        runs,
        pods,
        service_accounts: kube::runtime::reflector::store().0,
        resource_servers,
        namespaces: kube::runtime::reflector::store().0,
        reviewer: Reviewer::new(client.clone(), metrics.clone(), Default::default()),
        metrics,
        client,
        issuer,
        ready: Arc::new(AtomicBool::new(true)),
    });
    let app = router(state);
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange")
        .append_pair("subject_token", &subject)
        .append_pair("subject_token_type", "urn:ietf:params:oauth:token-type:jwt")
        .append_pair("actor_token", &actor)
        .append_pair("actor_token_type", "urn:ietf:params:oauth:token-type:jwt")
        .append_pair("audience", AUDIENCE)
        .finish();
    let request = || {
        Request::post("/token")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body.clone()))
            .unwrap()
    };
    // The first exchange reviews the actor token (one TokenReview); later ones hit the cache.
    let first = rt.block_on(app.clone().oneshot(request())).unwrap();
    assert_eq!(first.status(), 200, "{:?}", rt.block_on(axum::body::to_bytes(first.into_body(), 1 << 16)));
    let reviews = api.token_reviews();

    let mut g = c.benchmark_group("exchange");
    g.throughput(Throughput::Elements(1));
    g.bench_function("router_oneshot", |b| {
        b.iter(|| {
            let resp = rt.block_on(app.clone().oneshot(request())).unwrap();
            assert_eq!(resp.status(), 200);
            resp
        })
    });
    g.finish();
    assert_eq!(api.token_reviews(), reviews, "every later review was answered from the cache");
    drop(api);
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = bench_authorize, bench_tokens, bench_exchange }
criterion_main!(benches);
