//! The signing-key Secret's `keys.json`: a key set or an error, never a panic; a loaded set
//! has exactly one active key and survives its own round trip.
#![no_main]
use std::collections::BTreeMap;

use deputy::tokens::KeySet;
use deputy::tokens::keys::SECRET_KEY;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let map = BTreeMap::from([(SECRET_KEY.to_string(), data.to_vec())]);
    if let Ok(set) = KeySet::from_secret_data(&map) {
        let _ = set.jwks();
        let stored = set.to_secret_data().expect("a loaded set serialises");
        let again = KeySet::from_secret_data(&stored).expect("a stored set loads");
        assert_eq!(again.active().kid, set.active().kid);
    }
});
