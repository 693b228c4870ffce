//! OAuth 2.0 error responses (RFC 6749 §5.2) and form parsing that refuses ambiguity.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The error codes Deputy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    InvalidTarget,
    UnsupportedTokenType,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::InvalidTarget => "invalid_target",
            ErrorCode::UnsupportedTokenType => "unsupported_token_type",
        }
    }
    fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An OAuth error: code, a description for the client, and the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub code: ErrorCode,
    pub description: String,
    pub status: StatusCode,
}

impl OAuthError {
    /// An error whose description, which may quote the request, is cut at
    /// [`crate::audit::MAX_ECHO`] bytes (a 30 KB parameter name does not make a 30 KB reply).
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        let mut description = description.into();
        if description.len() > crate::audit::MAX_ECHO {
            description = format!("{}… (truncated)", crate::audit::clip(&description, crate::audit::MAX_ECHO));
        }
        OAuthError { code, description, status: code.status() }
    }
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    error_description: &'a str,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Body { error: self.code.as_str(), error_description: &self.description })
            .unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status == StatusCode::TOO_MANY_REQUESTS {
            // The Kubernetes API unreachable (503) or Deputy at its bound of reviews (429):
            // try again shortly.
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"deputy\""));
        }
        resp
    }
}

pub fn invalid_request(d: impl Into<String>) -> OAuthError {
    OAuthError::new(ErrorCode::InvalidRequest, d)
}

/// Parameters of an `application/x-www-form-urlencoded` body.
#[derive(Debug, Default)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

/// Parameters that may appear more than once (RFC 8693 §2.1).
const MULTI: [&str; 2] = ["audience", "resource"];

impl Form {
    /// Parses a form body, refusing any parameter repeated (except `audience`/`resource`)
    /// and any empty value: RFC 6749 §3.1 says parameters must not be included more than once.
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Form, OAuthError> {
        let ct = content_type.unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(invalid_request(format!(
                "the body must be application/x-www-form-urlencoded, not {:?}",
                if mime.is_empty() { "nothing" } else { mime }
            )));
        }
        if std::str::from_utf8(body).is_err() {
            return Err(invalid_request("the body is not UTF-8"));
        }
        let mut pairs: Vec<(String, String)> = vec![];
        for (k, v) in form_urlencoded::parse(body) {
            if k.is_empty() {
                continue;
            }
            if !MULTI.contains(&k.as_ref()) && pairs.iter().any(|(pk, _)| pk == k.as_ref()) {
                return Err(invalid_request(format!("parameter {k:?} is repeated")));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Form { pairs })
    }

    /// A parameter's value; an empty value counts as absent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, v)| k == key && !v.is_empty()).map(|(_, v)| v.as_str())
    }

    pub fn require(&self, key: &str) -> Result<&str, OAuthError> {
        self.get(key).ok_or_else(|| invalid_request(format!("parameter {key:?} is required")))
    }

    /// Every value of a multi-valued parameter.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.pairs.iter().filter(|(k, v)| k == key && !v.is_empty()).map(|(_, v)| v.as_str()).collect()
    }
}

/// The bearer token of an `Authorization` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    #[test]
    fn forms_refuse_repeats_and_other_types() {
        assert!(Form::parse(FORM, b"a=1&a=2").is_err());
        assert!(Form::parse(FORM, b"audience=a&audience=b").is_ok());
        assert!(Form::parse(Some("application/json"), b"{}").is_err());
        assert!(Form::parse(None, b"a=1").is_err());
        assert!(Form::parse(Some("application/x-www-form-urlencoded; charset=UTF-8"), b"a=1").is_ok());
        assert!(Form::parse(FORM, b"a=\xff").is_err());
        let f = Form::parse(FORM, b"a=&b=x%20y").unwrap();
        assert_eq!(f.get("a"), None);
        assert_eq!(f.get("b"), Some("x y"));
        assert!(f.require("c").is_err());
    }

    #[test]
    fn error_body_is_rfc6749() {
        let resp = OAuthError::new(ErrorCode::InvalidClient, "who are you").into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    }
}
