//! Status of DelegationGrants (phase, active runs) and Agents (active runs).
//!
//! Recounts are triggered by the run reconciler whenever a run starts or ends, by grant and
//! agent changes, and at each grant's `notBefore` and `expiresAt`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use super::{Context, MANAGER, StatusTrigger};
use crate::authorization::{GrantTime, grant_window};
use crate::resources::{
    AgentStatus, Condition, ConditionStatus, DelegationGrant, DelegationGrantStatus, Effect, GrantPhase, RunPhase,
    set_condition,
};

/// A grant's phase at some moment, when it next changes, and what is wrong with it if it is
/// invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantState {
    pub phase: GrantPhase,
    pub next_change: Option<Timestamp>,
    pub problem: Option<String>,
}

fn invalid(problem: String) -> GrantState {
    GrantState { phase: GrantPhase::Invalid, next_change: None, problem: Some(problem) }
}

/// The state of a grant at `now`.
pub fn grant_state(g: &DelegationGrant, now: Timestamp) -> GrantState {
    let window = match grant_window(&g.spec, now) {
        Ok(w) => w,
        Err(e) => return invalid(format!("malformed time: {e}")),
    };
    for (field, v) in [("maxTokenTTL", &g.spec.max_token_ttl), ("maxRunDuration", &g.spec.max_run_duration)] {
        if let Some(Err(e)) = v.as_deref().map(crate::duration::parse) {
            return invalid(format!("{field}: {e}"));
        }
    }
    if let Err(e) = crate::scope::parse_all(&g.spec.scopes) {
        return invalid(e.to_string());
    }
    let phase = match window {
        GrantTime::NotYet { .. } => GrantPhase::Pending,
        GrantTime::InForce { .. } => GrantPhase::Active,
        GrantTime::Expired => GrantPhase::Expired,
    };
    GrantState { phase, next_change: window.next_change(), problem: None }
}

fn active_runs(ctx: &Context, ns: &str, pred: impl Fn(&crate::resources::AgentRun) -> bool) -> u32 {
    let n = ctx
        .stores
        .runs
        .state()
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(ns))
        .filter(|r| {
            r.status.as_ref().and_then(|s| s.phase).is_some_and(RunPhase::is_active)
                && r.metadata.deletion_timestamp.is_none()
        })
        .filter(|r| pred(r))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

async fn update_grant(ctx: &Context, key: &ObjectRef<DelegationGrant>, now: Timestamp) -> Option<Timestamp> {
    let g = ctx.stores.grants.get(key)?;
    let ns = g.namespace().unwrap_or_default();
    let name = g.name_any();
    let GrantState { phase, next_change: next, problem } = grant_state(&g, now);
    let runs = active_runs(ctx, &ns, |r| {
        r.status.as_ref().and_then(|s| s.grant.as_deref()).is_some_and(|list| list.split(',').any(|x| x == name))
    });
    let mut status = g.status.clone().unwrap_or_default();
    let (ready, reason, message) = match (phase, g.spec.effect) {
        (GrantPhase::Invalid, _) => (ConditionStatus::False, "Invalid", problem.unwrap_or_default()),
        (GrantPhase::Pending, _) => {
            (ConditionStatus::False, "NotYetValid", "the grant is not in force before notBefore".to_string())
        }
        (GrantPhase::Expired, _) => (ConditionStatus::False, "Expired", "the grant is no longer in force".to_string()),
        (GrantPhase::Active, Effect::Allow) => (ConditionStatus::True, "Active", "the grant is in force".to_string()),
        (GrantPhase::Active, Effect::Deny) => (ConditionStatus::True, "Active", "the refusal is in force".to_string()),
    };
    set_condition(&mut status.conditions, Condition::new("Ready", ready, reason, message, now, g.metadata.generation));
    let new = DelegationGrantStatus {
        phase: Some(phase),
        active_runs: runs,
        observed_generation: g.metadata.generation,
        ..status
    };
    if g.status.as_ref() != Some(&new) {
        let api: Api<DelegationGrant> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant", "status": new});
        if let Err(e) = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
            tracing::warn!(grant = %name, namespace = %ns, error = %e, "could not update grant status");
            return Some(now + jiff::SignedDuration::from_secs(5));
        }
    }
    next
}

async fn update_agent(ctx: &Context, key: &ObjectRef<crate::resources::Agent>) {
    let Some(a) = ctx.stores.agents.get(key) else { return };
    let ns = a.namespace().unwrap_or_default();
    let name = a.name_any();
    let runs = active_runs(ctx, &ns, |r| r.spec.agent == name);
    let new = AgentStatus { active_runs: runs, observed_generation: a.metadata.generation };
    if a.status.as_ref() != Some(&new) {
        let api: Api<crate::resources::Agent> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "Agent", "status": new});
        if let Err(e) = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
            tracing::warn!(agent = %name, namespace = %ns, error = %e, "could not update agent status");
        }
    }
}

/// Keeps grant and agent status current until shutdown. Triggers are coalesced: a burst of
/// run changes costs one recount per grant/agent.
pub(super) async fn status_loop(
    ctx: Arc<Context>,
    mut rx: mpsc::UnboundedReceiver<StatusTrigger>,
    mut stop: broadcast::Receiver<()>,
) {
    let mut scheduled: HashMap<ObjectRef<DelegationGrant>, Timestamp> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut first = true;
    loop {
        let mut grants: HashSet<ObjectRef<DelegationGrant>> = HashSet::new();
        let mut agents: HashSet<ObjectRef<crate::resources::Agent>> = HashSet::new();
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        if first {
            // A full pass once the caches are filled.
            if ctx.stores.wait_until_ready().await.is_err() {
                return;
            }
            grants.extend(ctx.stores.grants.state().iter().map(|g| ObjectRef::from_obj(&**g)));
            agents.extend(ctx.stores.agents.state().iter().map(|a| ObjectRef::from_obj(&**a)));
            first = false;
        }
        // New or changed grants and agents (their status lags their generation).
        let stale = |gen_: Option<i64>, observed: Option<Option<i64>>| observed.is_none_or(|o| o != gen_);
        grants.extend(
            ctx.stores
                .grants
                .state()
                .iter()
                .filter(|g| stale(g.metadata.generation, g.status.as_ref().map(|s| s.observed_generation)))
                .map(|g| ObjectRef::from_obj(&**g)),
        );
        agents.extend(
            ctx.stores
                .agents
                .state()
                .iter()
                .filter(|a| stale(a.metadata.generation, a.status.as_ref().map(|s| s.observed_generation)))
                .map(|a| ObjectRef::from_obj(&**a)),
        );
        while let Ok(t) = rx.try_recv() {
            match t {
                StatusTrigger::Grant(g) => {
                    grants.insert(g);
                }
                StatusTrigger::Agent(a) => {
                    agents.insert(a);
                }
            }
        }
        let now = ctx.now();
        let due: Vec<_> = scheduled.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
        for k in due {
            scheduled.remove(&k);
            grants.insert(k);
        }
        for g in grants {
            if let Some(next) = update_grant(&ctx, &g, now).await {
                scheduled.insert(g, next);
            }
        }
        for a in agents {
            update_agent(&ctx, &a).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(spec: serde_json::Value) -> DelegationGrant {
        let mut base = serde_json::json!({"principal": "alice@example.com", "agent": "a", "effect": "Allow",
                                          "scopes": ["a:b"], "audiences": ["svc"]});
        if let (Some(b), Some(extra)) = (base.as_object_mut(), spec.as_object()) {
            b.extend(extra.clone());
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": "g", "namespace": "ns"}, "spec": base,
        }))
        .unwrap()
    }

    #[test]
    fn a_grants_state_follows_its_window_and_names_what_is_malformed() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let (nb, exp) = ("2026-11-23T12:00:00Z", "2026-11-23T13:00:00Z");
        let window = serde_json::json!({"notBefore": nb, "expiresAt": exp});
        let cases = [
            (window.clone(), "2026-11-23T11:00:00Z", GrantPhase::Pending, Some(t(nb))),
            (window.clone(), "2026-11-23T12:30:00Z", GrantPhase::Active, Some(t(exp))),
            (window, exp, GrantPhase::Expired, None),
            (serde_json::json!({}), exp, GrantPhase::Active, None),
        ];
        for (spec, now, phase, next_change) in cases {
            let got = grant_state(&grant(spec), t(now));
            assert_eq!(got, GrantState { phase, next_change, problem: None }, "at {now}");
        }
        for (spec, problem) in [
            (serde_json::json!({"expiresAt": "soon"}), "malformed time"),
            (serde_json::json!({"maxTokenTTL": "forever"}), "maxTokenTTL"),
            (serde_json::json!({"scopes": ["BAD SCOPE"]}), ""),
        ] {
            let got = grant_state(&grant(spec), t(nb));
            assert_eq!((got.phase, got.next_change), (GrantPhase::Invalid, None));
            assert!(got.problem.is_some_and(|p| p.contains(problem)), "{problem}");
        }
    }
}
