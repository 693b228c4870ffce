//! Table tests of the plan: every row of the README's revocation table, every Pending reason,
//! the rotation edges (the last seconds before a deadline, a missing Secret, a stale cache).

use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::authorization::{Reason, Refusal};
use crate::resources::GrantedAuthority;

fn t0() -> Timestamp {
    "2026-11-23T12:00:00Z".parse().unwrap()
}

fn secs(s: i64) -> SignedDuration {
    SignedDuration::from_secs(s)
}

/// An authorisation for `svc` with `a:b`, a 30 s token, a deadline 60 s after t0.
fn auth() -> Authorization {
    Authorization {
        identity: "spiffe://cluster.local/ns/ns/agent/a/run/r1".into(),
        authority: vec![("svc".into(), vec![Scope::parse("a:b").unwrap()])],
        scopes: vec![Scope::parse("a:b").unwrap()],
        audiences: vec!["svc".into()],
        denied_scopes: vec![],
        token_ttl: secs(30),
        started_at: t0(),
        deadline: t0() + secs(60),
        grants: vec!["g".into()],
        delegation_chain: vec!["alice@example.com".into(), "spiffe://cluster.local/ns/ns/agent/a/run/r1".into()],
        remaining_delegation_depth: 0,
    }
}

fn refused(reason: Reason) -> Option<Decision> {
    Some(Decision::Denied(Refusal { reason, message: format!("refused: {}", reason.as_str()), denied_scopes: vec![] }))
}

fn ours() -> Found {
    Found::Ours { uid: "child-1".into() }
}

fn all_there(pod_running: bool) -> Children {
    Children {
        pod: Pod { found: ours(), end: None, running: pod_running, labelled: true },
        service_account: ours(),
        secret: ours(),
        secret_token: 1,
    }
}

/// A run in `phase`, whose status records the decision of `auth()` and a token issued at t0.
fn status(phase: RunPhase) -> AgentRunStatus {
    let mut s = AgentRunStatus { phase: Some(phase), ..Default::default() };
    if phase.is_active() {
        auth().record_in(&mut s);
        s.token_issued_at = Some(t0());
        s.token_expires_at = Some(t0() + secs(30));
        s.rotations = 0;
    }
    s
}

/// A pending run (from the caches, not yet confirmed on fresh grants), authorised.
fn pending() -> Observed {
    Observed {
        now: t0() + secs(1),
        uid: "uid-1".into(),
        status: AgentRunStatus::default(),
        cache_behind: false,
        deleting: false,
        revoke_requested: false,
        ended: None,
        decision: Some(Decision::Authorized(auth())),
        fresh: false,
        token: Token::Unread,
        children: None,
    }
}

/// An active (running) run with all its children, its token fresh.
fn running() -> Observed {
    Observed {
        status: status(RunPhase::Running),
        children: Some(all_there(true)),
        token: Token::Holds(auth().authority),
        ..pending()
    }
}

fn ends(step: &Step) -> Option<End> {
    match step {
        Step::End(why, _) => Some(*why),
        _ => None,
    }
}

fn keep(step: Step) -> Keep {
    match step {
        Step::Keep(k) => k,
        other => panic!("expected Keep, got {other:?}"),
    }
}

#[test]
fn every_trigger_in_the_revocation_table_ends_an_active_run_with_its_reason() {
    let with_pod = |end: Option<End>, found: Found| Observed {
        children: Some(Children { pod: Pod { found, end, running: false, labelled: true }, ..all_there(false) }),
        ..running()
    };
    let cases: Vec<(&str, Observed, End, RunPhase)> = vec![
        ("the pod succeeded", with_pod(Some(End::PodSucceeded), ours()), End::PodSucceeded, RunPhase::Succeeded),
        ("the pod failed", with_pod(Some(End::PodFailed), ours()), End::PodFailed, RunPhase::Failed),
        ("the pod is being deleted", with_pod(Some(End::PodDeleted), ours()), End::PodDeleted, RunPhase::Failed),
        ("the pod is gone while running", with_pod(None, Found::Absent), End::PodDeleted, RunPhase::Failed),
        (
            "maxDuration passed",
            Observed { now: t0() + secs(60), ..running() },
            End::DeadlineExceeded,
            RunPhase::Expired,
        ),
        (
            "the grant was deleted",
            Observed { decision: refused(Reason::NoGrant), ..running() },
            End::GrantDeleted,
            RunPhase::Revoked,
        ),
        (
            "the grant expired",
            Observed { decision: refused(Reason::GrantExpired), ..running() },
            End::GrantExpired,
            RunPhase::Revoked,
        ),
        (
            "the grant's notBefore moved ahead",
            Observed { decision: refused(Reason::GrantNotYetValid), ..running() },
            End::GrantNotYetValid,
            RunPhase::Revoked,
        ),
        (
            "a Deny grant appeared",
            Observed { decision: refused(Reason::DeniedByGrant), ..running() },
            End::DeniedByGrant,
            RunPhase::Revoked,
        ),
        (
            "the grants now give less than the token carries",
            Observed {
                token: Token::Holds(auth().authority),
                decision: Some(Decision::Authorized(narrower())),
                ..running()
            },
            End::AuthorityReduced,
            RunPhase::Revoked,
        ),
        (
            "the Agent was deleted",
            Observed { decision: refused(Reason::AgentDeleted), ..running() },
            End::AgentDeleted,
            RunPhase::Revoked,
        ),
        (
            "the Agent is gone",
            Observed { decision: refused(Reason::AgentNotFound), ..running() },
            End::AgentDeleted,
            RunPhase::Revoked,
        ),
        (
            "the parent run ended",
            Observed { decision: refused(Reason::ParentNotActive), ..running() },
            End::ParentEnded,
            RunPhase::Revoked,
        ),
        (
            "the parent run is gone",
            Observed { decision: refused(Reason::ParentNotFound), ..running() },
            End::ParentEnded,
            RunPhase::Revoked,
        ),
        (
            "the run called POST /revoke",
            Observed { revoke_requested: true, ..running() },
            End::SelfRevoked,
            RunPhase::Revoked,
        ),
    ];
    for (what, o, want, phase) in cases {
        let step = plan(&o);
        assert_eq!(ends(&step), Some(want), "{what}: {step:?}");
        assert_eq!(want.phase(), phase, "{what}");
    }
}

/// `auth()` without the `a:b` scope for `svc` (it holds `a:c` there now).
fn narrower() -> Authorization {
    let c = Scope::parse("a:c").unwrap();
    Authorization { authority: vec![("svc".into(), vec![c.clone()])], scopes: vec![c], ..auth() }
}

#[test]
fn a_shrunk_authority_is_read_from_the_token_not_believed_from_the_status() {
    // What the token carries is not known (a restarted operator): the plan reads it first,
    // whatever the status says.
    let o = Observed { token: Token::Unread, ..running() };
    assert_eq!(plan(&o), Step::Observe(Need::Token));
    let o = Observed { decision: Some(Decision::Authorized(narrower())), ..o };
    assert_eq!(plan(&o), Step::Observe(Need::Token));
    // A token that does not verify (or names another run) proves nothing: the run goes on,
    // and its next token carries only the decision's pairs.
    let o = Observed { token: Token::Invalid, ..o };
    assert!(matches!(plan(&o), Step::Keep(_)), "{:?}", plan(&o));
    // A tenant who narrowed the status to match a narrower grant changes nothing: the token
    // still carries the old pair, and the run is revoked.
    let mut narrowed = status(RunPhase::Running);
    narrowed.granted_authority = vec![GrantedAuthority { audience: "svc".into(), scopes: vec!["a:c".into()] }];
    let o = Observed { status: narrowed, decision: Some(Decision::Authorized(narrower())), ..running() };
    assert_eq!(ends(&plan(&o)), Some(End::AuthorityReduced), "{:?}", plan(&o));
    // A status claiming more than the token carries does not revoke the run either.
    let mut wider = status(RunPhase::Running);
    wider.granted_authority.push(GrantedAuthority { audience: "other".into(), scopes: vec!["x:y".into()] });
    let o = Observed { status: wider, ..running() };
    assert!(matches!(plan(&o), Step::Keep(_)), "{:?}", plan(&o));
}

#[test]
fn a_grant_expiring_is_reported_as_such_not_as_the_deadline_it_bounded() {
    // The grant's expiresAt bounds the deadline. At that moment the engine no longer
    // authorises the run (GrantExpired), so the plan never sees an Authorized decision past
    // that deadline: the run ends GrantExpired.
    let at = t0() + secs(60);
    let o = Observed { now: at, decision: refused(Reason::GrantExpired), ..running() };
    assert_eq!(ends(&plan(&o)), Some(End::GrantExpired));
    // Only an authorised run past its deadline ends DeadlineExceeded.
    let o = Observed { now: at, ..running() };
    assert_eq!(ends(&plan(&o)), Some(End::DeadlineExceeded));
}

#[test]
fn every_pending_reason_waits_and_every_other_refusal_denies() {
    let waits = [
        Reason::AgentNotFound,
        Reason::NoGrant,
        Reason::GrantNotYetValid,
        Reason::ParentNotFound,
        Reason::ParentPending,
        Reason::AudienceNotRegistered,
    ];
    let denies = [
        Reason::InvalidSpec,
        Reason::AgentDeleted,
        Reason::InvalidAgent,
        Reason::GrantExpired,
        Reason::DeniedByGrant,
        Reason::InvalidDenyGrant,
        Reason::NoScopesGranted,
        Reason::NoAudienceGranted,
        Reason::ReservedNamespace,
        Reason::ParentNotActive,
        Reason::ParentPrincipalMismatch,
        Reason::DelegationDepthExceeded,
    ];
    for r in waits {
        assert!(
            matches!(plan(&Observed { decision: refused(r), ..pending() }), Step::Wait(x) if x.reason == r),
            "{r:?}"
        );
    }
    for r in denies {
        assert!(
            matches!(plan(&Observed { decision: refused(r), ..pending() }), Step::Deny(x) if x.reason == r),
            "{r:?}"
        );
    }
}

#[test]
fn a_pending_run_is_authorised_only_on_a_fresh_read_of_the_grants() {
    assert_eq!(plan(&pending()), Step::Observe(Need::FreshGrants));
    assert_eq!(plan(&Observed { fresh: true, ..pending() }), Step::Authorize(auth()));
    // The fresh read found a Deny grant the cache had not seen yet.
    let o = Observed { fresh: true, decision: refused(Reason::DeniedByGrant), ..pending() };
    assert!(matches!(plan(&o), Step::Deny(_)));
    // A pending run past its deadline (it waited too long) expires rather than starting.
    let o = Observed { now: t0() + secs(61), fresh: true, ..pending() };
    assert_eq!(ends(&plan(&o)), Some(End::DeadlineExceeded));
}

#[test]
fn ended_stale_deleted_and_tampered_runs() {
    let ended = |phase: RunPhase, reason: Option<&str>, revoked: bool| {
        let mut s = status(phase);
        s.reason = reason.map(str::to_string);
        s.completed_at = Some(t0());
        s.revoked_at = revoked.then_some(t0());
        Observed { status: s, ..running() }
    };
    let cases: Vec<(&str, Observed, Step)> = vec![
        ("a stale cache", Observed { cache_behind: true, ..running() }, Step::WaitForCache),
        ("ended, credentials gone", ended(RunPhase::Revoked, Some("GrantDeleted"), true), Step::Idle),
        ("denied", ended(RunPhase::Denied, Some("DeniedByGrant"), false), Step::Idle),
        // Deputy stopped between the terminal status and revokedAt.
        ("revoked mid-way", ended(RunPhase::Revoked, Some("GrantDeleted"), false), Step::FinishEnd { stop_pod: true }),
        (
            "succeeded mid-way",
            ended(RunPhase::Succeeded, Some("PodSucceeded"), false),
            Step::FinishEnd { stop_pod: false },
        ),
        (
            "a child conflict mid-way",
            ended(RunPhase::Failed, Some("ChildConflict"), false),
            Step::FinishEnd { stop_pod: true },
        ),
        // A reason Deputy never writes: the safe side is to stop the pod.
        ("an unknown reason", ended(RunPhase::Failed, Some("Whatever"), false), Step::FinishEnd { stop_pod: true }),
        ("being deleted", Observed { deleting: true, ..running() }, Step::Idle),
        // Written back to a live phase by someone else: checked before the cache.
        (
            "tampered",
            Observed {
                status: AgentRunStatus { completed_at: Some(t0()), ..status(RunPhase::Running) },
                cache_behind: true,
                ..running()
            },
            Step::Tampered,
        ),
    ];
    for (what, o, want) in cases {
        assert_eq!(plan(&o), want, "{what}");
    }
}

#[test]
fn an_active_run_follows_its_pod_and_recreates_what_is_missing() {
    let base = || Observed { status: status(RunPhase::Authorized), children: Some(all_there(false)), ..running() };
    let k = keep(plan(&base()));
    assert_eq!((k.pod, k.relabel_pod.clone(), k.create_service_account, k.mint), (PodStep::Leave, None, false, None));
    // The pod runs: so does the run.
    let o = Observed { children: Some(all_there(true)), ..base() };
    assert_eq!(keep(plan(&o)).pod, PodStep::MarkRunning);
    // The pod never created (the operator stopped first) is created again.
    let o = Observed { children: Some(Children { pod: Pod::absent(), ..all_there(false) }), ..base() };
    assert_eq!(keep(plan(&o)).pod, PodStep::Recreate);
    // The pod lost the label the cache selects on.
    let unlabelled = Pod { found: ours(), end: None, running: true, labelled: false };
    let o = Observed { children: Some(Children { pod: unlabelled, ..all_there(true) }), ..running() };
    assert_eq!(keep(plan(&o)).relabel_pod.as_deref(), Some("child-1"));
    // A missing ServiceAccount is created; a missing Secret is a mint at once.
    let o = Observed {
        children: Some(Children { service_account: Found::Absent, secret: Found::Absent, ..all_there(true) }),
        ..running()
    };
    let k = keep(plan(&o));
    assert_eq!((k.create_service_account, k.mint), (true, Some(Mint::SecretMissing)));
    // The children are looked at only once the run's authority is settled.
    assert_eq!(plan(&Observed { children: None, ..running() }), Step::Observe(Need::Children));
}

#[test]
fn a_child_name_held_by_someone_else_is_never_written() {
    let cases = [
        (
            Children { pod: Pod { found: Found::Foreign { leaving: false }, ..Pod::absent() }, ..all_there(true) },
            Child::Pod,
            false,
        ),
        (
            Children { service_account: Found::Foreign { leaving: true }, ..all_there(true) },
            Child::ServiceAccount,
            true,
        ),
        (Children { secret: Found::Foreign { leaving: false }, ..all_there(true) }, Child::Secret, false),
    ];
    for (children, child, leaving) in cases {
        let o = Observed { children: Some(children), ..running() };
        assert_eq!(plan(&o), Step::Taken { child, leaving }, "{child:?}");
    }
}

#[test]
fn rotation_is_due_at_about_half_life_and_never_loops_before_the_deadline() {
    let at = |now: Timestamp, iat: Timestamp, exp: Timestamp, deadline: Timestamp| {
        let mut s = status(RunPhase::Running);
        s.token_issued_at = Some(iat);
        s.token_expires_at = Some(exp);
        s.deadline = Some(deadline);
        let a = Authorization { deadline, ..auth() };
        keep(plan(&Observed { now, status: s, decision: Some(Decision::Authorized(a)), ..running() })).mint
    };
    let (iat, exp, deadline) = (t0(), t0() + secs(30), t0() + secs(60));
    // Half of 30 s is 15 s, plus a jitter of at most 3 s.
    assert_eq!(at(t0() + secs(14), iat, exp, deadline), None);
    assert_eq!(at(t0() + secs(19), iat, exp, deadline), Some(Mint::Rotation));
    // D1: the last token lives until the deadline; every second before it, nothing is due.
    let last = (t0() + secs(45), deadline);
    for s in 45..60 {
        assert_eq!(at(t0() + secs(s), last.0, last.1, deadline), None, "{s} s");
    }
    // Not even a missing Secret is minted for once the deadline's whole second has begun: a
    // token carries whole seconds and is capped by the deadline, so it would be born expired.
    let deadline = t0() + SignedDuration::from_millis(60_500);
    let mut s = status(RunPhase::Running);
    s.deadline = Some(deadline);
    let late = |now: Timestamp| Observed {
        now,
        status: s.clone(),
        decision: Some(Decision::Authorized(Authorization { deadline, ..auth() })),
        children: Some(Children { secret: Found::Absent, ..all_there(true) }),
        ..running()
    };
    assert_eq!(keep(plan(&late(t0() + SignedDuration::from_millis(60_200)))).mint, None);
    assert_eq!(keep(plan(&late(t0() + SignedDuration::from_millis(59_900)))).mint, Some(Mint::SecretMissing));
    assert!(!can_mint(t0() + SignedDuration::from_millis(60_200), deadline));
    assert!(can_mint(deadline - secs(1), deadline));
}

/// Every token written is counted, so `rotations + 1` bounds the tokens a run ever had: a
/// Secret holding a token the status does not record (Deputy stopped, or its status write
/// failed, between the two writes) is replaced at once by one numbered after it, recorded.
#[test]
fn a_token_whose_status_write_was_lost_is_counted_and_replaced() {
    // (rotations recorded, the Secret's token number, mint, tokens written so far)
    let cases = [
        (0, 1, None, 1),
        (0, 0, None, 1), // an older Secret without the annotation
        (3, 4, None, 4),
        (3, 2, None, 4), // the Secret cache is behind the status
        (0, 2, Some(Mint::Unrecorded), 2),
        (3, 6, Some(Mint::Unrecorded), 6),
    ];
    for (rotations, secret_token, mint, tokens) in cases {
        let mut st = status(RunPhase::Running);
        st.rotations = rotations;
        let o = Observed { status: st, children: Some(Children { secret_token, ..all_there(true) }), ..running() };
        let k = keep(plan(&o));
        assert_eq!((k.mint, k.tokens), (mint, tokens), "rotations {rotations}, Secret's token {secret_token}");
    }
    // Before any token is recorded (a pending run), the Secret's number is all there is.
    assert_eq!(tokens_written(&AgentRunStatus::default(), 0), 0);
    assert_eq!(tokens_written(&AgentRunStatus::default(), 1), 1);
}

#[test]
fn the_wake_up_is_the_earliest_of_rotation_deadline_and_grant_change() {
    let mut s = status(RunPhase::Running);
    s.deadline = Some(t0() + secs(60));
    let rotation = next_rotation(t0(), t0() + secs(30), t0() + secs(60), "uid-1", 1).unwrap();
    assert_eq!(wake_at(&s, "uid-1", None), Some(rotation));
    assert_eq!(wake_at(&s, "uid-1", Some(t0() + secs(5))), Some(t0() + secs(5)));
    // The last token: the deadline.
    s.token_issued_at = Some(t0() + secs(45));
    s.token_expires_at = Some(t0() + secs(60));
    assert_eq!(wake_at(&s, "uid-1", None), Some(t0() + secs(60)));
    assert_eq!(wake_at(&AgentRunStatus::default(), "uid-1", None), None);
}

#[test]
fn a_status_is_regressed_when_it_ended_but_shows_a_live_or_pending_phase() {
    let st = |phase: Option<RunPhase>, completed: bool, revoked: bool| AgentRunStatus {
        phase,
        completed_at: completed.then_some(t0()),
        revoked_at: revoked.then_some(t0()),
        ..Default::default()
    };
    let cases = [
        (st(Some(RunPhase::Authorized), false, false), false),
        (st(Some(RunPhase::Running), false, false), false),
        (st(None, false, false), false),
        (st(Some(RunPhase::Succeeded), true, true), false),
        (st(Some(RunPhase::Revoked), true, false), false),
        (st(Some(RunPhase::Denied), true, false), false),
        (st(Some(RunPhase::Authorized), true, false), true),
        (st(Some(RunPhase::Running), false, true), true),
        (st(Some(RunPhase::Pending), true, true), true),
        (st(None, true, false), true),
    ];
    for (status, want) in cases {
        assert_eq!(status_regressed(&status), want, "{status:?}");
    }
}

#[test]
fn a_decision_is_made_only_for_a_run_that_may_act_on_it() {
    let undecided = |o: Observed| Observed { decision: None, ..o };
    assert_eq!(plan(&undecided(running())), Step::Observe(Need::Decision));
    assert_eq!(plan(&undecided(pending())), Step::Observe(Need::Decision));
    assert_eq!(plan(&undecided(Observed { cache_behind: true, ..running() })), Step::WaitForCache);
    assert_eq!(plan(&undecided(Observed { deleting: true, ..running() })), Step::Idle);
    let o = undecided(Observed { revoke_requested: true, ..running() });
    assert_eq!(ends(&plan(&o)), Some(End::SelfRevoked));
}

#[test]
fn a_run_deputy_marked_ended_never_becomes_active_again_whatever_its_status_says() {
    // The status written back to a live phase with completedAt and revokedAt removed, or
    // Deputy stopped between the mark and the status: the run ends again, for its reason,
    // however good the decision now is.
    for base in [running(), pending(), Observed { status: status(RunPhase::Authorized), ..running() }] {
        let o = Observed { ended: Some(End::GrantDeleted), ..base };
        assert_eq!(ends(&plan(&o)), Some(End::GrantDeleted), "{:?}", o.status.phase);
    }
    // A terminal status with the mark: the end is finished as usual, not ended twice.
    let mut st = status(RunPhase::Revoked);
    st.reason = Some(End::GrantDeleted.as_str().into());
    st.completed_at = Some(t0());
    let o = Observed { ended: Some(End::GrantDeleted), status: st, ..running() };
    assert_eq!(plan(&o), Step::FinishEnd { stop_pod: true });
}
