//! Authenticating Kubernetes service-account tokens with the TokenReview API, economically:
//! successful reviews are cached until shortly before the token expires, refusals for a few
//! seconds; a bearer that is not a JWT is refused without asking (unless opaque tokens are
//! allowed); and the reviews asked for are bounded per second and in flight, whatever clients
//! send (a flood of junk tokens gets 429, not one TokenReview each).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::metrics::Metrics;

/// Who a token belongs to, as the API server says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
    /// `authentication.kubernetes.io/pod-name`, when the token is bound to a pod.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the token is not valid: {0}")]
    Rejected(String),
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
    /// Deputy is asking the API server for as many reviews as it allows itself: try later.
    #[error("too many token reviews at once; try again shortly")]
    Busy,
}

/// How much Deputy asks of the API server's TokenReview.
#[derive(Clone, Copy, Debug)]
pub struct ReviewLimits {
    /// Reviews per second at most (a burst of twice this is allowed).
    pub per_second: u32,
    /// Reviews in flight at most.
    pub in_flight: usize,
    /// Review bearer tokens that are not JWTs (the opaque tokens of some webhook
    /// authenticators); otherwise they are refused without a review.
    pub opaque_tokens: bool,
}

impl Default for ReviewLimits {
    fn default() -> ReviewLimits {
        ReviewLimits { per_second: 100, in_flight: 32, opaque_tokens: false }
    }
}

/// How long a refusal is remembered: a client repeating a rejected token costs nothing more.
const REJECTED_FOR: Duration = Duration::from_secs(10);
/// How long a review waits for a slot among those in flight before it is refused as busy.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long a TokenReview or SubjectAccessReview may take. The client's own read timeout is
/// unbounded (watches share it); an API server that stops answering (frozen, partitioned)
/// would otherwise hold the caller's request and a review slot until TCP gives up.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `token` has the shape of a JWT (three base64url parts): every Kubernetes
/// service-account token does.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = 0;
    for part in token.split('.') {
        parts += 1;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return false;
        }
    }
    parts == 3
}

/// How long a successful review is trusted at most, and how far before the token's own
/// expiry it stops being trusted.
const MAX_CACHE: Duration = Duration::from_secs(300);
const EXPIRY_MARGIN: i64 = 30;
const MAX_ENTRIES: usize = 50_000;

/// Who asks to do what: (user, groups, verb, API group, resource).
type AccessKey = (String, Vec<String>, &'static str, &'static str, &'static str);

/// The token's SHA-256 and the audiences it was reviewed for.
type CacheKey = ([u8; 32], Vec<String>);

struct Entry {
    reviewed: Reviewed,
    until: Instant,
}

/// A TokenReview client with a cache.
pub struct Reviewer {
    client: Client,
    cache: Mutex<HashMap<CacheKey, Entry>>,
    /// Recent SubjectAccessReview answers, by (user, groups, verb, group, resource), with when
    /// they are forgotten.
    access: quick_cache::sync::Cache<AccessKey, (bool, Instant)>,
    /// Recent refusals, by token digest and audiences, with when they are forgotten.
    rejected: quick_cache::sync::Cache<CacheKey, (String, Instant)>,
    limiter: governor::DefaultDirectRateLimiter,
    in_flight: tokio::sync::Semaphore,
    opaque_tokens: bool,
    metrics: Arc<Metrics>,
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// How long a review of `token` may be cached: until shortly before the token's `exp` when
/// it is a JWT (a bound service-account token is), never longer than [`MAX_CACHE`].
fn cache_for(token: &str) -> Duration {
    let exp = crate::tokens::verify::peek_claims(token).ok().and_then(|c| c.get("exp").and_then(|e| e.as_i64()));
    match exp {
        Some(exp) => {
            let left = exp - jiff::Timestamp::now().as_second() - EXPIRY_MARGIN;
            Duration::from_secs(u64::try_from(left).unwrap_or(0)).min(MAX_CACHE)
        }
        None => Duration::from_secs(60),
    }
}

/// Whether a TokenReview answer is for one of the audiences asked for. The API server answers
/// `status.audiences` with the intersection of the token's audiences and the review's; an
/// authenticator that ignores `spec.audiences` (some webhook authenticators do) answers none,
/// and the token must then be refused rather than trusted for an audience nobody checked.
/// With no audiences asked for, the API server's own audience was checked and any answer goes.
pub fn audiences_accepted(requested: &[String], answered: Option<&[String]>) -> bool {
    requested.is_empty() || answered.unwrap_or_default().iter().any(|a| requested.contains(a))
}

/// The run's pod and ServiceAccount as they exist now (their uids; `None`: no pod of the run,
/// or a ServiceAccount the cache has not seen).
#[derive(Clone, Copy, Debug)]
pub struct Live<'a> {
    pub pod_uid: Option<&'a str>,
    pub service_account_uid: Option<&'a str>,
}

/// Why an authenticated actor token may not act for a run, if it may not: it must be a token of
/// the run's own ServiceAccount (`expected_user`) as it exists now (its uid, where the review and
/// the cache both know it), bound to the run's pod by name and by uid, and that pod must be the
/// one that exists now. The uid checks are what keep a cached review from outliving its pod or
/// its ServiceAccount: one deleted and created again under the same name has a new uid, and the
/// old token no longer matches it.
pub fn actor_refusal(reviewed: &Reviewed, expected_user: &str, pod: &str, live: Live<'_>) -> Option<&'static str> {
    if reviewed.username != expected_user {
        return Some("actor_token does not belong to the subject token's run");
    }
    if let (Some(had), Some(has)) = (reviewed.uid.as_deref(), live.service_account_uid)
        && had != has
    {
        return Some("actor_token belongs to an earlier ServiceAccount of this run");
    }
    let (Some(bound_name), Some(bound_uid)) = (reviewed.pod_name.as_deref(), reviewed.pod_uid.as_deref()) else {
        return Some("actor_token is not bound to a pod (use the projected token of the run's pod)");
    };
    if bound_name != pod {
        return Some("actor_token is bound to another pod");
    }
    match live.pod_uid {
        Some(uid) if uid == bound_uid => None,
        Some(_) => Some("actor_token is bound to an earlier pod of this run"),
        None => Some("actor_token's pod does not exist"),
    }
}

impl Reviewer {
    pub fn new(client: Client, metrics: Arc<Metrics>, limits: ReviewLimits) -> Reviewer {
        let per_second = std::num::NonZeroU32::new(limits.per_second).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = per_second.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        Reviewer {
            client,
            cache: Mutex::new(HashMap::new()),
            access: quick_cache::sync::Cache::new(10_000),
            rejected: quick_cache::sync::Cache::new(10_000),
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(per_second).allow_burst(burst)),
            in_flight: tokio::sync::Semaphore::new(limits.in_flight.max(1)),
            opaque_tokens: limits.opaque_tokens,
            metrics,
        }
    }

    /// Authenticates `token` for `audiences` (empty: the API server's default audience).
    pub async fn review(&self, token: &str, audiences: &[String]) -> Result<Reviewed, ReviewError> {
        if !self.opaque_tokens && !looks_like_jwt(token) {
            self.metrics.token_review("not_jwt");
            return Err(ReviewError::Rejected("not a Kubernetes service-account token (not a JWT)".into()));
        }
        let key = (digest(token), audiences.to_vec());
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some(e) = cache.get(&key)
            && e.until > now
        {
            self.metrics.token_review("cache_hit");
            return Ok(e.reviewed.clone());
        }
        if let Some((why, until)) = self.rejected.get(&key)
            && until > now
        {
            self.metrics.token_review("rejected_cached");
            return Err(ReviewError::Rejected(why));
        }
        if self.limiter.check().is_err() {
            self.metrics.token_review("throttled");
            return Err(ReviewError::Busy);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, self.in_flight.acquire()).await else {
            self.metrics.token_review("throttled");
            return Err(ReviewError::Busy);
        };
        let result = self.ask(token, audiences).await;
        if let Err(ReviewError::Rejected(why)) = &result {
            self.rejected.insert(key.clone(), (why.clone(), now + REJECTED_FOR));
        }
        let reviewed = result?;
        let ttl = cache_for(token);
        if !ttl.is_zero()
            && let Ok(mut cache) = self.cache.lock()
        {
            if cache.len() >= MAX_ENTRIES {
                cache.retain(|_, e| e.until > now);
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, Entry { reviewed: reviewed.clone(), until: now + ttl });
        }
        Ok(reviewed)
    }

    /// Whether the reviewed identity may `verb` the cluster-scoped `resource` of API `group`,
    /// as the API server's authorisers say (a SubjectAccessReview). An answer is remembered for
    /// a minute if yes, ten seconds if no; reviews of access share the TokenReviews' bounds.
    pub async fn may(
        &self,
        who: &Reviewed,
        verb: &'static str,
        group: &'static str,
        resource: &'static str,
    ) -> Result<bool, ReviewError> {
        let key = (who.username.clone(), who.groups.clone(), verb, group, resource);
        let now = Instant::now();
        if let Some((allowed, until)) = self.access.get(&key)
            && until > now
        {
            return Ok(allowed);
        }
        if self.limiter.check().is_err() {
            self.metrics.token_review("throttled");
            return Err(ReviewError::Busy);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, self.in_flight.acquire()).await else {
            return Err(ReviewError::Busy);
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.username.clone()),
                uid: who.uid.clone(),
                groups: Some(who.groups.clone()),
                extra: Some(who.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let asked = Api::<SubjectAccessReview>::all(self.client.clone());
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, asked.create(&PostParams::default(), &review))
            .await
            .map_err(|_| unanswered())?
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let allowed = answer.status.is_some_and(|s| s.allowed && s.denied != Some(true));
        let keep = if allowed { Duration::from_secs(60) } else { REJECTED_FOR };
        self.access.insert(key, (allowed, now + keep));
        Ok(allowed)
    }

    /// One TokenReview.
    async fn ask(&self, token: &str, audiences: &[String]) -> Result<Reviewed, ReviewError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
            },
            ..Default::default()
        };
        let answer = match tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                self.metrics.token_review("error");
                return Err(ReviewError::Unavailable(e.to_string()));
            }
            Err(_) => {
                self.metrics.token_review("error");
                return Err(unanswered());
            }
        };
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            self.metrics.token_review("rejected");
            return Err(ReviewError::Rejected(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        if !audiences_accepted(audiences, status.audiences.as_deref()) {
            self.metrics.token_review("rejected");
            return Err(ReviewError::Rejected(format!(
                "the token is not for this audience (the API server answered audiences {:?}, wanted one of {audiences:?})",
                status.audiences.unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let reviewed = Reviewed {
            username: user.username.unwrap_or_default(),
            uid: user.uid,
            groups: user.groups.unwrap_or_default(),
            pod_name: first("authentication.kubernetes.io/pod-name"),
            pod_uid: first("authentication.kubernetes.io/pod-uid"),
            extra: extra.clone(),
        };
        self.metrics.token_review("authenticated");
        Ok(reviewed)
    }
}

fn unanswered() -> ReviewError {
    ReviewError::Unavailable(format!("the API server did not answer within {REVIEW_TIMEOUT:?}"))
}

#[cfg(test)]
mod tests {
    use super::{Live, Reviewed, actor_refusal, audiences_accepted, looks_like_jwt};

    #[test]
    fn only_a_jwt_shaped_bearer_is_worth_a_review() {
        let cases = [
            ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", true),
            ("a.b.c", true),
            ("junk", false),
            ("a.b", false),
            ("a.b.c.d", false),
            ("a..c", false),
            ("a.b.c=", false),
            ("a b.c.d", false),
            ("", false),
        ];
        for (token, want) in cases {
            assert_eq!(looks_like_jwt(token), want, "{token:?}");
        }
    }

    #[test]
    fn an_actor_token_must_be_bound_to_the_runs_live_pod() {
        const SA: &str = "system:serviceaccount:team:deputy-run-r";
        let r = |user: &str, pod: Option<&str>, uid: Option<&str>| Reviewed {
            username: user.into(),
            uid: Some("sa-uid".into()),
            groups: vec![],
            extra: Default::default(),
            pod_name: pod.map(Into::into),
            pod_uid: uid.map(Into::into),
        };
        let live = |pod: Option<&'static str>, sa: Option<&'static str>| Live { pod_uid: pod, service_account_uid: sa };
        type Row<'a> = (Reviewed, Live<'a>, Option<&'a str>);
        let cases: Vec<Row> = vec![
            (r(SA, Some("deputy-run-r"), Some("u1")), live(Some("u1"), Some("sa-uid")), None),
            (r(SA, Some("deputy-run-r"), Some("u1")), live(Some("u1"), None), None),
            (
                r(SA, Some("deputy-run-r"), Some("u1")),
                live(Some("u1"), Some("sa-uid-2")),
                Some("earlier ServiceAccount"),
            ),
            (
                r("system:serviceaccount:team:other", Some("deputy-run-r"), Some("u1")),
                live(Some("u1"), None),
                Some("belong"),
            ),
            (r(SA, None, None), live(Some("u1"), None), Some("not bound")),
            (r(SA, Some("deputy-run-r"), None), live(Some("u1"), None), Some("not bound")),
            (r(SA, Some("deputy-run-x"), Some("u1")), live(Some("u1"), None), Some("another pod")),
            (r(SA, Some("deputy-run-r"), Some("u0")), live(Some("u1"), None), Some("earlier pod")),
            (r(SA, Some("deputy-run-r"), Some("u1")), live(None, None), Some("does not exist")),
        ];
        for (reviewed, live, want) in cases {
            let got = actor_refusal(&reviewed, SA, "deputy-run-r", live);
            match want {
                None => assert_eq!(got, None, "{reviewed:?} live {live:?}"),
                Some(w) => assert!(got.is_some_and(|g| g.contains(w)), "{reviewed:?} live {live:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn the_answer_must_name_a_requested_audience() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        type Row<'a> = (&'a [&'a str], Option<&'a [&'a str]>, bool);
        let cases: &[Row] = &[
            (&[], None, true),
            (&[], Some(&["https://kubernetes.default.svc"]), true),
            (&["https://deputy"], Some(&["https://deputy"]), true),
            (&["https://deputy"], Some(&["https://other", "https://deputy"]), true),
            (&["https://deputy"], None, false),
            (&["https://deputy"], Some(&[]), false),
            (&["https://deputy"], Some(&["https://other"]), false),
            (&["https://deputy"], Some(&["https://deputy/"]), false),
        ];
        for (requested, answered, want) in cases {
            let answered = answered.map(&s);
            assert_eq!(audiences_accepted(&s(requested), answered.as_deref()), *want, "{requested:?} {answered:?}");
        }
    }
}
