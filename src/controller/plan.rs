//! The reconciler's decisions, as one pure function: from what it observed of a run (its
//! status, its children, a fresh authorisation decision and the time), the next [`Step`]. The
//! reconciler observes, calls [`plan`], and carries the step out; nothing here does I/O, reads
//! a clock or a cache, so every rule is a row in a table test.
//!
//! Some observations cost a request, so they are made only when a rule needs them: the plan
//! asks for them ([`Step::Observe`]) and is called again with them.

use jiff::Timestamp;

use crate::authorization::{Authorization, Decision, Refusal};
use crate::resources::{AgentRunStatus, RunPhase};
use crate::runs::{End, Found};
use crate::scope::{self, Scope};

use super::children::next_rotation;

/// The (audience, scopes) pairs a run holds.
pub type Held = Vec<(String, Vec<Scope>)>;

/// What the reconciler saw of a run.
#[derive(Clone, Debug)]
pub struct Observed {
    pub now: Timestamp,
    /// The run's uid (the seed of its rotation times).
    pub uid: String,
    /// The status as cached (a report: never read back as authority).
    pub status: AgentRunStatus,
    /// The cached status is behind one this process wrote (its watch event is on the way).
    pub cache_behind: bool,
    /// The run is being deleted.
    pub deleting: bool,
    /// The run asked the token endpoint to revoke it (the revoke annotation).
    pub revoke_requested: bool,
    /// Deputy ended the run, for this reason (the ended annotation), whatever the status says.
    pub ended: Option<End>,
    /// The authorisation decision, made just now (`None`: not made yet).
    pub decision: Option<Decision>,
    /// The decision was made on a fresh read of the grants, not the grant cache.
    pub fresh: bool,
    /// What the run's current token carries.
    pub token: Token,
    /// The run's children (`None`: not looked at yet).
    pub children: Option<Children>,
}

/// What the run's current token carries, as far as the reconciler read it.
#[derive(Clone, Debug, PartialEq)]
pub enum Token {
    /// Not read.
    Unread,
    /// No token that verifies with Deputy's keys and names this run.
    Invalid,
    /// The token's (audience, scopes) pairs.
    Holds(Held),
}

/// The run's children, as found under their names.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub pod: Pod,
    pub service_account: Found,
    pub secret: Found,
    /// The number of the token the run's Secret holds (its annotation, or this process's
    /// memory of its last write; 0 when unknown).
    pub secret_token: u32,
}

/// The run's pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub found: Found,
    /// How it ended, if it has (`runs::pod_end`).
    pub end: Option<End>,
    /// Its phase is `Running`.
    pub running: bool,
    /// It carries the `managed-by` label the pod cache selects on.
    pub labelled: bool,
}

impl Pod {
    pub fn absent() -> Pod {
        Pod { found: Found::Absent, end: None, running: false, labelled: false }
    }
}

/// What to observe before the plan can decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Decide from the caches (an ended, stale or deleted run needs no decision).
    Decision,
    /// Decide again on a fresh read of the grants: the grant and run caches are separate
    /// watches, and a Deny grant created just before the run must never lose that race.
    FreshGrants,
    /// Read what the run's current token carries (the status only hints at it).
    Token,
    /// Look at the run's children.
    Children,
}

impl Need {
    /// How many needs there are: the plan asks for each at most once per reconcile.
    pub const COUNT: usize = 4;
}

/// Which child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Child {
    Pod,
    ServiceAccount,
    Secret,
}

impl Child {
    /// Its kind, as the API server names it.
    pub fn kind(self) -> &'static str {
        match self {
            Child::Pod => "Pod",
            Child::ServiceAccount => "ServiceAccount",
            Child::Secret => "Secret",
        }
    }
}

/// Why a token is minted for an active run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mint {
    /// The current token reached its rotation time.
    Rotation,
    /// The run's Secret is gone.
    SecretMissing,
    /// The Secret holds a token the status does not record (Deputy stopped, or its status
    /// write failed, between the two writes): a new one, recorded, takes its place.
    Unrecorded,
}

impl Mint {
    pub fn as_str(self) -> &'static str {
        match self {
            Mint::Rotation => "Rotation",
            Mint::SecretMissing => "SecretMissing",
            Mint::Unrecorded => "Unrecorded",
        }
    }
}

/// What to do with the pod of an active run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodStep {
    Leave,
    /// It is missing (e.g. the operator stopped before creating it): create it again.
    Recreate,
    /// It runs: the run moves from `Authorized` to `Running`.
    MarkRunning,
}

/// The work that keeps an active run going.
#[derive(Clone, Debug, PartialEq)]
pub struct Keep {
    pub auth: Authorization,
    /// The run's own pod lost its `managed-by` label: put it back (at this uid).
    pub relabel_pod: Option<String>,
    pub pod: PodStep,
    /// The ServiceAccount is missing: create it.
    pub create_service_account: bool,
    pub mint: Option<Mint>,
    /// How many tokens the run has had so far ([`tokens_written`]): a new one is numbered
    /// after them, and the status's `rotations` becomes this.
    pub tokens: u32,
}

/// The next step for a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Observe more, then plan again.
    Observe(Need),
    /// The cache is behind Deputy's own last write: do nothing until the write's watch event.
    WaitForCache,
    /// The status of an ended run was written back to a live phase: it stays ended.
    Tampered,
    /// The run ended but its credentials may still exist (Deputy stopped mid-way): remove them
    /// (and the pod when asked) and record `revokedAt`.
    FinishEnd { stop_pod: bool },
    /// Nothing to do until something changes.
    Idle,
    /// End the run.
    End(End, String),
    /// Authorise the pending run: create its children and mint its first token.
    Authorize(Authorization),
    /// The pending run waits for something it names.
    Wait(Refusal),
    /// Deny the pending run for good.
    Deny(Refusal),
    /// A child's name is held by an object the run does not own.
    Taken { child: Child, leaving: bool },
    /// Keep the active run going.
    Keep(Keep),
}

/// The next step for the run `o` describes.
pub fn plan(o: &Observed) -> Step {
    let phase = o.status.phase.unwrap_or(RunPhase::Pending);
    // Before the cache check: a stale copy of Deputy's own writes never shows `completedAt`
    // with a live phase (the terminal phase is written with it), so this is someone else's.
    if status_regressed(&o.status) {
        return Step::Tampered;
    }
    // Deputy marked the run ended, yet its status shows no end: Deputy stopped between the mark
    // and the status, or someone wrote the status back (completedAt and revokedAt removed too).
    // Either way the run ends again, for the reason it ended.
    if let Some(end) = o.ended
        && !phase.is_terminal()
    {
        return ended(end);
    }
    if o.cache_behind {
        return Step::WaitForCache;
    }
    if phase.is_terminal() {
        if o.status.revoked_at.is_some() || phase == RunPhase::Denied {
            return Step::Idle;
        }
        // The pod is kept only when the recorded reason says it ended by itself.
        let stop_pod = o.status.reason.as_deref().and_then(End::parse).is_none_or(End::stops_pod);
        return Step::FinishEnd { stop_pod };
    }
    if o.deleting {
        return Step::Idle;
    }
    let active = phase.is_active();
    if active && o.revoke_requested {
        return ended(End::SelfRevoked);
    }
    let Some(decision) = &o.decision else { return Step::Observe(Need::Decision) };
    match (decision, active) {
        // The deadline is the decision's (from the run's creation), never the status's.
        (Decision::Authorized(auth), _) if o.now >= auth.deadline => ended(End::DeadlineExceeded),
        (Decision::Authorized(_), false) if !o.fresh => Step::Observe(Need::FreshGrants),
        (Decision::Authorized(auth), false) => Step::Authorize(auth.clone()),
        (Decision::Denied(refusal), false) if refusal.reason.is_transient() => Step::Wait(refusal.clone()),
        (Decision::Denied(refusal), false) => Step::Deny(refusal.clone()),
        (Decision::Denied(refusal), true) => Step::End(End::lost(refusal.reason), refusal.message.clone()),
        (Decision::Authorized(auth), true) => keep_active(o, auth),
    }
}

fn ended(why: End) -> Step {
    Step::End(why, why.message().to_string())
}

fn keep_active(o: &Observed, auth: &Authorization) -> Step {
    // What the run holds is what its current token, signed by Deputy, carries (as minted by
    // this process, or read from the token once): never the status, which anyone allowed to
    // write it could narrow to hide a pair the grants no longer give.
    match &o.token {
        Token::Unread => return Step::Observe(Need::Token),
        Token::Holds(held) => {
            if let Some(why) = authority_reduced(held, auth) {
                return Step::End(End::AuthorityReduced, why);
            }
        }
        // No token of this run's to compare with: the next mint carries only the decision's.
        Token::Invalid => {}
    }
    let Some(children) = &o.children else { return Step::Observe(Need::Children) };
    let running = o.status.phase == Some(RunPhase::Running);

    let mut relabel_pod = None;
    let pod = match &children.pod.found {
        Found::Foreign { leaving } => return Step::Taken { child: Child::Pod, leaving: *leaving },
        Found::Ours { uid } => {
            if let Some(end) = children.pod.end {
                return ended(end);
            }
            if !children.pod.labelled {
                relabel_pod = Some(uid.clone());
            }
            if o.status.phase == Some(RunPhase::Authorized) && children.pod.running {
                PodStep::MarkRunning
            } else {
                PodStep::Leave
            }
        }
        Found::Absent if running => return ended(End::PodDeleted),
        Found::Absent => PodStep::Recreate,
    };
    if let Found::Foreign { leaving } = children.service_account {
        return Step::Taken { child: Child::ServiceAccount, leaving };
    }
    if let Found::Foreign { leaving } = children.secret {
        return Step::Taken { child: Child::Secret, leaving };
    }
    let tokens = tokens_written(&o.status, children.secret_token);
    let mint = if !can_mint(o.now, auth.deadline) {
        None
    } else if children.secret == Found::Absent {
        Some(Mint::SecretMissing)
    } else if tokens > tokens_recorded(&o.status) {
        Some(Mint::Unrecorded)
    } else if rotation_due(&o.status, auth.deadline, &o.uid, o.now) {
        Some(Mint::Rotation)
    } else {
        None
    };
    Step::Keep(Keep {
        auth: auth.clone(),
        relabel_pod,
        pod,
        create_service_account: children.service_account == Found::Absent,
        mint,
        tokens,
    })
}

/// The tokens the status records: its first and its rotations.
fn tokens_recorded(status: &AgentRunStatus) -> u32 {
    if status.token_issued_at.is_some() { status.rotations.saturating_add(1) } else { 0 }
}

/// How many tokens the run has had written: what the status records, or the number of the one
/// its Secret holds when that is higher (a write whose status was lost). Every token written is
/// counted, so `rotations + 1` bounds the tokens a run ever had.
pub fn tokens_written(status: &AgentRunStatus, secret_token: u32) -> u32 {
    tokens_recorded(status).max(secret_token)
}

/// Whether a token minted now could outlive `now` (tokens carry whole seconds, and one is
/// capped by the deadline): a token born expired is never minted; the last one simply lasts.
pub fn can_mint(now: Timestamp, deadline: Timestamp) -> bool {
    deadline.as_second() > now.as_second()
}

/// Whether the current token (per the status Deputy wrote) is due for rotation.
fn rotation_due(status: &AgentRunStatus, deadline: Timestamp, uid: &str, now: Timestamp) -> bool {
    match (status.token_issued_at, status.token_expires_at) {
        (Some(iat), Some(exp)) => {
            next_rotation(iat, exp, deadline, uid, status.rotations + 1).is_some_and(|at| now >= at)
        }
        _ => true,
    }
}

/// When the reconciler must look at the run again, whatever else happens: the current token's
/// rotation, the deadline, or the next change of a grant's time window.
pub fn wake_at(status: &AgentRunStatus, uid: &str, grant_change: Option<Timestamp>) -> Option<Timestamp> {
    let rotation = match (status.token_issued_at, status.token_expires_at, status.deadline) {
        (Some(iat), Some(exp), Some(deadline)) => next_rotation(iat, exp, deadline, uid, status.rotations + 1),
        _ => None,
    };
    [rotation, status.deadline, grant_change].into_iter().flatten().min()
}

/// Whether a status says the run ended (`completedAt`, `revokedAt`) yet shows a live or
/// pending phase: only a write by someone else does that (Deputy sets the terminal phase in
/// the same write as `completedAt`).
pub fn status_regressed(status: &AgentRunStatus) -> bool {
    let ended = status.completed_at.is_some() || status.revoked_at.is_some();
    ended && !status.phase.is_some_and(RunPhase::is_terminal)
}

/// An active run keeps only what it was given; if its grants now give less, it is revoked
/// rather than silently narrowed (its tokens already carry the old pairs).
pub fn authority_reduced(held: &Held, auth: &Authorization) -> Option<String> {
    for (aud, scopes) in held {
        let Some((_, now_held)) = auth.authority.iter().find(|(a, _)| a == aud) else {
            return Some(format!("audience {aud} is no longer granted"));
        };
        if let Some(lost) = scopes.iter().find(|s| !scope::covered_by(s, now_held)) {
            return Some(format!("scope {lost} is no longer granted for audience {aud}"));
        }
    }
    None
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
