//! The token endpoint's form parser and the exchange request on arbitrary bodies: an error,
//! never a panic; an accepted form never holds a repeated single-valued parameter.
#![no_main]
use deputy::server::exchange::Request;
use deputy::server::oauth::Form;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for ct in ["application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8"] {
        if let Ok(form) = Form::parse(Some(ct), data) {
            if let Ok(req) = Request::parse(&form) {
                assert!(!req.subject_token.is_empty() && !req.actor_token.is_empty());
            }
        }
    }
    let _ = Form::parse(None, data);
});
