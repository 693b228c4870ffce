//! The load benchmark's "limit" (issue 6, 2a): the least any token endpoint must do per
//! request, in Deputy's own server stack (axum 0.8 + tokio multi-thread, same release profile,
//! same token code): read a form body, verify one EdDSA JWT (`subject_token`), sign one new
//! EdDSA JWT, answer JSON. No Kubernetes, no authorisation, no audit, no metrics.
//!
//! ```sh
//! cargo build --release --example bench_limit
//! target/release/examples/bench_limit --listen 127.0.0.1:18080 --token-out /tmp/subject.jwt
//! ```
//!
//! It prints `listening on http://ADDR` once bound, and writes a valid subject token (signed by
//! its freshly generated key, 1 h lifetime) to `--token-out`, for the load generator's body.
//! Run `bench/load` rather than this by hand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use deputy::tokens::{Alg, AudienceCheck, Claims, KeySet, RunRef, RunTokenSpec, Verifier};
use jiff::{SignedDuration, Timestamp};

const ISSUER: &str = "http://bench-limit.invalid";

struct Limit {
    keys: KeySet,
    verifier: Verifier,
}

#[derive(serde::Serialize)]
struct Answer {
    access_token: String,
    issued_token_type: &'static str,
    token_type: &'static str,
    expires_in: i64,
    scope: String,
}

async fn token(State(s): State<Arc<Limit>>, body: Bytes) -> Response {
    let Some(subject) = form_urlencoded::parse(&body).find(|(k, _)| k == "subject_token").map(|(_, v)| v.into_owned())
    else {
        return (StatusCode::BAD_REQUEST, "subject_token missing").into_response();
    };
    let old = match s.verifier.verify(&subject, AudienceCheck::Any) {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let now = Timestamp::now().as_second();
    let claims =
        Claims { iat: now, nbf: now, exp: (now + 300).min(old.exp), jti: uuid::Uuid::new_v4().to_string(), ..old };
    let Ok(access_token) = s.keys.active().sign(&claims) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let body = serde_json::to_vec(&Answer {
        access_token,
        issued_token_type: "urn:ietf:params:oauth:token-type:access_token",
        token_type: "Bearer",
        expires_in: claims.exp - now,
        scope: claims.scope,
    })
    .unwrap_or_default();
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A subject token shaped like a Deputy run token (same claims, similar size).
fn subject_token(keys: &KeySet) -> String {
    let audiences = vec!["gdpr-compliance-service".to_string()];
    let identity = "spiffe://cluster.local/ns/marketing/agent/gdpr-compliance-agent/run/gdpr-check-q4";
    let actors = vec![identity.to_string()];
    let now = Timestamp::now();
    let spec = RunTokenSpec {
        issuer: ISSUER,
        principal: "alice@example.com",
        audiences: &audiences,
        identity,
        scope: "compliance:audit:cross_dept compliance:privacy:check".into(),
        authority: audiences
            .iter()
            .map(|a| (a.clone(), "compliance:audit:cross_dept compliance:privacy:check".to_string()))
            .collect(),
        actors: &actors,
        run: RunRef {
            namespace: "marketing".into(),
            name: "gdpr-check-q4".into(),
            uid: uuid::Uuid::new_v4().to_string(),
        },
        task: "Check the Q4 field campaign for GDPR compliance",
        issued_at: now,
        ttl: SignedDuration::from_hours(1),
        not_after: now + SignedDuration::from_hours(2),
    };
    keys.active().sign(&spec.claims()).unwrap()
}

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:0".to_string();
    let mut token_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap(),
            "--token-out" => token_out = args.next(),
            other => panic!("unknown argument {other}; usage: bench_limit [--listen ADDR] [--token-out FILE]"),
        }
    }
    let keys = KeySet::generate(Alg::EdDSA, Timestamp::now()).unwrap();
    let verifier = Verifier::from_key_set(ISSUER, &keys, 30).unwrap();
    if let Some(path) = token_out {
        std::fs::write(path, subject_token(&keys)).unwrap();
    }
    let app = Router::new().route("/token", post(token)).with_state(Arc::new(Limit { keys, verifier }));
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}
