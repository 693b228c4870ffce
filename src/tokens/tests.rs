//! Token tests: minting, verification, and every way a token must be refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::*;

const ISS: &str = "https://deputy.deputy-system.svc";

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn claims_at(iat: Timestamp) -> Claims {
    let chain = vec![
        "spiffe://cluster.local/ns/marketing/agent/planner/run/plan-7".to_string(),
        "spiffe://cluster.local/ns/marketing/agent/gdpr-compliance-agent/run/gdpr-check-q4".to_string(),
    ];
    RunTokenSpec {
        issuer: ISS,
        principal: "alice@example.com",
        audiences: &["gdpr-compliance-service".to_string()],
        identity: &chain[1],
        scope: "compliance:audit:cross_dept compliance:privacy:check".into(),
        authority: [(
            "gdpr-compliance-service".to_string(),
            "compliance:audit:cross_dept compliance:privacy:check".to_string(),
        )]
        .into(),
        actors: &chain,
        run: RunRef { namespace: "marketing".into(), name: "gdpr-check-q4".into(), uid: "u-1".into() },
        task: "Check the Q4 field campaign for GDPR compliance",
        issued_at: iat,
        ttl: SignedDuration::from_mins(10),
        not_after: iat + SignedDuration::from_hours(1),
    }
    .claims()
}

fn setup(alg: Alg) -> (KeySet, Verifier) {
    let set = KeySet::generate(alg, now()).unwrap();
    let v = Verifier::from_key_set(ISS, &set, 0).unwrap();
    (set, v)
}

/// Re-signs arbitrary header/claims with the key set's active key (for forged headers).
fn sign_raw(set: &KeySet, header: serde_json::Value, claims: &serde_json::Value) -> String {
    // Build the signing input by hand, then sign it with the same key through a tiny
    // detour: SigningKey only signs its own header, so use aws-lc-rs via a fresh key parse.
    let stored = set.to_stored();
    let der = pem::parse(&stored.keys[0].private_key).unwrap();
    let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let sig = match stored.keys[0].alg {
        Alg::EdDSA => {
            let kp = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.contents()).unwrap();
            kp.sign(input.as_bytes()).as_ref().to_vec()
        }
        Alg::ES256 => {
            let kp = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                der.contents(),
            )
            .unwrap();
            kp.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes()).unwrap().as_ref().to_vec()
        }
    };
    format!("{input}.{}", B64.encode(sig))
}

#[test]
fn minted_tokens_verify_for_both_algorithms() {
    for alg in [Alg::EdDSA, Alg::ES256] {
        let (set, v) = setup(alg);
        let claims = claims_at(now());
        let token = set.active().sign(&claims).unwrap();
        let header = verify::peek_header(&token).unwrap();
        assert_eq!(header, json!({"alg": alg.as_str(), "kid": set.active().kid, "typ": "at+jwt"}));
        let got = v.verify_at(&token, AudienceCheck::Exactly("gdpr-compliance-service"), now()).unwrap();
        assert_eq!(got, claims);
        assert_eq!(got.act.sub, claims.client_id, "the outermost act is the current actor");
        assert_eq!(got.delegation_chain().len(), 3);
    }
}

#[test]
fn claims_have_the_design_shape() {
    let (set, _) = setup(Alg::EdDSA);
    let token = set.active().sign(&claims_at(now())).unwrap();
    let c = verify::peek_claims(&token).unwrap();
    for key in ["iss", "sub", "aud", "client_id", "scope", "act", "run", "task", "iat", "nbf", "exp", "jti"] {
        assert!(c.get(key).is_some(), "claim {key} missing");
    }
    assert_eq!(c["sub"], "alice@example.com");
    assert_eq!(c["aud"], "gdpr-compliance-service");
    assert_eq!(c["act"]["act"]["sub"], "spiffe://cluster.local/ns/marketing/agent/planner/run/plan-7");
    assert_eq!(c["run"], json!({"namespace": "marketing", "name": "gdpr-check-q4", "uid": "u-1"}));
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
}

/// An independent implementation (ed25519-dalek, not jsonwebtoken nor aws-lc-rs) checks
/// the signature using only the published JWKS.
#[test]
fn an_independent_library_verifies_the_signature_from_the_jwks() {
    use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
    let (set, _) = setup(Alg::EdDSA);
    let token = set.active().sign(&claims_at(now())).unwrap();
    let jwks = set.jwks();
    let x = B64.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
    let key = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = Signature::from_slice(&B64.decode(sig).unwrap()).unwrap();
    assert!(key.verify(input.as_bytes(), &sig).is_ok());
    let mut tampered = input.as_bytes().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(key.verify(&tampered, &sig).is_err());
}

/// jsonwebtoken needs exactly one crypto backend; with none it panics at the first use.
/// This proves ours is wired, through jsonwebtoken's own encode and decode.
#[test]
fn jsonwebtoken_crypto_backend_is_wired() {
    let (set, _) = setup(Alg::EdDSA);
    let stored = set.to_stored();
    let der = pem::parse(&stored.keys[0].private_key).unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ed_der(der.contents());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(set.active().kid.clone());
    header.typ = Some("at+jwt".into());
    let claims = claims_at(Timestamp::now());
    let token = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
    let v = Verifier::from_key_set(ISS, &set, 0).unwrap();
    assert_eq!(v.verify(&token, AudienceCheck::Any).unwrap(), claims);
}

#[test]
fn rejections_have_distinct_reasons() {
    let (set, v) = setup(Alg::EdDSA);
    let (other, _) = setup(Alg::EdDSA);
    let claims = claims_at(now());
    let good = set.active().sign(&claims).unwrap();
    let claims_json = serde_json::to_value(&claims).unwrap();
    let kid = set.active().kid.clone();
    let aud = AudienceCheck::Exactly("gdpr-compliance-service");

    let mut tampered_claims = claims_json.clone();
    tampered_claims["scope"] = json!("compliance:*");
    let (h, _, s) = {
        let mut p = good.split('.');
        (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
    };
    let tampered = format!("{h}.{}.{s}", B64.encode(tampered_claims.to_string()));
    let alg_none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "at+jwt", "kid": kid}).to_string()),
        B64.encode(claims_json.to_string())
    );
    let hs256 = {
        let header = jsonwebtoken::Header {
            alg: jsonwebtoken::Algorithm::HS256,
            kid: Some(kid.clone()),
            typ: Some("at+jwt".into()),
            ..Default::default()
        };
        // An attacker's classic: HMAC keyed with the public key.
        let public = set.jwks()["keys"][0]["x"].as_str().unwrap().to_string();
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(public.as_bytes())).unwrap()
    };
    let mut foreign = claims_json.clone();
    foreign["iss"] = json!("https://evil.example");
    let mut no_sub = claims_json.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    let header = json!({"alg": "EdDSA", "kid": kid, "typ": "at+jwt"});

    let table: Vec<(&str, String, AudienceCheck<'_>, Timestamp, VerifyError)> = vec![
        ("garbage", "not-a-jwt".into(), aud, now(), VerifyError::Malformed(String::new())),
        ("four parts", format!("{good}.x"), aud, now(), VerifyError::Malformed(String::new())),
        ("tampered payload", tampered, aud, now(), VerifyError::BadSignature),
        ("alg none", alg_none, aud, now(), VerifyError::UnsupportedAlgorithm("none".into())),
        ("HS256 keyed with the public key", hs256, aud, now(), VerifyError::UnsupportedAlgorithm("HS256".into())),
        (
            "signed by another key",
            other.active().sign(&claims).unwrap(),
            aud,
            now(),
            VerifyError::UnknownKey(other.active().kid.clone()),
        ),
        ("expired", good.clone(), aud, now() + SignedDuration::from_mins(10), VerifyError::Expired),
        ("not yet valid", good.clone(), aud, now() - SignedDuration::from_secs(1), VerifyError::NotYetValid),
        ("wrong audience", good.clone(), AudienceCheck::Exactly("payments-service"), now(), VerifyError::WrongAudience),
        ("foreign issuer", sign_raw(&set, header.clone(), &foreign), aud, now(), VerifyError::WrongIssuer),
        (
            "wrong typ",
            sign_raw(&set, json!({"alg": "EdDSA", "kid": kid, "typ": "JWT"}), &claims_json),
            aud,
            now(),
            VerifyError::WrongType("JWT".into()),
        ),
        (
            "no kid",
            sign_raw(&set, json!({"alg": "EdDSA", "typ": "at+jwt"}), &claims_json),
            aud,
            now(),
            VerifyError::MissingKid,
        ),
        (
            "ES256 header on an Ed25519 kid",
            sign_raw(&set, json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"}), &claims_json),
            aud,
            now(),
            VerifyError::AlgorithmMismatch(kid.clone()),
        ),
        ("missing sub", sign_raw(&set, header.clone(), &no_sub), aud, now(), VerifyError::MissingClaim("sub".into())),
    ];
    let mut codes = std::collections::HashSet::new();
    for (name, token, aud, at, want) in table {
        let got = v.verify_at(&token, aud, at).unwrap_err();
        assert_eq!(got.code(), want.code(), "{name}: got {got:?}");
        if !matches!(want, VerifyError::Malformed(_)) {
            assert_eq!(got, want, "{name}");
        }
        codes.insert(got.code());
    }
    assert_eq!(codes.len(), 12, "every rejection has its own reason");
    // and the good token passes at the edges of its lifetime
    assert!(v.verify_at(&good, aud, now()).is_ok());
    assert!(v.verify_at(&good, aud, now() + SignedDuration::from_secs(599)).is_ok());
}

#[test]
fn leeway_is_explicit() {
    let set = KeySet::generate(Alg::EdDSA, now()).unwrap();
    let v = Verifier::from_key_set(ISS, &set, 30).unwrap();
    let token = set.active().sign(&claims_at(now())).unwrap();
    let aud = AudienceCheck::Any;
    assert!(v.verify_at(&token, aud, now() + SignedDuration::from_secs(629)).is_ok());
    assert_eq!(v.verify_at(&token, aud, now() + SignedDuration::from_secs(630)), Err(VerifyError::Expired));
    assert!(v.verify_at(&token, aud, now() - SignedDuration::from_secs(30)).is_ok());
    assert_eq!(v.verify_at(&token, aud, now() - SignedDuration::from_secs(31)), Err(VerifyError::NotYetValid));
}

#[test]
fn retired_keys_keep_verifying_their_tokens() {
    let mut set = KeySet::generate(Alg::EdDSA, now()).unwrap();
    let old_token = set.active().sign(&claims_at(now())).unwrap();
    set.rotate(Alg::ES256, now(), SignedDuration::from_hours(1)).unwrap();
    let new_token = set.active().sign(&claims_at(now())).unwrap();
    let v = Verifier::from_key_set(ISS, &set, 0).unwrap();
    assert!(v.verify_at(&old_token, AudienceCheck::Any, now()).is_ok());
    assert!(v.verify_at(&new_token, AudienceCheck::Any, now()).is_ok());
    set.prune(now() + SignedDuration::from_hours(2));
    let v = Verifier::from_key_set(ISS, &set, 0).unwrap();
    assert!(matches!(v.verify_at(&old_token, AudienceCheck::Any, now()), Err(VerifyError::UnknownKey(_))));
}

#[test]
fn jwks_ignores_keys_it_cannot_trust() {
    let jwks = json!({"keys": [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
    ]});
    let v = Verifier::from_jwks(ISS, &jwks, 0).unwrap();
    assert!(format!("{v:?}").contains("kids: []"));
    assert!(Verifier::from_jwks(ISS, &json!({"nope": 1}), 0).is_err());
}
