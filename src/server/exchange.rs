//! The token exchange as a pure core: the request a form makes ([`Request::parse`]) and, from
//! the verified subject token, the run's status and the audience's registration, the claims of
//! the exchanged token or the RFC 6749 error ([`grant`]). The handler around it verifies the
//! tokens, reviews the actor, reads the caches and signs; nothing here does I/O or reads a
//! clock.

use crate::registration::Registrations;
use crate::resources::AgentRunStatus;
use crate::runs::contract::{GRANT_TYPE_EXCHANGE, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT};
use crate::scope::{self, Scope};
use crate::tokens::{Audience, Claims};

use super::oauth::{ErrorCode, Form, OAuthError, invalid_request};

/// The longest lifetime of an exchanged token.
pub const MAX_EXCHANGED_TTL_SECS: i64 = 300;

/// A well-formed exchange request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub subject_token: &'a str,
    pub actor_token: &'a str,
    /// The token type of the response (`access_token` unless the jwt type was asked for).
    pub issued_type: &'static str,
    /// Every `audience` and `resource` parameter.
    pub targets: Vec<&'a str>,
    /// The `scope` parameter, if any.
    pub scope: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The request `form` makes, or the error for the first thing wrong with it.
    pub fn parse(form: &'a Form) -> Result<Request<'a>, OAuthError> {
        let grant_type = form.require("grant_type")?;
        if grant_type != GRANT_TYPE_EXCHANGE {
            return Err(OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                format!("grant_type must be {GRANT_TYPE_EXCHANGE}"),
            ));
        }
        let subject_token = form.require("subject_token")?;
        let subject_type = form.require("subject_token_type")?;
        if subject_type != TOKEN_TYPE_JWT && subject_type != TOKEN_TYPE_ACCESS {
            return Err(invalid_request("subject_token_type must be the jwt or access_token token type"));
        }
        let actor_token = form.require("actor_token")?;
        if form.require("actor_token_type")? != TOKEN_TYPE_JWT {
            return Err(invalid_request(format!("actor_token_type must be {TOKEN_TYPE_JWT}")));
        }
        let issued_type = match form.get("requested_token_type") {
            None | Some(TOKEN_TYPE_ACCESS) => TOKEN_TYPE_ACCESS,
            Some(TOKEN_TYPE_JWT) => TOKEN_TYPE_JWT,
            Some(_) => return Err(invalid_request("requested_token_type must be the access_token or jwt token type")),
        };
        let targets = form.all("audience").into_iter().chain(form.all("resource")).collect();
        Ok(Request { subject_token, actor_token, issued_type, targets, scope: form.get("scope") })
    }
}

/// What the exchanged token is decided from, besides the request.
pub struct Grounds<'a> {
    /// The subject token's claims (verified: ours, valid now, of a live run).
    pub subject: &'a Claims,
    /// The run's status, as cached (its granted audiences and scopes, its deadline).
    pub status: &'a AgentRunStatus,
    /// The audiences registered for the run's namespace now.
    pub registrations: &'a Registrations,
    pub namespace: &'a str,
    /// Deputy's issuer (`iss`, and the run token's own audience).
    pub issuer: &'a str,
    /// The time, in seconds.
    pub now: i64,
    /// The new token's `jti`.
    pub jti: String,
}

/// The claims of the exchanged token, or why there is none.
pub fn grant(req: &Request<'_>, g: &Grounds<'_>) -> Result<Claims, OAuthError> {
    let subject = g.subject;
    let audience = audience_of(&req.targets, subject, g.issuer)?;
    // The subject token says, signed, which scopes the run holds for which audience: only
    // those pairs are ever exchanged for.
    let Some(held_here) = subject.scopes_for(&audience).filter(|_| g.status.granted_audiences.contains(&audience))
    else {
        return Err(OAuthError::new(
            ErrorCode::InvalidTarget,
            format!("audience {audience:?} is not granted to this run"),
        ));
    };
    let held = scope::parse_all(&held_here)
        .map_err(|_| OAuthError::new(ErrorCode::InvalidGrant, "the subject token's scope is malformed"))?;
    let run_held = scope::parse_all(&g.status.granted_scopes).unwrap_or_default();
    let wanted: Vec<Scope> = match req.scope {
        None => held.clone(),
        Some(s) => s
            .split(' ')
            .filter(|x| !x.is_empty())
            .map(Scope::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| OAuthError::new(ErrorCode::InvalidScope, e.to_string()))?,
    };
    if wanted.is_empty() {
        return Err(OAuthError::new(ErrorCode::InvalidScope, "no scope requested"));
    }
    if let Some(extra) = wanted.iter().find(|w| !scope::covered_by(w, &held) || !scope::covered_by(w, &run_held)) {
        return Err(OAuthError::new(
            ErrorCode::InvalidScope,
            format!("scope {extra} is not held for audience {audience:?}"),
        ));
    }
    // The audience's owners, now: registered for the run's namespace, with these scopes.
    let registration = g
        .registrations
        .get(&audience)
        .map_err(|why| OAuthError::new(ErrorCode::InvalidTarget, why.explain(&audience, g.namespace)))?;
    if let Some(extra) = wanted.iter().find(|w| !scope::covered_by(w, &registration.scopes)) {
        return Err(OAuthError::new(
            ErrorCode::InvalidScope,
            format!("scope {extra} is not registered for audience {audience:?}"),
        ));
    }
    if registration.require_dpop {
        // Fail closed until proofs are accepted: a token for this audience must be bound.
        return Err(invalid_request(format!(
            "audience {audience:?} requires a DPoP proof (RFC 9449), which this Deputy does not accept yet"
        )));
    }
    let mut granted = wanted;
    scope::minimise(&mut granted);

    // Lifetime: ≤ 5 minutes, ≤ the subject token, ≤ the run's deadline, ≤ the audience's
    // maxTokenTTL.
    let now = g.now;
    let ttl = registration.max_token_ttl.map_or(MAX_EXCHANGED_TTL_SECS, |t| t.as_secs().min(MAX_EXCHANGED_TTL_SECS));
    let mut exp = (now + ttl).min(subject.exp);
    if let Some(deadline) = g.status.deadline {
        exp = exp.min(deadline.as_second());
    }
    if exp <= now {
        return Err(OAuthError::new(ErrorCode::InvalidGrant, "the subject token or the run expires now"));
    }
    Ok(Claims {
        iss: g.issuer.to_string(),
        sub: subject.sub.clone(),
        aud: Audience::One(audience),
        client_id: subject.client_id.clone(),
        scope: scope::to_claim(&granted),
        act: subject.act.clone(),
        run: subject.run.clone(),
        task: subject.task.clone(),
        iat: now,
        nbf: now,
        exp,
        jti: g.jti.clone(),
        authority: Default::default(),
    })
}

/// The one audience of the new token: the single target named (repeats allowed), or without a
/// target the one audience the subject token may be exchanged for.
fn audience_of(targets: &[&str], subject: &Claims, issuer: &str) -> Result<String, OAuthError> {
    let mut uniq: Vec<&str> = targets.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    match uniq.as_slice() {
        [one] => Ok(one.to_string()),
        [] => match (&subject.aud, subject.authority.len()) {
            (_, 1) => Ok(subject.authority.keys().next().cloned().unwrap_or_default()),
            (Audience::One(a), 0) if a != issuer => Ok(a.clone()),
            _ => Err(OAuthError::new(ErrorCode::InvalidTarget, "name the audience (or resource) of the new token")),
        },
        _ => Err(OAuthError::new(ErrorCode::InvalidTarget, "an exchanged token is bound to exactly one audience")),
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
