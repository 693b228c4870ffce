//! The audit trail: one JSON line on stdout per decision, always naming both principals.
//!
//! Audit lines carry `"log": "audit"`; ordinary logs go to stderr through `tracing` and never
//! carry that field, so the two are told apart by stream and by field. A token itself is never
//! written, only its `jti`.

use std::io::Write;

use jiff::Timestamp;
use serde::Serialize;

/// What was decided.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Authorized,
    Denied,
    Minted,
    Rotated,
    Exchanged,
    ExchangeRefused,
    Introspected,
    Revoked,
}

/// One audit record.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Record<'a> {
    pub ts: Timestamp,
    pub log: &'static str,
    pub action: Action,
    /// The human the agent acts for.
    pub principal: &'a str,
    /// Acting run identities, chronological (the current actor last).
    pub actor_chain: &'a [String],
    pub namespace: &'a str,
    pub run: &'a str,
    pub agent: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub scopes: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub audiences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<&'a str>,
}

impl<'a> Record<'a> {
    /// A record with the identifying fields; the rest can be set with struct update.
    pub fn new(
        action: Action,
        principal: &'a str,
        actor_chain: &'a [String],
        namespace: &'a str,
        run: &'a str,
        agent: &'a str,
    ) -> Self {
        Record {
            ts: Timestamp::now(),
            log: "audit",
            action,
            principal,
            actor_chain,
            namespace,
            run,
            agent,
            scopes: &[],
            audiences: &[],
            jti: None,
            exp: None,
            reason: None,
            message: None,
            task: None,
        }
    }

    /// Writes the record as one line on stdout. A message longer than [`MAX_ECHO`] bytes
    /// (it may quote what a client sent) is cut there.
    pub fn emit(&self) {
        let clipped = Record { message: self.message.map(|m| clip(m, MAX_ECHO)), ..self.clone() };
        let mut line = match serde_json::to_vec(&clipped) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "could not serialise an audit record");
                return;
            }
        };
        line.push(b'\n');
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        if let Err(e) = lock.write_all(&line).and_then(|_| lock.flush()) {
            tracing::error!(error = %e, "could not write an audit record");
        }
    }
}

/// The most bytes of a client's input that an error reply or an audit line repeats.
pub const MAX_ECHO: usize = 512;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it steps back.
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip(&"x".repeat(30_000), MAX_ECHO).len(), MAX_ECHO);
    }

    #[test]
    fn a_record_names_both_principals_and_never_a_token() {
        let chain = vec!["spiffe://cluster.local/ns/m/agent/a/run/r".to_string()];
        let scopes = vec!["a:b".to_string()];
        let r = Record {
            scopes: &scopes,
            jti: Some("j-1"),
            reason: Some("GrantDeleted"),
            ..Record::new(Action::Revoked, "alice@example.com", &chain, "m", "r", "a")
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["log"], "audit");
        assert_eq!(v["action"], "revoked");
        assert_eq!(v["principal"], "alice@example.com");
        assert_eq!(v["actor_chain"][0], "spiffe://cluster.local/ns/m/agent/a/run/r");
        assert_eq!(v["jti"], "j-1");
        assert!(v.get("token").is_none());
        assert!(v.get("audiences").is_none(), "empty lists are left out");
    }
}
