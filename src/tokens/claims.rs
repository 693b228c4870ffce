//! The claims of a Deputy token (RFC 9068 profile with RFC 8693 `act`).

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// One actor in the delegation chain; `act` nests the earlier actors (RFC 8693 §4.1).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// Builds the nested `act` claim from acting identities in chronological order (the
    /// first agent run first, the current actor last). The current actor is outermost.
    pub fn from_chain<S: AsRef<str>>(actors: &[S]) -> Option<Actor> {
        actors.iter().fold(None, |inner, sub| Some(Actor { sub: sub.as_ref().to_string(), act: inner.map(Box::new) }))
    }

    /// The actors in chronological order (innermost, i.e. earliest, first).
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![];
        let mut cur = Some(self);
        while let Some(a) = cur {
            out.push(a.sub.clone());
            cur = a.act.as_deref();
        }
        out.reverse();
        out
    }
}

/// `aud`: one audience as a string, several as an array (RFC 7519 §4.1.3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn from_list(list: &[String]) -> Audience {
        match list {
            [one] => Audience::One(one.clone()),
            many => Audience::Many(many.to_vec()),
        }
    }
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(list) => list.iter().any(|a| a == aud),
        }
    }
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Audience::One(a) => vec![a.clone()],
            Audience::Many(list) => list.clone(),
        }
    }
}

/// Which run a token belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RunRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The claims of every token Deputy issues.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The principal: the human the agent acts for.
    pub sub: String,
    pub aud: Audience,
    /// The run identity (the OAuth client that holds the token).
    pub client_id: String,
    /// Space-separated scopes.
    pub scope: String,
    /// The current actor, with earlier actors nested.
    pub act: Actor,
    pub run: RunRef,
    #[serde(default)]
    pub task: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// A run token's authority: for each audience, the space-separated scopes the run holds
    /// there (only these pairs may be exchanged for). Exchanged tokens have one audience and
    /// no such claim.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub authority: std::collections::BTreeMap<String, String>,
}

impl Claims {
    /// The scopes this token may be exchanged for at `audience`: its `authority` entry, or,
    /// for a token of exactly one audience and no `authority`, its `scope`. A token for
    /// several audiences without `authority` grants nothing (its pairs are unknown).
    pub fn scopes_for(&self, audience: &str) -> Option<Vec<&str>> {
        if !self.authority.is_empty() {
            return self.authority.get(audience).map(|s| s.split(' ').filter(|x| !x.is_empty()).collect());
        }
        match &self.aud {
            Audience::One(a) if a == audience => Some(self.scopes()),
            Audience::Many(list) if list.len() == 1 && list[0] == audience => Some(self.scopes()),
            _ => None,
        }
    }

    /// The scopes as a list.
    pub fn scopes(&self) -> Vec<&str> {
        self.scope.split(' ').filter(|s| !s.is_empty()).collect()
    }
    /// Principal first, then acting identities in chronological order.
    pub fn delegation_chain(&self) -> Vec<String> {
        let mut chain = vec![self.sub.clone()];
        chain.extend(self.act.chain());
        chain
    }
    pub fn expires_at(&self) -> Timestamp {
        Timestamp::from_second(self.exp).unwrap_or(Timestamp::MIN)
    }
}

/// What a run token is made from.
#[derive(Clone, Debug)]
pub struct RunTokenSpec<'a> {
    pub issuer: &'a str,
    pub principal: &'a str,
    pub audiences: &'a [String],
    /// The run's identity (also the current actor).
    pub identity: &'a str,
    pub scope: String,
    /// Audience → space-separated scopes held there.
    pub authority: std::collections::BTreeMap<String, String>,
    /// Acting identities in chronological order; the last must be `identity`.
    pub actors: &'a [String],
    pub run: RunRef,
    pub task: &'a str,
    pub issued_at: Timestamp,
    pub ttl: SignedDuration,
    /// Never valid past this (the run's deadline).
    pub not_after: Timestamp,
}

impl RunTokenSpec<'_> {
    /// The claims, with `exp = min(iat + ttl, not_after)` and a fresh `jti`.
    pub fn claims(&self) -> Claims {
        let iat = self.issued_at.as_second();
        let exp = (iat.saturating_add(self.ttl.as_secs())).min(self.not_after.as_second());
        let act = Actor::from_chain(self.actors).unwrap_or_else(|| Actor { sub: self.identity.to_string(), act: None });
        Claims {
            iss: self.issuer.to_string(),
            sub: self.principal.to_string(),
            aud: Audience::from_list(self.audiences),
            client_id: self.identity.to_string(),
            scope: self.scope.clone(),
            act,
            run: self.run.clone(),
            task: self.task.to_string(),
            iat,
            nbf: iat,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            authority: self.authority.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_chain_nests_current_actor_outermost() {
        let act = Actor::from_chain(&["plan-7", "gdpr"]).unwrap();
        assert_eq!(act.sub, "gdpr");
        assert_eq!(act.act.as_ref().unwrap().sub, "plan-7");
        assert!(act.act.as_ref().unwrap().act.is_none());
        assert_eq!(act.chain(), vec!["plan-7", "gdpr"]);
        let json = serde_json::to_value(&act).unwrap();
        assert_eq!(json, serde_json::json!({"sub": "gdpr", "act": {"sub": "plan-7"}}));
        assert!(Actor::from_chain::<&str>(&[]).is_none());
    }

    #[test]
    fn audience_is_a_string_for_one_and_an_array_for_many() {
        assert_eq!(serde_json::to_value(Audience::from_list(&["a".into()])).unwrap(), serde_json::json!("a"));
        assert_eq!(
            serde_json::to_value(Audience::from_list(&["a".into(), "b".into()])).unwrap(),
            serde_json::json!(["a", "b"])
        );
        let many: Audience = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert!(many.contains("b") && !many.contains("c"));
    }

    #[test]
    fn expiry_never_passes_the_deadline() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let spec = RunTokenSpec {
            issuer: "https://deputy",
            principal: "alice@example.com",
            audiences: &["svc".to_string()],
            identity: "spiffe://x/run",
            scope: "a:b".into(),
            authority: [("svc".to_string(), "a:b".to_string())].into(),
            actors: &["spiffe://x/run".to_string()],
            run: RunRef { namespace: "ns".into(), name: "r".into(), uid: "u".into() },
            task: "t",
            issued_at: now,
            ttl: SignedDuration::from_mins(10),
            not_after: now + SignedDuration::from_mins(3),
        };
        let c = spec.claims();
        assert_eq!(c.exp - c.iat, 180);
        assert_eq!(c.nbf, c.iat);
        assert_ne!(c.jti, spec.claims().jti, "every token gets its own jti");
        assert_eq!(c.delegation_chain(), vec!["alice@example.com", "spiffe://x/run"]);
        assert_eq!(c.scopes_for("svc"), Some(vec!["a:b"]));
        assert_eq!(c.scopes_for("other"), None);
    }

    #[test]
    fn a_token_may_be_exchanged_only_for_its_pairs() {
        let base = RunTokenSpec {
            issuer: "https://deputy",
            principal: "alice@example.com",
            audiences: &["staging-db".to_string(), "prod-db".to_string()],
            identity: "spiffe://x/run",
            scope: "data:read data:write".into(),
            authority: [
                ("prod-db".to_string(), "data:read".to_string()),
                ("staging-db".to_string(), "data:write".to_string()),
            ]
            .into(),
            actors: &["spiffe://x/run".to_string()],
            run: RunRef { namespace: "ns".into(), name: "r".into(), uid: "u".into() },
            task: "t",
            issued_at: Timestamp::from_second(1_000_000).unwrap(),
            ttl: SignedDuration::from_mins(10),
            not_after: Timestamp::from_second(2_000_000).unwrap(),
        };
        let c = base.claims();
        assert_eq!(c.scopes_for("prod-db"), Some(vec!["data:read"]));
        assert_eq!(c.scopes_for("staging-db"), Some(vec!["data:write"]));
        assert_eq!(c.scopes_for("dev-db"), None);
        // Without `authority`, a token for several audiences grants nothing; for one, its scope.
        let many = Claims { authority: Default::default(), ..c.clone() };
        assert_eq!(many.scopes_for("prod-db"), None);
        let one = Claims { authority: Default::default(), aud: Audience::One("prod-db".into()), ..c };
        assert_eq!(one.scopes_for("prod-db"), Some(vec!["data:read", "data:write"]));
    }
}
