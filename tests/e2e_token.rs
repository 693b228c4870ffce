//! End-to-end: the token endpoint of a live `deputy run` (RFC 8693 exchange, RFC 7662
//! introspection, RFC 7009 revocation, discovery), on both backends (the test API server and
//! the real control plane), with pod-bound service-account tokens the tests request as the
//! kubelet does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use deputy::tokens::{AudienceCheck, Claims, KeySet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::{Value, json};
use support::{Env, exchange_form, wait_until};

const T: Duration = Duration::from_secs(20);
use deputy::runs::contract::{GRANT_TYPE_EXCHANGE as EXCHANGE, TOKEN_TYPE_ACCESS as ACCESS, TOKEN_TYPE_JWT as JWT};

/// An active GDPR run with its pod running; returns (run token, actor token).
async fn active_run(env: &Env, run: &str) -> (String, String) {
    env.wait_phase(run, "Authorized", T).await;
    env.set_pod_phase(&format!("deputy-run-{run}"), "Running").await;
    env.wait_phase(run, "Running", T).await;
    (env.run_token(run).await.unwrap(), env.actor_token(run).await)
}

/// The operator's signing keys, read from its Secret (to forge tokens the endpoint must
/// refuse: expired, not yet valid, foreign issuer).
async fn operator_keys(env: &Env) -> KeySet {
    let secret: Secret =
        Api::namespaced(env.client.clone(), &env.operator_ns).get("deputy-signing-keys").await.unwrap();
    let data: BTreeMap<String, Vec<u8>> = secret.data.unwrap().into_iter().map(|(k, v)| (k, v.0)).collect();
    KeySet::from_secret_data(&data).unwrap()
}

fn claims_of(token: &str) -> Claims {
    serde_json::from_value(deputy::tokens::verify::peek_claims(token).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_issues_a_narrower_token_that_keeps_both_principals() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let (subject, actor) = active_run(&env, "gdpr-check-q4").await;
    let mut form = exchange_form(&subject, &actor);
    form.push(("scope", "compliance:privacy:check"));
    let (status, body) = env.post("/token", &form, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["issued_token_type"], ACCESS);
    assert_eq!(body["scope"], "compliance:privacy:check");
    assert!(body["expires_in"].as_i64().unwrap() <= 300);

    let token = body["access_token"].as_str().unwrap();
    let new = env.verifier().await.verify(token, AudienceCheck::Exactly("gdpr-compliance-service")).unwrap();
    let old = claims_of(&subject);
    assert_eq!(new.sub, "alice@example.com");
    assert_eq!(new.act, old.act, "the act chain is kept");
    assert_eq!(new.client_id, old.client_id);
    assert_eq!(new.scope, "compliance:privacy:check");
    assert!(new.exp - new.iat <= 300 && new.exp <= old.exp);
    assert_ne!(new.jti, old.jti);
    assert_eq!(new.run, old.run);

    // An exchanged token can be exchanged again (a further hop), never wider.
    let (status, body) = env.post("/token", &exchange_form(token, &actor), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "compliance:privacy:check");

    // Audit: both principals on every exchange.
    let audit = env.audit();
    let line = audit.iter().find(|l| l["action"] == "exchanged").unwrap();
    assert_eq!(line["principal"], "alice@example.com");
    assert_eq!(line["actor_chain"][0], old.client_id);

    // TokenReview answers are cached: the second and third exchanges reviewed nothing new.
    let reviews = env.token_reviews().await;
    let (status, _) = env.post("/token", &exchange_form(&subject, &actor), None).await;
    assert_eq!(status, 200);
    assert_eq!(env.token_reviews().await, reviews, "cached review");

    // Metrics on the admin port.
    let m = deputy::http_client::get(&format!("{}/metrics", env.admin_url()), Duration::from_secs(5)).await.unwrap();
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(text.contains("deputy_token_exchanges_total{result=\"ok\"}"), "{text}");
    assert!(text.contains("deputy_token_reviews_total{result=\"cache_hit\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_oauth_error() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.apply_example("supply-chain.yaml").await;
    let (subject, actor) = active_run(&env, "gdpr-check-q4").await;
    let (_, other_actor) = active_run(&env, "supply-chain-planner-7").await;

    let keys = operator_keys(&env).await;
    let base = claims_of(&subject);
    let now = jiff::Timestamp::now().as_second();
    let sign = |c: &Claims| keys.active().sign(c).unwrap();
    let expired = sign(&Claims { iat: now - 700, nbf: now - 700, exp: now - 100, ..base.clone() });
    let future = sign(&Claims { iat: now + 600, nbf: now + 600, exp: now + 1200, ..base.clone() });
    let foreign = sign(&Claims { iss: "https://evil.example".into(), ..base.clone() });
    let payload = B64.encode(serde_json::to_vec(&base).unwrap());
    let alg_none = format!(
        "{}.{payload}.",
        B64.encode(json!({"alg": "none", "typ": "at+jwt", "kid": keys.active().kid}).to_string())
    );
    let hs256 = {
        let header = jsonwebtoken::Header {
            alg: jsonwebtoken::Algorithm::HS256,
            kid: Some(keys.active().kid.clone()),
            typ: Some("at+jwt".into()),
            ..Default::default()
        };
        let public = keys.jwks()["keys"][0]["x"].as_str().unwrap().to_string();
        jsonwebtoken::encode(&header, &base, &jsonwebtoken::EncodingKey::from_secret(public.as_bytes())).unwrap()
    };

    let with = |pairs: &[(&'static str, &str)]| -> Vec<(String, String)> {
        let mut form: Vec<(String, String)> =
            exchange_form(&subject, &actor).into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for (k, v) in pairs {
            form.retain(|(fk, _)| fk != k);
            if !v.is_empty() {
                form.push((k.to_string(), v.to_string()));
            }
        }
        form
    };
    let mut dup = with(&[]);
    dup.push(("subject_token".into(), subject.clone()));

    type Row = (&'static str, Vec<(String, String)>, u16, &'static str);
    let table: Vec<Row> = vec![
        ("missing grant_type", with(&[("grant_type", "")]), 400, "invalid_request"),
        ("duplicated subject_token", dup, 400, "invalid_request"),
        ("wrong grant type", with(&[("grant_type", "client_credentials")]), 400, "unsupported_grant_type"),
        ("missing subject_token", with(&[("subject_token", "")]), 400, "invalid_request"),
        (
            "bad subject_token_type",
            with(&[("subject_token_type", "urn:ietf:params:oauth:token-type:saml2")]),
            400,
            "invalid_request",
        ),
        ("missing actor_token", with(&[("actor_token", "")]), 400, "invalid_request"),
        (
            "bad requested_token_type",
            with(&[("requested_token_type", "urn:ietf:params:oauth:token-type:id_token")]),
            400,
            "invalid_request",
        ),
        ("garbage subject token", with(&[("subject_token", "garbage")]), 400, "invalid_grant"),
        ("expired subject token", with(&[("subject_token", &expired)]), 400, "invalid_grant"),
        ("not-yet-valid subject token", with(&[("subject_token", &future)]), 400, "invalid_grant"),
        ("foreign issuer", with(&[("subject_token", &foreign)]), 400, "invalid_grant"),
        ("alg none", with(&[("subject_token", &alg_none)]), 400, "invalid_grant"),
        ("HS256 with the public key", with(&[("subject_token", &hs256)]), 400, "invalid_grant"),
        ("unknown actor token", with(&[("actor_token", "not-a-service-account-token")]), 401, "invalid_client"),
        ("actor token of another run", with(&[("actor_token", &other_actor)]), 400, "unauthorized_client"),
        ("scope escalation", with(&[("scope", "compliance:*")]), 400, "invalid_scope"),
        ("scope outside the token", with(&[("scope", "marketing:read")]), 400, "invalid_scope"),
        ("malformed scope", with(&[("scope", "a::b")]), 400, "invalid_scope"),
        ("audience not granted", with(&[("audience", "payments-service")]), 400, "invalid_target"),
        (
            "resource not granted",
            with(&[("audience", ""), ("resource", "https://payments.example")]),
            400,
            "invalid_target",
        ),
    ];
    for (name, form, status, error) in &table {
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (got, body) = env.post("/token", &pairs, None).await;
        assert_eq!((got, body["error"].as_str().unwrap_or("")), (*status, *error), "{name}: {body}");
        assert!(body["error_description"].as_str().is_some_and(|d| !d.is_empty()), "{name}");
    }

    // Not a form at all.
    let url = format!("{}/token", env.token_url());
    let json_body = serde_json::to_vec(&json!({"grant_type": EXCHANGE})).unwrap();
    let r =
        deputy::http_client::send("POST", &url, &[("content-type", "application/json")], json_body, T).await.unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((r.status, body["error"].as_str()), (400, Some("invalid_request")), "JSON instead of a form");
    // Too big.
    let big = format!("grant_type={EXCHANGE}&subject_token={}", "a".repeat(70 * 1024));
    let r = deputy::http_client::send(
        "POST",
        &url,
        &[("content-type", "application/x-www-form-urlencoded")],
        big.into_bytes(),
        T,
    )
    .await
    .unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((r.status, body["error"].as_str()), (413, Some("invalid_request")), "oversized body");
    // No 5xx anywhere above, and refusals are audited.
    assert!(env.audit().iter().filter(|l| l["action"] == "exchange_refused").count() >= table.len());

    // A revoked run: its tokens are refused.
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Succeeded").await;
    env.wait_phase("gdpr-check-q4", "Succeeded", T).await;
    let (status, body) = env.post("/token", &exchange_form(&subject, &actor), None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "revoked run: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_sees_both_principals_and_goes_inactive_within_a_second_of_the_pod_ending() {
    let env = Env::start().await;
    env.apply_example("supply-chain.yaml").await;
    env.wait_phase("supply-chain-planner-7", "Authorized", T).await;
    let (subject, actor) = active_run(&env, "optimise-routes-7").await;
    let rs = env.resource_server_token().await;

    let (status, body) = env.post("/introspect", &[("token", &subject)], None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "introspection needs a caller token");
    let (status, body) = env.post("/introspect", &[("token", &subject)], Some("who-knows")).await;
    assert_eq!(status, 401, "{body}");
    // A Kubernetes identity is not enough: the answer names the principal, chain and task.
    let nobody = env.service_account_token("nobody").await;
    let (status, body) = env.post("/introspect", &[("token", &subject)], Some(&nobody)).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("invalid_client")), "{body}");
    assert!(body["error_description"].as_str().is_some_and(|d| d.contains("introspections.deputy.dev")), "{body}");

    let (status, body) = env.post("/introspect", &[("token", &subject)], Some(&rs)).await;
    assert_eq!(status, 200);
    assert_eq!(body["active"], true, "{body}");
    assert_eq!(body["sub"], "alice@example.com");
    let planner = format!("spiffe://cluster.local/ns/{}/agent/supply-chain-planner/run/supply-chain-planner-7", env.ns);
    assert_eq!(body["act"]["act"]["sub"], planner, "the whole act chain: {body}");
    for k in ["scope", "aud", "client_id", "exp", "iat", "jti", "run"] {
        assert!(body.get(k).is_some(), "{k} missing: {body}");
    }
    // Garbage and foreign tokens are simply inactive.
    let (_, body) = env.post("/introspect", &[("token", "garbage")], Some(&rs)).await;
    assert_eq!(body, json!({"active": false}));

    // An exchanged token too, until the run ends.
    let (_, ex) = env
        .post(
            "/token",
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", &subject),
                ("subject_token_type", JWT),
                ("actor_token", &actor),
                ("actor_token_type", JWT),
            ],
            None,
        )
        .await;
    let exchanged = ex["access_token"].as_str().unwrap().to_string();

    // The pod ends (its parent is still running): p99 pod end → inactive ≤ 1 s.
    env.set_pod_phase("deputy-run-optimise-routes-7", "Succeeded").await;
    let t0 = Instant::now();
    let inactive = wait_until(Duration::from_secs(1), || async {
        let (_, a) = env.post("/introspect", &[("token", &subject)], Some(&rs)).await;
        let (_, b) = env.post("/introspect", &[("token", &exchanged)], Some(&rs)).await;
        a["active"] == false && b["active"] == false
    })
    .await;
    assert!(inactive, "still active {:?} after the pod ended", t0.elapsed());
    let (status, body) = env.post("/token", &exchange_form(&subject, &actor), None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_can_revoke_itself() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let (subject, actor) = active_run(&env, "gdpr-check-q4").await;
    let rs = env.resource_server_token().await;
    let (status, body) = env.post("/revoke", &[("token", &subject)], None).await;
    assert_eq!(status, 401, "revocation needs the actor token: {body}");
    let (status, _) = env.post("/revoke", &[("token", &subject)], Some(&actor)).await;
    assert_eq!(status, 200);
    let (_, body) = env.post("/introspect", &[("token", &subject)], Some(&rs)).await;
    assert_eq!(body["active"], false, "inactive at once");
    let run = env.wait_phase("gdpr-check-q4", "Revoked", T).await;
    assert_eq!(run.status.unwrap().reason.as_deref(), Some("SelfRevoked"));
    let gone = wait_until(T, || async { env.run_token("gdpr-check-q4").await.is_none() }).await;
    assert!(gone, "the controller cleans up as for any revocation");
    // Unknown tokens get 200 too (RFC 7009 §2.2).
    let (status, _) = env.post("/revoke", &[("token", "garbage")], Some(&actor)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_jwks_are_published_and_cacheable() {
    let env = Env::start().await;
    let r =
        deputy::http_client::get(&format!("{}/.well-known/openid-configuration", env.token_url()), T).await.unwrap();
    assert_eq!(r.status, 200);
    let doc: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc["issuer"], env.token_url());
    for (k, path) in [
        ("token_endpoint", "/token"),
        ("introspection_endpoint", "/introspect"),
        ("revocation_endpoint", "/revoke"),
        ("jwks_uri", "/jwks.json"),
    ] {
        assert_eq!(doc[k], format!("{}{path}", env.token_url()));
    }
    assert_eq!(doc["grant_types_supported"], json!([EXCHANGE]));
    let jwks = env.jwks().await;
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    let hz = deputy::http_client::get(&format!("{}/healthz", env.admin_url()), T).await.unwrap();
    assert_eq!(hz.status, 200);
}

/// The Python verifier in examples/clients (PyJWT and its JWKS client) accepts an exchanged
/// token and reads both principals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_verifies_an_exchanged_token() {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/python");
    assert!(python.exists(), "run scripts/install-tools first (scripts/test does)");
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let (subject, actor) = active_run(&env, "gdpr-check-q4").await;
    let (status, body) = env.post("/token", &exchange_form(&subject, &actor), None).await;
    assert_eq!(status, 200);
    let token = body["access_token"].as_str().unwrap().to_string();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients/verify.py");
    let verify = |audience: &str| {
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(&script)
            .args(["--issuer", &env.token_url(), "--jwks", &format!("{}/jwks.json", env.token_url())])
            .args(["--audience", audience])
            .arg(&token);
        cmd
    };
    let out = verify("gdpr-compliance-service").output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verify.py failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("principal: alice@example.com"), "{stdout}");
    assert!(stdout.contains("actor: spiffe://cluster.local/"), "{stdout}");
    // And it refuses the same token for another audience.
    let out = verify("payments-service").output().await.unwrap();
    assert!(!out.status.success());
}

/// `deputy exchange` (what an agent runs in its pod) and `deputy token verify` (what an
/// integrator runs) against a live endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exchanges_and_verifies() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let (subject, actor) = active_run(&env, "gdpr-check-q4").await;
    let (token_file, actor_file) = (env.dir.join("token"), env.dir.join("actor-token"));
    std::fs::write(&token_file, &subject).unwrap();
    std::fs::write(&actor_file, &actor).unwrap();
    let deputy = env!("CARGO_BIN_EXE_deputy");
    let exchange = |scope: &str| {
        let mut cmd = tokio::process::Command::new(deputy);
        cmd.args(["exchange", "--audience", "gdpr-compliance-service", "--scope", scope])
            .env("DEPUTY_TOKEN_FILE", &token_file)
            .env("DEPUTY_ACTOR_TOKEN_FILE", &actor_file)
            .env("DEPUTY_TOKEN_ENDPOINT", format!("{}/token", env.token_url()));
        cmd
    };
    let out = exchange("compliance:privacy:check").output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    std::fs::write(env.dir.join("exchanged"), &token).unwrap();

    let out = exchange("compliance:*").output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_scope"));

    let jwks = format!("{}/jwks.json", env.token_url());
    let verify = |aud: &str| {
        let mut cmd = tokio::process::Command::new(deputy);
        cmd.args(["token", "verify", "--jwks", &jwks, "--audience", aud]).arg(env.dir.join("exchanged"));
        cmd
    };
    let ok = verify("gdpr-compliance-service").output().await.unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("valid: sub=alice@example.com"));
    let bad = verify("payments-service").output().await.unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("wrong_audience"));
    let inspect = tokio::process::Command::new(deputy)
        .args(["token", "inspect"])
        .arg(env.dir.join("exchanged"))
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("Delegation: alice@example.com ← gdpr-check-q4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_token_flood_costs_a_bounded_number_of_token_reviews() {
    let mut env = Env::api_only().await;
    env.extra_args = vec!["--token-reviews-per-second".into(), "20".into()];
    env.start_operator().await;
    let rs = env.resource_server_token().await;
    let (status, _) = env.post("/introspect", &[("token", "x")], Some(&rs)).await;
    assert_eq!(status, 200, "the resource server's review is cached");
    let before = env.token_reviews().await;
    let started = std::time::Instant::now();

    // 150 distinct JWT-shaped junk bearers, 150 that are not JWTs, 150 repeats of one junk JWT.
    let junk: Vec<String> = (0..150).map(|i| format!("eyJhbGciOiJub25lIn0.junk{i}.sig")).collect();
    let opaque: Vec<String> = (0..150).map(|i| format!("opaque-{i}")).collect();
    let repeated = vec!["eyJhbGciOiJub25lIn0.same.sig".to_string(); 150];
    let bearers: Vec<&String> = junk.iter().chain(&opaque).chain(&repeated).collect();
    // 50 at a time: a flood, within what one test client's sockets do reliably.
    use futures::StreamExt;
    let answers: Vec<(u16, serde_json::Value)> = futures::stream::iter(bearers.iter())
        .map(|b| env.post("/introspect", &[("token", "x")], Some(b)))
        .buffer_unordered(50)
        .collect()
        .await;
    // A well-behaved caller is served during the flood (its review is cached).
    let (status, _) = env.post("/introspect", &[("token", "x")], Some(&rs)).await;
    assert_eq!(status, 200, "the resource server is still served");
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = env.token_reviews().await - before;
    let throttled = answers.iter().filter(|(s, _)| *s == 429).count();
    let refused = answers.iter().filter(|(s, _)| *s == 401).count();
    eprintln!(
        "{} junk introspections in {elapsed:.2} s: {reviews} TokenReviews, {throttled} throttled (429), {refused} refused (401)",
        answers.len()
    );
    // 20 per second with a burst of 40: whatever the flood, at most that many reviews.
    let bound = 40 + (20.0 * elapsed).ceil() as u64 + 1;
    assert!(reviews <= bound, "{reviews} TokenReviews in {elapsed:.2} s (bound {bound})");
    assert!(throttled > 0 && throttled + refused == answers.len(), "every junk caller is refused or throttled");
    assert!(answers.iter().all(|(s, _)| *s != 200 && *s < 500), "never served, never a 5xx");
}

/// A connection from `source` to the token port that sends the start of a request and stops.
async fn slow_loris(source: &str, port: u16) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(format!("{source}:0").parse().ok()?).ok()?;
    let mut tcp = socket.connect(format!("127.0.0.1:{port}").parse().ok()?).await.ok()?;
    tcp.write_all(b"POST /token HTTP/1.1\r\nHost: deputy\r\n").await.ok()?;
    Some(tcp)
}

/// What the server sent on `tcp` before closing it (or within `wait`).
async fn read_all(tcp: &mut tokio::net::TcpStream, wait: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = vec![];
    let _ = tokio::time::timeout(wait, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_a_connection_flood_do_not_stop_a_well_behaved_client() {
    let mut env = Env::api_only().await;
    env.extra_args = ["--max-connections-per-source", "40", "--http-header-timeout", "2s"].map(String::from).to_vec();
    env.start_operator().await;
    let discovery = format!("{}/.well-known/openid-configuration", env.token_url());
    let readyz = format!("{}/readyz", env.admin_url());

    // 120 slow clients from another loopback address: 40 are held (until the header timeout),
    // the other 80 are told 429 at once.
    let mut held = vec![];
    for _ in 0..120 {
        if let Some(tcp) = slow_loris("127.0.0.2", env.port).await {
            held.push(tcp);
        }
    }
    assert_eq!(held.len(), 120, "the attacker's connections are accepted by the kernel");
    let started = Instant::now();
    let good = deputy::http_client::get(&discovery, Duration::from_secs(5)).await.unwrap();
    let ready = deputy::http_client::get(&readyz, Duration::from_secs(5)).await.unwrap();
    let good_took = started.elapsed();
    assert_eq!((good.status, ready.status), (200, 200));
    assert!(good_took < Duration::from_secs(2), "a well-behaved client waited {good_took:?}");

    let mut told = 0;
    let mut closed = 0;
    for tcp in &mut held {
        let reply = read_all(tcp, Duration::from_secs(4)).await;
        if reply.starts_with("HTTP/1.1 429") {
            assert!(reply.contains("Retry-After: 1"), "{reply}");
            told += 1;
        } else if reply.is_empty() || reply.starts_with("HTTP/1.1 408") {
            closed += 1;
        }
    }
    eprintln!("120 slow clients: {told} told 429, {closed} closed by the header timeout; good client {good_took:?}");
    assert_eq!(told, 80, "over the per-source cap: 429");
    assert_eq!(closed, 40, "the held ones were closed by the 2 s header timeout");
    // And the port serves as before.
    let again = deputy::http_client::get(&discovery, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_corrupted_signing_key_secret_is_written_back_and_no_token_dies() {
    use kube::api::{DeleteParams, Patch, PatchParams};
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let (subject, actor) = active_run(&env, "gdpr-check-q4").await;
    let kid = operator_keys(&env).await.active().kid.clone();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.operator_ns);
    let restored = || async {
        match secrets.get_opt("deputy-signing-keys").await.unwrap() {
            Some(s) => {
                let data: BTreeMap<String, Vec<u8>> =
                    s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
                KeySet::from_secret_data(&data).is_ok_and(|set| set.active().kid == kid)
            }
            None => false,
        }
    };

    secrets.delete("deputy-signing-keys", &DeleteParams::default()).await.unwrap();
    assert!(wait_until(T, restored).await, "the deleted Secret is written back:\n{}", env.operator_log());
    let (status, body) = env.post("/token", &exchange_form(&subject, &actor), None).await;
    assert_eq!(status, 200, "the run's token still exchanges: {body}");

    let junk = json!({"data": {"keys.json": base64::engine::general_purpose::STANDARD.encode(b"not keys")}});
    secrets.patch("deputy-signing-keys", &PatchParams::default(), &Patch::Merge(&junk)).await.unwrap();
    assert!(wait_until(T, restored).await, "the corrupted Secret is written back:\n{}", env.operator_log());
    let (status, body) = env.post("/token", &exchange_form(&subject, &actor), None).await;
    assert_eq!(status, 200, "the run's token still exchanges: {body}");
    assert!(env.operator_log().contains("written back from the keys in memory"), "said so in the log");
}
