//! Which audiences a namespace's runs may be given tokens for: the ResourceServers that register
//! each audience for that namespace, folded into one [`Registration`] per audience. Pure: the
//! authorisation engine (which pairs a run may hold) and the token endpoint (how long an
//! exchanged token may live, whether it needs DPoP) read the same answer.
//!
//! Several ResourceServers may register one audience (for different sets of namespaces). Those
//! selecting the namespace add up: their scopes are a union, the tightest `maxTokenTTL` wins
//! and one `requireDPoP` is enough. A malformed ResourceServer for an audience (a scope or a
//! duration that does not parse, which the CRD schema normally refuses) makes that audience
//! unregistered everywhere: Deputy fails closed rather than guess what it would have allowed.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use jiff::SignedDuration;

use crate::duration;
use crate::resources::{NamespaceSelector, ResourceServer, SelectorOperator};
use crate::scope::{self, Scope};

/// The label the API server sets on every namespace to its own name (it cannot be changed).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What the ResourceServers selecting one namespace say about one audience.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    /// The scope patterns the audience honours there (minimal, sorted).
    pub scopes: Vec<Scope>,
    /// The longest lifetime of an exchanged token for it, if any server bounds it.
    pub max_token_ttl: Option<SignedDuration>,
    /// Whether exchanges for it must carry a DPoP proof.
    pub require_dpop: bool,
    /// The ResourceServers that registered it, sorted.
    pub servers: Vec<String>,
}

/// Why an audience is not registered for a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unregistered {
    /// No ResourceServer names the audience.
    Unknown,
    /// ResourceServers name it, but none selects the namespace.
    NotForNamespace,
    /// A ResourceServer naming it is malformed (the message says how).
    Malformed(String),
}

/// Every audience registered for one namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registrations {
    by_audience: BTreeMap<String, Result<Registration, Unregistered>>,
}

impl Registrations {
    /// Folds `servers` for the namespace `namespace` with labels `labels` (`None` when the
    /// namespace is not known; it then has only the name label the API server gives it).
    pub fn for_namespace<R: Borrow<ResourceServer>>(
        servers: &[R],
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Registrations {
        let mut labels = labels.cloned().unwrap_or_default();
        // The API server keeps this label equal to the name; set it here too so that a cache
        // (or a test API server) without it decides the same way.
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        let mut by_audience: BTreeMap<String, Result<Registration, Unregistered>> = BTreeMap::new();
        for rs in servers {
            let rs: &ResourceServer = rs.borrow();
            let spec = &rs.spec;
            let name = rs.metadata.name.clone().unwrap_or_default();
            let entry = by_audience.entry(spec.audience.clone()).or_insert(Err(Unregistered::Unknown));
            if matches!(entry, Err(Unregistered::Malformed(_))) {
                continue;
            }
            let parsed = scope::parse_all(&spec.scopes).map_err(|e| format!("spec.scopes: {e}")).and_then(|s| {
                let ttl = spec.max_token_ttl.as_deref().map(duration::parse).transpose();
                ttl.map(|t| (s, t)).map_err(|e| format!("spec.maxTokenTTL: {e}"))
            });
            let (scopes, ttl) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    *entry = Err(Unregistered::Malformed(format!("ResourceServer {name:?} is malformed ({e})")));
                    continue;
                }
            };
            if rs.metadata.deletion_timestamp.is_some() || !selects(&spec.namespace_selector, &labels) {
                if matches!(entry, Err(Unregistered::Unknown)) {
                    *entry = Err(Unregistered::NotForNamespace);
                }
                continue;
            }
            match entry {
                Ok(reg) => {
                    reg.scopes.extend(scopes);
                    scope::minimise(&mut reg.scopes);
                    reg.max_token_ttl = match (reg.max_token_ttl, ttl) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    reg.require_dpop |= spec.require_dpop;
                    reg.servers.push(name);
                    reg.servers.sort();
                }
                Err(_) => {
                    let mut scopes = scopes;
                    scope::minimise(&mut scopes);
                    *entry = Ok(Registration {
                        scopes,
                        max_token_ttl: ttl,
                        require_dpop: spec.require_dpop,
                        servers: vec![name],
                    });
                }
            }
        }
        Registrations { by_audience }
    }

    /// The registration of `audience`, or why there is none.
    pub fn get(&self, audience: &str) -> Result<&Registration, Unregistered> {
        match self.by_audience.get(audience) {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Unregistered::Unknown),
        }
    }
}

impl Unregistered {
    /// A sentence for people: why `audience` may not be used in `namespace`.
    pub fn explain(&self, audience: &str, namespace: &str) -> String {
        match self {
            Unregistered::Unknown => format!("no ResourceServer registers audience {audience:?}"),
            Unregistered::NotForNamespace => {
                format!("no ResourceServer for audience {audience:?} selects namespace {namespace:?}")
            }
            Unregistered::Malformed(why) => format!("audience {audience:?} is unusable: {why}"),
        }
    }
}

/// Whether a selector selects a set of labels (`metav1.LabelSelector` semantics: every
/// `matchLabels` entry and every expression must hold; an empty selector selects everything).
pub fn selects(selector: &NamespaceSelector, labels: &BTreeMap<String, String>) -> bool {
    selector.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            match e.operator {
                // `In` without values selects nothing (the schema refuses it anyway).
                SelectorOperator::In => value.is_some_and(|v| e.values.contains(v)),
                SelectorOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                SelectorOperator::Exists => value.is_some(),
                SelectorOperator::DoesNotExist => value.is_none(),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{ResourceServerSpec, SelectorRequirement};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement { key: key.into(), operator, values: values.iter().map(|v| v.to_string()).collect() }
    }

    #[test]
    fn selectors_follow_label_selector_semantics() {
        use SelectorOperator::*;
        let ns = labels(&[("tenant", "marketing"), ("tier", "prod")]);
        let cases: Vec<(NamespaceSelector, bool)> = vec![
            (NamespaceSelector::default(), true),
            (NamespaceSelector { match_labels: labels(&[("tenant", "marketing")]), ..Default::default() }, true),
            (NamespaceSelector { match_labels: labels(&[("tenant", "sales")]), ..Default::default() }, false),
            (
                NamespaceSelector {
                    match_labels: labels(&[("tenant", "marketing"), ("tier", "dev")]),
                    ..Default::default()
                },
                false,
            ),
            (
                NamespaceSelector { match_expressions: vec![req("tier", In, &["prod", "dev"])], ..Default::default() },
                true,
            ),
            (NamespaceSelector { match_expressions: vec![req("tier", In, &[])], ..Default::default() }, false),
            (NamespaceSelector { match_expressions: vec![req("tier", NotIn, &["prod"])], ..Default::default() }, false),
            (NamespaceSelector { match_expressions: vec![req("absent", NotIn, &["x"])], ..Default::default() }, true),
            (NamespaceSelector { match_expressions: vec![req("tier", Exists, &[])], ..Default::default() }, true),
            (NamespaceSelector { match_expressions: vec![req("absent", Exists, &[])], ..Default::default() }, false),
            (
                NamespaceSelector { match_expressions: vec![req("tier", DoesNotExist, &[])], ..Default::default() },
                false,
            ),
            (
                NamespaceSelector {
                    match_labels: labels(&[("tenant", "marketing")]),
                    match_expressions: vec![req("tier", In, &["dev"])],
                },
                false,
            ),
        ];
        for (i, (sel, want)) in cases.iter().enumerate() {
            assert_eq!(selects(sel, &ns), *want, "case {i}: {sel:?}");
        }
    }

    fn server(name: &str, audience: &str, scopes: &[&str], selector: NamespaceSelector) -> ResourceServer {
        ResourceServer::new(
            name,
            ResourceServerSpec {
                audience: audience.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                namespace_selector: selector,
                max_token_ttl: None,
                require_dpop: false,
            },
        )
    }

    fn only(ns: &str) -> NamespaceSelector {
        NamespaceSelector { match_labels: labels(&[(NAMESPACE_NAME_LABEL, ns)]), ..Default::default() }
    }

    #[test]
    fn an_audience_is_registered_only_where_a_server_selects_the_namespace() {
        let servers = vec![server("db", "db", &["data:read"], only("marketing"))];
        let here = Registrations::for_namespace(&servers, "marketing", None);
        assert_eq!(here.get("db").map(|r| r.servers.clone()), Ok(vec!["db".to_string()]));
        let there = Registrations::for_namespace(&servers, "sales", None);
        assert_eq!(there.get("db"), Err(Unregistered::NotForNamespace));
        assert_eq!(there.get("other"), Err(Unregistered::Unknown));
        // The name label is the namespace's own, whatever the cached labels say.
        let forged = labels(&[(NAMESPACE_NAME_LABEL, "marketing")]);
        let there = Registrations::for_namespace(&servers, "sales", Some(&forged));
        assert_eq!(there.get("db"), Err(Unregistered::NotForNamespace));
    }

    #[test]
    fn servers_for_one_audience_add_scopes_and_keep_the_tightest_bounds() {
        let mut a = server("a", "db", &["data:read"], NamespaceSelector::default());
        a.spec.max_token_ttl = Some("2m".into());
        let mut b = server("b", "db", &["data:write", "data:read:rows"], NamespaceSelector::default());
        b.spec.max_token_ttl = Some("1m".into());
        b.spec.require_dpop = true;
        let c = server("c", "db", &["admin:*"], only("elsewhere"));
        let reg = Registrations::for_namespace(&[a, b, c], "marketing", None);
        let reg = reg.get("db").cloned().map_err(|e| e.explain("db", "marketing"));
        let reg = reg.unwrap_or_else(|e| panic!("{e}"));
        let scopes: Vec<String> = reg.scopes.iter().map(|s| s.to_string()).collect();
        // `data:read` is exact: it does not cover `data:read:rows`, which stays.
        assert_eq!(scopes, ["data:read", "data:read:rows", "data:write"]);
        assert_eq!(reg.max_token_ttl, Some(SignedDuration::from_mins(1)));
        assert!(reg.require_dpop);
        assert_eq!(reg.servers, ["a", "b"]);
    }

    #[test]
    fn a_malformed_server_makes_its_audience_unusable_everywhere() {
        let good = server("good", "db", &["data:read"], NamespaceSelector::default());
        let mut bad = server("bad", "db", &["data:read"], only("elsewhere"));
        bad.spec.max_token_ttl = Some("forever".into());
        for servers in [vec![good.clone(), bad.clone()], vec![bad, good]] {
            let reg = Registrations::for_namespace(&servers, "marketing", None);
            assert!(matches!(reg.get("db"), Err(Unregistered::Malformed(m)) if m.contains("\"bad\"")));
        }
    }

    #[test]
    fn a_server_being_deleted_registers_nothing() {
        let mut rs = server("db", "db", &["data:read"], NamespaceSelector::default());
        rs.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        let reg = Registrations::for_namespace(&[rs], "marketing", None);
        assert_eq!(reg.get("db"), Err(Unregistered::NotForNamespace));
    }
}
