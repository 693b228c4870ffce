//! Label and field selectors.

use crate::error::{ApiError, ApiResult};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` (requirements are ANDed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Req>);

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
}

fn set_values(rest: &str) -> ApiResult<Vec<String>> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("unable to parse requirement: expected '(...)' in {rest:?}")))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn valid_key(k: &str) -> ApiResult<String> {
    if k.is_empty() || k.contains(char::is_whitespace) || k.contains(['(', ')', '=', '!']) {
        return Err(ApiError::bad_request(format!("unable to parse requirement: invalid label key {k:?}")));
    }
    Ok(k.to_string())
}

impl LabelSelector {
    pub fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(valid_key(k.trim())?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Req::NotEq(valid_key(k.trim())?, v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Req::Eq(valid_key(k.trim())?, v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Req::Eq(valid_key(k.trim())?, v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Req::NotIn(valid_key(k.trim())?, set_values(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Req::In(valid_key(k.trim())?, set_values(rest)?)
            } else {
                Req::Exists(valid_key(&part)?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: `path=value`, `path==value`, `path!=value`, ANDed. Paths are
/// generic dotted JSON paths (`metadata.name`, `status.phase`, `spec.nodeName`, ...); a missing
/// field compares as the empty string, like the real server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid field selector: {part:?}")));
            };
            reqs.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let got = path.split('.').try_fold(obj, |v, k| v.get(k));
            let got = match got {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "a", "tier": "web"}}});
        let m = |s: &str| LabelSelector::parse(s).map(|l| l.matches(&o));
        assert_eq!(m("app=a"), Ok(true));
        assert_eq!(m("app==a,tier!=db"), Ok(true));
        assert_eq!(m("app in (a, b),tier notin (db)"), Ok(true));
        assert_eq!(m("app notin (a)"), Ok(false));
        assert_eq!(m("!missing,app"), Ok(true));
        assert_eq!(m("!app"), Ok(false));
        assert!(m("app in a").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "x"}, "status": {"phase": "Running"}});
        let f = |s: &str| FieldSelector::parse(s).map(|f| f.matches(&o));
        assert_eq!(f("metadata.name=x,status.phase!=Pending"), Ok(true));
        assert_eq!(f("spec.nodeName="), Ok(true));
        assert_eq!(f("status.phase==Pending"), Ok(false));
    }
}
