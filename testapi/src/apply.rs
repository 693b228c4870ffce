//! Server-side apply, approximated.
//!
//! Each field manager's *applied* field set is kept in a side table in the store (not in
//! `metadata.managedFields`). A set holds leaf paths: maps are recursed into, every other value
//! (including lists) is one atomic leaf, except `metadata.finalizers` (a set of strings) and
//! `metadata.ownerReferences` (a list keyed by `uid`), whose items are owned one by one. When a
//! manager applies again, paths it applied before and omits now are removed, unless another
//! apply manager also owns them. Conflicts between managers are not detected (`force` is
//! accepted and ignored), and fields written by non-apply requests are not tracked.

use serde_json::{Map, Value};
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    /// A `metadata.finalizers` item.
    Item(String),
    /// A `metadata.ownerReferences` item, by uid.
    Uid(String),
}

pub type FieldPath = Vec<Seg>;
pub type FieldSet = BTreeSet<FieldPath>;

/// The field paths an applied configuration sets. `status_only` restricts to `.status`
/// (the status subresource), `skip_status` drops `.status` (main resource with a status
/// subresource).
pub fn field_set(applied: &Value, status_only: bool, skip_status: bool) -> FieldSet {
    let mut set = FieldSet::new();
    let Some(obj) = applied.as_object() else { return set };
    for (k, v) in obj {
        let is_status = k == "status";
        if k == "apiVersion" || k == "kind" || (status_only && !is_status) || (skip_status && is_status) {
            continue;
        }
        if k == "metadata" {
            let Some(meta) = v.as_object() else { continue };
            for (mk, mv) in meta {
                let base = vec![Seg::Key("metadata".into()), Seg::Key(mk.clone())];
                match mk.as_str() {
                    "labels" | "annotations" => collect(mv, base, &mut set),
                    "finalizers" => {
                        for f in mv.as_array().into_iter().flatten().filter_map(Value::as_str) {
                            let mut p = base.clone();
                            p.push(Seg::Item(f.into()));
                            set.insert(p);
                        }
                    }
                    "ownerReferences" => {
                        for r in mv.as_array().into_iter().flatten() {
                            if let Some(uid) = r.get("uid").and_then(Value::as_str) {
                                let mut p = base.clone();
                                p.push(Seg::Uid(uid.into()));
                                set.insert(p);
                            }
                        }
                    }
                    _ => {}
                }
            }
            continue;
        }
        collect(v, vec![Seg::Key(k.clone())], &mut set);
    }
    set
}

fn collect(v: &Value, path: FieldPath, set: &mut FieldSet) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(Seg::Key(k.clone()));
                collect(child, p, set);
            }
        }
        _ => {
            set.insert(path);
        }
    }
}

/// Merge an applied configuration into `target`: maps merge recursively, lists and scalars
/// replace, `null` removes, finalizers are unioned, owner references merge by uid. Identity
/// metadata (name, namespace, uid, ...) is left alone.
pub fn merge_applied(target: &mut Value, applied: &Value, status_only: bool, skip_status: bool) {
    let (Some(t), Some(a)) = (target.as_object_mut(), applied.as_object()) else { return };
    for (k, v) in a {
        let is_status = k == "status";
        if (status_only && !is_status) || (skip_status && is_status) || k == "apiVersion" || k == "kind" {
            continue;
        }
        if k == "metadata" {
            let Some(am) = v.as_object() else { continue };
            let tm = t.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
            let Some(tm) = tm.as_object_mut() else { continue };
            for (mk, mv) in am {
                match mk.as_str() {
                    "labels" | "annotations" => merge_value(tm.entry(mk.clone()).or_insert(Value::Null), mv),
                    "finalizers" => {
                        let list = tm.entry(mk.clone()).or_insert_with(|| Value::Array(vec![]));
                        if let (Some(list), Some(new)) = (list.as_array_mut(), mv.as_array()) {
                            for f in new {
                                if !list.contains(f) {
                                    list.push(f.clone());
                                }
                            }
                        }
                    }
                    "ownerReferences" => {
                        let list = tm.entry(mk.clone()).or_insert_with(|| Value::Array(vec![]));
                        if let (Some(list), Some(new)) = (list.as_array_mut(), mv.as_array()) {
                            for r in new {
                                match list.iter_mut().find(|x| x.get("uid") == r.get("uid")) {
                                    Some(existing) => *existing = r.clone(),
                                    None => list.push(r.clone()),
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            continue;
        }
        merge_value(t.entry(k.clone()).or_insert(Value::Null), v);
    }
}

fn merge_value(target: &mut Value, applied: &Value) {
    match (target.as_object_mut(), applied.as_object()) {
        (Some(t), Some(a)) => {
            for (k, v) in a {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_value(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = applied.clone(),
    }
}

/// Remove one owned path from `target`, then prune maps it leaves empty (below the top level).
pub fn remove_path(target: &mut Value, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cur = &mut *target;
    for seg in parents {
        let Seg::Key(k) = seg else { return };
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    match last {
        Seg::Key(k) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(k);
            }
        }
        Seg::Item(f) => {
            if let Some(list) = cur.as_array_mut() {
                list.retain(|x| x.as_str() != Some(f));
            }
        }
        Seg::Uid(uid) => {
            if let Some(list) = cur.as_array_mut() {
                list.retain(|x| x.get("uid").and_then(Value::as_str) != Some(uid));
            }
        }
    }
    // Prune maps the removal left empty, never the top-level fields (spec, metadata, ...).
    prune_empty(target, parents, 0);
}

fn prune_empty(cur: &mut Value, path: &[Seg], depth: usize) {
    let Some((Seg::Key(k), rest)) = path.split_first() else { return };
    let Some(m) = cur.as_object_mut() else { return };
    if let Some(child) = m.get_mut(k) {
        prune_empty(child, rest, depth + 1);
        if depth >= 1 && child.as_object().is_some_and(Map::is_empty) {
            m.remove(k);
        }
    }
}

/// Does `path` (or anything under it / above it) appear in `set`?
pub fn overlaps(set: &FieldSet, path: &FieldPath) -> bool {
    set.iter().any(|p| p.starts_with(path) || path.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_merge_and_remove() {
        let mut obj = json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"a": 1, "b": {"c": 2}}});
        let applied =
            json!({"metadata": {"labels": {"y": "2"}, "finalizers": ["f"]}, "spec": {"b": {"d": 3}, "list": [1]}});
        merge_applied(&mut obj, &applied, false, false);
        assert_eq!(obj["spec"], json!({"a": 1, "b": {"c": 2, "d": 3}, "list": [1]}));
        let set = field_set(&applied, false, false);
        assert!(set.contains(&vec![Seg::Key("spec".into()), Seg::Key("b".into()), Seg::Key("d".into())]));
        assert!(set.contains(&vec![Seg::Key("metadata".into()), Seg::Key("finalizers".into()), Seg::Item("f".into())]));
        for p in &set {
            remove_path(&mut obj, p);
        }
        assert_eq!(
            obj,
            json!({"metadata": {"name": "a", "labels": {"x": "1"}, "finalizers": []}, "spec": {"a": 1, "b": {"c": 2}}})
        );
    }
}
