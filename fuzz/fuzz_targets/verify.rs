//! Token verification of arbitrary bytes: refused (or, for the one valid seed, accepted),
//! never a panic.
#![no_main]
use std::sync::OnceLock;

use deputy::tokens::verify::{Verifier, peek_claims};
use deputy::tokens::{Alg, AudienceCheck, KeySet};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let set = KeySet::generate(Alg::EdDSA, jiff::Timestamp::UNIX_EPOCH).expect("a key");
        Verifier::from_key_set("https://deputy", &set, 30).expect("a verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let now = jiff::Timestamp::UNIX_EPOCH;
    // Nothing fuzzed is signed by this key: every token is refused.
    assert!(verifier().verify_at(token, AudienceCheck::Any, now).is_err());
    assert!(verifier().verify_at(token, AudienceCheck::Exactly("svc"), now).is_err());
    let _ = peek_claims(token);
});
