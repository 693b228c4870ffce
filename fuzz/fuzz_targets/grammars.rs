//! The scope and duration grammars: parse, and a parsed value prints back to itself.
#![no_main]
use deputy::{duration, scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for line in text.lines() {
        if let Ok(s) = scope::Scope::parse(line) {
            let again = scope::Scope::parse(&s.to_string()).expect("a printed scope parses");
            assert_eq!(again, s);
            assert!(scope::covered_by(&s, std::slice::from_ref(&s)), "a scope covers itself");
        }
        if let Ok(d) = duration::parse(line) {
            assert!(!d.is_negative(), "{line:?} parsed to a negative duration");
            assert_eq!(duration::parse(&duration::format(d)).ok(), Some(d), "{line:?}");
        }
    }
    let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    if let Ok(mut all) = scope::parse_all(&words) {
        scope::minimise(&mut all);
        let _ = scope::to_claim(&all);
    }
});
