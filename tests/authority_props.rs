//! Property tests of the authorisation engine (DESIGN, "Authority"): over random Agents, grant
//! sets (Allow and Deny, overlapping patterns, time windows), runs and sub-agent chains, every
//! (audience, scope) pair a run holds is consented for that audience by an Allow grant in force,
//! inside the Agent's ceiling, asked for, not covered by any Deny, and held by the parent; the
//! TTL and deadline never exceed any bound; depth strictly decreases down a chain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deputy::authorization::{Authorization, Decision, Input, Parent, Policy, authorize};
use deputy::registration::{NAMESPACE_NAME_LABEL, Registrations};
use deputy::resources::{
    Agent, AgentRun, AgentRunSpec, AgentRunStatus, AgentSpec, DelegationGrant, DelegationGrantSpec, Effect,
    NamespaceSelector, ResourceServer, ResourceServerSpec, RunPhase,
};
use deputy::scope::{self, Scope};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ObjectMeta;
use proptest::prelude::*;

const AUDIENCES: [&str; 3] = ["s1", "s2", "s3"];
const PRINCIPAL: &str = "alice@example.com";

fn now() -> Timestamp {
    "2026-11-23T12:00:00Z".parse().unwrap()
}

fn created() -> Timestamp {
    now() - SignedDuration::from_mins(20)
}

/// Scope patterns over a small alphabet, so that random sets overlap often.
fn scope_pattern_with(max_depth: usize, wild: f64) -> impl Strategy<Value = String> {
    (prop::collection::vec(prop::sample::select(vec!["x", "y"]), 1..=max_depth), prop::bool::weighted(wild)).prop_map(
        |(segs, wild)| {
            let mut s = segs.join(":");
            if wild {
                s.push_str(":*");
            }
            s
        },
    )
}

/// What runs ask for: mostly exact scopes.
fn scope_pattern() -> impl Strategy<Value = String> {
    scope_pattern_with(3, 0.1)
}

/// What ceilings and grants name: mostly broad patterns.
fn broad_pattern() -> impl Strategy<Value = String> {
    scope_pattern_with(1, 0.8)
}

fn audiences(min: usize) -> impl Strategy<Value = Vec<String>> {
    prop::sample::subsequence(AUDIENCES.to_vec(), min..=3).prop_map(|v| v.into_iter().map(String::from).collect())
}

fn duration() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["1m", "2m", "5m", "10m", "30m", "1h", "2h"]).prop_map(String::from)
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("team".into()),
        uid: Some(format!("uid-{name}")),
        creation_timestamp: Some(Time(created())),
        ..Default::default()
    }
}

/// ResourceServers for the audiences: for each, usually one with a broad ceiling, mostly
/// selecting the runs' namespace, sometimes another one; sometimes a second server.
fn servers() -> impl Strategy<Value = Vec<ResourceServer>> {
    let one = |audience: &'static str| {
        (prop::collection::vec(broad_pattern(), 1..=2), prop::bool::weighted(0.9), 0..10u8).prop_map(
            move |(scopes, here, n)| {
                let ns = if here { "team" } else { "elsewhere" };
                ResourceServer::new(
                    &format!("{audience}-{ns}-{n}"),
                    ResourceServerSpec {
                        audience: audience.to_string(),
                        scopes,
                        namespace_selector: NamespaceSelector {
                            match_labels: [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into(),
                            ..Default::default()
                        },
                        max_token_ttl: None,
                        require_dpop: false,
                    },
                )
            },
        )
    };
    let per_audience = |audience: &'static str| prop::collection::vec(one(audience), 1..=2);
    (per_audience("s1"), per_audience("s2"), per_audience("s3"))
        .prop_map(|(a, b, c)| a.into_iter().chain(b).chain(c).collect())
}

/// Whether one of `servers` registers `scope` at `audience` for the namespace `team`.
fn registered(servers: &[ResourceServer], audience: &str, scope: &Scope) -> bool {
    servers.iter().any(|rs| {
        rs.spec.audience == audience
            && rs.spec.namespace_selector.match_labels.get(NAMESPACE_NAME_LABEL).map(String::as_str) == Some("team")
            && scope::covered_by(scope, &parse(&rs.spec.scopes))
    })
}

fn agent() -> impl Strategy<Value = Agent> {
    (prop::collection::vec(broad_pattern(), 2..5), audiences(2), duration()).prop_map(|(scopes, audiences, ttl)| {
        Agent {
            metadata: meta("agent"),
            spec: AgentSpec {
                description: None,
                scopes,
                audiences,
                max_token_ttl: ttl,
                template: serde_json::json!({"spec": {"containers": [{"name": "a", "image": "img"}]}}),
                automount_service_account_token: false,
            },
            status: None,
        }
    })
}

/// A time window relative to now: not yet, in force, or over.
fn window() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    let t = |mins: i64| (now() + SignedDuration::from_mins(mins)).to_string();
    prop_oneof![
        8 => Just((None, None)),
        1 => Just((Some(t(-60)), Some(t(60)))),
        1 => Just((Some(t(10)), None)),
        1 => Just((None, Some(t(-1)))),
        1 => Just((None, Some(t(5)))),
    ]
}

fn grant(i: usize) -> impl Strategy<Value = DelegationGrant> {
    (
        prop::bool::weighted(0.25),
        prop::collection::vec(broad_pattern(), 0..3),
        audiences(0),
        prop::option::of(duration()),
        prop::option::of(duration()),
        prop::option::of(0u32..3),
        window(),
    )
        .prop_map(move |(deny, scopes, audiences, ttl, run, depth, (nb, exp))| {
            let effect = if deny { Effect::Deny } else { Effect::Allow };
            // An Allow grant names at least one scope and one audience (the CRD says so).
            let scopes = if !deny && scopes.is_empty() { vec!["x:*".to_string()] } else { scopes };
            let audiences = if !deny && audiences.is_empty() { vec!["s1".to_string()] } else { audiences };
            DelegationGrant {
                metadata: meta(&format!("g{i}")),
                spec: DelegationGrantSpec {
                    principal: PRINCIPAL.into(),
                    agent: "agent".into(),
                    effect,
                    scopes,
                    audiences,
                    max_token_ttl: ttl,
                    max_run_duration: run,
                    max_delegation_depth: depth,
                    not_before: nb,
                    expires_at: exp,
                },
                status: None,
            }
        })
}

fn grants() -> impl Strategy<Value = Vec<DelegationGrant>> {
    (1usize..6).prop_flat_map(|n| (0..n).map(grant).collect::<Vec<_>>())
}

fn run(name: &'static str) -> impl Strategy<Value = AgentRun> {
    (prop::collection::vec(scope_pattern(), 1..4), audiences(1), prop::option::of(duration()), duration()).prop_map(
        move |(scopes, audiences, ttl, max)| AgentRun {
            metadata: meta(name),
            spec: AgentRunSpec {
                agent: "agent".into(),
                principal: PRINCIPAL.into(),
                task: "t".into(),
                scopes,
                audiences,
                token_ttl: ttl,
                max_duration: max,
                parent_run: None,
                args: vec![],
                env: vec![],
            },
            status: None,
        },
    )
}

fn parse(list: &[String]) -> Vec<Scope> {
    list.iter().map(|s| Scope::parse(s).unwrap()).collect()
}

fn dur(s: &str) -> SignedDuration {
    deputy::duration::parse(s).unwrap()
}

fn in_force(g: &DelegationGrant) -> bool {
    let t = |s: &Option<String>| s.as_deref().map(|x| x.parse::<Timestamp>().unwrap());
    t(&g.spec.not_before).is_none_or(|nb| nb <= now()) && t(&g.spec.expires_at).is_none_or(|e| now() < e)
}

/// Every invariant of DESIGN's "Authority" for one authorised run.
fn check(
    run: &AgentRun,
    agent: &Agent,
    servers: &[ResourceServer],
    grants: &[DelegationGrant],
    policy: &Policy,
    parent: Option<&Authorization>,
    a: &Authorization,
) {
    assert!(!a.authority.is_empty(), "authorised with nothing");
    let requested = parse(&run.spec.scopes);
    let ceiling = parse(&agent.spec.scopes);
    let live: Vec<&DelegationGrant> = grants.iter().filter(|g| in_force(g)).collect();
    for (aud, held) in &a.authority {
        assert!(
            run.spec.audiences.contains(aud) && agent.spec.audiences.contains(aud),
            "{aud} not asked or not the agent's"
        );
        if let Some(p) = parent {
            assert!(p.authority.iter().any(|(pa, _)| pa == aud), "{aud} not held by the parent");
        }
        for s in held {
            assert!(scope::covered_by(s, &requested), "{s} at {aud} was not asked for");
            assert!(scope::covered_by(s, &ceiling), "{s} at {aud} is outside the Agent's ceiling");
            assert!(
                registered(servers, aud, s),
                "{s} at {aud} is not registered by a ResourceServer for the namespace"
            );
            let consented = live.iter().any(|g| {
                g.spec.effect == Effect::Allow
                    && g.spec.audiences.contains(aud)
                    && scope::covered_by(s, &parse(&g.spec.scopes))
            });
            assert!(consented, "{s} at {aud} has no Allow grant for that audience");
            let denied = live.iter().any(|d| {
                d.spec.effect == Effect::Deny
                    && (d.spec.audiences.is_empty() || d.spec.audiences.contains(aud))
                    && (d.spec.scopes.is_empty() || parse(&d.spec.scopes).iter().any(|x| x.overlaps(s)))
            });
            assert!(!denied, "{s} at {aud} is covered by a Deny");
            if let Some(p) = parent {
                let (_, ps) = p.authority.iter().find(|(pa, _)| pa == aud).unwrap();
                assert!(scope::covered_by(s, ps), "{s} at {aud} is not held by the parent");
            }
        }
    }
    let mut union: Vec<Scope> = a.authority.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    scope::minimise(&mut union);
    assert_eq!(a.scopes, union);

    // Bounds.
    assert!(a.token_ttl <= dur(&agent.spec.max_token_ttl) && a.token_ttl <= policy.max_token_ttl);
    if let Some(t) = &run.spec.token_ttl {
        assert!(a.token_ttl <= dur(t));
    }
    assert!(a.deadline <= created() + dur(&run.spec.max_duration));
    assert!(a.deadline <= created() + policy.max_run_duration);
    for name in &a.grants {
        let g = grants.iter().find(|g| g.metadata.name.as_deref() == Some(name.as_str())).unwrap();
        assert!(g.spec.effect == Effect::Allow && in_force(g), "{name} contributes but is not an Allow in force");
        if let Some(t) = &g.spec.max_token_ttl {
            assert!(a.token_ttl <= dur(t), "{name}'s TTL");
        }
        if let Some(d) = &g.spec.max_run_duration {
            assert!(a.deadline <= created() + dur(d), "{name}'s run duration");
        }
        if let Some(e) = &g.spec.expires_at {
            assert!(a.deadline <= e.parse::<Timestamp>().unwrap(), "{name}'s expiry");
        }
        assert!(a.remaining_delegation_depth <= g.spec.max_delegation_depth.unwrap_or(0));
    }
    // Every grant that consents to a held pair is one of the contributing grants (so its
    // bounds applied).
    for g in live.iter().filter(|g| g.spec.effect == Effect::Allow) {
        let gives = a.authority.iter().any(|(aud, held)| {
            g.spec.audiences.contains(aud) && held.iter().any(|h| parse(&g.spec.scopes).iter().any(|s| h.overlaps(s)))
        });
        if gives {
            assert!(
                a.grants.contains(g.metadata.name.as_ref().unwrap()),
                "{:?} gives a held pair but did not bound the run",
                g.metadata.name
            );
        }
    }
    if let Some(p) = parent {
        assert!(a.token_ttl <= p.token_ttl && a.deadline <= p.deadline);
        assert!(a.remaining_delegation_depth < p.remaining_delegation_depth, "depth strictly decreases");
    }
}

/// Completeness, the converse of [`check`] for a top-level run: a requested pair that lies
/// inside every bound (the Agent's audiences and ceiling, a ResourceServer registering it, an
/// Allow grant in force for that audience, no Deny in force touching it) is held, whole.
/// Returns how many such pairs there were.
fn check_complete(
    run: &AgentRun,
    agent: &Agent,
    servers: &[ResourceServer],
    grants: &[DelegationGrant],
    a: &Authorization,
) -> usize {
    let mut inside_pairs = 0;
    let ceiling = parse(&agent.spec.scopes);
    let live: Vec<&DelegationGrant> = grants.iter().filter(|g| in_force(g)).collect();
    for aud in run.spec.audiences.iter().filter(|aud| agent.spec.audiences.contains(aud)) {
        for r in parse(&run.spec.scopes) {
            let inside = scope::covered_by(&r, &ceiling)
                && registered(servers, aud, &r)
                && live.iter().any(|g| {
                    g.spec.effect == Effect::Allow
                        && g.spec.audiences.contains(aud)
                        && scope::covered_by(&r, &parse(&g.spec.scopes))
                })
                && !live.iter().any(|d| {
                    d.spec.effect == Effect::Deny
                        && (d.spec.audiences.is_empty() || d.spec.audiences.contains(aud))
                        && (d.spec.scopes.is_empty() || parse(&d.spec.scopes).iter().any(|x| x.overlaps(&r)))
                });
            if inside {
                inside_pairs += 1;
                let held = a.authority.iter().find(|(held_aud, _)| held_aud == aud).map(|(_, s)| s.as_slice());
                assert!(
                    held.is_some_and(|held| scope::covered_by(&r, held)),
                    "{r} at {aud} is consented and inside every bound but not held: {:?}",
                    a.authority
                );
            }
        }
    }
    inside_pairs
}

fn policy() -> Policy {
    Policy { deputy_namespace: Some("deputy-system".into()), ..Policy::default() }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn a_top_level_run_holds_only_consented_pairs(
        agent in agent(), servers in servers(), grants in grants(), run in run("r"),
    ) {
        let policy = policy();
        let registered = Registrations::for_namespace(&servers, "team", None);
        let d = authorize(Input {
            run: &run, agent: Some(&agent), grants: &grants, parent: None, registered: &registered, now: now(), policy: &policy,
        });
        if let Decision::Authorized(a) = &d {
            check(&run, &agent, &servers, &grants, &policy, None, a);
            check_complete(&run, &agent, &servers, &grants, a);
        }
    }

    #[test]
    fn a_sub_agent_holds_only_what_its_parent_holds(
        agent in agent(), servers in servers(), grants in grants(), parent in run("p"), child in run("c"),
    ) {
        let policy = policy();
        let registered = Registrations::for_namespace(&servers, "team", None);
        let mut parent = parent;
        parent.status = Some(AgentRunStatus { phase: Some(RunPhase::Running), ..Default::default() });
        let pd = authorize(Input {
            run: &parent, agent: Some(&agent), grants: &grants, parent: None, registered: &registered, now: now(), policy: &policy,
        });
        let mut child = child;
        child.spec.parent_run = Some("p".into());
        let d = authorize(Input {
            run: &child,
            agent: Some(&agent),
            grants: &grants,
            parent: Some(Parent { run: &parent, decision: &pd }),
            registered: &registered,
            now: now(),
            policy: &policy,
        });
        match (&pd, &d) {
            (Decision::Authorized(p), Decision::Authorized(a)) => {
                check(&child, &agent, &servers, &grants, &policy, Some(p), a)
            }
            (Decision::Denied(_), Decision::Authorized(_)) => prop_assert!(false, "a child of a denied parent was authorised"),
            _ => {}
        }
    }
}

/// The generators must reach both outcomes often, or the properties above would hold vacuously.
#[test]
fn the_generators_reach_authorised_and_denied_runs() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (agent(), servers(), grants(), run("r"));
    let policy = policy();
    let (mut authorised, mut pairs_of_several_audiences, mut denied) = (0, 0, 0);
    let mut with_pairs_inside_every_bound = 0;
    let mut reasons = std::collections::BTreeMap::new();
    for _ in 0..2000 {
        let (agent, servers, grants, run) = strategy.new_tree(&mut runner).unwrap().current();
        let registered = Registrations::for_namespace(&servers, "team", None);
        match authorize(Input {
            run: &run,
            agent: Some(&agent),
            grants: &grants,
            parent: None,
            registered: &registered,
            now: now(),
            policy: &policy,
        }) {
            Decision::Authorized(a) => {
                authorised += 1;
                if check_complete(&run, &agent, &servers, &grants, &a) > 0 {
                    with_pairs_inside_every_bound += 1;
                }
                if a.authority.len() > 1 {
                    pairs_of_several_audiences += 1;
                }
            }
            Decision::Denied(r) => {
                denied += 1;
                *reasons.entry(r.reason.as_str()).or_insert(0) += 1;
            }
        }
    }
    eprintln!("authorised {authorised}, denied {denied}: {reasons:?}");
    assert!(authorised >= 200 && denied >= 200, "authorised {authorised}, denied {denied} of 2000");
    assert!(pairs_of_several_audiences >= 50, "only {pairs_of_several_audiences} runs held several audiences");
    eprintln!("{with_pairs_inside_every_bound} authorised runs asked for a pair inside every bound");
    assert!(
        with_pairs_inside_every_bound >= 100,
        "completeness would hold vacuously: only {with_pairs_inside_every_bound} runs asked for a pair inside every bound"
    );
}
