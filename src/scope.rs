//! Scope patterns and their algebra.
//!
//! # Grammar
//! ```text
//! scope   = segment *( ":" segment )
//! pattern = scope [ ":*" ]
//! segment = 1*( ALPHA / DIGIT / "_" / "." / "-" / "/" )
//! ```
//! A scope without `*` names exactly itself. A pattern `P:*` names every scope that starts
//! with all the segments of `P` **and has at least one more segment**: `compliance:*`
//! matches `compliance:audit` and `compliance:audit:cross_dept`, but not `compliance` and
//! not `compliance-extra:audit`. `*` is only allowed as a whole, final segment, and a bare
//! `*` (everything) is not a scope: a ceiling or grant must always name a prefix.
//!
//! Two patterns denote sets that are either nested or disjoint, so the intersection of two
//! patterns is always one of them or nothing. That keeps every intersection exact: no
//! authority is invented and none is silently lost.

use std::fmt;

/// The longest scope accepted, in bytes.
pub const MAX_SCOPE_LEN: usize = 256;

/// A parsed scope or scope pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    segments: Vec<String>,
    wildcard: bool,
}

/// Why a string is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope is empty")]
    Empty,
    #[error("scope {0:?} is longer than {MAX_SCOPE_LEN} bytes")]
    TooLong(String),
    #[error("scope {0:?} has an empty segment")]
    EmptySegment(String),
    #[error("scope {0:?} may use `*` only as its whole last segment after at least one other")]
    MisplacedWildcard(String),
    #[error("scope {0:?} has a character outside A-Z a-z 0-9 _ . - /")]
    BadCharacter(String),
}

impl Scope {
    /// Parses a scope or pattern.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        if s.is_empty() {
            return Err(ScopeError::Empty);
        }
        if s.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::TooLong(s.chars().take(32).collect()));
        }
        let mut parts: Vec<&str> = s.split(':').collect();
        let wildcard = parts.last() == Some(&"*");
        if wildcard {
            parts.pop();
        }
        if parts.is_empty() {
            return Err(ScopeError::MisplacedWildcard(s.to_string()));
        }
        let mut segments = Vec::with_capacity(parts.len());
        for part in parts {
            if part.is_empty() {
                return Err(ScopeError::EmptySegment(s.to_string()));
            }
            if part.contains('*') {
                return Err(ScopeError::MisplacedWildcard(s.to_string()));
            }
            if !part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/')) {
                return Err(ScopeError::BadCharacter(s.to_string()));
            }
            segments.push(part.to_string());
        }
        Ok(Scope { segments, wildcard })
    }

    /// Whether this is a pattern (ends in `:*`).
    pub fn is_pattern(&self) -> bool {
        self.wildcard
    }

    /// Whether every scope this one names is also named by `other` (set inclusion).
    pub fn is_subset_of(&self, other: &Scope) -> bool {
        if !other.wildcard {
            return !self.wildcard && self.segments == other.segments;
        }
        let prefix = &other.segments;
        if self.wildcard {
            // `Q:*` ⊆ `P:*` iff P is a prefix of Q (Q may equal P).
            self.segments.len() >= prefix.len() && self.segments[..prefix.len()] == prefix[..]
        } else {
            // a literal needs P as a proper prefix.
            self.segments.len() > prefix.len() && self.segments[..prefix.len()] == prefix[..]
        }
    }

    /// Whether `scope` (a literal) is named by this pattern.
    pub fn matches(&self, scope: &Scope) -> bool {
        scope.is_subset_of(self)
    }

    /// The intersection of the two sets: one of them, or `None` when they are disjoint.
    pub fn intersect(&self, other: &Scope) -> Option<Scope> {
        if self.is_subset_of(other) {
            Some(self.clone())
        } else if other.is_subset_of(self) {
            Some(other.clone())
        } else {
            None
        }
    }

    /// Whether the two sets share at least one scope.
    pub fn overlaps(&self, other: &Scope) -> bool {
        self.intersect(other).is_some()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join(":"))?;
        if self.wildcard {
            f.write_str(":*")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s)
    }
}

/// Parses a list of scopes, failing on the first malformed one.
pub fn parse_all<S: AsRef<str>>(items: &[S]) -> Result<Vec<Scope>, ScopeError> {
    items.iter().map(|s| Scope::parse(s.as_ref())).collect()
}

/// The intersection of two unions of patterns, as a minimal union (no member is a subset
/// of another), sorted.
pub fn intersect_sets(a: &[Scope], b: &[Scope]) -> Vec<Scope> {
    let mut out: Vec<Scope> = a.iter().flat_map(|x| b.iter().filter_map(move |y| x.intersect(y))).collect();
    minimise(&mut out);
    out
}

/// Removes duplicates and members covered by another member; sorts the rest.
pub fn minimise(set: &mut Vec<Scope>) {
    set.sort();
    set.dedup();
    let snapshot = set.clone();
    set.retain(|s| !snapshot.iter().any(|other| other != s && s.is_subset_of(other)));
}

/// Whether the union `set` covers `scope` entirely.
pub fn covered_by(scope: &Scope, set: &[Scope]) -> bool {
    // Patterns are nested-or-disjoint, so a union covers a pattern only if one member does
    // (a union of narrower patterns never covers `P:*`, which names infinitely many scopes).
    set.iter().any(|s| scope.is_subset_of(s))
}

/// Renders scopes as the space-separated `scope` claim.
pub fn to_claim(set: &[Scope]) -> String {
    set.iter().map(Scope::to_string).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Scope {
        Scope::parse(x).unwrap()
    }

    #[test]
    fn grammar() {
        let ok = ["compliance", "compliance:audit", "compliance:audit:cross_dept", "compliance:*", "a.b-c/d:E_9:*"];
        for x in ok {
            assert_eq!(Scope::parse(x).map(|p| p.to_string()).as_deref(), Ok(x), "{x}");
        }
        let bad = [
            ("", ScopeError::Empty),
            ("*", ScopeError::MisplacedWildcard("*".into())),
            ("a:*:b", ScopeError::MisplacedWildcard("a:*:b".into())),
            ("a*", ScopeError::MisplacedWildcard("a*".into())),
            ("a:b*", ScopeError::MisplacedWildcard("a:b*".into())),
            ("a::b", ScopeError::EmptySegment("a::b".into())),
            (":a", ScopeError::EmptySegment(":a".into())),
            ("a:", ScopeError::EmptySegment("a:".into())),
            ("a b", ScopeError::BadCharacter("a b".into())),
            ("a:é", ScopeError::BadCharacter("a:é".into())),
        ];
        for (x, err) in bad {
            assert_eq!(Scope::parse(x), Err(err), "{x:?}");
        }
        assert!(matches!(Scope::parse(&"a".repeat(300)), Err(ScopeError::TooLong(_))));
    }

    #[test]
    fn matching_table() {
        // (pattern, candidate, matches)
        let table = [
            ("compliance:*", "compliance:audit", true),
            ("compliance:*", "compliance:audit:cross_dept", true),
            ("compliance:*", "compliance", false),
            ("compliance:*", "compliance-x:audit", false),
            ("compliance:*", "marketing:read", false),
            ("compliance:audit:*", "compliance:audit:cross_dept", true),
            ("compliance:audit:*", "compliance:audit", false),
            ("compliance:audit:*", "compliance:privacy:check", false),
            ("marketing:read", "marketing:read", true),
            ("marketing:read", "marketing:read:all", false),
            ("marketing:read", "marketing", false),
            // pattern vs pattern
            ("compliance:*", "compliance:audit:*", true),
            ("compliance:*", "compliance:*", true),
            ("compliance:audit:*", "compliance:*", false),
            ("compliance:audit", "compliance:audit:*", false),
        ];
        for (p, c, want) in table {
            assert_eq!(s(p).matches(&s(c)), want, "{p} matches {c}");
        }
    }

    #[test]
    fn intersections_are_exact() {
        let table = [
            ("compliance:*", "compliance:audit:*", Some("compliance:audit:*")),
            ("compliance:audit:*", "compliance:*", Some("compliance:audit:*")),
            ("compliance:*", "compliance:audit", Some("compliance:audit")),
            ("compliance:audit:*", "compliance:privacy:*", None),
            ("compliance:audit", "compliance:audit", Some("compliance:audit")),
            ("compliance:audit", "compliance:privacy", None),
            ("compliance", "compliance:*", None),
        ];
        for (a, b, want) in table {
            assert_eq!(s(a).intersect(&s(b)).map(|x| x.to_string()).as_deref(), want, "{a} ∩ {b}");
        }
    }

    #[test]
    fn set_intersection_is_minimal() {
        let a = parse_all(&["compliance:*", "marketing:read"]).unwrap();
        let b = parse_all(&["compliance:audit:*", "compliance:audit:x", "compliance:privacy:check", "marketing:*"])
            .unwrap();
        let got: Vec<String> = intersect_sets(&a, &b).iter().map(|x| x.to_string()).collect();
        assert_eq!(got, ["compliance:audit:*", "compliance:privacy:check", "marketing:read"]);
    }

    #[test]
    fn coverage_needs_one_member() {
        let set = parse_all(&["a:b", "a:c:*"]).unwrap();
        assert!(covered_by(&s("a:b"), &set));
        assert!(covered_by(&s("a:c:d:e"), &set));
        assert!(covered_by(&s("a:c:*"), &set));
        assert!(!covered_by(&s("a:*"), &set));
        assert!(!covered_by(&s("a:d"), &set));
        assert_eq!(to_claim(&set), "a:b a:c:*");
    }
}
