//! The authorisation engine: pure functions from (run, agent, grants, parent, *now*) to a
//! decision. No I/O, no clock of its own: the controller passes *now*, tests pass a fixed one.
//!
//! Effective authority is always the **intersection** of what the run asks for, what the
//! Agent may hold (its ceiling), what the audience's ResourceServer registers for the run's
//! namespace, what the principal granted (the union of Allow grants in
//! force, minus every Deny grant in force) and, for a sub-agent, what the parent run holds.
//!
//! Rules, in the order they are checked:
//! 1. The run's own spec must be well-formed (scopes, durations, no `DEPUTY_*` env), and the
//!    run must not be in Deputy's own namespace.
//! 2. The Agent must exist and not be being deleted; its spec (pod template included) must be
//!    well-formed.
//! 3. For a sub-agent run: the parent must exist, be active, act for the same principal and
//!    have delegation depth left.
//! 4. Grants for (principal, agent) count only while in force: `notBefore <= now <
//!    expiresAt`, not being deleted. A malformed Allow grant is ignored; a malformed Deny
//!    grant denies everything (fail closed).
//! 5. Deny grants win. A Deny grant takes away its scopes and its audiences; an empty list
//!    means "all of them", so a Deny grant with both lists empty refuses the agent outright.
//!    A requested pattern that overlaps a denied one is dropped whole (patterns cannot
//!    express "P:* except Q").
//! 6. The pod is the Agent's template: a run adds only args and plain env to it.
//! 7. TTL = min(run, agent, contributing grants, parent, global); deadline = min(start plus
//!    maxDuration, start plus the grants' maxRunDuration, the grants' expiresAt, the parent's
//!    deadline, start plus the global maximum). A run left with no scope or no audience is
//!    denied, never given an empty token.

use std::borrow::Borrow;

use jiff::{SignedDuration, Timestamp};

use crate::duration;
use crate::registration::Registrations;
use crate::resources::{Agent, AgentRun, AgentRunSpec, DelegationGrant, DeniedScope, Effect, RunPhase};
use crate::scope::{self, Scope};

/// The longest AgentRun name: `deputy-run-` plus it is exactly the 253 characters a
/// Kubernetes name may have, so every run's children get its name unshortened (and two runs
/// never share a child name). The CRD refuses longer names too.
pub const MAX_RUN_NAME: usize = 242;

/// Operator-wide bounds and naming that every decision uses.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The SPIFFE trust domain of run identities (`cluster.local`).
    pub trust_domain: String,
    /// No token lives longer than this, whatever the resources say.
    pub max_token_ttl: SignedDuration,
    /// The token lifetime of a run that does not ask for one (before the other bounds).
    pub default_token_ttl: SignedDuration,
    /// No run lasts longer than this.
    pub max_run_duration: SignedDuration,
    /// Deputy's own namespace (its signing keys, its Lease): runs there are refused.
    pub deputy_namespace: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            trust_domain: "cluster.local".to_string(),
            max_token_ttl: SignedDuration::from_hours(1),
            default_token_ttl: SignedDuration::from_mins(10),
            max_run_duration: SignedDuration::from_hours(24),
            deputy_namespace: None,
        }
    }
}

/// Everything a decision depends on. `G` is a `DelegationGrant` or anything that borrows
/// as one (an `Arc` from a reflector store).
#[derive(Clone, Copy, Debug)]
pub struct Input<'a, G: Borrow<DelegationGrant> = DelegationGrant> {
    pub run: &'a AgentRun,
    /// The run's Agent, if it exists.
    pub agent: Option<&'a Agent>,
    /// The DelegationGrants of the run's namespace (any principal/agent; the engine filters).
    pub grants: &'a [G],
    /// The parent run named by `spec.parentRun`, if it exists, with its own decision.
    pub parent: Option<Parent<'a>>,
    /// The audiences the ResourceServers register for the run's namespace.
    pub registered: &'a Registrations,
    pub now: Timestamp,
    pub policy: &'a Policy,
}

/// A sub-agent's parent: the run (its principal, and whether it is live) and its decision,
/// recomputed the same way up the chain. Nothing of the parent's status is read as authority.
#[derive(Clone, Copy, Debug)]
pub struct Parent<'a> {
    pub run: &'a AgentRun,
    pub decision: &'a Decision,
}

/// Whether a run is live by its own record: active phase, never completed or revoked, not
/// being deleted. A status that went back from an end to an active phase is not live.
pub fn is_live_record(run: &AgentRun) -> bool {
    let s = run.status.as_ref();
    run.metadata.deletion_timestamp.is_none()
        && !run.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(crate::resources::ENDED_ANNOTATION))
        && s.and_then(|s| s.phase).is_some_and(RunPhase::is_active)
        && s.is_some_and(|s| s.completed_at.is_none() && s.revoked_at.is_none())
}

/// A machine-readable reason for a refusal. `as_str` is what appears in status, Events,
/// audit lines and metric labels (a bounded set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The run's spec is malformed.
    InvalidSpec,
    /// The named Agent does not exist (yet).
    AgentNotFound,
    /// The Agent is being deleted.
    AgentDeleted,
    /// The Agent's spec is malformed.
    InvalidAgent,
    /// No Allow grant for (principal, agent) exists yet.
    NoGrant,
    /// Allow grants exist but none is in force yet (before `notBefore`).
    GrantNotYetValid,
    /// Allow grants existed but every one has expired.
    GrantExpired,
    /// A Deny grant refuses the principal this agent (or everything the run asked for).
    DeniedByGrant,
    /// A Deny grant is malformed, so Deputy fails closed.
    InvalidDenyGrant,
    /// None of the requested scopes survives the intersection.
    NoScopesGranted,
    /// None of the requested audiences survives the intersection.
    NoAudienceGranted,
    /// None survives, and some were dropped because no ResourceServer registers them for the
    /// run's namespace (yet): a pending run waits for one.
    AudienceNotRegistered,
    /// The run is in Deputy's own namespace (where the signing keys live).
    ReservedNamespace,
    /// The parent run does not exist (yet).
    ParentNotFound,
    /// The parent run has not been authorised yet.
    ParentPending,
    /// The parent run is not active (it ended, or was denied).
    ParentNotActive,
    /// The parent run acts for another principal.
    ParentPrincipalMismatch,
    /// The chain already has as many hops as the grants allow.
    DelegationDepthExceeded,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::AgentNotFound => "AgentNotFound",
            Reason::AgentDeleted => "AgentDeleted",
            Reason::InvalidAgent => "InvalidAgent",
            Reason::NoGrant => "NoGrant",
            Reason::GrantNotYetValid => "GrantNotYetValid",
            Reason::GrantExpired => "GrantExpired",
            Reason::DeniedByGrant => "DeniedByGrant",
            Reason::InvalidDenyGrant => "InvalidDenyGrant",
            Reason::NoScopesGranted => "NoScopesGranted",
            Reason::NoAudienceGranted => "NoAudienceGranted",
            Reason::AudienceNotRegistered => "AudienceNotRegistered",
            Reason::ReservedNamespace => "ReservedNamespace",
            Reason::ParentNotFound => "ParentNotFound",
            Reason::ParentPending => "ParentPending",
            Reason::ParentNotActive => "ParentNotActive",
            Reason::ParentPrincipalMismatch => "ParentPrincipalMismatch",
            Reason::DelegationDepthExceeded => "DelegationDepthExceeded",
        }
    }

    /// Whether a *pending* run should wait for a change (something it names may still be
    /// created) rather than be denied for good. An active run loses its authority either way.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Reason::AgentNotFound
                | Reason::NoGrant
                | Reason::GrantNotYetValid
                | Reason::AudienceNotRegistered
                | Reason::ParentNotFound
                | Reason::ParentPending
        )
    }
}

/// Why a scope was dropped.
pub mod scope_reason {
    pub const NOT_IN_AGENT_CEILING: &str = "NotInAgentCeiling";
    pub const NOT_REGISTERED: &str = "NotInResourceServerScopes";
    pub const NOT_GRANTED: &str = "NotGrantedByPrincipal";
    pub const DENIED_BY_GRANT: &str = "DeniedByGrant";
    pub const NOT_HELD_BY_PARENT: &str = "NotHeldByParent";
}

/// A refusal: the reason, a sentence for people, and the scopes that were dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    pub denied_scopes: Vec<DeniedScope>,
}

/// What an authorised run holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Authorization {
    /// `spiffe://<trust-domain>/ns/<ns>/agent/<agent>/run/<run>`.
    pub identity: String,
    /// The authority: for each audience the run may use (sorted), the scopes it holds there
    /// (minimal and sorted). Only these pairs are ever put in a token.
    pub authority: Vec<(String, Vec<Scope>)>,
    /// Every scope held for some audience, minimal and sorted (the run token's `scope`).
    pub scopes: Vec<Scope>,
    /// The audiences of `authority`, sorted.
    pub audiences: Vec<String>,
    /// Requested scopes that were dropped, with reasons.
    pub denied_scopes: Vec<DeniedScope>,
    /// Lifetime of each run token.
    pub token_ttl: SignedDuration,
    /// When the run started (its deadline counts from here).
    pub started_at: Timestamp,
    /// The hard deadline.
    pub deadline: Timestamp,
    /// The Allow grants that contributed, sorted.
    pub grants: Vec<String>,
    /// Principal first, then acting run identities, outermost (oldest) first; the last is this run.
    pub delegation_chain: Vec<String>,
    /// How many further sub-agent hops this run may start.
    pub remaining_delegation_depth: u32,
}

impl Authorization {
    /// Records this authorisation in a run's status (the fields a child run's decision
    /// later reads back: scopes, audiences, TTL, deadline, chain, remaining depth).
    pub fn record_in(&self, status: &mut crate::resources::AgentRunStatus) {
        status.identity = Some(self.identity.clone());
        status.grant = Some(self.grants.join(","));
        status.granted_authority = self
            .authority
            .iter()
            .map(|(audience, scopes)| crate::resources::GrantedAuthority {
                audience: audience.clone(),
                scopes: scopes.iter().map(Scope::to_string).collect(),
            })
            .collect();
        status.granted_scopes = self.scopes.iter().map(Scope::to_string).collect();
        status.granted_audiences = self.audiences.clone();
        status.denied_scopes = self.denied_scopes.clone();
        status.delegation_chain = self.delegation_chain.clone();
        status.remaining_delegation_depth = Some(self.remaining_delegation_depth);
        status.token_ttl = Some(duration::format(self.token_ttl));
        status.started_at = Some(self.started_at);
        status.deadline = Some(self.deadline);
    }

    /// The acting run identities, chronological (the delegation chain without the principal).
    pub fn actors(&self) -> &[String] {
        self.delegation_chain.get(1..).unwrap_or(&[])
    }
}

/// The outcome of [`authorize`].
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Authorized(Authorization),
    Denied(Refusal),
}

impl Decision {
    pub fn is_authorized(&self) -> bool {
        matches!(self, Decision::Authorized(_))
    }
}

/// The run identity of a run.
pub fn run_identity(trust_domain: &str, namespace: &str, agent: &str, run: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/agent/{agent}/run/{run}")
}

fn refuse(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal { reason, message: message.into(), denied_scopes: vec![] }
}

/// A grant's spec, parsed.
struct ParsedGrant<'a> {
    name: &'a str,
    scopes: Vec<Scope>,
    audiences: &'a [String],
    max_token_ttl: Option<SignedDuration>,
    max_run_duration: Option<SignedDuration>,
    max_depth: u32,
    expires_at: Option<Timestamp>,
}

/// Where `now` falls in a grant's time window (`notBefore`, `expiresAt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantTime {
    /// Before `notBefore`: in force from `from`.
    NotYet { from: Timestamp },
    /// In force, until `expiresAt` if it has one.
    InForce { until: Option<Timestamp> },
    /// At or after `expiresAt`.
    Expired,
}

impl GrantTime {
    /// When the grant's window next changes.
    pub fn next_change(self) -> Option<Timestamp> {
        match self {
            GrantTime::NotYet { from } => Some(from),
            GrantTime::InForce { until } => until,
            GrantTime::Expired => None,
        }
    }
}

/// The one rule for a grant's time window, used by the decision, the grant's status phase and
/// the reconciler's wake-ups: in force from `notBefore` (inclusive) until `expiresAt`
/// (exclusive). Either time malformed: an error.
pub fn grant_window(spec: &crate::resources::DelegationGrantSpec, now: Timestamp) -> Result<GrantTime, String> {
    let not_before = spec.not_before.as_deref().map(parse_time).transpose()?;
    let expires_at = spec.expires_at.as_deref().map(parse_time).transpose()?;
    Ok(match (not_before, expires_at) {
        (Some(from), _) if now < from => GrantTime::NotYet { from },
        (_, Some(exp)) if now >= exp => GrantTime::Expired,
        (_, until) => GrantTime::InForce { until },
    })
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    s.parse::<Timestamp>().map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

fn parse_grant(g: &DelegationGrant, now: Timestamp) -> Result<(ParsedGrant<'_>, GrantTime), String> {
    let spec = &g.spec;
    let scopes = scope::parse_all(&spec.scopes).map_err(|e| e.to_string())?;
    let dur = |v: &Option<String>| v.as_deref().map(duration::parse).transpose().map_err(|e| e.to_string());
    let time = grant_window(spec, now)?;
    let expires_at = spec.expires_at.as_deref().map(parse_time).transpose()?;
    Ok((
        ParsedGrant {
            name: g.metadata.name.as_deref().unwrap_or(""),
            scopes,
            audiences: &spec.audiences,
            max_token_ttl: dur(&spec.max_token_ttl)?,
            max_run_duration: dur(&spec.max_run_duration)?,
            max_depth: spec.max_delegation_depth.unwrap_or(0),
            expires_at,
        },
        time,
    ))
}

/// Container images named by a pod template (containers, init and ephemeral containers).
pub fn template_images(template: &serde_json::Value) -> Result<Vec<String>, String> {
    let spec = template.get("spec").ok_or_else(|| "template has no spec".to_string())?;
    let mut images = vec![];
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(items) = spec.get(list) else { continue };
        let items = items.as_array().ok_or_else(|| format!("template.spec.{list} is not a list"))?;
        for (i, c) in items.iter().enumerate() {
            let image = c
                .get("image")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("template.spec.{list}[{i}] has no image"))?;
            images.push(image.to_string());
        }
    }
    if spec.get("containers").and_then(|c| c.as_array()).is_none_or(|c| c.is_empty()) {
        return Err("template.spec.containers is empty".to_string());
    }
    Ok(images)
}

/// Decides whether `input.run` may act, and with what authority.
pub fn authorize<G: Borrow<DelegationGrant>>(input: Input<'_, G>) -> Decision {
    match decide(input) {
        Ok(auth) => Decision::Authorized(auth),
        Err(refusal) => Decision::Denied(refusal),
    }
}

/// The steps of the decision, each a named check that refuses with a reason.
fn decide<G: Borrow<DelegationGrant>>(input: Input<'_, G>) -> Result<Authorization, Refusal> {
    let Input { run, agent, grants, parent, registered, now, policy } = input;
    let spec = &run.spec;
    let namespace = run.metadata.namespace.as_deref().unwrap_or("default");
    let run_name = run.metadata.name.as_deref().unwrap_or("");
    let Asked { requested, ttl: run_ttl, max_duration } = check_run(run, policy)?;
    let AgentBounds { agent, ceiling, ttl: agent_ttl } = check_agent(agent, spec, namespace)?;
    let identity = run_identity(&policy.trust_domain, namespace, &spec.agent, run_name);
    let parent_auth = check_parent(spec, parent)?;
    let (allows, denies) = grants_in_force(grants, spec, now)?;

    let (authority, denied_scopes) = intersect(&Pairs {
        requested: &requested,
        audiences: &spec.audiences,
        ceiling: &ceiling,
        agent,
        registered,
        namespace,
        parent: parent_auth,
        allows: &allows,
        denies: &denies,
    })?;
    let mut effective: Vec<Scope> = authority.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    scope::minimise(&mut effective);
    let audiences: Vec<String> = authority.iter().map(|(a, _)| a.clone()).collect();

    // The grants that contributed: those consenting to a pair the run holds.
    let contributing: Vec<&ParsedGrant<'_>> = allows
        .iter()
        .filter(|g| {
            authority
                .iter()
                .any(|(a, held)| g.audiences.contains(a) && held.iter().any(|h| g.scopes.iter().any(|s| h.overlaps(s))))
        })
        .collect();

    // 6./7. Lifetimes.
    // The deadline counts from the run's creation, which no tenant can move (a status can be
    // written by anyone allowed to write it, so it is never read here).
    let started_at = run.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    let mut ttl = run_ttl.unwrap_or(policy.default_token_ttl).min(agent_ttl).min(policy.max_token_ttl);
    let mut deadline = add(started_at, max_duration.min(policy.max_run_duration));
    let mut depth = u32::MAX;
    for g in &contributing {
        if let Some(t) = g.max_token_ttl {
            ttl = ttl.min(t);
        }
        if let Some(d) = g.max_run_duration {
            deadline = deadline.min(add(started_at, d));
        }
        if let Some(exp) = g.expires_at {
            deadline = deadline.min(exp);
        }
        depth = depth.min(g.max_depth);
    }
    let mut chain = vec![spec.principal.clone()];
    if let Some(pa) = parent_auth {
        ttl = ttl.min(pa.token_ttl);
        deadline = deadline.min(pa.deadline);
        // At least 1: a parent with no depth left was refused above.
        depth = depth.min(pa.remaining_delegation_depth - 1);
        // The parent's chain already starts with the principal.
        if !pa.delegation_chain.is_empty() {
            chain = pa.delegation_chain.clone();
        }
    }
    chain.push(identity.clone());
    let mut grant_names: Vec<String> = contributing.iter().map(|g| g.name.to_string()).collect();
    grant_names.sort();

    Ok(Authorization {
        identity,
        authority,
        scopes: effective,
        audiences,
        denied_scopes,
        token_ttl: ttl,
        started_at,
        deadline,
        grants: grant_names,
        delegation_chain: chain,
        remaining_delegation_depth: depth,
    })
}

/// A run's authority: for each audience, the scopes held there.
type Held = Vec<(String, Vec<Scope>)>;

/// What the authority of a run is made from (5.).
struct Pairs<'a, 'g> {
    requested: &'a [Scope],
    audiences: &'a [String],
    ceiling: &'a [Scope],
    agent: &'a Agent,
    registered: &'a Registrations,
    namespace: &'a str,
    parent: Option<&'a Authorization>,
    allows: &'a [ParsedGrant<'g>],
    denies: &'a [ParsedGrant<'g>],
}

/// Step 5: Authority, per audience: requested ∩ ceiling ∩ ResourceServer(a) ∩ ⋃{Allow g : a ∈ g.audiences} −
///    ⋃{Deny d : a ∈ d.audiences or d names none} (∩ the parent's for a). Grants add up as
///    pairs, never as (all their scopes) × (all their audiences).
fn intersect(p: &Pairs<'_, '_>) -> Result<(Held, Vec<DeniedScope>), Refusal> {
    let mut requested_audiences: Vec<&String> = p.audiences.iter().collect();
    requested_audiences.sort();
    requested_audiences.dedup();
    let mut authority: Vec<(String, Vec<Scope>)> = vec![];
    // For each requested scope, how far it got for any audience (to say why it was dropped).
    let mut furthest = vec![Reached::Nothing; p.requested.len()];
    // Whether any audience was left to hold scopes at all.
    let mut scoped_any = false;
    // Why an audience the Agent may use is not registered here (for the refusal's message).
    let mut unregistered = vec![];
    for a in requested_audiences {
        if !p.agent.spec.audiences.contains(a) {
            continue;
        }
        // Only the audience's owners decide which namespaces may be given tokens for it.
        let server_scopes = match p.registered.get(a) {
            Ok(r) => &r.scopes,
            Err(why) => {
                unregistered.push(why.explain(a, p.namespace));
                continue;
            }
        };
        // A sub-agent may use only its parent's audiences, with at most its scopes there.
        let parent_scopes: Option<&[Scope]> = match p.parent {
            Some(pa) => match pa.authority.iter().find(|(pa, _)| pa == a) {
                Some((_, held)) => Some(held),
                None => continue,
            },
            None => None,
        };
        let granted: Vec<Scope> =
            p.allows.iter().filter(|g| g.audiences.contains(a)).flat_map(|g| g.scopes.iter().cloned()).collect();
        if granted.is_empty() {
            continue;
        }
        let denies_a: Vec<&ParsedGrant<'_>> =
            p.denies.iter().filter(|d| d.audiences.is_empty() || d.audiences.contains(a)).collect();
        if denies_a.iter().any(|d| d.scopes.is_empty()) {
            // A Deny grant with no scopes takes the whole audience away.
            continue;
        }
        scoped_any = true;
        let mut held = vec![];
        for (i, r) in p.requested.iter().enumerate() {
            let mut step = scope::intersect_sets(std::slice::from_ref(r), p.ceiling);
            let mut stage = Reached::Nothing;
            if !step.is_empty() {
                step = scope::intersect_sets(&step, server_scopes);
                stage = Reached::Ceiling;
            }
            if !step.is_empty() {
                step = scope::intersect_sets(&step, &granted);
                stage = Reached::Server;
            }
            if !step.is_empty() {
                step.retain(|s| !denies_a.iter().any(|d| d.scopes.iter().any(|x| s.overlaps(x))));
                stage = Reached::Grant;
            }
            if let (false, Some(ps)) = (step.is_empty(), parent_scopes) {
                step = scope::intersect_sets(&step, ps);
                stage = Reached::Deny;
            }
            furthest[i] = furthest[i].max(if step.is_empty() { stage } else { Reached::Held });
            held.extend(step);
        }
        scope::minimise(&mut held);
        if !held.is_empty() {
            authority.push((a.clone(), held));
        }
    }
    let mut denied_scopes = vec![];
    for (r, f) in p.requested.iter().zip(&furthest) {
        let why = match f {
            Reached::Held => continue,
            Reached::Nothing => scope_reason::NOT_IN_AGENT_CEILING,
            Reached::Ceiling => scope_reason::NOT_REGISTERED,
            Reached::Server => scope_reason::NOT_GRANTED,
            Reached::Grant => scope_reason::DENIED_BY_GRANT,
            Reached::Deny => scope_reason::NOT_HELD_BY_PARENT,
        };
        denied_scopes.push(DeniedScope { scope: r.to_string(), reason: why.to_string() });
    }
    if authority.is_empty() {
        if !scoped_any {
            return Err(Refusal {
                reason: if unregistered.is_empty() { Reason::NoAudienceGranted } else { Reason::AudienceNotRegistered },
                message: if unregistered.is_empty() {
                    format!("none of the requested audiences {:?} may be used", p.audiences)
                } else {
                    format!(
                        "none of the requested audiences {:?} may be used: {}",
                        p.audiences,
                        unregistered.join("; ")
                    )
                },
                denied_scopes,
            });
        }
        let all_denied =
            !denied_scopes.is_empty() && denied_scopes.iter().all(|d| d.reason == scope_reason::DENIED_BY_GRANT);
        let reason = if all_denied { Reason::DeniedByGrant } else { Reason::NoScopesGranted };
        return Err(Refusal {
            reason,
            message: format!(
                "none of the requested scopes may be held for any audience: {}",
                summarise(&denied_scopes)
            ),
            denied_scopes,
        });
    }
    Ok((authority, denied_scopes))
}

/// What the run asks for, from its own spec (1.).
struct Asked {
    requested: Vec<Scope>,
    ttl: Option<SignedDuration>,
    max_duration: SignedDuration,
}

/// Step 1: The run's own spec, and where it is.
fn check_run(run: &AgentRun, policy: &Policy) -> Result<Asked, Refusal> {
    let spec = &run.spec;
    let namespace = run.metadata.namespace.as_deref().unwrap_or("default");
    let run_name = run.metadata.name.as_deref().unwrap_or("");
    let requested = match scope::parse_all(&spec.scopes) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => return Err(refuse(Reason::InvalidSpec, "spec.scopes is empty")),
        Err(e) => return Err(refuse(Reason::InvalidSpec, format!("spec.scopes: {e}"))),
    };
    if spec.audiences.is_empty() || spec.audiences.iter().any(|a| a.is_empty()) {
        return Err(refuse(Reason::InvalidSpec, "spec.audiences must name at least one non-empty audience"));
    }
    let ttl = match spec.token_ttl.as_deref().map(duration::parse).transpose() {
        Ok(t) => t,
        Err(e) => return Err(refuse(Reason::InvalidSpec, format!("spec.tokenTTL: {e}"))),
    };
    let max_duration = match duration::parse(&spec.max_duration) {
        Ok(d) => d,
        Err(e) => return Err(refuse(Reason::InvalidSpec, format!("spec.maxDuration: {e}"))),
    };
    if run_name.len() > MAX_RUN_NAME {
        // Children are named `deputy-run-<run>`; a longer name would have to be shortened, and
        // a shortened name can be chosen to equal another run's.
        return Err(refuse(Reason::InvalidSpec, format!("the run's name is longer than {MAX_RUN_NAME} characters")));
    }
    if let Some(e) = spec.env.iter().find(|e| e.name.starts_with("DEPUTY_")) {
        return Err(refuse(Reason::InvalidSpec, format!("spec.env: {:?} is reserved for Deputy", e.name)));
    }
    if policy.deputy_namespace.as_deref() == Some(namespace) {
        return Err(refuse(
            Reason::ReservedNamespace,
            format!("runs in Deputy's own namespace {namespace:?} are refused (it holds the signing keys)"),
        ));
    }

    Ok(Asked { requested, ttl, max_duration })
}

/// What the Agent allows every run of it (2.).
struct AgentBounds<'a> {
    agent: &'a Agent,
    ceiling: Vec<Scope>,
    ttl: SignedDuration,
}

/// Step 2: The Agent the run names: it exists, is not being deleted, and its spec is sound.
fn check_agent<'a>(agent: Option<&'a Agent>, spec: &AgentRunSpec, namespace: &str) -> Result<AgentBounds<'a>, Refusal> {
    let Some(agent) = agent else {
        return Err(refuse(
            Reason::AgentNotFound,
            format!("Agent {:?} does not exist in namespace {namespace}", spec.agent),
        ));
    };
    if agent.metadata.deletion_timestamp.is_some() {
        return Err(refuse(Reason::AgentDeleted, format!("Agent {:?} is being deleted", spec.agent)));
    }
    let ceiling = match scope::parse_all(&agent.spec.scopes) {
        Ok(s) => s,
        Err(e) => return Err(refuse(Reason::InvalidAgent, format!("Agent {:?} spec.scopes: {e}", spec.agent))),
    };
    let agent_ttl = match duration::parse(&agent.spec.max_token_ttl) {
        Ok(d) => d,
        Err(e) => return Err(refuse(Reason::InvalidAgent, format!("Agent {:?} spec.maxTokenTTL: {e}", spec.agent))),
    };
    if let Err(e) = template_images(&agent.spec.template) {
        return Err(refuse(Reason::InvalidAgent, format!("Agent {:?} spec.{e}", spec.agent)));
    }

    Ok(AgentBounds { agent, ceiling, ttl: agent_ttl })
}

/// Step 3: the parent, for a sub-agent run: it is authorised, live, acts for the same
/// principal and may delegate further. Its authority (decided afresh, never read from its status).
fn check_parent<'a>(spec: &AgentRunSpec, parent: Option<Parent<'a>>) -> Result<Option<&'a Authorization>, Refusal> {
    let Some(parent_name) = spec.parent_run.as_deref() else { return Ok(None) };
    let Some(parent) = parent else {
        return Err(refuse(Reason::ParentNotFound, format!("parent run {parent_name:?} does not exist")));
    };
    let phase = parent.run.status.as_ref().and_then(|s| s.phase).unwrap_or(RunPhase::Pending);
    let ended = parent.run.metadata.deletion_timestamp.is_some()
        || parent.run.status.as_ref().is_some_and(|s| s.completed_at.is_some() || s.revoked_at.is_some());
    if phase == RunPhase::Pending && !ended {
        return Err(refuse(Reason::ParentPending, format!("parent run {parent_name:?} is not authorised yet")));
    }
    if !is_live_record(parent.run) {
        return Err(refuse(Reason::ParentNotActive, format!("parent run {parent_name:?} is not active")));
    }
    if parent.run.spec.principal != spec.principal {
        return Err(refuse(
            Reason::ParentPrincipalMismatch,
            format!("parent run {parent_name:?} acts for {:?}, not {:?}", parent.run.spec.principal, spec.principal),
        ));
    }
    let pa = match parent.decision {
        Decision::Authorized(a) => a,
        Decision::Denied(r) => {
            return Err(refuse(
                Reason::ParentNotActive,
                format!("parent run {parent_name:?} no longer holds authority ({})", r.reason.as_str()),
            ));
        }
    };
    if pa.remaining_delegation_depth == 0 {
        return Err(refuse(
            Reason::DelegationDepthExceeded,
            format!("parent run {parent_name:?} may not delegate further (maxDelegationDepth reached)"),
        ));
    }
    Ok(Some(pa))
}

/// Step 4: the grants for (principal, agent) in force now: the Allows and the Denies. A
/// blanket Deny, a malformed Deny (fail closed), or no Allow in force refuses the run.
fn grants_in_force<'g, G: Borrow<DelegationGrant>>(
    grants: &'g [G],
    spec: &AgentRunSpec,
    now: Timestamp,
) -> Result<(Vec<ParsedGrant<'g>>, Vec<ParsedGrant<'g>>), Refusal> {
    let mut allows = vec![];
    let mut denies = vec![];
    let (mut not_yet, mut expired) = (false, false);
    for g in grants {
        let g: &DelegationGrant = g.borrow();
        if g.spec.principal != spec.principal || g.spec.agent != spec.agent || g.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match (parse_grant(g, now), g.spec.effect) {
            (Ok((p, GrantTime::InForce { .. })), Effect::Allow) => allows.push(p),
            (Ok((p, GrantTime::InForce { .. })), Effect::Deny) => denies.push(p),
            (Ok((_, GrantTime::NotYet { .. })), Effect::Allow) => not_yet = true,
            (Ok((_, GrantTime::Expired)), Effect::Allow) => expired = true,
            (Ok(_), Effect::Deny) => {}
            (Err(_), Effect::Allow) => {}
            (Err(e), Effect::Deny) => {
                let name = g.metadata.name.as_deref().unwrap_or("");
                return Err(refuse(
                    Reason::InvalidDenyGrant,
                    format!("Deny grant {name:?} is malformed ({e}); failing closed"),
                ));
            }
        }
    }
    if let Some(d) = denies.iter().find(|d| d.scopes.is_empty() && d.audiences.is_empty()) {
        return Err(refuse(
            Reason::DeniedByGrant,
            format!("grant {:?} denies {} the use of agent {:?}", d.name, spec.principal, spec.agent),
        ));
    }
    if allows.is_empty() {
        let (reason, what) = if not_yet {
            (Reason::GrantNotYetValid, "is not in force yet")
        } else if expired {
            (Reason::GrantExpired, "has expired")
        } else {
            (Reason::NoGrant, "exists")
        };
        let msg = if reason == Reason::NoGrant {
            format!("no Allow grant for principal {:?} and agent {:?} exists", spec.principal, spec.agent)
        } else {
            format!("every Allow grant for principal {:?} and agent {:?} {what}", spec.principal, spec.agent)
        };
        return Err(refuse(reason, msg));
    }

    Ok((allows, denies))
}

/// How far a requested scope got through the intersection for one audience: past the Agent's
/// ceiling, past the ResourceServer's scopes, past the grants, past the Denies, or held. The furthest over all audiences says
/// why a dropped scope was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Reached {
    Nothing,
    Ceiling,
    Server,
    Grant,
    Deny,
    Held,
}

fn add(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

fn summarise(denied: &[DeniedScope]) -> String {
    denied.iter().map(|d| format!("{} ({})", d.scope, d.reason)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests;
