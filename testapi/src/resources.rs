//! The resource registry (built-in kinds plus CRD-registered ones) and discovery documents.

use crate::error::{ApiError, ApiResult};
use serde_json::{Value, json};

pub const CRD_KEY: &str = "apiextensions.k8s.io/customresourcedefinitions";
pub const NAMESPACE_KEY: &str = "/namespaces";

/// One served resource (all versions of one group/plural).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceDef {
    pub group: String,
    /// Served versions; the first is the preferred one. Objects are stored once and merely
    /// relabelled with the requested version (no conversion).
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub short_names: Vec<String>,
    pub namespaced: bool,
    pub status: bool,
    /// Only `create` (tokenreviews, subjectaccessreviews).
    pub create_only: bool,
    /// Registered by a CRD object (unregistered when it is deleted).
    pub custom: bool,
}

impl ResourceDef {
    /// Storage key: `group/plural` (`/pods` for the core group).
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }
    pub fn group_version(&self, version: &str) -> String {
        if self.group.is_empty() { version.to_string() } else { format!("{}/{}", self.group, version) }
    }
    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }
    fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            vec!["create"]
        } else {
            vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    singular: &str,
    kind: &str,
    short: &[&str],
    namespaced: bool,
    status: bool,
) -> ResourceDef {
    ResourceDef {
        group: group.into(),
        versions: vec![version.into()],
        plural: plural.into(),
        singular: singular.into(),
        kind: kind.into(),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        namespaced,
        status,
        create_only: false,
        custom: false,
    }
}

pub fn builtins() -> Vec<ResourceDef> {
    let mut tokenreviews =
        builtin("authentication.k8s.io", "v1", "tokenreviews", "tokenreview", "TokenReview", &[], false, false);
    tokenreviews.create_only = true;
    let mut sars = builtin(
        "authorization.k8s.io",
        "v1",
        "subjectaccessreviews",
        "subjectaccessreview",
        "SubjectAccessReview",
        &[],
        false,
        false,
    );
    sars.create_only = true;
    vec![
        builtin("", "v1", "namespaces", "namespace", "Namespace", &["ns"], false, true),
        builtin("", "v1", "pods", "pod", "Pod", &["po"], true, true),
        builtin("", "v1", "secrets", "secret", "Secret", &[], true, false),
        builtin("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", &["sa"], true, false),
        builtin("", "v1", "configmaps", "configmap", "ConfigMap", &["cm"], true, false),
        builtin("", "v1", "services", "service", "Service", &["svc"], true, true),
        builtin("", "v1", "events", "event", "Event", &["ev"], true, false),
        builtin("events.k8s.io", "v1", "events", "event", "Event", &["ev"], true, false),
        builtin("coordination.k8s.io", "v1", "leases", "lease", "Lease", &[], true, false),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "customresourcedefinition",
            "CustomResourceDefinition",
            &["crd", "crds"],
            false,
            true,
        ),
        tokenreviews,
        sars,
    ]
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_str)
}

/// Read the resource a CustomResourceDefinition object defines.
pub fn from_crd(crd: &Value) -> ApiResult<ResourceDef> {
    let spec = crd.get("spec").ok_or_else(|| ApiError::invalid("CustomResourceDefinition: spec is required"))?;
    let group = str_at(spec, &["group"]).ok_or_else(|| ApiError::invalid("spec.group: Required value"))?;
    let plural =
        str_at(spec, &["names", "plural"]).ok_or_else(|| ApiError::invalid("spec.names.plural: Required value"))?;
    let kind = str_at(spec, &["names", "kind"]).ok_or_else(|| ApiError::invalid("spec.names.kind: Required value"))?;
    let name = str_at(crd, &["metadata", "name"]).unwrap_or_default();
    if name != format!("{plural}.{group}") {
        return Err(ApiError::invalid(format!(
            "CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: metadata.name: must be spec.names.plural+\".\"+spec.group"
        )));
    }
    let singular = str_at(spec, &["names", "singular"]).map(str::to_string).unwrap_or_else(|| kind.to_lowercase());
    let short_names = spec
        .pointer("/names/shortNames")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let namespaced = str_at(spec, &["scope"]) != Some("Cluster");
    let versions_json = spec.get("versions").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut versions = Vec::new();
    let mut status = false;
    let mut storage_first = None;
    for v in &versions_json {
        let Some(vname) = v.get("name").and_then(Value::as_str) else { continue };
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        if v.pointer("/subresources/status").is_some() {
            status = true;
        }
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            storage_first = Some(vname.to_string());
        }
        versions.push(vname.to_string());
    }
    if versions.is_empty() {
        return Err(ApiError::invalid("spec.versions: must have at least one served version"));
    }
    // Preferred version first (storage version is a good proxy).
    if let Some(s) = storage_first
        && let Some(pos) = versions.iter().position(|v| *v == s)
    {
        let v = versions.remove(pos);
        versions.insert(0, v);
    }
    Ok(ResourceDef {
        group: group.into(),
        versions,
        plural: plural.into(),
        singular,
        kind: kind.into(),
        short_names,
        namespaced,
        status,
        create_only: false,
        custom: true,
    })
}

/// The server-maintained status of an accepted CRD.
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let cond = |t: &str, reason: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": ""});
    json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [cond("NamesAccepted", "NoConflicts"), cond("Established", "InitialNamesAccepted")],
    })
}

/// `/api`
pub fn api_versions(addr: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]})
}

/// `/apis`
pub fn group_list(resources: &[ResourceDef]) -> Value {
    let mut groups: Vec<String> = Vec::new();
    for r in resources.iter().filter(|r| !r.group.is_empty()) {
        if !groups.contains(&r.group) {
            groups.push(r.group.clone());
        }
    }
    let groups: Vec<Value> = groups.iter().filter_map(|g| group(resources, g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`
pub fn group(resources: &[ResourceDef], group: &str) -> Option<Value> {
    let mut versions: Vec<String> = Vec::new();
    for r in resources.iter().filter(|r| r.group == group) {
        for v in &r.versions {
            if !versions.contains(v) {
                versions.push(v.clone());
            }
        }
    }
    let preferred = versions.first()?;
    let gv = |v: &String| json!({"groupVersion": format!("{group}/{v}"), "version": v});
    Some(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": versions.iter().map(gv).collect::<Vec<_>>(),
        "preferredVersion": gv(preferred),
    }))
}

/// `/api/v1`, `/apis/{group}/{version}`
pub fn resource_list(resources: &[ResourceDef], group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for r in resources.iter().filter(|r| r.group == group && r.serves(version)) {
        list.push(json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
            "verbs": r.verbs(), "shortNames": r.short_names,
        }));
        if r.status {
            list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
        if r.key() == "/serviceaccounts" {
            list.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
        }
    }
    if list.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}))
}

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "35", "gitVersion": "v1.35.0+deputy-testapi", "gitCommit": "", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.25", "compiler": "gc", "platform": "linux/amd64",
    })
}

/// `/openapi/v3`: one entry per group-version.
pub fn openapi_root(resources: &[ResourceDef]) -> Value {
    let mut paths = serde_json::Map::new();
    for r in resources {
        for v in &r.versions {
            let p = if r.group.is_empty() { format!("api/{v}") } else { format!("apis/{}/{v}", r.group) };
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}")}));
        }
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1|apis/g/v}`: just enough for kubectl to see that PATCH takes
/// `fieldValidation` (so it validates on the server, i.e. not at all) — no schemas.
pub fn openapi_gv(resources: &[ResourceDef], group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for r in resources.iter().filter(|r| r.group == group && r.serves(version)) {
        let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let param = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string"}});
        let op = json!({"x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind}, "parameters": [param], "responses": {"200": {"description": "OK"}}});
        paths.insert(path, json!({"patch": op.clone(), "put": op}));
    }
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "deputy-testapi", "version": "v1.35.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}
