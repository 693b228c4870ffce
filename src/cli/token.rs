//! `deputy token inspect` and `deputy token verify`.

use std::io::Read;
use std::time::Duration;

use clap::Subcommand;
use jiff::{SignedDuration, Timestamp};

use crate::tokens::verify::{peek_claims, peek_header};
use crate::tokens::{AudienceCheck, Verifier, verify::DEFAULT_LEEWAY_SECS};

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Decode a token (without verifying it) and show header, claims, the delegation chain
    /// and the time left.
    Inspect {
        /// A file holding the token, or `-` for standard input.
        file: String,
    },
    /// Verify a token's signature and claims; exit 0 only if it is valid.
    Verify {
        /// The public keys: a JWKS file, or an http(s) URL serving one.
        #[arg(long)]
        jwks: String,
        /// Require this audience. Without it, any audience is accepted.
        #[arg(long)]
        audience: Option<String>,
        /// The expected issuer. Defaults to the JWKS URL without `/jwks.json`; required
        /// when the JWKS is a file.
        #[arg(long)]
        issuer: Option<String>,
        /// Clock-skew leeway in seconds.
        #[arg(long, default_value_t = DEFAULT_LEEWAY_SECS)]
        leeway: u64,
        /// A file holding the token, or `-` for standard input.
        file: String,
    },
}

pub async fn run(cmd: TokenCommand) -> i32 {
    let result = match cmd {
        TokenCommand::Inspect { file } => read_token(&file).and_then(|t| inspect(&t, Timestamp::now())).map(|out| {
            print!("{out}");
            0
        }),
        TokenCommand::Verify { jwks, audience, issuer, leeway, file } => {
            verify(&jwks, audience.as_deref(), issuer, leeway, &file).await
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// Reads a token from a file or stdin, trimming whitespace; refuses anything huge.
pub fn read_token(file: &str) -> Result<String, String> {
    let mut buf = String::new();
    let limit = 64 * 1024;
    let read = if file == "-" {
        std::io::stdin().take(limit + 1).read_to_string(&mut buf)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit + 1).read_to_string(&mut buf))
    };
    read.map_err(|e| format!("cannot read {file}: {e}"))?;
    if buf.len() as u64 > limit {
        return Err(format!("{file} is larger than {limit} bytes; not a token"));
    }
    let token = buf.trim().to_string();
    if token.is_empty() {
        return Err(format!("{file} is empty"));
    }
    Ok(token)
}

fn short(identity: &str) -> &str {
    // spiffe://td/ns/<ns>/agent/<agent>/run/<run> → <run>
    identity.rsplit_once("/run/").map(|(_, r)| r).unwrap_or(identity)
}

/// Renders a human-readable view of a token.
pub fn inspect(token: &str, now: Timestamp) -> Result<String, String> {
    let header = peek_header(token).map_err(|e| e.to_string())?;
    let claims = peek_claims(token).map_err(|e| e.to_string())?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut out = format!("Header:\n{}\nClaims:\n{}\n", pretty(&header), pretty(&claims));
    if let Ok(c) = serde_json::from_value::<crate::tokens::Claims>(claims.clone()) {
        let chain = c.delegation_chain();
        let line: Vec<&str> =
            chain.iter().enumerate().map(|(i, s)| if i == 0 { s.as_str() } else { short(s) }).collect();
        out.push_str(&format!("Delegation: {}\n", line.join(" ← ")));
        for (i, id) in chain.iter().enumerate().skip(1) {
            let role = if i + 1 == chain.len() { "current actor" } else { "earlier actor" };
            out.push_str(&format!("  {role}: {id}\n"));
        }
        out.push_str(&format!("Scopes: {}\nAudience: {}\n", c.scope, c.aud.to_vec().join(", ")));
    } else {
        out.push_str("Delegation: (not a Deputy token: claims do not have Deputy's shape)\n");
    }
    if let Some(exp) = claims.get("exp").and_then(|e| e.as_i64()) {
        let left = SignedDuration::from_secs(exp - now.as_second());
        let when = Timestamp::from_second(exp).map(|t| t.to_string()).unwrap_or_default();
        if left.is_positive() {
            out.push_str(&format!("Expires: {when} (in {})\n", crate::duration::format(left)));
        } else {
            out.push_str(&format!("Expires: {when} (EXPIRED {} ago)\n", crate::duration::format(-left)));
        }
    }
    Ok(out)
}

async fn load_jwks(source: &str) -> Result<serde_json::Value, String> {
    let raw = if source.starts_with("http://") || source.starts_with("https://") {
        let resp = crate::http_client::get(source, Duration::from_secs(10))
            .await
            .map_err(|e| format!("fetching {source}: {e}"))?;
        if resp.status != 200 {
            return Err(format!("fetching {source}: HTTP {}", resp.status));
        }
        resp.body.to_vec()
    } else {
        std::fs::read(source).map_err(|e| format!("cannot read {source}: {e}"))?
    };
    serde_json::from_slice(&raw).map_err(|e| format!("{source} is not JSON: {e}"))
}

async fn verify(
    jwks: &str,
    audience: Option<&str>,
    issuer: Option<String>,
    leeway: u64,
    file: &str,
) -> Result<i32, String> {
    let issuer = match issuer {
        Some(i) => i,
        None => match jwks.strip_suffix("/jwks.json") {
            Some(base) if base.starts_with("http") => base.to_string(),
            _ => return Err("pass --issuer (it can only be derived from a JWKS URL ending in /jwks.json)".into()),
        },
    };
    let token = read_token(file)?;
    let doc = load_jwks(jwks).await?;
    let verifier = Verifier::from_jwks(&issuer, &doc, leeway).map_err(|e| e.to_string())?;
    let check = audience.map_or(AudienceCheck::Any, AudienceCheck::Exactly);
    match verifier.verify(&token, check) {
        Ok(c) => {
            let chain = c.delegation_chain();
            println!(
                "valid: sub={} act={} scope={:?} aud={} exp={}{}",
                c.sub,
                chain.last().map(String::as_str).unwrap_or(""),
                c.scope,
                c.aud.to_vec().join(","),
                c.expires_at(),
                if audience.is_none() { " (audience not checked)" } else { "" }
            );
            Ok(0)
        }
        Err(e) => {
            println!("invalid: {e} ({})", e.code());
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_shows_chain_and_time_left() {
        let set = crate::tokens::KeySet::generate(crate::tokens::Alg::EdDSA, Timestamp::UNIX_EPOCH).unwrap();
        let actors = vec![
            "spiffe://cluster.local/ns/m/agent/planner/run/run-a".to_string(),
            "spiffe://cluster.local/ns/m/agent/opt/run/run-b".to_string(),
        ];
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let claims = crate::tokens::RunTokenSpec {
            issuer: "https://deputy",
            principal: "alice@example.com",
            audiences: &["svc".to_string()],
            identity: &actors[1],
            scope: "a:b".into(),
            authority: [("svc".to_string(), "a:b".to_string())].into(),
            actors: &actors,
            run: crate::tokens::RunRef { namespace: "m".into(), name: "run-b".into(), uid: "u".into() },
            task: "t",
            issued_at: now,
            ttl: SignedDuration::from_mins(10),
            not_after: now + SignedDuration::from_hours(1),
        }
        .claims();
        let token = set.active().sign(&claims).unwrap();
        let out = inspect(&token, now + SignedDuration::from_mins(1)).unwrap();
        assert!(out.contains("Delegation: alice@example.com ← run-a ← run-b"), "{out}");
        assert!(out.contains("(in 9m)"), "{out}");
        let out = inspect(&token, now + SignedDuration::from_mins(12)).unwrap();
        assert!(out.contains("EXPIRED 2m ago"), "{out}");
        assert!(inspect("garbage", now).is_err());
    }
}
