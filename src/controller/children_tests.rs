//! Unit tests of the child builders and rotation times.

use jiff::{SignedDuration, Timestamp};
use kube::api::ObjectMeta;
use serde_json::json;

use super::*;
use crate::authorization::Authorization;
use crate::resources::{AgentRunSpec, AgentSpec, RunEnvVar};
use crate::scope::Scope;

fn now() -> Timestamp {
    "2026-11-23T12:00:00Z".parse().unwrap()
}

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

fn agent(automount: bool) -> Agent {
    agent_with(template(), automount)
}

fn agent_with(template: serde_json::Value, automount: bool) -> Agent {
    Agent {
        metadata: ObjectMeta { name: Some("gdpr".into()), namespace: Some("marketing".into()), ..Default::default() },
        spec: AgentSpec {
            description: None,
            scopes: vec!["a:*".into()],
            audiences: vec!["svc".into()],
            max_token_ttl: "15m".into(),
            template,
            automount_service_account_token: automount,
        },
        status: None,
    }
}

fn auth() -> Authorization {
    Authorization {
        identity: "spiffe://cluster.local/ns/marketing/agent/gdpr/run/gdpr-check-q4".into(),
        authority: vec![("svc".into(), vec![Scope::parse("a:b").unwrap()])],
        scopes: vec![Scope::parse("a:b").unwrap()],
        audiences: vec!["svc".into()],
        denied_scopes: vec![],
        token_ttl: SignedDuration::from_mins(10),
        started_at: now(),
        deadline: now() + SignedDuration::from_mins(30),
        grants: vec!["g".into()],
        delegation_chain: vec![
            "alice@example.com".into(),
            "spiffe://cluster.local/ns/marketing/agent/gdpr/run/gdpr-check-q4".into(),
        ],
        remaining_delegation_depth: 0,
    }
}

fn cfg() -> ChildConfig {
    ChildConfig {
        issuer: "https://deputy.deputy-system.svc".into(),
        token_endpoint: "https://deputy.deputy-system.svc/token".into(),
    }
}

fn template() -> serde_json::Value {
    json!({
        "metadata": {"labels": {"team": "privacy", "app.kubernetes.io/managed-by": "someone-else"}},
        "spec": {
            "serviceAccountName": "default",
            "initContainers": [{"name": "init", "image": "img"}],
            "containers": [{"name": "agent", "image": "img", "env": [{"name": "DEPUTY_TOKEN_FILE", "value": "/tmp/forged"}, {"name": "KEEP", "value": "1"}]}],
        }
    })
}

#[test]
fn every_run_name_deputy_accepts_names_its_children_unshortened() {
    // So two runs never share a child: the old collision was a long name shortened to
    // `<prefix>-<hash>`, which a second run could take as its own name.
    for len in [1, 100, crate::authorization::MAX_RUN_NAME] {
        let name = "x".repeat(len);
        assert_eq!(child_name(&name), format!("deputy-run-{name}"));
    }
    assert_eq!(child_name(&"x".repeat(crate::authorization::MAX_RUN_NAME)).len(), 253);
}

#[test]
fn service_account_has_no_api_token_unless_the_agent_says_so() {
    let r = run();
    let sa = desired_service_account(&r, &agent(false), &auth());
    assert_eq!(sa.metadata.name.as_deref(), Some("deputy-run-gdpr-check-q4"));
    assert_eq!(sa.automount_service_account_token, Some(false));
    let owner = &sa.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("AgentRun", "gdpr-check-q4", Some(true)));
    assert_eq!(sa.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"], "deputy");
    assert_eq!(desired_service_account(&r, &agent(true), &auth()).automount_service_account_token, Some(true));
}

#[test]
fn secret_holds_token_and_run_json() {
    let r = run();
    let info = RunInfo {
        issuer: "i",
        token_endpoint: "e",
        identity: "id",
        namespace: "marketing",
        run: "gdpr-check-q4",
        principal: "alice@example.com",
        scopes: vec!["a:b".into()],
        audiences: &["svc".to_string()],
        token_file: "/var/run/secrets/deputy.dev/token".into(),
        actor_token_file: "/var/run/secrets/deputy.dev/actor-token".into(),
        token_expires_at: now(),
        next_rotation_at: now(),
        deadline: now(),
    };
    let s = desired_secret(&r, "TOKEN", 3, &info).unwrap();
    assert_eq!(crate::runs::token_number(&s.metadata), 3, "the Secret says which token it holds");
    let data = s.data.unwrap();
    assert_eq!(data["token"].0, b"TOKEN");
    let j: serde_json::Value = serde_json::from_slice(&data["run.json"].0).unwrap();
    assert_eq!(j["tokenExpiresAt"], "2026-11-23T12:00:00Z");
    assert!(j.get("nextRotationAt").is_some());
    assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
}

#[test]
fn pod_gets_identity_volume_env_and_deadline() {
    let r = run();
    let pod = desired_pod(&r, &agent(false), &auth(), &cfg(), now()).unwrap();
    let spec = pod.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("deputy-run-gdpr-check-q4"), "the template's SA is replaced");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.active_deadline_seconds, Some(1800));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let vol = spec.volumes.unwrap().into_iter().find(|v| v.name == VOLUME_NAME).unwrap();
    let sources = vol.projected.unwrap().sources.unwrap();
    assert_eq!(sources[0].secret.as_ref().unwrap().name, "deputy-run-gdpr-check-q4");
    let sat = sources[1].service_account_token.as_ref().unwrap();
    assert_eq!(sat.audience.as_deref(), Some("https://deputy.deputy-system.svc"));
    assert_eq!(sat.path, "actor-token");
    assert_eq!(sat.expiration_seconds, Some(600));
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let m = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == VOLUME_NAME).unwrap();
        assert_eq!((m.mount_path.as_str(), m.read_only), (MOUNT_PATH, Some(true)));
        let env = c.env.as_ref().unwrap();
        let file: Vec<_> = env.iter().filter(|e| e.name == "DEPUTY_TOKEN_FILE").collect();
        assert_eq!(file.len(), 1, "our variable replaces a forged one");
        assert_eq!(file[0].value.as_deref(), Some("/var/run/secrets/deputy.dev/token"));
        assert!(env.iter().any(|e| e.name == "DEPUTY_TOKEN_ENDPOINT"));
    }
    assert!(spec.containers[0].env.as_ref().unwrap().iter().any(|e| e.name == "KEEP"));
    let labels = pod.metadata.labels.unwrap();
    assert_eq!(labels["team"], "privacy");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "deputy", "our labels win");
    assert_eq!(labels[RUN_LABEL], "gdpr-check-q4");
}

#[test]
fn templates_that_cannot_be_honoured_are_refused() {
    let cases = [
        (
            "restartPolicy Always",
            json!({"spec": {"restartPolicy": "Always", "containers": [{"name": "a", "image": "img"}]}}),
        ),
        (
            "reserved volume",
            json!({"spec": {"volumes": [{"name": "deputy-token", "emptyDir": {}}], "containers": [{"name": "a", "image": "img"}]}}),
        ),
        (
            "mount path taken",
            json!({"spec": {"containers": [{"name": "a", "image": "img", "volumeMounts": [{"name": "x", "mountPath": "/var/run/secrets/deputy.dev/"}]}]}}),
        ),
        ("not a pod template", json!({"spec": {"containers": "nope"}})),
        ("no spec", json!({"metadata": {}})),
    ];
    for (name, t) in cases {
        assert!(desired_pod(&run(), &agent_with(t, false), &auth(), &cfg(), now()).is_err(), "{name}");
    }
}

#[test]
fn a_shorter_own_deadline_is_kept() {
    let t = json!({"spec": {"activeDeadlineSeconds": 60, "containers": [{"name": "a", "image": "img"}]}});
    let pod = desired_pod(&run(), &agent_with(t, false), &auth(), &cfg(), now()).unwrap();
    assert_eq!(pod.spec.unwrap().active_deadline_seconds, Some(60));
}

#[test]
fn rotation_is_at_half_life_with_bounded_jitter_spread_across_runs() {
    let iat = now();
    let exp = iat + SignedDuration::from_mins(10);
    let mut seconds = std::collections::HashSet::new();
    for i in 0..1000 {
        let at = rotation_at(iat, exp, &format!("uid-{i}"), 1);
        let off = at.as_second() - iat.as_second();
        assert!((300..360).contains(&off), "{off}");
        seconds.insert(off);
        assert_eq!(at, rotation_at(iat, exp, &format!("uid-{i}"), 1), "stable across reconciles");
    }
    assert!(seconds.len() >= 50, "1000 runs rotate over {} distinct seconds", seconds.len());
    assert!(rotation_at(iat, exp, "u", 1) < exp);
}

/// A run's whole life, minted the way the controller mints (`exp = min(iat + ttl,
/// deadline)`, the next mint at `next_rotation`), without a clock: the number of mints is
/// about its lifetime over half its TTL, none in a loop before the deadline (D1: one run was
/// re-minted ~180 times in its last second), and no token is minted already expired.
#[test]
fn a_run_is_reminted_about_every_half_ttl_and_its_last_token_lives_until_the_deadline() {
    let cases = [
        // (ttl s, lifetime s, most mints)
        (30, 60, 4),
        (30, 61, 4),
        (30, 89, 5),
        (10, 3600, 720),
        (600, 600, 1),
        (600, 300, 1),
        (30, 31, 2),
        // Below the CRD's 30 s minimum, still no loop.
        (2, 5, 4),
    ];
    for (ttl, life, most) in cases {
        for run in 0..50 {
            let uid = format!("uid-{run}");
            let start = now();
            let deadline = start + SignedDuration::from_secs(life);
            let (mut t, mut mints, mut last_5s) = (start, 0u32, 0u32);
            loop {
                let exp = (t + SignedDuration::from_secs(ttl)).min(deadline);
                assert!(exp > t, "ttl {ttl} life {life}: a token minted at {t} expires at {exp}");
                mints += 1;
                if deadline.as_second() - t.as_second() < 5 {
                    last_5s += 1;
                }
                assert!(mints <= most, "ttl {ttl} life {life} {uid}: more than {most} mints");
                match next_rotation(t, exp, deadline, &uid, mints) {
                    Some(next) if next < deadline => {
                        assert!(next > t && next <= exp, "rotation at {next} for a token of {t}..{exp}");
                        t = next;
                    }
                    _ => break,
                }
            }
            if ttl >= 10 {
                assert!(last_5s <= 2, "ttl {ttl} life {life}: {last_5s} mints in the last 5 s");
            }
        }
    }
    // The last token is never rotated.
    let (iat, deadline) = (now(), now() + SignedDuration::from_secs(20));
    assert_eq!(next_rotation(iat, deadline, deadline, "u", 3), None);
    assert!(next_rotation(iat, deadline - SignedDuration::from_secs(1), deadline, "u", 3).is_some());
}

#[test]
fn a_run_adds_only_args_and_plain_env_to_the_agents_first_container() {
    let mut r = run();
    r.spec.args = vec!["--campaign".into(), "q4".into()];
    r.spec.env = vec![RunEnvVar { name: "CAMPAIGN".into(), value: "q4".into() }];
    let a = agent(false);
    let pod = desired_pod(&r, &a, &auth(), &cfg(), now()).unwrap();
    let spec = pod.spec.unwrap();
    assert_eq!(spec.containers.len(), 1);
    assert_eq!(spec.containers[0].args.as_deref(), Some(&["--campaign".to_string(), "q4".to_string()][..]));
    let env = spec.containers[0].env.as_ref().unwrap();
    assert!(env.iter().any(|e| e.name == "CAMPAIGN" && e.value.as_deref() == Some("q4") && e.value_from.is_none()));
    assert!(spec.init_containers.unwrap()[0].env.as_ref().unwrap().iter().all(|e| e.name != "CAMPAIGN"));
    // Only the Agent's volumes and Deputy's.
    let volumes: Vec<String> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(volumes, [VOLUME_NAME]);

    for (name, bad) in [("DEPUTY_TOKEN_FILE", "reserved for Deputy"), ("KEEP", "set by the Agent")] {
        let mut r = run();
        r.spec.env = vec![RunEnvVar { name: name.into(), value: "/tmp/forged".into() }];
        let err = desired_pod(&r, &a, &auth(), &cfg(), now()).unwrap_err();
        assert!(err.to_string().contains(bad), "{name}: {err}");
    }
}
