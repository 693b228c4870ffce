//! HTTP: URL parsing, verbs, discovery and the `/testapi` control endpoints.

use crate::error::{ApiError, ApiResult, json_response};
use crate::resources::{self, ResourceDef};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{ObjKey, PatchType, Shared, lock, res_name};
use crate::tokens::{TokenSpec, UserInfo};
use crate::watch::{self, Filter, WatchOptions};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone)]
pub struct App {
    pub shared: Shared,
    pub addr: String,
}

/// A request body: JSON, or YAML.
pub fn parse_body(body: &[u8]) -> ApiResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) => serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("cannot decode the body as JSON ({json_err}) or YAML ({e})"))),
    }
}

fn ok(body: &Value) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, body))
}

pub async fn handle(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let resp = dispatch(&app, &method, &uri, &headers, &body);
    tracing::debug!(%method, %uri, "request");
    resp.unwrap_or_else(IntoResponse::into_response)
}

fn dispatch(app: &App, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
    if let Some(ct) = headers.get("content-type").and_then(|c| c.to_str().ok())
        && ct.contains("protobuf")
    {
        return Err(ApiError::new(
            415,
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml ({ct})"
            ),
        ));
    }
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let q: HashMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
    let not_found = || ApiError::new(404, "the server could not find the requested resource");
    if segs.first() != Some(&"testapi") && lock(&app.shared).down {
        return Err(ApiError::new(503, "the server is currently unable to handle the request"));
    }
    match segs.as_slice() {
        ["version"] => ok(&resources::version()),
        ["healthz" | "livez" | "readyz"] => Ok("ok".into_response()),
        ["openapi", "v3"] => ok(&resources::openapi_root(&lock(&app.shared).resources)),
        ["openapi", "v3", "api", v] => {
            ok(&resources::openapi_gv(&lock(&app.shared).resources, "", v).ok_or_else(not_found)?)
        }
        ["openapi", "v3", "apis", g, v] => {
            ok(&resources::openapi_gv(&lock(&app.shared).resources, g, v).ok_or_else(not_found)?)
        }
        ["api"] => ok(&resources::api_versions(&app.addr)),
        ["apis"] => ok(&resources::group_list(&lock(&app.shared).resources)),
        ["api", "v1"] => ok(&resources::resource_list(&lock(&app.shared).resources, "", "v1").ok_or_else(not_found)?),
        ["apis", g] => ok(&resources::group(&lock(&app.shared).resources, g).ok_or_else(not_found)?),
        ["apis", g, v] => ok(&resources::resource_list(&lock(&app.shared).resources, g, v).ok_or_else(not_found)?),
        ["testapi", rest @ ..] => controls(app, method, rest, body),
        ["api", "v1", rest @ ..] => resource(app, "", "v1", rest, method, &q, headers, body),
        ["apis", g, v, rest @ ..] => resource(app, g, v, rest, method, &q, headers, body),
        _ => Err(not_found()),
    }
}

struct Target {
    res: ResourceDef,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn resolve(app: &App, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let st = lock(&app.shared);
    let nf = || ApiError::new(404, "the server could not find the requested resource");
    let s = |i: usize| rest.get(i).map(|x| x.to_string());
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && let Some(res) = st.find(group, version, rest[2]).filter(|r| r.namespaced)
    {
        if rest.len() > 5 {
            return Err(nf());
        }
        return Ok(Target { res, ns: s(1), name: s(3), sub: s(4) });
    }
    let res = rest.first().and_then(|p| st.find(group, version, p)).ok_or_else(nf)?;
    if rest.len() > 3 || (res.namespaced && rest.len() > 1) {
        return Err(nf());
    }
    Ok(Target { res, ns: None, name: s(1), sub: s(2) })
}

fn is_true(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

#[allow(clippy::too_many_arguments)]
fn resource(
    app: &App,
    group: &str,
    version: &str,
    rest: &[&str],
    method: &Method,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<Response> {
    let Target { res, ns, name, sub } = resolve(app, group, version, rest)?;
    let sub = sub.as_deref();
    match sub {
        None => {}
        Some("status") if res.status => {}
        Some("token") if res.key() == "/serviceaccounts" && method == Method::POST => {}
        Some(_) => return Err(ApiError::new(404, "the server could not find the requested resource")),
    }
    let verb = match (method.as_str(), name.is_some()) {
        ("GET", true) => "GET",
        ("GET", false) if is_true(q, "watch") => "WATCH",
        ("GET", false) => "LIST",
        ("POST", _) => "CREATE",
        ("PUT", true) => "UPDATE",
        ("PATCH", true) => "PATCH",
        ("DELETE", true) => "DELETE",
        ("DELETE", false) => "DELETECOLLECTION",
        _ => {
            return Err(ApiError::new(
                405,
                format!("the server does not allow this method on the requested resource ({method})"),
            ));
        }
    };
    if res.create_only && verb != "CREATE" {
        return Err(ApiError::new(405, "the server does not allow this method on the requested resource"));
    }
    let stat_res = match sub {
        Some(s) => format!("{}/{s}", res.plural),
        None => res.plural.clone(),
    };
    let filter = Filter {
        res: res.clone(),
        version: version.to_string(),
        ns: ns.clone(),
        labels: q.get("labelSelector").filter(|s| !s.is_empty()).map(|s| LabelSelector::parse(s)).transpose()?,
        fields: q.get("fieldSelector").filter(|s| !s.is_empty()).map(|s| FieldSelector::parse(s)).transpose()?,
    };
    let table = headers.get("accept").and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("as=Table"));
    let key = ObjKey { res: res.key(), ns: ns.clone().unwrap_or_default(), name: name.clone().unwrap_or_default() };

    let mut st = lock(&app.shared);
    st.record(&stat_res, verb);
    let agent = headers.get("user-agent").and_then(|a| a.to_str().ok()).unwrap_or("");
    st.record_agent(agent, &stat_res, verb);
    if !matches!(verb, "GET" | "LIST" | "WATCH")
        && let Some(e) = st.take_fault(&stat_res, &res.plural)
    {
        return Err(e);
    }
    let created = |v: &Value| Ok(json_response(StatusCode::CREATED, v));
    match verb {
        "GET" => {
            let obj = filter.present(&st.get(&res, &key)?);
            if table { ok(&to_table(&filter, &[obj], st.rv)) } else { ok(&obj) }
        }
        "LIST" => {
            let items: Vec<Value> =
                st.list(&res.key(), ns.as_deref(), |o| filter.matches(o)).iter().map(|o| filter.present(o)).collect();
            if table {
                return ok(&to_table(&filter, &items, st.rv));
            }
            ok(&json!({
                "kind": format!("{}List", res.kind), "apiVersion": res.group_version(version),
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items,
            }))
        }
        "WATCH" => {
            drop(st);
            let resource_version = match q.get("resourceVersion").map(String::as_str) {
                None | Some("" | "0") => None,
                Some(rv) => Some(
                    rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
                ),
            };
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|t| *t > 0)
                .unwrap_or(290)
                .min(86_400);
            let opts = WatchOptions {
                resource_version,
                send_initial_events: is_true(q, "sendInitialEvents"),
                bookmarks: is_true(q, "allowWatchBookmarks"),
                timeout: Duration::from_secs(timeout),
                bookmark_interval: Duration::from_secs(1),
            };
            Ok(watch::watch(app.shared.clone(), filter, opts))
        }
        "CREATE" if res.key() == "authentication.k8s.io/tokenreviews" => created(&st.token_review(&parse_body(body)?)?),
        "CREATE" if res.key() == "authorization.k8s.io/subjectaccessreviews" => {
            created(&st.access_review(&parse_body(body)?))
        }
        "CREATE" if sub == Some("token") => created(&st.token_request(&key.ns, &key.name, &parse_body(body)?)?),
        "CREATE" if name.is_some() => Err(ApiError::new(405, "POST is not allowed on a named object")),
        "CREATE" => created(&filter.present(&st.create(&res, ns.as_deref(), parse_body(body)?)?)),
        "UPDATE" => ok(&filter.present(&st.update(&res, &key, parse_body(body)?, sub)?)),
        "PATCH" => {
            let ctype = headers.get("content-type").and_then(|c| c.to_str().ok()).unwrap_or_default();
            let ptype = match ctype.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/json-patch+json" => PatchType::Json,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
                other => {
                    return Err(ApiError::new(
                        415,
                        format!("the body of the request was in an unknown format ({other:?})"),
                    ));
                }
            };
            let manager = q.get("fieldManager").map(String::as_str);
            ok(&filter.present(&st.patch(&res, &key, ptype, body, sub, manager)?))
        }
        "DELETE" => {
            let opts = if body.iter().all(u8::is_ascii_whitespace) { json!({}) } else { parse_body(body)? };
            let policy = q
                .get("propagationPolicy")
                .map(String::as_str)
                .or_else(|| opts.get("propagationPolicy").and_then(Value::as_str));
            let current = st.get(&res, &key)?;
            for (pre, field) in [
                ("/preconditions/uid", "/metadata/uid"),
                ("/preconditions/resourceVersion", "/metadata/resourceVersion"),
            ] {
                if let Some(want) = opts.pointer(pre).and_then(Value::as_str)
                    && current.pointer(field).and_then(Value::as_str) != Some(want)
                {
                    return Err(ApiError::conflict(&res_name(&res), &key.name));
                }
            }
            ok(&filter.present(&st.delete(&res_name(&res), &key, policy == Some("Orphan"))?))
        }
        _ => {
            // DELETECOLLECTION
            let keys: Vec<ObjKey> = st
                .objects
                .iter()
                .filter(|(k, v)| k.res == res.key() && ns.as_deref().is_none_or(|n| k.ns == n) && filter.matches(v))
                .map(|(k, _)| k.clone())
                .collect();
            let mut items = Vec::new();
            for k in keys {
                if let Ok(v) = st.delete(&res_name(&res), &k, false) {
                    items.push(filter.present(&v));
                }
            }
            ok(
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.group_version(version), "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
    }
}

fn age(obj: &Value) -> String {
    let Some(ts) = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    else {
        return "<unknown>".into();
    };
    let s = jiff::Timestamp::now().as_second().saturating_sub(ts.as_second()).max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A `meta.k8s.io/v1 Table` for `kubectl get`: NAME, (STATUS for pods), AGE.
fn to_table(filter: &Filter, items: &[Value], rv: u64) -> Value {
    let pods = filter.res.key() == "/pods";
    let mut cols = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0}),
    ];
    if pods {
        cols.push(
            json!({"name": "Status", "type": "string", "format": "", "description": "status.phase", "priority": 0}),
        );
    }
    cols.push(
        json!({"name": "Age", "type": "string", "format": "", "description": "Time since creation", "priority": 0}),
    );
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            if pods {
                cells.push(o.pointer("/status/phase").cloned().unwrap_or(json!("Pending")));
            }
            cells.push(json!(age(o)));
            json!({"cells": cells, "object": o})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": cols, "rows": rows})
}

#[derive(serde::Deserialize)]
struct FaultReq {
    resource: String,
    count: u32,
    #[serde(default = "conflict_code")]
    code: u16,
}

fn conflict_code() -> u16 {
    409
}

/// What a SubjectAccessReview is to allow (`POST /testapi/allow`).
#[derive(serde::Deserialize)]
struct AllowReq {
    user: String,
    group: String,
    resource: String,
    verb: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterReq {
    token: String,
    user: UserInfo,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    expiration_timestamp: Option<jiff::Timestamp>,
}

fn from_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_value(parse_body(body)?).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `/testapi/...`: test controls for other processes.
fn controls(app: &App, method: &Method, rest: &[&str], body: &[u8]) -> ApiResult<Response> {
    let mut st = lock(&app.shared);
    match (method.as_str(), rest) {
        ("GET", ["stats"]) => ok(&json!(st.stats)),
        ("POST", ["stats", "reset"]) | ("DELETE", ["stats"]) => {
            st.stats.clear();
            st.stats_by_agent.clear();
            ok(&json!({}))
        }
        ("POST", ["faults"]) => {
            let f: FaultReq = from_body(body)?;
            st.faults.insert(f.resource, (f.count, f.code));
            ok(&json!({}))
        }
        ("POST", ["allow"]) => {
            let a: AllowReq = from_body(body)?;
            st.allowed.insert((a.user, a.group, a.resource, a.verb));
            ok(&json!({}))
        }
        ("POST", ["tokens"]) => {
            let spec: TokenSpec = from_body(body)?;
            let (token, expires) = st.issue_token(&spec);
            ok(&json!({"token": token, "expirationTimestamp": expires.to_string()}))
        }
        ("POST", ["tokens", "register"]) => {
            let r: RegisterReq = from_body(body)?;
            st.register_token(r.token, r.user, r.audiences, r.expiration_timestamp);
            ok(&json!({}))
        }
        ("POST", ["compact"]) => {
            st.compact();
            ok(&json!({"resourceVersion": st.rv.to_string()}))
        }
        ("GET", ["resourceversion"]) => ok(&json!({"resourceVersion": st.rv.to_string()})),
        _ => Err(ApiError::new(404, "unknown test control")),
    }
}
