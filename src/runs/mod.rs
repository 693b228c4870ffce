//! What both the controller and the token endpoint know about a run: the names of its
//! children, which of them are its own (by uid), how its pod ended, the revoke annotation, and
//! the one rule for whether a run may still use its tokens. Neither the controller nor the
//! server imports the other; both import this.

pub mod contract;
mod end;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use kube::api::ObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::resources::AgentRun;
use crate::tokens::Claims;
pub use end::End;

/// The label every child carries, for selecting them.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "deputy");
pub const RUN_LABEL: &str = "deputy.dev/run";
pub const AGENT_LABEL: &str = "deputy.dev/agent";
/// The annotation the token endpoint sets when a run revokes itself; the controller ends the
/// run, and every replica treats the run as inactive from the moment it sees it.
pub const REVOKE_ANNOTATION: &str = "deputy.dev/revoke-requested";
/// On a run's Secret: which of the run's tokens it holds (1 for the first). The status counts
/// the tokens it recorded; a Secret written just before Deputy stopped, whose status write was
/// lost, holds one more, and the next token is numbered after it.
pub const TOKEN_NUMBER_ANNOTATION: &str = "deputy.dev/token-number";

/// The token number a Secret's metadata carries (0: none, or not a number).
pub fn token_number(meta: &ObjectMeta) -> u32 {
    meta.annotations.as_ref().and_then(|a| a.get(TOKEN_NUMBER_ANNOTATION)).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn short_hash(s: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
    d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// `prefix + name`, shortened with a hash suffix when it would exceed `max` characters.
fn bounded(prefix: &str, name: &str, max: usize) -> String {
    let full = format!("{prefix}{name}");
    if full.len() <= max {
        return full;
    }
    let keep = max - 9;
    let cut: String = full.chars().take(keep).collect();
    format!("{}-{}", cut.trim_end_matches(['-', '.']), short_hash(&full))
}

/// The name of a run's ServiceAccount, Secret and Pod: `deputy-run-<run>`.
pub fn child_name(run_name: &str) -> String {
    bounded("deputy-run-", run_name, 253)
}

/// The part of a run's Pod that Deputy reads back: its metadata and phase. The pod cache holds
/// these rather than `Pod`, whose in-memory size is about 2.4 KB before any field is set
/// (`PodSpec` alone is 1.5 KB inline); with thousands of runs that is most of the cache.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PodPhase {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodPhaseStatus>,
}

/// `status.phase` of a Pod.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PodPhaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl Resource for PodPhase {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodPhase {
    pub fn phase(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.phase.as_deref())
    }
}

/// How a run's pod ended, if it has. A pod being deleted counts as failed.
pub fn pod_end(pod: &PodPhase) -> Option<End> {
    match pod.phase() {
        Some("Succeeded") => Some(End::PodSucceeded),
        Some("Failed") => Some(End::PodFailed),
        _ if pod.metadata.deletion_timestamp.is_some() => Some(End::PodDeleted),
        _ => None,
    }
}

/// Whose an object found under a child's name (`deputy-run-<run>`) is. Names are
/// predictable, so anyone who can create Secrets, ServiceAccounts or Pods in the namespace can
/// take one first: Deputy writes to, deletes and trusts only objects whose controller owner
/// reference names the run's uid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing has the name: the child is created (a create, which fails if the name is taken).
    Absent,
    /// The run's own; `uid` is the object's, a precondition on every write and delete.
    Ours { uid: String },
    /// Someone else's (a tenant's, or a child of an earlier run of the same name). `leaving`:
    /// it is being deleted, so the name will be free soon.
    Foreign { leaving: bool },
}

/// Whose the object with `meta` is, for `run` (`None`: there is no such object).
pub fn found(meta: Option<&ObjectMeta>, run: &AgentRun) -> Found {
    let Some(meta) = meta else { return Found::Absent };
    let run_uid = run.metadata.uid.as_deref().filter(|u| !u.is_empty());
    let controlled = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == run_uid && o.kind == AgentRun::kind(&()));
    match meta.uid.as_deref().filter(|u| !u.is_empty()) {
        Some(uid) if controlled => Found::Ours { uid: uid.to_string() },
        _ => Found::Foreign { leaving: meta.deletion_timestamp.is_some() },
    }
}

/// Whether the object with `meta` is the run's own child.
pub fn owned_by(meta: &ObjectMeta, run: &AgentRun) -> bool {
    matches!(found(Some(meta), run), Found::Ours { .. })
}

/// A label value (at most 63 characters) naming `name`.
pub fn label_value(name: &str) -> String {
    bounded("", name, 63)
}

/// Whether the run a token names is active right now, per this replica's cache.
pub fn run_of(runs: &Store<AgentRun>, claims: &Claims) -> Option<Arc<AgentRun>> {
    let run = runs.get(&ObjectRef::new(&claims.run.name).within(&claims.run.namespace))?;
    (run.metadata.uid.as_deref() == Some(claims.run.uid.as_str())).then_some(run)
}

/// Whether the run may use its tokens now: its status says it is active, and its pod (when the
/// cache holds it) has not ended. Looking at the pod too means every replica refuses a finished
/// run's tokens as soon as the pod's phase reaches it, without waiting for the controller to
/// end the run (which, with thousands of pods ending at once, can take seconds).
pub fn is_live(pods: &Store<PodPhase>, run: &AgentRun) -> bool {
    is_active(run) && !pod_has_ended(pods, run)
}

fn pod_has_ended(pods: &Store<PodPhase>, run: &AgentRun) -> bool {
    let name = child_name(&run.name_any());
    let pod = pods.get(&ObjectRef::new(&name).within(&run.namespace().unwrap_or_default()));
    pod.is_some_and(|p| owned_by(&p.metadata, run) && pod_end(&p).is_some())
}

/// Whether the run's status says it is active (not yet ended, not revoked, not deleted).
pub fn is_active(run: &AgentRun) -> bool {
    // `completedAt` or `revokedAt` makes a run dead whatever its phase says: a status written
    // back to a live phase does not bring its tokens back.
    crate::authorization::is_live_record(run) && !run.annotations().contains_key(REVOKE_ANNOTATION)
}
