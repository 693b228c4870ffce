//! Service-account style tokens: TokenRequest issues them, TokenReview checks them.
//!
//! Tokens are random opaque strings (not JWTs). A review checks what a real API server checks
//! for bound service-account tokens: known, not expired, the service account still exists with
//! the same uid, the bound pod still exists with the same uid, and the audiences intersect.

use crate::error::{ApiError, ApiResult};
use crate::store::{ObjKey, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// The audience the server itself accepts: used when a TokenRequest or a TokenReview gives none.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Who a token authenticates as (`TokenReview.status.user`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserInfo {
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// A service-account token to issue (the library twin of a TokenRequest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    /// Empty means the API server's own audience.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "default_expiry", with = "secs")]
    pub expires_in: Duration,
    /// Bind the token to a pod: (name, uid).
    #[serde(default)]
    pub pod: Option<(String, String)>,
}

fn default_expiry() -> Duration {
    Duration::from_secs(3600)
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub user: UserInfo,
    pub audiences: Vec<String>,
    pub expires: Option<jiff::Timestamp>,
    /// (namespace, name, uid if known) of the service account.
    pub sa: Option<(String, String, Option<String>)>,
    /// (namespace, name, uid) of the bound pod.
    pub pod: Option<(String, String, String)>,
}

fn random_token() -> String {
    format!("dtk.{}.{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn uid_of(state: &State, res: &str, ns: &str, name: &str) -> Option<String> {
    let obj = state.objects.get(&ObjKey { res: res.into(), ns: ns.into(), name: name.into() })?;
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return None;
    }
    obj.pointer("/metadata/uid").and_then(Value::as_str).map(str::to_string)
}

impl State {
    /// Issue a token for a service account. The SA's uid is bound if the SA exists (the HTTP
    /// TokenRequest path requires it to exist).
    pub fn issue_token(&mut self, spec: &TokenSpec) -> (String, jiff::Timestamp) {
        let sa_uid = uid_of(self, "/serviceaccounts", &spec.namespace, &spec.service_account);
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = &spec.pod {
            extra.insert("authentication.kubernetes.io/pod-name".to_string(), vec![name.clone()]);
            extra.insert("authentication.kubernetes.io/pod-uid".to_string(), vec![uid.clone()]);
        }
        let user = UserInfo {
            username: format!("system:serviceaccount:{}:{}", spec.namespace, spec.service_account),
            uid: sa_uid.clone().unwrap_or_default(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", spec.namespace),
                "system:authenticated".into(),
            ],
            extra,
        };
        let audiences = if spec.audiences.is_empty() { vec![API_AUDIENCE.to_string()] } else { spec.audiences.clone() };
        let secs = i64::try_from(spec.expires_in.as_secs()).unwrap_or(i64::MAX / 4).min(10 * 365 * 86400);
        let expires =
            jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_secs(secs)).unwrap_or(jiff::Timestamp::MAX);
        let token = random_token();
        self.tokens.insert(
            token.clone(),
            TokenEntry {
                user,
                audiences,
                expires: Some(expires),
                sa: Some((spec.namespace.clone(), spec.service_account.clone(), sa_uid)),
                pod: spec.pod.as_ref().map(|(n, u)| (spec.namespace.clone(), n.clone(), u.clone())),
            },
        );
        (token, expires)
    }

    /// `POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`
    pub fn token_request(&mut self, ns: &str, sa: &str, body: &Value) -> ApiResult<Value> {
        if uid_of(self, "/serviceaccounts", ns, sa).is_none() {
            return Err(ApiError::not_found("serviceaccounts", sa));
        }
        let spec = body.get("spec").filter(|s| s.is_object()).cloned().unwrap_or(json!({}));
        let audiences: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let expiration = spec.get("expirationSeconds").and_then(Value::as_u64).unwrap_or(3600);
        if expiration < 600 {
            return Err(ApiError::invalid(
                "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
            ));
        }
        let mut pod = None;
        if let Some(bound) = spec.get("boundObjectRef").filter(|b| !b.is_null()) {
            let kind = bound.get("kind").and_then(Value::as_str).unwrap_or_default();
            let name = bound.get("name").and_then(Value::as_str).unwrap_or_default();
            if kind != "Pod" {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token to object of kind {kind:?} (this test server supports Pod only)"
                )));
            }
            let uid = uid_of(self, "/pods", ns, name).ok_or_else(|| ApiError::not_found("pods", name))?;
            if let Some(want) = bound.get("uid").and_then(Value::as_str)
                && !want.is_empty()
                && want != uid
            {
                return Err(ApiError::new(
                    409,
                    format!("the UID in the bound object reference ({want}) does not match the UID in record ({uid})"),
                ));
            }
            pod = Some((name.to_string(), uid));
        }
        let spec_struct = TokenSpec {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: audiences.clone(),
            expires_in: Duration::from_secs(expiration),
            pod,
        };
        let (token, expires) = self.issue_token(&spec_struct);
        let mut out_spec = spec;
        out_spec["audiences"] = json!(if audiences.is_empty() { vec![API_AUDIENCE.to_string()] } else { audiences });
        out_spec["expirationSeconds"] = json!(expiration);
        Ok(json!({
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa, "namespace": ns, "creationTimestamp": crate::store::now()},
            "spec": out_spec,
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
        }))
    }

    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`
    pub fn token_review(&mut self, body: &Value) -> ApiResult<Value> {
        let token = body.pointer("/spec/token").and_then(Value::as_str).unwrap_or_default();
        let wanted: Vec<String> = body
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let status = match self.check_token(token, &wanted) {
            Ok((user, audiences)) => json!({"authenticated": true, "user": user, "audiences": audiences}),
            Err(e) => json!({"authenticated": false, "user": {}, "error": e}),
        };
        let mut out = body.clone();
        if !out.is_object() {
            out = json!({});
        }
        out["kind"] = json!("TokenReview");
        out["apiVersion"] = json!("authentication.k8s.io/v1");
        out["metadata"] = json!({"creationTimestamp": null});
        out["status"] = status;
        Ok(out)
    }

    fn check_token(&self, token: &str, wanted: &[String]) -> Result<(UserInfo, Vec<String>), String> {
        let invalid = || "[invalid bearer token, token lookup failed]".to_string();
        let entry = self.tokens.get(token).ok_or_else(invalid)?;
        if entry.expires.is_some_and(|e| e <= jiff::Timestamp::now()) {
            return Err("[invalid bearer token, service account token has expired]".into());
        }
        if let Some((ns, name, uid)) = &entry.sa {
            let current = uid_of(self, "/serviceaccounts", ns, name);
            let ok = match (uid, &current) {
                (Some(u), Some(c)) => u == c,
                (None, Some(_)) => true,
                (_, None) => false,
            };
            if !ok {
                return Err(format!("[invalid bearer token, service account {ns}/{name} has been deleted]"));
            }
        }
        if let Some((ns, name, uid)) = &entry.pod
            && uid_of(self, "/pods", ns, name).as_deref() != Some(uid.as_str())
        {
            return Err(format!("[invalid bearer token, pod {ns}/{name} (uid {uid}) has been deleted or replaced]"));
        }
        let wanted: Vec<String> = if wanted.is_empty() { vec![API_AUDIENCE.to_string()] } else { wanted.to_vec() };
        let matched: Vec<String> = wanted.iter().filter(|a| entry.audiences.contains(a)).cloned().collect();
        if matched.is_empty() {
            return Err("[invalid bearer token, token audiences don't match the requested audiences]".into());
        }
        let mut user = entry.user.clone();
        if let Some((ns, name, _)) = &entry.sa
            && let Some(uid) = uid_of(self, "/serviceaccounts", ns, name)
        {
            user.uid = uid;
        }
        Ok((user, matched))
    }
}

impl State {
    /// Register an arbitrary token (not bound to a service account). Empty `audiences` means
    /// the API server's own audience.
    pub fn register_token(
        &mut self,
        token: String,
        user: UserInfo,
        audiences: Vec<String>,
        expires: Option<jiff::Timestamp>,
    ) {
        let audiences = if audiences.is_empty() { vec![API_AUDIENCE.to_string()] } else { audiences };
        self.tokens.insert(token, TokenEntry { user, audiences, expires, sa: None, pod: None });
    }
}
