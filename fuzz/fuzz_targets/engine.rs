//! The authorisation engine on arbitrary resource JSON: a decision, never a panic; an
//! authorised run never holds a scope or audience it did not ask for.
#![no_main]
use deputy::authorization::{Decision, Input, Policy, authorize};
use deputy::registration::Registrations;
use deputy::resources::{Agent, AgentRun, DelegationGrant, ResourceServer};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else { return };
    let mut parts = parts.into_iter();
    let Some(Ok(run)) = parts.next().map(serde_json::from_value::<AgentRun>) else { return };
    let agent = parts.next().and_then(|v| serde_json::from_value::<Agent>(v).ok());
    let mut grants = vec![];
    let mut servers = vec![];
    for v in parts {
        if let Ok(g) = serde_json::from_value::<DelegationGrant>(v.clone()) {
            grants.push(g);
        } else if let Ok(rs) = serde_json::from_value::<ResourceServer>(v) {
            servers.push(rs);
        }
    }
    let ns = run.metadata.namespace.clone().unwrap_or_default();
    let registered = Registrations::for_namespace(&servers, &ns, None);
    let policy = Policy::default();
    let now = jiff::Timestamp::UNIX_EPOCH;
    let decision = authorize(Input {
        run: &run,
        agent: agent.as_ref(),
        grants: &grants,
        parent: None,
        registered: &registered,
        now,
        policy: &policy,
    });
    if let Decision::Authorized(auth) = decision {
        for (aud, _) in &auth.authority {
            assert!(run.spec.audiences.contains(aud), "granted an audience not asked for: {aud}");
        }
        let asked = deputy::scope::parse_all(&run.spec.scopes).expect("an authorised run's scopes parse");
        for s in &auth.scopes {
            assert!(deputy::scope::covered_by(s, &asked), "granted {s}, not within what was asked");
        }
        assert!(auth.deadline >= auth.started_at);
    }
});
