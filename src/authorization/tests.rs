//! Table-driven tests of every authorisation rule and its edges.

use jiff::{SignedDuration, Timestamp};
use kube::api::ObjectMeta;
use serde_json::json;

use super::*;
use crate::resources::{
    AgentRunSpec, AgentRunStatus, AgentSpec, DelegationGrantSpec, NamespaceSelector, ResourceServer,
    ResourceServerSpec, RunEnvVar,
};

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn now() -> Timestamp {
    t("2026-11-23T12:00:00Z")
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("marketing".into()),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn agent(name: &str, scopes: &[&str], audiences: &[&str]) -> Agent {
    Agent {
        metadata: meta(name),
        spec: AgentSpec {
            description: None,
            scopes: strings(scopes),
            audiences: strings(audiences),
            max_token_ttl: "15m".into(),
            template: json!({"spec": {"containers": [{"name": "agent", "image": "registry.example.com/agents/gdpr@sha256:abc"}]}}),
            automount_service_account_token: false,
        },
        status: None,
    }
}

fn grant(name: &str, effect: Effect, scopes: &[&str], audiences: &[&str]) -> DelegationGrant {
    DelegationGrant {
        metadata: meta(name),
        spec: DelegationGrantSpec {
            principal: "alice@example.com".into(),
            agent: "gdpr".into(),
            effect,
            scopes: strings(scopes),
            audiences: strings(audiences),
            max_token_ttl: None,
            max_run_duration: None,
            max_delegation_depth: None,
            not_before: None,
            expires_at: None,
        },
        status: None,
    }
}

fn allow(name: &str, scopes: &[&str]) -> DelegationGrant {
    grant(name, Effect::Allow, scopes, &["svc"])
}

fn run(name: &str, scopes: &[&str]) -> AgentRun {
    AgentRun {
        metadata: meta(name),
        spec: AgentRunSpec {
            agent: "gdpr".into(),
            principal: "alice@example.com".into(),
            task: "check".into(),
            scopes: strings(scopes),
            audiences: strings(&["svc"]),
            token_ttl: Some("10m".into()),
            max_duration: "1h".into(),
            parent_run: None,
            args: vec![],
            env: vec![],
        },
        status: None,
    }
}

struct Case {
    name: &'static str,
    run: AgentRun,
    agent: Option<Agent>,
    grants: Vec<DelegationGrant>,
    /// The parent run and its (recomputed) decision.
    parent: Option<(AgentRun, Decision)>,
}

/// ResourceServers registering every audience of these tests for every namespace, with a
/// ceiling wider than any test asks for (the cases of ResourceServers are below).
fn open_servers() -> Vec<ResourceServer> {
    let audiences = ["svc", "other-svc", "staging-db", "prod-db", "payments-service"];
    let scopes = ["compliance:*", "data:*", "finance:*", "marketing:*", "payments:*"];
    audiences.iter().map(|a| server(a, &scopes, NamespaceSelector::default())).collect()
}

fn server(audience: &str, scopes: &[&str], namespace_selector: NamespaceSelector) -> ResourceServer {
    ResourceServer::new(
        audience,
        ResourceServerSpec {
            audience: audience.into(),
            scopes: strings(scopes),
            namespace_selector,
            max_token_ttl: None,
            require_dpop: false,
        },
    )
}

fn decide(c: &Case) -> Decision {
    decide_with(c, &open_servers())
}

fn decide_with(c: &Case, servers: &[ResourceServer]) -> Decision {
    let ns = c.run.metadata.namespace.as_deref().unwrap_or("default");
    authorize(Input {
        run: &c.run,
        agent: c.agent.as_ref(),
        grants: &c.grants,
        parent: c.parent.as_ref().map(|(run, decision)| Parent { run, decision }),
        registered: &Registrations::for_namespace(servers, ns, None),
        now: now(),
        policy: &Policy { deputy_namespace: Some("deputy-system".into()), ..Policy::default() },
    })
}

fn case(name: &'static str, run: AgentRun, agent: Agent, grants: Vec<DelegationGrant>) -> Case {
    Case { name, run, agent: Some(agent), grants, parent: None }
}

fn granted(d: &Decision) -> Vec<String> {
    match d {
        Decision::Authorized(a) => a.scopes.iter().map(|s| s.to_string()).collect(),
        Decision::Denied(r) => panic!("denied: {r:?}"),
    }
}

fn reason(d: &Decision) -> Reason {
    match d {
        Decision::Denied(r) => r.reason,
        Decision::Authorized(a) => panic!("authorized: {a:?}"),
    }
}

fn gdpr_agent() -> Agent {
    agent("gdpr", &["compliance:*", "marketing:read"], &["svc", "other-svc"])
}

#[test]
fn scope_intersections() {
    // (case, expected granted scopes, expected denied (scope, reason))
    type Row = (Case, Vec<&'static str>, Vec<(&'static str, &'static str)>);
    let table: Vec<Row> = vec![
        (
            case(
                "agent capability beyond the user's: the ceiling allows, the grant narrows",
                run("r", &["compliance:audit:cross_dept", "compliance:privacy:check"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:audit:*", "compliance:privacy:check"])],
            ),
            vec!["compliance:audit:cross_dept", "compliance:privacy:check"],
            vec![],
        ),
        (
            case(
                "wildcard request narrowed to the grant's deeper wildcard",
                run("r", &["compliance:*"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:audit:*"])],
            ),
            vec!["compliance:audit:*"],
            vec![],
        ),
        (
            case(
                "a wildcard never matches its own prefix",
                run("r", &["compliance", "compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"])],
            ),
            vec!["compliance:audit"],
            vec![("compliance", scope_reason::NOT_IN_AGENT_CEILING)],
        ),
        (
            case(
                "wildcards at three depths intersect to the deepest",
                run("r", &["compliance:audit:*"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:audit:cross_dept:*"])],
            ),
            vec!["compliance:audit:cross_dept:*"],
            vec![],
        ),
        (
            case(
                "not in the agent ceiling even though granted",
                run("r", &["finance:read", "compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["finance:read", "compliance:*"])],
            ),
            vec!["compliance:audit"],
            vec![("finance:read", scope_reason::NOT_IN_AGENT_CEILING)],
        ),
        (
            case(
                "in the ceiling but not granted by the principal",
                run("r", &["marketing:read", "compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"])],
            ),
            vec!["compliance:audit"],
            vec![("marketing:read", scope_reason::NOT_GRANTED)],
        ),
        (
            case(
                "several Allow grants whose union is needed",
                run("r", &["marketing:read", "compliance:audit"]),
                gdpr_agent(),
                vec![allow("g1", &["compliance:*"]), allow("g2", &["marketing:read"])],
            ),
            vec!["compliance:audit", "marketing:read"],
            vec![],
        ),
        (
            case(
                "Deny beside Allow: the denied scope goes, the rest stays",
                run("r", &["compliance:audit", "compliance:privacy:check"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"]), grant("no-audit", Effect::Deny, &["compliance:audit"], &[])],
            ),
            vec!["compliance:privacy:check"],
            vec![("compliance:audit", scope_reason::DENIED_BY_GRANT)],
        ),
        (
            case(
                "a requested pattern overlapping a denied scope is dropped whole",
                run("r", &["compliance:*", "marketing:read"]),
                gdpr_agent(),
                vec![
                    allow("g", &["compliance:*", "marketing:read"]),
                    grant("d", Effect::Deny, &["compliance:audit:cross_dept"], &[]),
                ],
            ),
            vec!["marketing:read"],
            vec![("compliance:*", scope_reason::DENIED_BY_GRANT)],
        ),
        (
            case(
                "a Deny naming only audiences takes no scope away",
                run("r", &["compliance:audit"]),
                gdpr_agent(),
                vec![
                    grant("g", Effect::Allow, &["compliance:*"], &["svc", "other-svc"]),
                    grant("d", Effect::Deny, &[], &["other-svc"]),
                ],
            ),
            vec!["compliance:audit"],
            vec![],
        ),
        (
            case(
                "duplicates and covered requests collapse",
                run("r", &["compliance:audit", "compliance:audit", "compliance:*"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"])],
            ),
            vec!["compliance:*"],
            vec![],
        ),
    ];
    for (c, want, want_denied) in table {
        let d = decide(&c);
        assert_eq!(granted(&d), want, "{}", c.name);
        let Decision::Authorized(a) = d else { unreachable!() };
        let denied: Vec<(&str, &str)> = a.denied_scopes.iter().map(|d| (d.scope.as_str(), d.reason.as_str())).collect();
        assert_eq!(denied, want_denied, "{}", c.name);
    }
}

#[test]
fn refusals() {
    let mut expired = allow("g", &["compliance:*"]);
    expired.spec.expires_at = Some("2026-11-23T12:00:00Z".into()); // exactly now: no longer in force
    let mut future = allow("g", &["compliance:*"]);
    future.spec.not_before = Some("2026-11-23T12:00:01Z".into());
    let mut other_principal = allow("g", &["compliance:*"]);
    other_principal.spec.principal = "bob@example.com".into();
    let mut other_agent = allow("g", &["compliance:*"]);
    other_agent.spec.agent = "supply-chain".into();
    let mut deleting_agent = gdpr_agent();
    deleting_agent.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
    let mut bad_deny = grant("d", Effect::Deny, &["compliance:audit"], &[]);
    bad_deny.spec.expires_at = Some("tomorrow".into());
    let mut deputy_env = run("r", &["compliance:audit"]);
    deputy_env.spec.env = vec![RunEnvVar { name: "DEPUTY_TOKEN_FILE".into(), value: "/etc/shadow".into() }];
    let long_name = run(&"r".repeat(MAX_RUN_NAME + 1), &["compliance:audit"]);
    let mut in_deputy_ns = run("r", &["compliance:audit"]);
    in_deputy_ns.metadata.namespace = Some("deputy-system".into());
    let mut no_containers = gdpr_agent();
    no_containers.spec.template = json!({"spec": {"containers": []}});
    let mut no_template = gdpr_agent();
    no_template.spec.template = json!({});
    let mut bad_ttl = run("r", &["compliance:audit"]);
    bad_ttl.spec.token_ttl = Some("ten minutes".into());
    let mut bad_duration = run("r", &["compliance:audit"]);
    bad_duration.spec.max_duration = "1d".into();
    let mut wrong_aud = run("r", &["compliance:audit"]);
    wrong_aud.spec.audiences = strings(&["payments-service"]);
    let mut bad_agent = gdpr_agent();
    bad_agent.spec.scopes = strings(&["*"]);

    let ok_grants = || vec![allow("g", &["compliance:*"])];
    let table: Vec<(Case, Reason)> = vec![
        (
            Case {
                name: "no agent",
                run: run("r", &["compliance:audit"]),
                agent: None,
                grants: ok_grants(),
                parent: None,
            },
            Reason::AgentNotFound,
        ),
        (
            case("agent being deleted", run("r", &["compliance:audit"]), deleting_agent, ok_grants()),
            Reason::AgentDeleted,
        ),
        (case("malformed agent", run("r", &["compliance:audit"]), bad_agent, ok_grants()), Reason::InvalidAgent),
        (case("no grant at all", run("r", &["compliance:audit"]), gdpr_agent(), vec![]), Reason::NoGrant),
        (
            case("grant of another principal", run("r", &["compliance:audit"]), gdpr_agent(), vec![other_principal]),
            Reason::NoGrant,
        ),
        (
            case("grant for another agent", run("r", &["compliance:audit"]), gdpr_agent(), vec![other_agent]),
            Reason::NoGrant,
        ),
        (
            case("grant expiring exactly now", run("r", &["compliance:audit"]), gdpr_agent(), vec![expired]),
            Reason::GrantExpired,
        ),
        (
            case("grant not yet valid", run("r", &["compliance:audit"]), gdpr_agent(), vec![future]),
            Reason::GrantNotYetValid,
        ),
        (
            case(
                "Deny with empty lists: Alice may not use this agent",
                run("r", &["compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"]), grant("d", Effect::Deny, &[], &[])],
            ),
            Reason::DeniedByGrant,
        ),
        (
            case(
                "Deny takes every requested scope",
                run("r", &["compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"]), grant("d", Effect::Deny, &["compliance:*"], &[])],
            ),
            Reason::DeniedByGrant,
        ),
        (
            case(
                "malformed Deny fails closed",
                run("r", &["compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"]), bad_deny],
            ),
            Reason::InvalidDenyGrant,
        ),
        (
            case("nothing requested may be held", run("r", &["finance:read"]), gdpr_agent(), ok_grants()),
            Reason::NoScopesGranted,
        ),
        (case("audience not allowed", wrong_aud, gdpr_agent(), ok_grants()), Reason::NoAudienceGranted),
        (
            case(
                "audience taken by a Deny",
                run("r", &["compliance:audit"]),
                gdpr_agent(),
                vec![allow("g", &["compliance:*"]), grant("d", Effect::Deny, &[], &["svc"])],
            ),
            Reason::NoAudienceGranted,
        ),
        (case("a DEPUTY_* env", deputy_env, gdpr_agent(), ok_grants()), Reason::InvalidSpec),
        (case("a name whose children would be shortened", long_name, gdpr_agent(), ok_grants()), Reason::InvalidSpec),
        (case("in Deputy's namespace", in_deputy_ns, gdpr_agent(), ok_grants()), Reason::ReservedNamespace),
        (
            case("agent template without containers", run("r", &["compliance:audit"]), no_containers, ok_grants()),
            Reason::InvalidAgent,
        ),
        (
            case("agent without a template", run("r", &["compliance:audit"]), no_template, ok_grants()),
            Reason::InvalidAgent,
        ),
        (case("malformed tokenTTL", bad_ttl, gdpr_agent(), ok_grants()), Reason::InvalidSpec),
        (case("malformed maxDuration", bad_duration, gdpr_agent(), ok_grants()), Reason::InvalidSpec),
        (case("malformed scope", run("r", &["compliance:*:audit"]), gdpr_agent(), ok_grants()), Reason::InvalidSpec),
        (case("no scopes", run("r", &[]), gdpr_agent(), ok_grants()), Reason::InvalidSpec),
    ];
    for (c, want) in table {
        let d = decide(&c);
        assert_eq!(reason(&d), want, "{}", c.name);
        let Decision::Denied(r) = d else { unreachable!() };
        assert!(!r.message.is_empty(), "{}: a refusal explains itself", c.name);
    }
}

#[test]
fn grant_window_edges() {
    let mut starts_now = allow("g", &["compliance:*"]);
    starts_now.spec.not_before = Some("2026-11-23T12:00:00Z".into());
    starts_now.spec.expires_at = Some("2026-11-23T12:00:01Z".into());
    let d = decide(&case(
        "notBefore exactly now is in force",
        run("r", &["compliance:audit"]),
        gdpr_agent(),
        vec![starts_now],
    ));
    let Decision::Authorized(a) = d else { panic!("{d:?}") };
    assert_eq!(a.deadline, t("2026-11-23T12:00:01Z"), "the grant's expiry bounds the deadline");

    let mut expired = allow("old", &["compliance:*"]);
    expired.spec.expires_at = Some("2026-11-01T00:00:00Z".into());
    let d = decide(&case(
        "an expired grant beside a live one is ignored",
        run("r", &["compliance:audit"]),
        gdpr_agent(),
        vec![expired, allow("new", &["compliance:*"])],
    ));
    let Decision::Authorized(a) = d else { panic!("{d:?}") };
    assert_eq!(a.grants, vec!["new"]);

    let mut deleting = allow("g", &["compliance:*"]);
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
    assert_eq!(
        reason(&decide(&case(
            "a grant being deleted no longer counts",
            run("r", &["compliance:audit"]),
            gdpr_agent(),
            vec![deleting]
        ))),
        Reason::NoGrant
    );

    let mut malformed_allow = allow("bad", &["compliance:*"]);
    malformed_allow.spec.max_token_ttl = Some("forever".into());
    assert_eq!(
        reason(&decide(&case(
            "a malformed Allow grant is ignored",
            run("r", &["compliance:audit"]),
            gdpr_agent(),
            vec![malformed_allow]
        ))),
        Reason::NoGrant
    );
}

#[test]
fn lifetimes_are_the_minimum_of_every_bound() {
    struct L {
        name: &'static str,
        run_ttl: Option<&'static str>,
        agent_ttl: &'static str,
        grant_ttl: Option<&'static str>,
        run_duration: &'static str,
        grant_duration: Option<&'static str>,
        want_ttl: i64,
        want_deadline_secs: i64,
    }
    let table = [
        L {
            name: "run asks least",
            run_ttl: Some("5m"),
            agent_ttl: "15m",
            grant_ttl: Some("10m"),
            run_duration: "1h",
            grant_duration: None,
            want_ttl: 300,
            want_deadline_secs: 3600,
        },
        L {
            name: "grant bounds",
            run_ttl: Some("10m"),
            agent_ttl: "15m",
            grant_ttl: Some("2m"),
            run_duration: "1h",
            grant_duration: Some("30m"),
            want_ttl: 120,
            want_deadline_secs: 1800,
        },
        L {
            name: "agent bounds",
            run_ttl: Some("20m"),
            agent_ttl: "15m",
            grant_ttl: None,
            run_duration: "2h",
            grant_duration: Some("3h"),
            want_ttl: 900,
            want_deadline_secs: 7200,
        },
        L {
            name: "default ttl when the run asks none",
            run_ttl: None,
            agent_ttl: "15m",
            grant_ttl: None,
            run_duration: "1h",
            grant_duration: None,
            want_ttl: 600,
            want_deadline_secs: 3600,
        },
        L {
            name: "global maxima",
            run_ttl: Some("3h"),
            agent_ttl: "5h",
            grant_ttl: None,
            run_duration: "48h",
            grant_duration: None,
            want_ttl: 3600,
            want_deadline_secs: 86400,
        },
    ];
    for l in table {
        let mut r = run("r", &["compliance:audit"]);
        r.spec.token_ttl = l.run_ttl.map(String::from);
        r.spec.max_duration = l.run_duration.into();
        let mut a = gdpr_agent();
        a.spec.max_token_ttl = l.agent_ttl.into();
        let mut g = allow("g", &["compliance:*"]);
        g.spec.max_token_ttl = l.grant_ttl.map(String::from);
        g.spec.max_run_duration = l.grant_duration.map(String::from);
        let Decision::Authorized(auth) = decide(&case(l.name, r, a, vec![g])) else { panic!("{}", l.name) };
        assert_eq!(auth.token_ttl, SignedDuration::from_secs(l.want_ttl), "{}", l.name);
        assert_eq!(auth.deadline, now() + SignedDuration::from_secs(l.want_deadline_secs), "{}", l.name);
    }
}

#[test]
fn only_contributing_grants_bound_the_run() {
    let mut narrow = allow("narrow", &["marketing:read"]);
    narrow.spec.max_token_ttl = Some("1m".into());
    let d = decide(&case(
        "an unrelated grant's bounds do not apply",
        run("r", &["compliance:audit"]),
        gdpr_agent(),
        vec![allow("wide", &["compliance:*"]), narrow],
    ));
    let Decision::Authorized(a) = d else { panic!("{d:?}") };
    assert_eq!(a.grants, vec!["wide"]);
    assert_eq!(a.token_ttl, SignedDuration::from_mins(10));
}

#[test]
fn the_deadline_counts_from_creation_whatever_the_status_says() {
    let mut r = run("r", &["compliance:audit"]);
    r.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now() - SignedDuration::from_mins(50)));
    // A status patched to claim a later start, a longer TTL, a later deadline, another
    // identity, chain and depth: none of it is read.
    r.status = Some(AgentRunStatus {
        started_at: Some(now()),
        token_ttl: Some("999999h".into()),
        deadline: Some(t("2099-01-01T00:00:00Z")),
        identity: Some("spiffe://evil/run/x".into()),
        delegation_chain: strings(&["alice@example.com", "spiffe://evil/run/x"]),
        remaining_delegation_depth: Some(8),
        granted_scopes: strings(&["compliance:*", "payments:*"]),
        ..Default::default()
    });
    let Decision::Authorized(a) = decide(&case("restarted", r, gdpr_agent(), vec![allow("g", &["compliance:*"])]))
    else {
        panic!()
    };
    assert_eq!(a.started_at, now() - SignedDuration::from_mins(50));
    assert_eq!(a.deadline, now() + SignedDuration::from_mins(10));
    assert_eq!(a.token_ttl, SignedDuration::from_mins(10));
    assert_eq!(a.identity, "spiffe://cluster.local/ns/marketing/agent/gdpr/run/r");
    assert_eq!(a.remaining_delegation_depth, 0);
    assert_eq!(a.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>(), ["compliance:audit"]);
}

#[test]
fn identity_and_chain_of_a_top_level_run() {
    let Decision::Authorized(a) = decide(&case(
        "top",
        run("gdpr-check-q4", &["compliance:audit"]),
        gdpr_agent(),
        vec![allow("g", &["compliance:*"])],
    )) else {
        panic!()
    };
    let id = "spiffe://cluster.local/ns/marketing/agent/gdpr/run/gdpr-check-q4";
    assert_eq!(a.identity, id);
    assert_eq!(a.delegation_chain, vec!["alice@example.com".to_string(), id.to_string()]);
    assert_eq!(a.remaining_delegation_depth, 0, "no maxDelegationDepth means no sub-agents");
    assert_eq!(a.audiences, vec!["svc"]);
}

/// A live parent run, and the decision the controller recomputes for it. Its status holds
/// only a phase: nothing else of it is read.
fn active_parent(remaining: u32, scopes: &[&str]) -> (AgentRun, Decision) {
    let mut p = run("plan-7", scopes);
    p.spec.agent = "planner".into();
    p.status = Some(AgentRunStatus { phase: Some(RunPhase::Running), ..Default::default() });
    let decision = Decision::Authorized(Authorization {
        identity: "spiffe://cluster.local/ns/marketing/agent/planner/run/plan-7".into(),
        authority: vec![("svc".into(), scopes.iter().map(|s| Scope::parse(s).unwrap()).collect())],
        scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        audiences: strings(&["svc"]),
        denied_scopes: vec![],
        token_ttl: SignedDuration::from_mins(5),
        started_at: now(),
        deadline: now() + SignedDuration::from_mins(20),
        grants: strings(&["g"]),
        delegation_chain: strings(&[
            "alice@example.com",
            "spiffe://cluster.local/ns/marketing/agent/planner/run/plan-7",
        ]),
        remaining_delegation_depth: remaining,
    });
    (p, decision)
}

fn child() -> AgentRun {
    let mut c = run("optimise-1", &["compliance:audit", "compliance:privacy:check"]);
    c.spec.parent_run = Some("plan-7".into());
    c
}

#[test]
fn sub_agent_authority_only_narrows() {
    let mut g = allow("g", &["compliance:*"]);
    g.spec.max_delegation_depth = Some(3);
    let c = Case {
        name: "child",
        run: child(),
        agent: Some(gdpr_agent()),
        grants: vec![g],
        parent: Some(active_parent(1, &["compliance:audit"])),
    };
    let Decision::Authorized(a) = decide(&c) else { panic!() };
    assert_eq!(granted(&decide(&c)), vec!["compliance:audit"]);
    assert_eq!(a.denied_scopes[0].reason, scope_reason::NOT_HELD_BY_PARENT);
    assert_eq!(a.token_ttl, SignedDuration::from_mins(5), "parent's ttl bounds the child");
    assert_eq!(a.deadline, now() + SignedDuration::from_mins(20), "parent's deadline bounds the child");
    assert_eq!(a.remaining_delegation_depth, 0, "depth along the chain: min(parent - 1, grant)");
    assert_eq!(
        a.delegation_chain,
        strings(&[
            "alice@example.com",
            "spiffe://cluster.local/ns/marketing/agent/planner/run/plan-7",
            "spiffe://cluster.local/ns/marketing/agent/gdpr/run/optimise-1"
        ])
    );
}

#[test]
fn sub_agent_refusals() {
    let g = || {
        let mut g = allow("g", &["compliance:*"]);
        g.spec.max_delegation_depth = Some(1);
        vec![g]
    };
    let with_status = |f: &dyn Fn(&mut AgentRunStatus)| {
        let mut p = active_parent(1, &["compliance:*"]);
        f(p.0.status.as_mut().unwrap());
        p
    };
    let ended = with_status(&|s| s.phase = Some(RunPhase::Succeeded));
    let pending = with_status(&|s| s.phase = Some(RunPhase::Pending));
    // A status written back from an end to an active phase is not a live parent.
    let regressed = with_status(&|s| s.completed_at = Some(now()));
    let regressed_revoked = with_status(&|s| s.revoked_at = Some(now()));
    let mut bobs = active_parent(1, &["compliance:*"]);
    bobs.0.spec.principal = "bob@example.com".into();
    let mut lost = active_parent(1, &["compliance:*"]);
    lost.1 = Decision::Denied(Refusal { reason: Reason::GrantExpired, message: "gone".into(), denied_scopes: vec![] });
    let table = [
        ("parent missing", None, Reason::ParentNotFound),
        ("parent ended", Some(ended), Reason::ParentNotActive),
        ("parent not yet authorised", Some(pending), Reason::ParentPending),
        ("parent acts for someone else", Some(bobs), Reason::ParentPrincipalMismatch),
        ("parent's status regressed from completed", Some(regressed), Reason::ParentNotActive),
        ("parent's status regressed from revoked", Some(regressed_revoked), Reason::ParentNotActive),
        ("parent no longer authorised", Some(lost), Reason::ParentNotActive),
        ("depth exactly at the limit", Some(active_parent(0, &["compliance:*"])), Reason::DelegationDepthExceeded),
        ("parent holds none of it", Some(active_parent(1, &["marketing:read"])), Reason::NoScopesGranted),
    ];
    for (name, parent, want) in table {
        let c = Case { name, run: child(), agent: Some(gdpr_agent()), grants: g(), parent };
        assert_eq!(reason(&decide(&c)), want, "{name}");
    }
}

#[test]
fn depth_is_enforced_along_the_whole_chain() {
    // Root under a grant of depth 1 → remaining 1; its child → 0; a grandchild is refused
    // even though the grandchild's own grant would allow more.
    let mut root_grant = allow("g", &["compliance:*"]);
    root_grant.spec.max_delegation_depth = Some(1);
    let Decision::Authorized(root) =
        decide(&case("root", run("plan-7", &["compliance:*"]), gdpr_agent(), vec![root_grant]))
    else {
        panic!()
    };
    assert_eq!(root.remaining_delegation_depth, 1);

    let mut generous = allow("g", &["compliance:*"]);
    generous.spec.max_delegation_depth = Some(5);
    let c = Case {
        name: "child",
        run: child(),
        agent: Some(gdpr_agent()),
        grants: vec![generous.clone()],
        parent: Some(active_parent(root.remaining_delegation_depth, &["compliance:*"])),
    };
    let Decision::Authorized(kid) = decide(&c) else { panic!() };
    assert_eq!(kid.remaining_delegation_depth, 0);

    let mut grandchild = child();
    grandchild.spec.parent_run = Some("optimise-1".into());
    let c = Case {
        name: "grandchild",
        run: grandchild,
        agent: Some(gdpr_agent()),
        grants: vec![generous],
        parent: Some(active_parent(kid.remaining_delegation_depth, &["compliance:*"])),
    };
    assert_eq!(reason(&decide(&c)), Reason::DelegationDepthExceeded);
}

#[test]
fn reasons_are_bounded_and_named() {
    use std::collections::HashSet;
    let all = [
        Reason::InvalidSpec,
        Reason::AgentNotFound,
        Reason::AgentDeleted,
        Reason::InvalidAgent,
        Reason::NoGrant,
        Reason::GrantNotYetValid,
        Reason::GrantExpired,
        Reason::DeniedByGrant,
        Reason::InvalidDenyGrant,
        Reason::NoScopesGranted,
        Reason::NoAudienceGranted,
        Reason::AudienceNotRegistered,
        Reason::ReservedNamespace,
        Reason::ParentNotFound,
        Reason::ParentNotActive,
        Reason::ParentPrincipalMismatch,
        Reason::DelegationDepthExceeded,
    ];
    let names: HashSet<&str> = all.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), all.len());
    assert!(Reason::AgentNotFound.is_transient() && !Reason::DeniedByGrant.is_transient());
}

fn pairs(d: &Decision) -> Vec<(String, Vec<String>)> {
    match d {
        Decision::Authorized(a) => {
            a.authority.iter().map(|(aud, s)| (aud.clone(), s.iter().map(|x| x.to_string()).collect())).collect()
        }
        Decision::Denied(r) => panic!("denied: {r:?}"),
    }
}

fn p(aud: &str, scopes: &[&str]) -> (String, Vec<String>) {
    (aud.to_string(), strings(scopes))
}

/// Finding 2: two grants were added up as (∪ scopes) × (∪ audiences), so `data:write` for
/// staging and `data:read` for prod gave `data:write` for prod, and the prod grant's bounds
/// were ignored. Authority is the union of each grant's own pairs.
#[test]
fn grants_add_up_as_pairs_and_every_contributing_grant_bounds_the_run() {
    let db_agent = agent("gdpr", &["data:*"], &["staging-db", "prod-db"]);
    let mut staging = grant("staging-write", Effect::Allow, &["data:write"], &["staging-db"]);
    staging.spec.max_token_ttl = Some("10m".into());
    let mut prod = grant("prod-read", Effect::Allow, &["data:read"], &["prod-db"]);
    prod.spec.max_token_ttl = Some("1m".into());
    prod.spec.max_run_duration = Some("2m".into());
    let mut r = run("r", &["data:write", "data:read"]);
    r.spec.audiences = strings(&["staging-db", "prod-db"]);

    let d = decide(&case("pairs", r.clone(), db_agent.clone(), vec![staging.clone(), prod.clone()]));
    assert_eq!(pairs(&d), [p("prod-db", &["data:read"]), p("staging-db", &["data:write"])]);
    let Decision::Authorized(a) = &d else { unreachable!() };
    assert_eq!(a.token_ttl, SignedDuration::from_mins(1), "the prod grant contributes a pair: its TTL bounds");
    assert_eq!(a.deadline, now() + SignedDuration::from_mins(2), "and its run duration");
    assert_eq!(a.grants, strings(&["prod-read", "staging-write"]));

    type Row<'a> = (&'a str, Vec<DelegationGrant>, Vec<(String, Vec<String>)>);
    let table: Vec<Row> = vec![
        (
            "a Deny of a pair nobody granted changes nothing",
            vec![staging.clone(), prod.clone(), grant("d", Effect::Deny, &["data:write"], &["prod-db"])],
            vec![p("prod-db", &["data:read"]), p("staging-db", &["data:write"])],
        ),
        (
            "a Deny removes exactly its scopes × audiences",
            vec![staging.clone(), prod.clone(), grant("d", Effect::Deny, &["data:write"], &["staging-db"])],
            vec![p("prod-db", &["data:read"])],
        ),
        (
            "a Deny of an audience with no scopes takes that audience only",
            vec![staging.clone(), prod.clone(), grant("d", Effect::Deny, &[], &["prod-db"])],
            vec![p("staging-db", &["data:write"])],
        ),
        (
            "a Deny of scopes for every audience",
            vec![staging.clone(), prod.clone(), grant("d", Effect::Deny, &["data:read"], &[])],
            vec![p("staging-db", &["data:write"])],
        ),
        (
            "one grant of both scopes for both audiences is the full product",
            vec![grant("all", Effect::Allow, &["data:read", "data:write"], &["staging-db", "prod-db"])],
            vec![p("prod-db", &["data:read", "data:write"]), p("staging-db", &["data:read", "data:write"])],
        ),
    ];
    for (name, grants, want) in table {
        assert_eq!(pairs(&decide(&case(name, r.clone(), db_agent.clone(), grants))), want, "{name}");
    }

    // Without the prod pair the prod grant no longer contributes, and no longer bounds.
    let d =
        decide(&case("staging only", r, db_agent, vec![staging, prod, grant("d", Effect::Deny, &[], &["prod-db"])]));
    let Decision::Authorized(a) = d else { panic!() };
    assert_eq!(a.token_ttl, SignedDuration::from_mins(10));
    assert_eq!(a.grants, strings(&["staging-write"]));
}

/// A sub-agent holds at most its parent's pairs, audience by audience.
#[test]
fn a_sub_agent_holds_only_its_parents_pairs() {
    let db_agent = agent("gdpr", &["data:*"], &["staging-db", "prod-db"]);
    let mut g = grant("all", Effect::Allow, &["data:*"], &["staging-db", "prod-db"]);
    g.spec.max_delegation_depth = Some(2);
    let (parent_run, mut parent) = active_parent(1, &["data:read"]);
    if let Decision::Authorized(a) = &mut parent {
        a.authority = vec![
            ("prod-db".into(), vec![Scope::parse("data:read").unwrap()]),
            ("staging-db".into(), vec![Scope::parse("data:write").unwrap()]),
        ];
        a.audiences = strings(&["prod-db", "staging-db"]);
    }
    let mut kid = child();
    kid.spec.scopes = strings(&["data:read", "data:write"]);
    kid.spec.audiences = strings(&["staging-db", "prod-db"]);
    let c = Case { name: "kid", run: kid, agent: Some(db_agent), grants: vec![g], parent: Some((parent_run, parent)) };
    assert_eq!(pairs(&decide(&c)), [p("prod-db", &["data:read"]), p("staging-db", &["data:write"])]);
}

fn only_namespace(ns: &str) -> NamespaceSelector {
    NamespaceSelector {
        match_labels: [(crate::registration::NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into(),
        ..Default::default()
    }
}

/// The Agent, the grant and the run all name `svc`; what the ResourceServers say decides.
fn registered_case() -> Case {
    case(
        "registration",
        run("r", &["compliance:audit", "compliance:privacy:check"]),
        agent("gdpr", &["compliance:*"], &["svc", "other-svc"]),
        vec![grant("g", Effect::Allow, &["compliance:*"], &["svc", "other-svc"])],
    )
}

#[test]
fn an_audience_no_resource_server_registers_is_never_granted() {
    let c = registered_case();
    let d = decide_with(&c, &[]);
    assert_eq!(reason(&d), Reason::AudienceNotRegistered);
    assert!(Reason::AudienceNotRegistered.is_transient(), "a pending run waits for a registration");
    let Decision::Denied(r) = &d else { unreachable!() };
    assert!(r.message.contains("no ResourceServer registers audience \"svc\""), "{}", r.message);
}

#[test]
fn an_audience_is_granted_only_in_the_namespaces_its_server_selects() {
    let c = registered_case();
    // An Agent anyone may create in their own namespace gets nothing there: the audience's
    // owners registered it for marketing only.
    let d = decide_with(&c, &[server("svc", &["compliance:*"], only_namespace("finance"))]);
    assert_eq!(reason(&d), Reason::AudienceNotRegistered);
    let Decision::Denied(r) = &d else { unreachable!() };
    assert!(r.message.contains("selects namespace \"marketing\""), "{}", r.message);
    let d = decide_with(&c, &[server("svc", &["compliance:*"], only_namespace("marketing"))]);
    assert_eq!(pairs(&d), [("svc".to_string(), strings(&["compliance:audit", "compliance:privacy:check"]))]);
}

#[test]
fn the_resource_servers_scopes_are_a_ceiling_per_audience() {
    let mut c = registered_case();
    c.run.spec.audiences = strings(&["svc", "other-svc"]);
    let servers = [
        server("svc", &["compliance:audit"], NamespaceSelector::default()),
        server("other-svc", &["compliance:privacy:*"], NamespaceSelector::default()),
    ];
    let d = decide_with(&c, &servers);
    assert_eq!(
        pairs(&d),
        [
            ("other-svc".to_string(), strings(&["compliance:privacy:check"])),
            ("svc".to_string(), strings(&["compliance:audit"])),
        ]
    );
    // A scope no registered server honours is dropped, and says so.
    let servers = [server("svc", &["compliance:audit"], NamespaceSelector::default())];
    let d = decide_with(&c, &servers);
    let Decision::Authorized(a) = &d else { panic!("{d:?}") };
    assert_eq!(
        a.denied_scopes,
        [DeniedScope { scope: "compliance:privacy:check".into(), reason: scope_reason::NOT_REGISTERED.into() }]
    );
}

#[test]
fn a_grants_window_opens_at_not_before_and_closes_at_expires_at() {
    let t = |s: &str| s.parse::<Timestamp>().unwrap();
    let spec = |nb: Option<&str>, exp: Option<&str>| crate::resources::DelegationGrantSpec {
        not_before: nb.map(str::to_string),
        expires_at: exp.map(str::to_string),
        ..grant("g", Effect::Allow, &["a:b"], &["svc"]).spec
    };
    let (nb, exp) = ("2026-11-23T12:00:00Z", "2026-11-23T13:00:00Z");
    let cases = [
        (spec(None, None), "2026-11-23T11:00:00Z", GrantTime::InForce { until: None }),
        (spec(Some(nb), Some(exp)), "2026-11-23T11:59:59Z", GrantTime::NotYet { from: t(nb) }),
        // notBefore is inclusive, expiresAt exclusive.
        (spec(Some(nb), Some(exp)), nb, GrantTime::InForce { until: Some(t(exp)) }),
        (spec(Some(nb), Some(exp)), "2026-11-23T12:59:59Z", GrantTime::InForce { until: Some(t(exp)) }),
        (spec(Some(nb), Some(exp)), exp, GrantTime::Expired),
        (spec(None, Some(exp)), "2026-11-24T00:00:00Z", GrantTime::Expired),
    ];
    for (spec, now, want) in cases {
        assert_eq!(grant_window(&spec, t(now)), Ok(want), "{now} in {:?}..{:?}", spec.not_before, spec.expires_at);
    }
    assert_eq!(GrantTime::NotYet { from: t(nb) }.next_change(), Some(t(nb)));
    assert_eq!(GrantTime::Expired.next_change(), None);
    assert!(grant_window(&spec(Some("tomorrow"), None), t(nb)).is_err());
}
