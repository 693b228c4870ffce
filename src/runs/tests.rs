//! Unit tests of the run rules both the controller and the token endpoint use.

use kube::api::ObjectMeta;
use kube::runtime::watcher;
use serde_json::json;

use super::*;
use crate::authorization::Reason;
use crate::resources::{AgentRunSpec, RunPhase};

fn run() -> AgentRun {
    AgentRun {
        metadata: ObjectMeta {
            name: Some("gdpr-check-q4".into()),
            namespace: Some("marketing".into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        },
        spec: AgentRunSpec {
            agent: "gdpr".into(),
            principal: "alice@example.com".into(),
            task: "t".into(),
            scopes: vec!["a:b".into()],
            audiences: vec!["svc".into()],
            token_ttl: None,
            max_duration: "1h".into(),
            parent_run: None,
            args: vec![],
            env: vec![],
        },
        status: None,
    }
}

fn pod(phase: &str, deleting: bool, owner_uid: &str) -> PodPhase {
    serde_json::from_value(json!({
        "metadata": {
            "name": "deputy-run-gdpr-check-q4",
            "namespace": "marketing",
            "uid": "pod-1",
            "deletionTimestamp": deleting.then_some("2026-11-23T12:00:00Z"),
            "ownerReferences": [{"apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
                                 "name": "gdpr-check-q4", "uid": owner_uid, "controller": true}],
        },
        "status": {"phase": phase},
    }))
    .unwrap()
}

#[test]
fn pod_end_maps_phase_and_deletion_to_the_run_outcome() {
    let cases = [
        ("Pending", false, None),
        ("Running", false, None),
        ("Unknown", false, None),
        ("Succeeded", false, Some((RunPhase::Succeeded, "PodSucceeded"))),
        ("Failed", false, Some((RunPhase::Failed, "PodFailed"))),
        // A finished pod that is also being deleted keeps its own outcome.
        ("Succeeded", true, Some((RunPhase::Succeeded, "PodSucceeded"))),
        ("Running", true, Some((RunPhase::Failed, "PodDeleted"))),
    ];
    for (phase, deleting, want) in cases {
        let got = pod_end(&pod(phase, deleting, "uid-1")).map(|e| (e.phase(), e.as_str()));
        assert_eq!(got, want, "{phase} deleting={deleting}");
    }
}

#[test]
fn only_an_object_the_run_controls_by_uid_is_ours() {
    let r = run();
    let meta = |uid: Option<&str>, deleting: bool, owner: serde_json::Value| -> ObjectMeta {
        serde_json::from_value(json!({
            "name": "deputy-run-gdpr-check-q4",
            "uid": uid,
            "deletionTimestamp": deleting.then_some("2026-11-23T12:00:00Z"),
            "ownerReferences": owner,
        }))
        .unwrap()
    };
    let owner = |kind: &str, uid: &str, controller: Option<bool>| {
        json!([{"apiVersion": "deputy.dev/v1alpha1", "kind": kind, "name": "gdpr-check-q4", "uid": uid,
                "controller": controller}])
    };
    let ours = || Found::Ours { uid: "obj-1".into() };
    let foreign = |leaving| Found::Foreign { leaving };
    let cases = [
        ("the run's controller reference", meta(Some("obj-1"), false, owner("AgentRun", "uid-1", Some(true))), ours()),
        ("ours and being deleted", meta(Some("obj-1"), true, owner("AgentRun", "uid-1", Some(true))), ours()),
        // A tenant's object, made before the run (no owner at all).
        ("no owner", meta(Some("obj-1"), false, json!(null)), foreign(false)),
        // A child of an earlier run of the same name: the name matches, the uid does not.
        ("an earlier run's", meta(Some("obj-1"), false, owner("AgentRun", "uid-0", Some(true))), foreign(false)),
        ("an earlier run's, leaving", meta(Some("obj-1"), true, owner("AgentRun", "uid-0", Some(true))), foreign(true)),
        // Naming the run as a mere owner (anyone can add that reference) does not make it ours.
        ("a non-controller reference", meta(Some("obj-1"), false, owner("AgentRun", "uid-1", None)), foreign(false)),
        ("controller: false", meta(Some("obj-1"), false, owner("AgentRun", "uid-1", Some(false))), foreign(false)),
        ("another kind with the uid", meta(Some("obj-1"), false, owner("Agent", "uid-1", Some(true))), foreign(false)),
        ("an object without a uid", meta(None, false, owner("AgentRun", "uid-1", Some(true))), foreign(false)),
    ];
    for (what, m, want) in cases {
        assert_eq!(found(Some(&m), &r), want, "{what}");
        assert_eq!(owned_by(&m, &r), matches!(want, Found::Ours { .. }), "{what}");
    }
    assert_eq!(found(None, &r), Found::Absent);
    // A run without a uid (never from the API server) owns nothing.
    let mut no_uid = r.clone();
    no_uid.metadata.uid = None;
    let m = meta(Some("obj-1"), false, owner("AgentRun", "", Some(true)));
    assert_eq!(found(Some(&m), &no_uid), foreign(false));
    assert!(owned_by(&pod("Running", false, "uid-1").metadata, &r));
}

#[test]
fn names_are_deterministic_and_bounded() {
    assert_eq!(child_name("gdpr-check-q4"), "deputy-run-gdpr-check-q4");
    let long = "a".repeat(253);
    let n = child_name(&long);
    assert!(n.len() <= 253);
    assert_eq!(n, child_name(&long), "deterministic");
    assert_ne!(child_name(&format!("{long}x")[1..]), n, "different runs, different names");
    assert!(label_value(&"b".repeat(100)).len() <= 63);
    assert_eq!(label_value("short"), "short");
}

fn run_in(phase: &str) -> AgentRun {
    serde_json::from_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": "r1", "namespace": "ns", "uid": "uid-1"},
        "spec": {"agent": "a", "principal": "alice@example.com", "task": "t", "scopes": ["x:y"],
                 "audiences": ["svc"], "maxDuration": "1h"},
        "status": {"phase": phase},
    }))
    .unwrap()
}

fn pods(phase: Option<&str>, owner_uid: &str) -> Store<PodPhase> {
    let (store, mut writer) = kube::runtime::reflector::store::<PodPhase>();
    if let Some(phase) = phase {
        let pod: PodPhase = serde_json::from_value(json!({
            "metadata": {"name": "deputy-run-r1", "namespace": "ns", "uid": "pod-1",
                         "ownerReferences": [{"apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
                                              "name": "r1", "uid": owner_uid, "controller": true}]},
            "status": {"phase": phase},
        }))
        .unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(pod));
    }
    store
}

#[test]
fn a_run_is_live_until_its_status_or_its_own_pod_says_it_ended() {
    let cases = [
        ("Running", Some("Running"), "uid-1", true),
        ("Authorized", None, "uid-1", true),
        ("Authorized", Some("Pending"), "uid-1", true),
        // The pod has ended but the controller has not yet ended the run: already inactive.
        ("Running", Some("Succeeded"), "uid-1", false),
        ("Running", Some("Failed"), "uid-1", false),
        // A finished pod of an earlier run with the same name does not end this one.
        ("Running", Some("Succeeded"), "uid-0", true),
        ("Succeeded", Some("Succeeded"), "uid-1", false),
        ("Denied", None, "uid-1", false),
    ];
    for (run_phase, pod_phase, owner, want) in cases {
        assert_eq!(is_live(&pods(pod_phase, owner), &run_in(run_phase)), want, "{run_phase} / {pod_phase:?} / {owner}");
    }
}

#[test]
fn a_status_written_back_to_a_live_phase_does_not_revive_a_run() {
    for field in ["completedAt", "revokedAt"] {
        let mut r = run_in("Authorized");
        let mut status = serde_json::to_value(r.status.take()).unwrap();
        status[field] = json!("2026-11-23T12:00:00Z");
        r.status = serde_json::from_value(status).unwrap();
        assert!(!is_active(&r), "{field} set: the run is dead whatever its phase");
    }
    assert!(is_active(&run_in("Running")));
}

#[test]
fn every_end_reason_is_listed_once_with_a_distinct_name() {
    let names: std::collections::BTreeSet<_> = End::ALL.iter().map(|e| e.as_str()).collect();
    assert_eq!(names.len(), End::ALL.len());
    assert_eq!(End::parse("SomethingElse"), None);
    for e in End::ALL {
        assert!(!e.message().is_empty(), "{e:?}");
        assert_eq!(End::parse(e.as_str()), Some(*e));
        assert!(e.phase().is_terminal(), "{e:?} ends in a terminal phase");
    }
}

#[test]
fn an_active_run_refused_by_a_fresh_decision_ends_with_a_listed_reason() {
    let cases = [
        (Reason::AgentNotFound, End::AgentDeleted),
        (Reason::AgentDeleted, End::AgentDeleted),
        (Reason::NoGrant, End::GrantDeleted),
        (Reason::GrantExpired, End::GrantExpired),
        (Reason::GrantNotYetValid, End::GrantNotYetValid),
        (Reason::ParentNotFound, End::ParentEnded),
        (Reason::ParentNotActive, End::ParentEnded),
        (Reason::ParentPending, End::ParentEnded),
        (Reason::DeniedByGrant, End::DeniedByGrant),
        (Reason::NoScopesGranted, End::NoScopesGranted),
    ];
    for (reason, want) in cases {
        assert_eq!(End::lost(reason), want, "{reason:?}");
        assert!(End::ALL.contains(&want));
        assert_eq!(want.phase(), RunPhase::Revoked);
    }
}

#[test]
fn only_a_run_whose_pod_ended_keeps_its_pod() {
    let cases = [
        (End::PodSucceeded, RunPhase::Succeeded, false),
        (End::PodFailed, RunPhase::Failed, false),
        (End::PodDeleted, RunPhase::Failed, false),
        // The run cannot go on: a pod of its own without credentials is stopped.
        (End::ChildConflict, RunPhase::Failed, true),
        (End::DeadlineExceeded, RunPhase::Expired, true),
        (End::SelfRevoked, RunPhase::Revoked, true),
        (End::GrantDeleted, RunPhase::Revoked, true),
    ];
    for (end, phase, stops) in cases {
        assert_eq!((end.phase(), end.stops_pod()), (phase, stops), "{end:?}");
    }
}
