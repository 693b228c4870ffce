//! The object store: one global resourceVersion counter, an event history for watches, and the
//! write semantics (create/update/patch/apply/delete, status subresource, finalizers,
//! owner-reference garbage collection).

use crate::apply::{self, FieldSet};
use crate::error::{ApiError, ApiResult};
use crate::resources::{self, CRD_KEY, NAMESPACE_KEY, ResourceDef};
use crate::tokens::TokenEntry;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    /// `group/plural`
    pub res: String,
    /// Empty for cluster-scoped objects.
    pub ns: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change. Every change gets its own resourceVersion.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub res: String,
    pub typ: EventType,
    pub object: Value,
    /// The previous state for MODIFIED (to turn selector transitions into ADDED/DELETED).
    pub old: Option<Value>,
    /// When it happened (watches of a delayed resource deliver it later).
    pub at: std::time::Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    /// Approximated as a JSON merge patch.
    Strategic,
    Json,
    Apply,
}

pub struct State {
    pub rv: u64,
    pub resources: Vec<ResourceDef>,
    pub objects: BTreeMap<ObjKey, Value>,
    pub history: VecDeque<Event>,
    pub history_limit: usize,
    /// Highest resourceVersion no longer in `history`; watches from an older one get 410.
    pub compacted: u64,
    /// Owner uid -> the objects whose ownerReferences name it (for garbage collection without
    /// scanning every object).
    dependents: HashMap<String, BTreeSet<ObjKey>>,
    /// Applied field sets: (object, is-status-subresource) -> manager -> fields.
    managers: HashMap<(ObjKey, bool), BTreeMap<String, FieldSet>>,
    /// resource -> verb -> count.
    pub stats: BTreeMap<String, BTreeMap<String, u64>>,
    /// The same counts per client `User-Agent` (e.g. to tell an operator's requests from a
    /// test's own).
    pub stats_by_agent: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
    /// resource (`plural` or `plural/sub`) -> (remaining, code).
    pub faults: HashMap<String, (u32, u16)>,
    /// What SubjectAccessReviews allow: (user, group, resource, verb). Everything else is
    /// denied (there is no RBAC here).
    pub allowed: std::collections::HashSet<(String, String, String, String)>,
    /// Watches of these resources (by plural) see each event only this long after it
    /// happened: a watch cache lagging behind the API server, as under load.
    pub watch_delays: HashMap<String, std::time::Duration>,
    /// An outage: every API request is answered 503 and every open watch ends (the test API
    /// server's own `/testapi` controls still answer).
    pub down: bool,
    pub tokens: HashMap<String, TokenEntry>,
    pub notify: watch::Sender<u64>,
}

pub type Shared = Arc<Mutex<State>>;

pub fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// A write that names a uid (`metadata.uid` in the body) is refused unless it is the stored
/// object's, with the real server's answer (422: the uid is immutable).
fn check_uid(res: &ResourceDef, name: &str, want: &str, have: Option<&str>) -> ApiResult<()> {
    if Some(want) == have {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "The {} \"{name}\" is invalid: metadata.uid: Invalid value: \"{want}\": field is immutable",
        res.kind
    )))
}

/// The uids an object's ownerReferences name.
fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj.pointer("/metadata/finalizers").and_then(Value::as_array).cloned().unwrap_or_default()
}

/// `pods`, `foos.example.com`: how error messages name a resource.
pub fn res_name(res: &ResourceDef) -> String {
    if res.group.is_empty() { res.plural.clone() } else { format!("{}.{}", res.plural, res.group) }
}

fn meta_mut(obj: &mut Value) -> ApiResult<&mut Map<String, Value>> {
    let map = obj.as_object_mut().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let meta = map.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut().ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

/// Everything except `metadata` and `status`: a change here bumps `generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    o
}

impl State {
    pub fn new(history_limit: usize) -> Self {
        let (notify, _) = watch::channel(0);
        State {
            rv: 1,
            resources: resources::builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            dependents: HashMap::new(),
            managers: HashMap::new(),
            stats: BTreeMap::new(),
            stats_by_agent: BTreeMap::new(),
            faults: HashMap::new(),
            allowed: Default::default(),
            watch_delays: HashMap::new(),
            down: false,
            tokens: HashMap::new(),
            notify,
        }
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
        self.resources.iter().find(|r| r.group == group && r.plural == plural && r.serves(version)).cloned()
    }

    pub fn record(&mut self, resource: &str, verb: &str) {
        *self.stats.entry(resource.to_string()).or_default().entry(verb.to_string()).or_default() += 1;
    }

    pub fn record_agent(&mut self, agent: &str, resource: &str, verb: &str) {
        let per = self.stats_by_agent.entry(agent.to_string()).or_default();
        *per.entry(resource.to_string()).or_default().entry(verb.to_string()).or_default() += 1;
    }

    /// Consume one injected failure for `resource` (`plural/sub` first, then `plural`).
    pub fn take_fault(&mut self, resource: &str, plural: &str) -> Option<ApiError> {
        for k in [resource, plural] {
            if let Some((n, code)) = self.faults.get_mut(k)
                && *n > 0
            {
                *n -= 1;
                let code = *code;
                return Some(if code == 409 {
                    ApiError::conflict(plural, "injected")
                } else {
                    ApiError::new(code, format!("injected failure for {resource}"))
                });
            }
        }
        None
    }

    /// Drop the whole event history: watches from any earlier resourceVersion now get 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Answers a SubjectAccessReview from the allow list (resource attributes only).
    pub fn access_review(&self, body: &Value) -> Value {
        let at = |p: &str| body.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        let key = (
            at("/spec/user"),
            at("/spec/resourceAttributes/group"),
            at("/spec/resourceAttributes/resource"),
            at("/spec/resourceAttributes/verb"),
        );
        let allowed = self.allowed.contains(&key);
        let mut out = if body.is_object() { body.clone() } else { serde_json::json!({}) };
        out["kind"] = serde_json::json!("SubjectAccessReview");
        out["apiVersion"] = serde_json::json!("authorization.k8s.io/v1");
        out["metadata"] = serde_json::json!({"creationTimestamp": null});
        out["status"] = serde_json::json!({"allowed": allowed});
        out
    }

    fn commit(&mut self, key: ObjKey, mut obj: Value, typ: EventType, old: Option<Value>) -> Value {
        self.rv += 1;
        if let Ok(meta) = meta_mut(&mut obj) {
            meta.insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        }
        self.set_object(&key, (typ != EventType::Deleted).then(|| obj.clone()));
        if self.history.len() >= self.history_limit
            && let Some(e) = self.history.pop_front()
        {
            self.compacted = e.rv;
        }
        self.history.push_back(Event {
            rv: self.rv,
            res: key.res,
            typ,
            object: obj.clone(),
            old,
            at: std::time::Instant::now(),
        });
        self.notify.send_replace(self.rv);
        obj
    }

    /// Store (`Some`) or drop (`None`) an object, keeping the owner index in step.
    fn set_object(&mut self, key: &ObjKey, obj: Option<Value>) {
        let current = obj.as_ref().map(owner_uids).unwrap_or_default();
        for uid in &current {
            self.dependents.entry(uid.clone()).or_default().insert(key.clone());
        }
        let previous = match obj {
            Some(obj) => self.objects.insert(key.clone(), obj),
            None => self.objects.remove(key),
        };
        for uid in previous.as_ref().map(owner_uids).unwrap_or_default() {
            if current.contains(&uid) {
                continue;
            }
            if let Some(set) = self.dependents.get_mut(&uid) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(&uid);
                }
            }
        }
    }

    /// Server-maintained parts of special objects.
    fn hooks(&mut self, res: &ResourceDef, obj: &mut Value) -> ApiResult<()> {
        if res.key() == CRD_KEY {
            let def = resources::from_crd(obj)?;
            if let Some(m) = obj.as_object_mut() {
                m.insert("status".into(), resources::crd_status(&Value::Object(m.clone()), &now()));
            }
            match self.resources.iter_mut().find(|r| r.key() == def.key()) {
                Some(r) if r.custom => *r = def,
                Some(_) => return Err(ApiError::invalid(format!("{} is a built-in resource", def.key()))),
                None => self.resources.push(def),
            }
        } else if res.key() == NAMESPACE_KEY
            && let Some(m) = obj.as_object_mut()
        {
            let deleting = m.get("metadata").and_then(|md| md.get("deletionTimestamp")).is_some();
            m.insert("status".into(), json!({"phase": if deleting { "Terminating" } else { "Active" }}));
        }
        Ok(())
    }

    pub fn get(&self, res: &ResourceDef, key: &ObjKey) -> ApiResult<Value> {
        self.objects.get(key).cloned().ok_or_else(|| ApiError::not_found(&res_name(res), &key.name))
    }

    pub fn list(&self, res_key: &str, ns: Option<&str>, filter: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.of_resource(res_key, ns).filter(|(_, v)| filter(v)).map(|(_, v)| v.clone()).collect()
    }

    pub fn create(&mut self, res: &ResourceDef, ns: Option<&str>, mut obj: Value) -> ApiResult<Value> {
        let map = obj.as_object_mut().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
        if let Some(kind) = map.get("kind").and_then(Value::as_str)
            && kind != res.kind
        {
            return Err(ApiError::bad_request(format!("kind {kind} does not match the resource {}", res.kind)));
        }
        map.insert("kind".into(), Value::String(res.kind.clone()));
        if !map.contains_key("apiVersion") {
            map.insert("apiVersion".into(), Value::String(res.group_version(&res.versions[0])));
        }
        if res.status {
            map.remove("status");
        }
        let meta = meta_mut(&mut obj)?;
        let namespace = if res.namespaced {
            let ns =
                ns.ok_or_else(|| ApiError::new(405, "namespaced resources are created under /namespaces/{ns}/"))?;
            match meta.get("namespace").and_then(Value::as_str) {
                Some(b) if !b.is_empty() && b != ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({b}) does not match the namespace sent on the request ({ns})"
                    )));
                }
                _ => {}
            }
            meta.insert("namespace".into(), Value::String(ns.into()));
            ns.to_string()
        } else {
            meta.remove("namespace");
            String::new()
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let suffix: String = uuid::Uuid::new_v4().simple().to_string().chars().take(5).collect();
                    format!("{prefix}{suffix}")
                }
                _ => return Err(ApiError::invalid("metadata.name: Required value: name or generateName is required")),
            },
        };
        meta.insert("name".into(), Value::String(name.clone()));
        meta.insert("uid".into(), Value::String(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), Value::String(now()));
        meta.insert("generation".into(), json!(1));
        for k in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
            meta.remove(k);
        }
        let key = ObjKey { res: res.key(), ns: namespace, name };
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&res_name(res), &key.name));
        }
        self.hooks(res, &mut obj)?;
        Ok(self.commit(key, obj, EventType::Added, None))
    }

    /// Replace an existing object with `new` (already the full intended object), applying the
    /// status-subresource split, immutable metadata, generation and finalizer rules.
    fn write_existing(
        &mut self,
        res: &ResourceDef,
        key: &ObjKey,
        old: Value,
        mut new: Value,
        sub: Option<&str>,
    ) -> ApiResult<Value> {
        if !new.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        for (field, want) in [("name", &key.name), ("namespace", &key.ns)] {
            if let Some(got) = meta_str(&new, field)
                && !got.is_empty()
                && got != want
            {
                return Err(ApiError::bad_request(format!(
                    "the {field} of the object ({got}) does not match the {field} on the URL ({want})"
                )));
            }
        }
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(&res_name(res), &key.name));
        }
        // Like a real server, a uid in the written object is a precondition.
        if let Some(uid) = meta_str(&new, "uid").filter(|u| !u.is_empty()) {
            check_uid(res, &key.name, uid, meta_str(&old, "uid"))?;
        }
        if sub == Some("status") {
            let status = new.get("status").cloned();
            new = old.clone();
            if let Some(m) = new.as_object_mut() {
                match status {
                    Some(s) => m.insert("status".into(), s),
                    None => m.remove("status"),
                };
            }
        } else {
            if let Some(m) = new.as_object_mut() {
                m.insert("kind".into(), old.get("kind").cloned().unwrap_or(Value::Null));
                if !m.contains_key("apiVersion") {
                    m.insert("apiVersion".into(), old.get("apiVersion").cloned().unwrap_or(Value::Null));
                }
                if res.status {
                    match old.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
            }
            let old_meta = old.get("metadata").and_then(Value::as_object).cloned().unwrap_or_default();
            let meta = meta_mut(&mut new)?;
            for k in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "generateName",
            ] {
                match old_meta.get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
            if !meta.contains_key("managedFields")
                && let Some(mf) = old_meta.get("managedFields")
            {
                meta.insert("managedFields".into(), mf.clone());
            }
            if spec_part(&new) != spec_part(&old) {
                let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
                meta_mut(&mut new)?.insert("generation".into(), json!(generation));
            }
        }
        // No new finalizers once deletion has started.
        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        let (old_f, new_f) = (finalizers(&old), finalizers(&new));
        if deleting && new_f.iter().any(|f| !old_f.contains(f)) {
            return Err(ApiError::invalid(format!(
                "{} \"{}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                res_name(res),
                key.name
            )));
        }
        meta_mut(&mut new)?
            .insert("resourceVersion".into(), old.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null));
        if new == old {
            return Ok(old); // a no-op write changes nothing, like a real server
        }
        self.hooks(res, &mut new)?;
        if deleting && new_f.is_empty() {
            self.set_object(key, Some(new));
            return self.remove(key).ok_or_else(|| ApiError::not_found(&res_name(res), &key.name));
        }
        Ok(self.commit(key.clone(), new, EventType::Modified, Some(old)))
    }

    pub fn update(&mut self, res: &ResourceDef, key: &ObjKey, body: Value, sub: Option<&str>) -> ApiResult<Value> {
        let old = self.get(res, key)?;
        if let Some(kind) = body.get("kind").and_then(Value::as_str)
            && kind != res.kind
        {
            return Err(ApiError::bad_request(format!("kind {kind} does not match the resource {}", res.kind)));
        }
        self.write_existing(res, key, old, body, sub)
    }

    pub fn patch(
        &mut self,
        res: &ResourceDef,
        key: &ObjKey,
        ptype: PatchType,
        body: &[u8],
        sub: Option<&str>,
        manager: Option<&str>,
    ) -> ApiResult<Value> {
        if ptype == PatchType::Apply {
            let manager = manager.filter(|m| !m.is_empty()).ok_or_else(|| ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"))?;
            let applied = crate::routes::parse_body(body)?;
            return self.apply(res, key, applied, manager, sub);
        }
        let old = self.get(res, key)?;
        let mut new = old.clone();
        match ptype {
            PatchType::Json => {
                let ops: Vec<Value> = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                for op in ops {
                    // Like the real server, `test` against an absent path passes for `null`.
                    let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
                    if op.get("op").and_then(Value::as_str) == Some("test")
                        && op.get("value").is_none_or(Value::is_null)
                        && new.pointer(path).is_none()
                    {
                        continue;
                    }
                    let op: json_patch::PatchOperation = serde_json::from_value(op)
                        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                    json_patch::patch(&mut new, &[op])
                        .map_err(|e| ApiError::invalid(format!("the JSON patch could not be applied: {e}")))?;
                }
            }
            _ => {
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid merge patch: {e}")))?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                json_patch::merge(&mut new, &patch);
            }
        }
        self.write_existing(res, key, old, new, sub)
    }

    fn apply(
        &mut self,
        res: &ResourceDef,
        key: &ObjKey,
        applied: Value,
        manager: &str,
        sub: Option<&str>,
    ) -> ApiResult<Value> {
        if !applied.is_object() {
            return Err(ApiError::bad_request("the applied configuration must be an object"));
        }
        // A real API server takes the name from the URL when the applied configuration
        // leaves it out (kube-lease-manager applies Leases that way); it refuses a mismatch.
        let mut applied = applied;
        match meta_str(&applied, "name") {
            Some(n) if n != key.name.as_str() => {
                return Err(ApiError::bad_request(
                    "metadata.name in the applied configuration must match the name in the URL",
                ));
            }
            Some(_) => {}
            None => {
                if let Some(obj) = applied.as_object_mut() {
                    let meta = obj.entry("metadata").or_insert_with(|| serde_json::json!({}));
                    if let Some(m) = meta.as_object_mut() {
                        m.insert("name".into(), serde_json::Value::String(key.name.clone()));
                    }
                }
            }
        }
        let status_only = sub == Some("status");
        let skip_status = !status_only && res.status;
        let new_set = apply::field_set(&applied, status_only, skip_status);
        let mkey = (key.clone(), status_only);
        let want_uid = meta_str(&applied, "uid").filter(|u| !u.is_empty()).map(str::to_string);
        let Some(old) = self.objects.get(key).cloned() else {
            if status_only {
                return Err(ApiError::not_found(&res_name(res), &key.name));
            }
            if let Some(uid) = want_uid {
                return Err(ApiError::new(
                    409,
                    format!(
                        "Operation cannot be fulfilled on {} \"{}\": uid mismatch: the provided object specified uid {uid}, and no existing object was found",
                        res_name(res),
                        key.name
                    ),
                ));
            }
            let ns = (!key.ns.is_empty()).then_some(key.ns.as_str());
            let created = self.create(res, ns, applied)?;
            self.managers.entry(mkey).or_default().insert(manager.to_string(), new_set);
            return Ok(created);
        };
        if let Some(uid) = want_uid.as_deref() {
            check_uid(res, &key.name, uid, meta_str(&old, "uid"))?;
        }
        let owners = self.managers.get(&mkey).cloned().unwrap_or_default();
        let prev = owners.get(manager).cloned().unwrap_or_default();
        let others: FieldSet =
            owners.iter().filter(|(m, _)| *m != manager).flat_map(|(_, s)| s.iter().cloned()).collect();
        let mut new = old.clone();
        for p in prev.difference(&new_set) {
            if !apply::overlaps(&others, p) && !apply::overlaps(&new_set, p) {
                apply::remove_path(&mut new, p);
            }
        }
        apply::merge_applied(&mut new, &applied, status_only, skip_status);
        if let Some(rv) = meta_str(&applied, "resourceVersion")
            && let Ok(m) = meta_mut(&mut new)
        {
            m.insert("resourceVersion".into(), Value::String(rv.into()));
        }
        let result = self.write_existing(res, key, old, new, sub)?;
        if self.objects.contains_key(key) {
            self.managers.entry(mkey).or_default().insert(manager.to_string(), new_set);
        }
        Ok(result)
    }

    /// Delete: with finalizers, mark (`deletionTimestamp`) and keep; otherwise remove now.
    pub fn delete(&mut self, res_display: &str, key: &ObjKey, orphan: bool) -> ApiResult<Value> {
        let obj = self.objects.get(key).cloned().ok_or_else(|| ApiError::not_found(res_display, &key.name))?;
        if orphan && let Some(uid) = meta_str(&obj, "uid").map(str::to_string) {
            for (dkey, mut dep) in self.dependents(&uid) {
                let old = dep.clone();
                if let Some(refs) = dep.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                }
                self.commit(dkey, dep, EventType::Modified, Some(old));
            }
        }
        if finalizers(&obj).is_empty() {
            return self.remove(key).ok_or_else(|| ApiError::not_found(res_display, &key.name));
        }
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(obj);
        }
        let mut new = obj.clone();
        let meta = meta_mut(&mut new)?;
        meta.insert("deletionTimestamp".into(), Value::String(now()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        if key.res == NAMESPACE_KEY
            && let Some(m) = new.as_object_mut()
        {
            m.insert("status".into(), json!({"phase": "Terminating"}));
        }
        Ok(self.commit(key.clone(), new, EventType::Modified, Some(obj)))
    }

    fn dependents(&self, uid: &str) -> Vec<(ObjKey, Value)> {
        self.dependents
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|k| self.objects.get(k).map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// The objects of one resource (in one namespace), in key order.
    fn of_resource<'a>(
        &'a self,
        res_key: &'a str,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> {
        let start = ObjKey { res: res_key.to_string(), ns: ns.unwrap_or_default().to_string(), name: String::new() };
        self.objects.range(start..).take_while(move |(k, _)| k.res == res_key && ns.is_none_or(|ns| k.ns == ns))
    }

    /// Final removal: DELETED event, then cascade (CRD instances, namespace contents, dependents).
    fn remove(&mut self, key: &ObjKey) -> Option<Value> {
        let obj = self.objects.get(key).cloned()?;
        let gone = self.commit(key.clone(), obj.clone(), EventType::Deleted, None);
        self.managers.remove(&(key.clone(), false));
        self.managers.remove(&(key.clone(), true));
        if key.res == CRD_KEY
            && let Ok(def) = resources::from_crd(&obj)
        {
            self.resources.retain(|r| !(r.custom && r.key() == def.key()));
            let res_key = def.key();
            let keys: Vec<ObjKey> = self.of_resource(&res_key, None).map(|(k, _)| k.clone()).collect();
            for k in keys {
                self.remove(&k);
            }
        }
        if key.res == NAMESPACE_KEY {
            let keys: Vec<ObjKey> = self.objects.keys().filter(|k| k.ns == key.name).cloned().collect();
            for k in keys {
                let _ = self.delete(&k.res, &k, false);
            }
        }
        if let Some(uid) = meta_str(&obj, "uid") {
            for (k, _) in self.dependents(uid) {
                let _ = self.delete(&k.res, &k, false);
            }
        }
        Some(gone)
    }
}
