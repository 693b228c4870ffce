//! The exchange's bad-input table, in-process (the e2e suites send the same over HTTP).

use axum::http::StatusCode;
use serde_json::json;

use super::*;
use crate::resources::{GrantedAuthority, ResourceServer};
use crate::tokens::{Actor, RunRef};

const NOW: i64 = 2_000_000_000;
const ISSUER: &str = "https://deputy.deputy-system.svc";

fn form(pairs: &[(&str, &str)]) -> Form {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    Form::parse(Some("application/x-www-form-urlencoded"), body.as_bytes()).unwrap()
}

/// A well-formed request, with `extra` parameters added and `without` ones left out.
fn request_form(extra: &[(&'static str, &'static str)], without: &[&str]) -> Form {
    let mut pairs = vec![
        ("grant_type", GRANT_TYPE_EXCHANGE),
        ("subject_token", "subject"),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("actor_token", "actor"),
        ("actor_token_type", TOKEN_TYPE_JWT),
    ];
    pairs.retain(|(k, _)| !without.contains(k));
    pairs.extend_from_slice(extra);
    form(&pairs)
}

#[test]
fn a_malformed_request_is_refused_with_its_rfc_6749_error() {
    let cases: Vec<(&str, Form, ErrorCode)> = vec![
        ("no grant_type", request_form(&[], &["grant_type"]), ErrorCode::InvalidRequest),
        (
            "another grant type",
            form(&[("grant_type", "client_credentials"), ("subject_token", "s")]),
            ErrorCode::UnsupportedGrantType,
        ),
        ("no subject_token", request_form(&[], &["subject_token"]), ErrorCode::InvalidRequest),
        (
            "a SAML subject",
            request_form(&[("subject_token_type", "urn:ietf:params:oauth:token-type:saml2")], &["subject_token_type"]),
            ErrorCode::InvalidRequest,
        ),
        ("no actor_token", request_form(&[], &["actor_token"]), ErrorCode::InvalidRequest),
        (
            "an access-token actor",
            request_form(&[("actor_token_type", TOKEN_TYPE_ACCESS)], &["actor_token_type"]),
            ErrorCode::InvalidRequest,
        ),
        (
            "an id_token wanted",
            request_form(&[("requested_token_type", "urn:x:id_token")], &[]),
            ErrorCode::InvalidRequest,
        ),
    ];
    for (what, form, want) in cases {
        let err = Request::parse(&form).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(err.code, want, "{what}: {}", err.description);
        assert_eq!(err.status, StatusCode::BAD_REQUEST, "{what}");
    }
    let ok = request_form(&[("audience", "db"), ("resource", "db"), ("scope", "data:read")], &[]);
    let req = Request::parse(&ok).unwrap();
    assert_eq!((req.targets, req.scope, req.issued_type), (vec!["db", "db"], Some("data:read"), TOKEN_TYPE_ACCESS));
    let jwt = request_form(&[("requested_token_type", TOKEN_TYPE_JWT)], &[]);
    assert_eq!(Request::parse(&jwt).unwrap().issued_type, TOKEN_TYPE_JWT);
}

/// A run token for two audiences: `db` with `data:read data:write`, `mail` with `mail:send`.
fn subject() -> Claims {
    Claims {
        iss: ISSUER.into(),
        sub: "alice@example.com".into(),
        aud: Audience::One(ISSUER.into()),
        client_id: "spiffe://cluster.local/ns/ns/agent/a/run/r1".into(),
        scope: "data:read data:write mail:send".into(),
        act: Actor { sub: "spiffe://cluster.local/ns/ns/agent/a/run/r1".into(), act: None },
        run: RunRef { namespace: "ns".into(), name: "r1".into(), uid: "uid-1".into() },
        task: "t".into(),
        iat: NOW - 10,
        nbf: NOW - 10,
        exp: NOW + 590,
        jti: "run-jti".into(),
        authority: [("db".to_string(), "data:read data:write".to_string()), ("mail".into(), "mail:send".into())]
            .into_iter()
            .collect(),
    }
}

fn status() -> AgentRunStatus {
    AgentRunStatus {
        granted_audiences: vec!["db".into(), "mail".into()],
        granted_scopes: vec!["data:read".into(), "data:write".into(), "mail:send".into()],
        granted_authority: vec![
            GrantedAuthority { audience: "db".into(), scopes: vec!["data:read".into(), "data:write".into()] },
            GrantedAuthority { audience: "mail".into(), scopes: vec!["mail:send".into()] },
        ],
        deadline: jiff::Timestamp::from_second(NOW + 3600).ok(),
        ..Default::default()
    }
}

fn server(audience: &str, scopes: &[&str], extra: serde_json::Value) -> ResourceServer {
    let mut spec = json!({"audience": audience, "scopes": scopes, "namespaceSelector": {}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "ResourceServer",
        "metadata": {"name": audience}, "spec": spec,
    }))
    .unwrap()
}

fn registrations(db: serde_json::Value) -> Registrations {
    let servers = [server("db", &["data:read", "data:write"], db), server("mail", &["mail:send"], json!({}))];
    Registrations::for_namespace(&servers, "ns", None)
}

/// The exchange of `params` for the run above at NOW, with `db` registered with `db` extra.
fn exchange(
    params: &[(&'static str, &'static str)],
    status: AgentRunStatus,
    db: serde_json::Value,
) -> Result<Claims, OAuthError> {
    let form = request_form(params, &[]);
    let req = Request::parse(&form)?;
    let subject = subject();
    let registrations = registrations(db);
    let grounds = Grounds {
        subject: &subject,
        status: &status,
        registrations: &registrations,
        namespace: "ns",
        issuer: ISSUER,
        now: NOW,
        jti: "new-jti".into(),
    };
    grant(&req, &grounds)
}

/// What is asked, of which run, with which `db` registration, and the error expected.
type Case = (&'static str, Vec<(&'static str, &'static str)>, AgentRunStatus, serde_json::Value, ErrorCode);

#[test]
fn an_exchange_outside_what_the_run_holds_is_refused() {
    let mut no_db = status();
    no_db.granted_audiences.retain(|a| a != "db");
    let mut narrowed = status();
    narrowed.granted_scopes.retain(|s| s != "data:write");
    let mut ended_soon = status();
    ended_soon.deadline = jiff::Timestamp::from_second(NOW).ok();
    let cases: Vec<Case> = vec![
        (
            "two audiences",
            vec![("audience", "db"), ("audience", "mail")],
            status(),
            json!({}),
            ErrorCode::InvalidTarget,
        ),
        ("no audience, two held", vec![], status(), json!({}), ErrorCode::InvalidTarget),
        ("an audience not in the token", vec![("audience", "payments")], status(), json!({}), ErrorCode::InvalidTarget),
        // The token carries it, but the run's status no longer grants it.
        ("an audience the run lost", vec![("audience", "db")], no_db, json!({}), ErrorCode::InvalidTarget),
        (
            "a scope held for another audience",
            vec![("audience", "db"), ("scope", "mail:send")],
            status(),
            json!({}),
            ErrorCode::InvalidScope,
        ),
        (
            "a scope the run lost",
            vec![("audience", "db"), ("scope", "data:write")],
            narrowed,
            json!({}),
            ErrorCode::InvalidScope,
        ),
        (
            "a malformed scope",
            vec![("audience", "db"), ("scope", "data:READ!")],
            status(),
            json!({}),
            ErrorCode::InvalidScope,
        ),
        ("a blank scope", vec![("audience", "db"), ("scope", "   ")], status(), json!({}), ErrorCode::InvalidScope),
        (
            "a scope the server no longer registers",
            vec![("audience", "db"), ("scope", "data:write")],
            status(),
            json!({"scopes": ["data:read"]}),
            ErrorCode::InvalidScope,
        ),
        (
            "a server that wants DPoP",
            vec![("audience", "db")],
            status(),
            json!({"requireDPoP": true}),
            ErrorCode::InvalidRequest,
        ),
        ("the run's deadline is now", vec![("audience", "db")], ended_soon, json!({}), ErrorCode::InvalidGrant),
    ];
    for (what, params, status, db, want) in cases {
        match exchange(&params, status, db) {
            Ok(c) => panic!("{what}: granted {c:?}"),
            Err(e) => assert_eq!(e.code, want, "{what}: {}", e.description),
        }
    }
}

#[test]
fn an_exchange_gives_one_audience_the_scopes_asked_and_the_tightest_lifetime() {
    let c = exchange(&[("audience", "db"), ("scope", "data:read")], status(), json!({})).unwrap();
    assert_eq!((c.aud.clone(), c.scope.as_str()), (Audience::One("db".into()), "data:read"));
    assert_eq!(
        (c.sub.as_str(), c.act.sub.as_str()),
        ("alice@example.com", "spiffe://cluster.local/ns/ns/agent/a/run/r1")
    );
    assert_eq!((c.iat, c.exp - c.iat, c.jti.as_str()), (NOW, MAX_EXCHANGED_TTL_SECS, "new-jti"));
    assert!(c.authority.is_empty(), "an exchanged token carries its one audience's scope only");
    // Without a scope: every scope held for the audience; `resource` names it as well.
    let c = exchange(&[("resource", "db")], status(), json!({})).unwrap();
    assert_eq!(c.scope, "data:read data:write");
    // The audience's maxTokenTTL, the subject token's exp and the run's deadline all bound it.
    let c = exchange(&[("audience", "db")], status(), json!({"maxTokenTTL": "1m"})).unwrap();
    assert_eq!(c.exp - c.iat, 60);
    let mut soon = status();
    soon.deadline = jiff::Timestamp::from_second(NOW + 30).ok();
    assert_eq!(exchange(&[("audience", "mail")], soon, json!({})).unwrap().exp, NOW + 30);
}

#[test]
fn an_error_never_echoes_more_than_a_bounded_part_of_the_request() {
    let name = "p".repeat(30_000);
    let body = format!("{name}=1&{name}=2");
    let err = Form::parse(Some("application/x-www-form-urlencoded"), body.as_bytes()).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert!(err.description.len() < crate::audit::MAX_ECHO + 32, "{} bytes", err.description.len());
    assert!(err.description.ends_with("(truncated)"));
}

#[test]
fn a_503_says_when_to_try_again_and_a_client_error_does_not() {
    use axum::response::IntoResponse;
    let unavailable = invalid_request("the API server is unreachable").with_status(StatusCode::SERVICE_UNAVAILABLE);
    let r = unavailable.into_response();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let r = invalid_request("bad").into_response();
    assert!(r.headers().get("retry-after").is_none());
    assert_eq!(r.headers().get("cache-control").and_then(|v| v.to_str().ok()), Some("no-store"));
}
