//! The token endpoint (RFC 8693 exchange, RFC 7662 introspection, RFC 7009 revocation,
//! discovery and JWKS) and the admin endpoints (probes and metrics), on separate listeners.

pub mod exchange;
pub mod listen;
pub mod oauth;
pub mod review;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Serialize;
use serde_json::json;

use crate::audit::{Action as AuditAction, Record};
use crate::metrics::Metrics;
use crate::registration::Registrations;
use crate::resources::{AgentRun, ResourceServer};
use crate::runs::contract::GRANT_TYPE_EXCHANGE;
use crate::runs::{self, PodPhase, REVOKE_ANNOTATION, is_live, run_of};
use crate::signing::KeyStore;
use crate::tokens::Claims;
use exchange::{Grounds, Request};
use oauth::{ErrorCode, Form, OAuthError, bearer, invalid_request};
use review::{ReviewError, Reviewer};

/// The largest request body accepted on any endpoint.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub use exchange::MAX_EXCHANGED_TTL_SECS;
/// The virtual resource a caller of `/introspect` needs `create` on (checked with a
/// SubjectAccessReview; nothing of that kind is stored).
pub const INTROSPECTION_GROUP: &str = "deputy.dev";
pub const INTROSPECTION_RESOURCE: &str = "introspections";
/// Everything the handlers share.
pub struct EndpointState {
    pub keys: Arc<KeyStore>,
    pub runs: Store<AgentRun>,
    /// The runs' pods (phase only), so that a run whose pod has ended is inactive at once.
    pub pods: Store<PodPhase>,
    /// The runs' ServiceAccounts (metadata): a cached review of an actor token is not believed
    /// once the ServiceAccount it was issued for has been replaced.
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    /// The ResourceServers and the namespaces' labels: an exchanged token's audience must be
    /// registered for the run's namespace, and lives no longer than its `maxTokenTTL`.
    pub resource_servers: Store<ResourceServer>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub reviewer: Reviewer,
    pub metrics: Arc<Metrics>,
    pub client: kube::Client,
    /// The public base URL (the issuer); endpoint URLs in discovery are built from it.
    pub issuer: String,
    /// Set once caches are synced and keys are loaded.
    pub ready: Arc<AtomicBool>,
}

/// The token endpoint's routes.
pub fn router(state: Arc<EndpointState>) -> Router {
    Router::new()
        .route("/token", post(token))
        .route("/introspect", post(introspect))
        .route("/revoke", post(revoke))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/oauth-authorization-server", get(discovery))
        .route("/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The admin routes: probes and metrics.
pub fn admin_router(state: Arc<EndpointState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<EndpointState>>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced or keys not loaded").into_response()
    }
}

async fn metrics(State(s): State<Arc<EndpointState>>) -> Response {
    let mut resp = s.metrics.encode().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

fn json_response<T: Serialize>(status: StatusCode, body: &T, cache: &'static str) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (status, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    resp
}

async fn discovery(State(s): State<Arc<EndpointState>>) -> Response {
    let base = s.issuer.trim_end_matches('/');
    let doc = json!({
        "issuer": s.issuer,
        "token_endpoint": format!("{base}/token"),
        "introspection_endpoint": format!("{base}/introspect"),
        "revocation_endpoint": format!("{base}/revoke"),
        "jwks_uri": format!("{base}/jwks.json"),
        "grant_types_supported": [GRANT_TYPE_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "revocation_endpoint_auth_methods_supported": ["bearer"],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "ES256"],
        "access_token_signing_alg_values_supported": ["EdDSA", "ES256"],
        "id_token_signing_alg_values_supported": ["EdDSA", "ES256"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "scopes_supported": [],
    });
    json_response(StatusCode::OK, &doc, "public, max-age=60")
}

async fn jwks(State(s): State<Arc<EndpointState>>) -> Response {
    let keys = s.keys.get();
    let mut resp = (StatusCode::OK, keys.jwks.clone()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json"));
    // Short enough that a rotation reaches verifiers well within a token's lifetime.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    resp
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

use kube::ResourceExt;

/// A successful exchange.
#[derive(Serialize, Debug)]
pub struct ExchangeResponse {
    pub access_token: String,
    pub issued_token_type: &'static str,
    pub token_type: &'static str,
    pub expires_in: i64,
    pub scope: String,
}

/// The body, or the RFC 6749 error for one that is too large or unreadable.
fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, OAuthError> {
    body.map_err(|e| {
        let status = e.status();
        invalid_request(format!("request body refused: {}", e.body_text())).with_status(
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            },
        )
    })
}

async fn token(
    State(s): State<Arc<EndpointState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = match body_or_error(body) {
        Ok(body) => exchange(&s, &headers, &body).await,
        Err(e) => Err((e, None)),
    };
    match result {
        Ok((resp, claims)) => {
            s.metrics.exchange("ok", started.elapsed());
            let actors = claims.act.chain();
            let scopes = claims.scopes().into_iter().map(String::from).collect::<Vec<_>>();
            let aud = claims.aud.to_vec();
            Record {
                scopes: &scopes,
                audiences: &aud,
                jti: Some(&claims.jti),
                exp: Some(claims.exp),
                ..Record::new(AuditAction::Exchanged, &claims.sub, &actors, &claims.run.namespace, &claims.run.name, "")
            }
            .emit();
            let mut r = json_response(StatusCode::OK, &resp, "no-store");
            r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            r
        }
        Err((err, subject)) => {
            s.metrics.exchange(err.code.as_str(), started.elapsed());
            let (principal, actors, ns, run) = match &subject {
                Some(c) => (c.sub.clone(), c.act.chain(), c.run.namespace.clone(), c.run.name.clone()),
                None => (String::new(), vec![], String::new(), String::new()),
            };
            Record {
                reason: Some(err.code.as_str()),
                message: Some(&err.description),
                ..Record::new(AuditAction::ExchangeRefused, &principal, &actors, &ns, &run, "")
            }
            .emit();
            err.into_response()
        }
    }
}

/// RFC 8693 token exchange. Returns the response and the new token's claims, or the error
/// and (when the subject token verified) its claims for the audit line. The decision itself
/// is `exchange::grant`; this verifies, reviews, reads the caches and signs around it.
pub async fn exchange(
    s: &EndpointState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ExchangeResponse, Claims), (OAuthError, Option<Claims>)> {
    let form = Form::parse(content_type(headers), body).map_err(|e| (e, None))?;
    let req = Request::parse(&form).map_err(|e| (e, None))?;

    // The subject token: ours, valid now.
    let keys = s.keys.get();
    let subject = keys
        .verify_any_audience(req.subject_token)
        .map_err(|e| (OAuthError::new(ErrorCode::InvalidGrant, format!("subject_token: {e}")), None))?;
    let fail = |err: OAuthError| (err, Some(subject.clone()));
    let not_active = || fail(OAuthError::new(ErrorCode::InvalidGrant, "the subject token's run is not active"));

    // Its run must be active at this moment.
    let run = run_of(&s.runs, &subject)
        .ok_or_else(|| fail(OAuthError::new(ErrorCode::InvalidGrant, "the subject token's run does not exist")))?;
    if !is_live(&s.pods, &run) {
        return Err(not_active());
    }
    // The actor: the pod of that very run.
    authenticate_actor(s, req.actor_token, &run).await.map_err(fail)?;
    // The review awaited the API server: the run may have ended meanwhile. Look again, and
    // decide on what the run is now.
    let run = run_of(&s.runs, &subject).filter(|r| is_live(&s.pods, r)).ok_or_else(not_active)?;
    let status = run.status.clone().unwrap_or_default();
    let ns = run.namespace().unwrap_or_default();
    let labels = s.namespaces.get(&ObjectRef::new(&ns)).and_then(|n| n.metadata.labels.clone());
    let registrations = Registrations::for_namespace(&s.resource_servers.state(), &ns, labels.as_ref());
    let grounds = Grounds {
        subject: &subject,
        status: &status,
        registrations: &registrations,
        namespace: &ns,
        issuer: &s.issuer,
        now: Timestamp::now().as_second(),
        jti: uuid::Uuid::new_v4().to_string(),
    };
    let claims = exchange::grant(&req, &grounds).map_err(fail)?;
    let token = keys.set.active().sign(&claims).map_err(|e| {
        fail(OAuthError::new(ErrorCode::InvalidRequest, e.to_string()).with_status(StatusCode::SERVICE_UNAVAILABLE))
    })?;
    s.metrics.token_minted("exchanged");
    Ok((
        ExchangeResponse {
            access_token: token,
            issued_token_type: req.issued_type,
            token_type: "Bearer",
            expires_in: claims.exp - claims.iat,
            scope: claims.scope.clone(),
        },
        claims,
    ))
}

/// A Kubernetes token that TokenReview refused is the client's fault (`invalid_client`, 401);
/// one that could not be reviewed at all is the API server's (503, so the client retries).
fn review_failure(what: &str, e: ReviewError) -> OAuthError {
    match e {
        ReviewError::Rejected(why) => OAuthError::new(ErrorCode::InvalidClient, format!("{what}: {why}")),
        ReviewError::Unavailable(why) => {
            OAuthError::new(ErrorCode::InvalidRequest, format!("{what} could not be checked: {why}"))
                .with_status(StatusCode::SERVICE_UNAVAILABLE)
        }
        ReviewError::Busy => OAuthError::new(ErrorCode::InvalidRequest, format!("{what} could not be checked: {e}"))
            .with_status(StatusCode::TOO_MANY_REQUESTS),
    }
}

/// The actor token must be a bound service-account token for Deputy's issuer, of the run's
/// own ServiceAccount, and (where the review says which pod it is bound to) of the run's pod.
async fn authenticate_actor(s: &EndpointState, actor_token: &str, run: &AgentRun) -> Result<(), OAuthError> {
    let reviewed = s
        .reviewer
        .review(actor_token, std::slice::from_ref(&s.issuer))
        .await
        .map_err(|e| review_failure("actor_token", e))?;
    let ns = run.namespace().unwrap_or_default();
    let child = runs::child_name(&run.name_any());
    let expected = format!("system:serviceaccount:{ns}:{child}");
    let live_uid = live_pod_uid(s, run, &ns, &child).await?;
    // The run's own ServiceAccount as the cache knows it (the review was perhaps remembered
    // from before it was replaced); unknown to the cache, the API server's review stands.
    let sa_uid = s
        .service_accounts
        .get(&ObjectRef::new(&child).within(&ns))
        .filter(|sa| runs::owned_by(&sa.metadata, run))
        .and_then(|sa| sa.metadata.uid.clone());
    let live = review::Live { pod_uid: live_uid.as_deref(), service_account_uid: sa_uid.as_deref() };
    match review::actor_refusal(&reviewed, &expected, &child, live) {
        Some(why) => Err(OAuthError::new(ErrorCode::UnauthorizedClient, why)),
        None => Ok(()),
    }
}

/// The uid of the run's pod as it exists now: from the cache, or (when the cache has not seen
/// it yet) from the API server. A pod of another owner under the same name does not count.
async fn live_pod_uid(s: &EndpointState, run: &AgentRun, ns: &str, child: &str) -> Result<Option<String>, OAuthError> {
    let owned = |p: &PodPhase| runs::owned_by(&p.metadata, run).then(|| p.metadata.uid.clone()).flatten();
    if let Some(p) = s.pods.get(&ObjectRef::new(child).within(ns)) {
        return Ok(owned(&p));
    }
    match Api::<PodPhase>::namespaced(s.client.clone(), ns).get_opt(child).await {
        Ok(p) => Ok(p.as_ref().and_then(owned)),
        Err(e) => Err(OAuthError::new(ErrorCode::InvalidRequest, format!("the run's pod could not be checked: {e}"))
            .with_status(StatusCode::SERVICE_UNAVAILABLE)),
    }
}

async fn introspect(
    State(s): State<Arc<EndpointState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // The caller (a resource server) authenticates with a Kubernetes token.
    let Some(caller) = bearer(&headers) else {
        s.metrics.introspection("unauthorized");
        return OAuthError::new(ErrorCode::InvalidClient, "authenticate with a bearer token").into_response();
    };
    let who = match s.reviewer.review(caller, &[]).await {
        Ok(who) => who,
        Err(e) => {
            s.metrics.introspection("unauthorized");
            return review_failure("the bearer token", e).into_response();
        }
    };
    // Being a Kubernetes identity is not enough: the answer names the principal, the chain
    // and the task. The caller needs `create` on `introspections.deputy.dev`.
    match s.reviewer.may(&who, "create", INTROSPECTION_GROUP, INTROSPECTION_RESOURCE).await {
        Ok(true) => {}
        Ok(false) => {
            s.metrics.introspection("forbidden");
            return OAuthError::new(
                ErrorCode::InvalidClient,
                format!(
                    "{} may not introspect tokens (it needs create on {INTROSPECTION_RESOURCE}.{INTROSPECTION_GROUP})",
                    who.username
                ),
            )
            .with_status(StatusCode::FORBIDDEN)
            .into_response();
        }
        Err(e) => return review_failure("the bearer token's permission", e).into_response(),
    }
    let token = match token_param(&headers, &body) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let answer = introspection(&s, &token);
    s.metrics.introspection(if answer["active"] == true { "active" } else { "inactive" });
    json_response(StatusCode::OK, &answer, "no-store")
}

/// The `token` parameter of an introspection or revocation form.
fn token_param(headers: &HeaderMap, body: &[u8]) -> Result<String, OAuthError> {
    let form = Form::parse(content_type(headers), body)?;
    Ok(form.require("token")?.to_string())
}

/// RFC 7662 answer for `token`: inactive for anything expired, malformed, foreign, or of a
/// run that is not active right now.
pub fn introspection(s: &EndpointState, token: &str) -> serde_json::Value {
    let inactive = json!({"active": false});
    let Ok(c) = s.keys.get().verify_any_audience(token) else { return inactive };
    let Some(run) = run_of(&s.runs, &c) else { return inactive };
    if !is_live(&s.pods, &run) {
        return inactive;
    }
    json!({
        "active": true,
        "iss": c.iss,
        "sub": c.sub,
        "act": c.act,
        "aud": c.aud,
        "client_id": c.client_id,
        "scope": c.scope,
        "token_type": "Bearer",
        "exp": c.exp,
        "iat": c.iat,
        "nbf": c.nbf,
        "jti": c.jti,
        "run": c.run,
        "task": c.task,
    })
}

async fn revoke(
    State(s): State<Arc<EndpointState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Some(actor) = bearer(&headers) else {
        return OAuthError::new(ErrorCode::InvalidClient, "authenticate with the run's actor token as a bearer token")
            .into_response();
    };
    let token = match token_param(&headers, &body) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    // RFC 7009 §2.2: an invalid or unknown token still gets 200.
    let Ok(c) = s.keys.get().verify_any_audience(&token) else { return StatusCode::OK.into_response() };
    let Some(run) = run_of(&s.runs, &c) else { return StatusCode::OK.into_response() };
    if let Err(e) = authenticate_actor(&s, actor, &run).await {
        return e.into_response();
    }
    if !is_live(&s.pods, &run) {
        return StatusCode::OK.into_response();
    }
    let api: Api<AgentRun> = Api::namespaced(s.client.clone(), &c.run.namespace);
    let patch = json!({"metadata": {"annotations": {REVOKE_ANNOTATION: Timestamp::now().to_string()}}});
    match api.patch(&c.run.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            let actors = c.act.chain();
            Record {
                jti: Some(&c.jti),
                reason: Some("SelfRevoked"),
                ..Record::new(AuditAction::Revoked, &c.sub, &actors, &c.run.namespace, &c.run.name, "")
            }
            .emit();
            StatusCode::OK.into_response()
        }
        // Gone: so are its tokens.
        Err(kube::Error::Api(e)) if e.code == 404 => StatusCode::OK.into_response(),
        // The run is not revoked yet: the API server did not take the write. Not the client's
        // fault, and worth retrying (503 with Retry-After, as for an unreachable TokenReview).
        Err(e) => OAuthError::new(ErrorCode::InvalidRequest, format!("the revocation could not be recorded yet: {e}"))
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
    }
}
