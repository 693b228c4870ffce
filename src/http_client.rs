//! A minimal HTTP(S) client for the command-line tools (fetching a JWKS, calling the token
//! endpoint). Built on the hyper stack kube already uses; system roots for HTTPS.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Responses larger than this are refused.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {0:?}")]
    Url(String),
    #[error("could not load the system's TLS roots: {0}")]
    Tls(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("response body: {0}")]
    Body(String),
}

/// A response: status, headers and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Sends one request and reads the whole (bounded) response.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let uri: hyper::Uri = url.parse().map_err(|_| HttpError::Url(url.to_string()))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| HttpError::Tls(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut req = hyper::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(|e| HttpError::Request(e.to_string()))?;
    let work = async {
        let resp = client.request(req).await.map_err(|e| HttpError::Request(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| HttpError::Body(e.to_string()))?
            .to_bytes();
        Ok(Response { status, headers, body })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| HttpError::Timeout(timeout))?
}

/// `GET url`.
pub async fn get(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    send("GET", url, &[], vec![], timeout).await
}

/// `POST url` with an `application/x-www-form-urlencoded` body.
pub async fn post_form(
    url: &str,
    form: &[(&str, &str)],
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let body = form_urlencode(form);
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    send("POST", url, &headers, body.into_bytes(), timeout).await
}

/// Encodes pairs as `application/x-www-form-urlencoded`.
pub fn form_urlencode(form: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_encoding() {
        assert_eq!(super::form_urlencode(&[("a b", "c&d=e"), ("x", "é")]), "a+b=c%26d%3De&x=%C3%A9");
    }
}
