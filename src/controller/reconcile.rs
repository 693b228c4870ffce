//! Reconciling one AgentRun: authorise → ServiceAccount → token Secret → Pod → status; rotate
//! the token at about half its life; revoke on every trigger.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::children::{self, RunInfo};
use super::events::EventType;
use super::owned::{self, Taken};
use super::plan::{self, Children, Held, Keep, Need, Observed, PodStep, Step, Token};
use super::{Context, Error, FINALIZER, MANAGER, requeue};
use crate::audit::{Action as AuditAction, Record};
use crate::authorization::{self, Authorization, Decision, Input, Parent, Reason, Refusal};
use crate::resources::{
    AgentRun, AgentRunStatus, Condition, ConditionStatus, DelegationGrant, ENDED_ANNOTATION, RunPhase, set_condition,
};
use crate::runs::{self, End, Found, PodPhase, contract};
use crate::scope;
use crate::tokens::{RunRef, RunTokenSpec};

/// Condition types on an AgentRun.
pub const COND_AUTHORIZED: &str = "Authorized";
pub const COND_TOKEN_ISSUED: &str = "TokenIssued";
pub const COND_REVOKED: &str = "Revoked";

#[tracing::instrument(skip_all, fields(run = %run.name_any(), namespace = run.namespace().unwrap_or_default()))]
pub async fn reconcile(run: Arc<AgentRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = run.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let key = format!("{ns}/{}", run.name_any());
    let api: Api<AgentRun> = Api::namespaced(ctx.client.clone(), &ns);
    let started = std::time::Instant::now();
    let result = finalizer(&api, FINALIZER, run, |event| async {
        match event {
            Finalizer::Apply(run) => match apply(&run, &ctx).await {
                Err(Error::NameTaken(taken)) => name_taken(&run, &ctx, taken).await,
                other => other,
            },
            Finalizer::Cleanup(run) => cleanup(&run, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e) | kube::runtime::finalizer::Error::RemoveFinalizer(e) => {
            Error::Kube(e)
        }
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics.observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::category));
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

/// Transient errors are retried with a capped exponential backoff per object.
pub fn error_policy(run: Arc<AgentRun>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    let delay = ctx.backoff(&key, err);
    tracing::warn!(run = %key, error = %err, category = err.category(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// What the engine needs, from the caches.
fn decide(run: &AgentRun, ctx: &Context, now: Timestamp) -> Decision {
    let ns = run.namespace().unwrap_or_default();
    let grants: Vec<_> =
        ctx.stores.grants.state().into_iter().filter(|g| g.namespace().as_deref() == Some(ns.as_str())).collect();
    decide_with(run, ctx, &grants, now)
}

/// How many runs up a chain a decision looks before giving up: more than any grant's
/// `maxDelegationDepth` allows, and the end of a `parentRun` cycle.
const MAX_CHAIN: usize = 10;

/// The decision with the given grants (of the run's namespace) and the cached Agent; a
/// sub-agent's parent is decided the same way, up the chain (never read from its status).
fn decide_with<G: std::borrow::Borrow<DelegationGrant>>(
    run: &AgentRun,
    ctx: &Context,
    grants: &[G],
    now: Timestamp,
) -> Decision {
    let registered = ctx.stores.registrations(&run.namespace().unwrap_or_default());
    decide_in_chain(run, ctx, grants, &registered, now, 0)
}

/// A parent is in the same namespace, so the same registrations hold all the way up.
fn decide_in_chain<G: std::borrow::Borrow<DelegationGrant>>(
    run: &AgentRun,
    ctx: &Context,
    grants: &[G],
    registered: &crate::registration::Registrations,
    now: Timestamp,
    hops: usize,
) -> Decision {
    let ns = run.namespace().unwrap_or_default();
    let agent = ctx.stores.agents.get(&ObjectRef::new(&run.spec.agent).within(&ns));
    let parent = run.spec.parent_run.as_ref().and_then(|p| ctx.stores.runs.get(&ObjectRef::new(p).within(&ns)));
    let parent_decision = parent.as_deref().map(|p| {
        if hops >= MAX_CHAIN {
            Decision::Denied(Refusal {
                reason: Reason::DelegationDepthExceeded,
                message: format!("the chain of parent runs is longer than {MAX_CHAIN} (or a cycle)"),
                denied_scopes: vec![],
            })
        } else {
            decide_in_chain(p, ctx, grants, registered, now, hops + 1)
        }
    });
    authorization::authorize(Input {
        run,
        agent: agent.as_deref(),
        grants,
        parent: parent.as_deref().zip(parent_decision.as_ref()).map(|(run, decision)| Parent { run, decision }),
        registered,
        now,
        policy: &ctx.cfg.policy,
    })
}

/// Observes the run, asks the plan for the next step (observing more when it asks), and
/// carries the step out.
async fn apply(run: &AgentRun, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.now();
    let uid = run.uid().unwrap_or_default();
    let mut observed = Observed {
        now,
        uid: uid.clone(),
        status: run.status.clone().unwrap_or_default(),
        cache_behind: ctx.cache_is_behind(&uid, run.status.as_ref()),
        deleting: run.meta().deletion_timestamp.is_some(),
        revoke_requested: run.annotations().contains_key(runs::REVOKE_ANNOTATION),
        // An unknown reason (not Deputy's writing) still marks the run ended.
        ended: run.annotations().get(ENDED_ANNOTATION).map(|v| End::parse(v).unwrap_or(End::StatusTampered)),
        decision: None,
        fresh: false,
        token: ctx.held(&uid).map_or(Token::Unread, Token::Holds),
        children: None,
    };
    // Each need is asked for at most once, so the plan settles within as many rounds.
    for _ in 0..=Need::COUNT {
        match plan::plan(&observed) {
            Step::Observe(need) => observe(run, ctx, &mut observed, need).await?,
            step => return carry_out(run, ctx, &observed, step).await,
        }
    }
    Err(Error::Unsettled)
}

/// Makes the observation the plan asked for.
async fn observe(run: &AgentRun, ctx: &Context, o: &mut Observed, need: Need) -> Result<(), Error> {
    match need {
        Need::Decision => o.decision = Some(decide(run, ctx, o.now)),
        Need::FreshGrants => {
            let api: Api<DelegationGrant> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
            let fresh = api.list(&ListParams::default()).await?.items;
            o.decision = Some(decide_with(run, ctx, &fresh, o.now));
            o.fresh = true;
        }
        Need::Token => {
            let held = held_by_token(run, ctx).await?;
            ctx.hold(&o.uid, held.clone());
            o.token = held.map_or(Token::Invalid, Token::Holds);
        }
        Need::Children => o.children = Some(observe_children(run, ctx).await?),
    }
    Ok(())
}

async fn carry_out(run: &AgentRun, ctx: &Context, o: &Observed, step: Step) -> Result<Action, Error> {
    let now = o.now;
    match step {
        // Our own last write has not reached the cache yet: acting on this copy would mint or
        // revoke a second time. The watch event of that write triggers the next reconcile.
        Step::WaitForCache => Ok(Action::requeue(Duration::from_millis(500))),
        Step::Tampered => tampered(run, ctx, o.status.clone()).await,
        Step::FinishEnd { stop_pod } => {
            // Final. Make sure nothing it held survives (e.g. the operator died mid-revocation).
            remove_credentials(run, ctx, stop_pod).await?;
            let mut s = o.status.clone();
            s.revoked_at = Some(now);
            write_status(run, ctx, s).await?;
            Ok(Action::await_change())
        }
        Step::Idle => Ok(Action::await_change()),
        // `apply` makes every observation before it carries a step out.
        Step::Observe(_) => Err(Error::Unsettled),
        Step::End(why, message) => end(run, ctx, why, &message).await,
        Step::Authorize(auth) => authorize(run, ctx, auth, now).await,
        Step::Wait(refusal) => wait(run, ctx, refusal, now).await,
        Step::Deny(refusal) => deny(run, ctx, refusal, now).await,
        Step::Taken { child, leaving } => Err(Error::NameTaken(Taken {
            kind: child.kind().to_string(),
            name: runs::child_name(&run.name_any()),
            leaving,
        })),
        Step::Keep(keep) => {
            let secret = o.children.as_ref().map_or(Found::Absent, |c| c.secret.clone());
            keep_active(run, ctx, o.status.clone(), keep, secret, now).await
        }
    }
}

/// Someone wrote an ended run's status back to a live phase. It stays ended: nothing is
/// created for it again, and every replica refuses its tokens (see `runs::is_active`).
async fn tampered(run: &AgentRun, ctx: &Context, status: AgentRunStatus) -> Result<Action, Error> {
    let phase = status.phase.unwrap_or(RunPhase::Pending);
    tracing::warn!(phase = ?phase, "the status of an ended run was written back to a live phase; it stays ended");
    publish(
        ctx,
        run,
        EventType::Warning,
        End::StatusTampered.as_str(),
        "Revoke",
        format!("status.phase {phase:?} on a run that completed or was revoked: the run stays ended"),
    )
    .await;
    mark_ended(run, ctx, End::StatusTampered).await?;
    remove_credentials(run, ctx, true).await?;
    let mut s = status;
    s.phase = Some(End::StatusTampered.phase());
    s.reason = Some(End::StatusTampered.as_str().into());
    s.message = Some(End::StatusTampered.message().into());
    write_status(run, ctx, s).await?;
    Ok(Action::await_change())
}

/// What the run's current token carries, if its Secret holds one that verifies with our keys
/// (a token written there by anyone else does not).
async fn held_by_token(run: &AgentRun, ctx: &Context) -> Result<Option<Held>, Error> {
    let ns = run.namespace().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get_opt(&runs::child_name(&run.name_any())).await?;
    let token = secret.and_then(|s| s.data).and_then(|d| d.get(contract::TOKEN_KEY).map(|b| b.0.clone()));
    let Some(token) = token.and_then(|t| String::from_utf8(t).ok()) else { return Ok(None) };
    let Ok(claims) = ctx.keys.get().verify_any_audience(&token) else { return Ok(None) };
    if claims.run.uid != run.uid().unwrap_or_default() {
        return Ok(None);
    }
    let held = claims
        .authority
        .iter()
        .map(|(aud, scopes)| {
            let scopes = scopes.split(' ').filter_map(|s| scope::Scope::parse(s).ok()).collect();
            (aud.clone(), scopes)
        })
        .collect();
    Ok(Some(held))
}

fn reference(run: &AgentRun) -> k8s_openapi::api::core::v1::ObjectReference {
    run.object_ref(&())
}

async fn publish(ctx: &Context, run: &AgentRun, type_: EventType, reason: &str, action: &str, note: String) {
    if let Err(e) = ctx.events.publish(&reference(run), type_, reason, action, &note).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
}

async fn write_status(run: &AgentRun, ctx: &Context, mut status: AgentRunStatus) -> Result<(), Error> {
    status.observed_generation = run.metadata.generation;
    if run.status.as_ref() == Some(&status) {
        return Ok(());
    }
    patch_status(run, ctx, &status).await
}

/// Writes the whole status (server-side apply) and remembers what was written.
async fn patch_status(run: &AgentRun, ctx: &Context, status: &AgentRunStatus) -> Result<(), Error> {
    let api: Api<AgentRun> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun", "status": status});
    api.patch_status(&run.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.wrote(&run.uid().unwrap_or_default(), status);
    Ok(())
}

fn chain_of(status: &AgentRunStatus) -> Vec<String> {
    status.delegation_chain.get(1..).map(<[String]>::to_vec).unwrap_or_default()
}

/// The run's status with `phase` and the refusal as reason, message and `Authorized=False`.
fn refused_status(run: &AgentRun, phase: RunPhase, refusal: &Refusal, now: Timestamp) -> AgentRunStatus {
    let mut status = run.status.clone().unwrap_or_default();
    status.phase = Some(phase);
    status.reason = Some(refusal.reason.as_str().into());
    status.message = Some(refusal.message.clone());
    let cond = Condition::new(
        COND_AUTHORIZED,
        ConditionStatus::False,
        refusal.reason.as_str(),
        refusal.message.clone(),
        now,
        run.metadata.generation,
    );
    set_condition(&mut status.conditions, cond);
    status
}

/// A pending run that names something not there yet waits for it.
async fn wait(run: &AgentRun, ctx: &Context, refusal: Refusal, now: Timestamp) -> Result<Action, Error> {
    let already = run.status.as_ref().and_then(|s| s.reason.as_deref()) == Some(refusal.reason.as_str());
    let status = refused_status(run, RunPhase::Pending, &refusal, now);
    write_status(run, ctx, status).await?;
    if !already {
        publish(
            ctx,
            run,
            EventType::Warning,
            refusal.reason.as_str(),
            "Authorize",
            format!("waiting: {}", refusal.message),
        )
        .await;
    }
    // A grant that becomes valid later is the only change no watch event announces.
    Ok(match next_grant_change(run, ctx, now) {
        Some(at) => requeue(until(now, at)),
        None => Action::await_change(),
    })
}

async fn deny(run: &AgentRun, ctx: &Context, refusal: Refusal, now: Timestamp) -> Result<Action, Error> {
    let mut status = refused_status(run, RunPhase::Denied, &refusal, now);
    status.denied_scopes = refusal.denied_scopes.clone();
    status.completed_at = Some(now);
    write_status(run, ctx, status).await?;
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let requested = run.spec.scopes.clone();
    Record {
        scopes: &requested,
        audiences: &run.spec.audiences,
        reason: Some(refusal.reason.as_str()),
        message: Some(&refusal.message),
        task: Some(&run.spec.task),
        ..Record::new(AuditAction::Denied, &run.spec.principal, &[], &ns, &name, &run.spec.agent)
    }
    .emit();
    ctx.metrics.run_denied(refusal.reason);
    publish(ctx, run, EventType::Warning, refusal.reason.as_str(), "Authorize", refusal.message).await;
    Ok(Action::await_change())
}

/// A run token just written to the run's Secret.
struct Minted {
    issued_at: Timestamp,
    expires_at: Timestamp,
    jti: String,
}

impl Minted {
    /// Records the token in the run's status (Deputy's own report of what it minted).
    fn record_in(&self, status: &mut AgentRunStatus) {
        status.token_issued_at = Some(self.issued_at);
        status.token_expires_at = Some(self.expires_at);
        status.token_id = Some(self.jti.clone());
    }
}

/// Mints a run token into the run's Secret from the decision just made (never from the
/// status). `rotations` is the
/// count the status will hold once this token is recorded (the seed of its rotation time).
async fn mint(
    run: &AgentRun,
    ctx: &Context,
    auth: &Authorization,
    rotations: u32,
    secret: Found,
    rotation: Option<plan::Mint>,
    now: Timestamp,
) -> Result<Minted, Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let identity = auth.identity.clone();
    let ttl = auth.token_ttl.min(ctx.cfg.policy.max_token_ttl);
    let deadline = auth.deadline;
    let actors = auth.actors().to_vec();
    let scopes = auth.scopes.clone();
    let granted_scopes: Vec<String> = scopes.iter().map(ToString::to_string).collect();
    let keys = ctx.keys.get();
    // The run token is for Deputy alone (its audience is Deputy's issuer): downstream services
    // only ever see single-audience exchanged tokens, which cannot be replayed across them.
    let own_audience = [ctx.keys.issuer().to_string()];
    let claims = RunTokenSpec {
        issuer: ctx.keys.issuer(),
        principal: &run.spec.principal,
        audiences: &own_audience,
        identity: &identity,
        scope: scope::to_claim(&scopes),
        authority: auth.authority.iter().map(|(a, s)| (a.clone(), scope::to_claim(s))).collect(),
        actors: &actors,
        run: RunRef { namespace: ns.clone(), name: name.clone(), uid: run.uid().unwrap_or_default() },
        task: &run.spec.task,
        issued_at: now,
        ttl,
        not_after: deadline,
    }
    .claims();
    let token = keys.set.active().sign(&claims)?;
    let expires = claims.expires_at();
    let next = children::next_rotation(now, expires, deadline, &run.uid().unwrap_or_default(), rotations + 1)
        .unwrap_or(expires);
    let info = RunInfo {
        issuer: ctx.keys.issuer(),
        token_endpoint: &ctx.cfg.children.token_endpoint,
        identity: &identity,
        namespace: &ns,
        run: &name,
        principal: &run.spec.principal,
        scopes: granted_scopes,
        audiences: &auth.audiences,
        token_file: contract::file(contract::TOKEN_KEY),
        actor_token_file: contract::file(contract::ACTOR_TOKEN_PATH),
        token_expires_at: expires,
        next_rotation_at: next,
        deadline,
    };
    let number = rotations.saturating_add(1);
    // The Secret's number and resourceVersion from one look: if it holds this number already
    // (a write the plan did not see yet), this token is not written over it.
    let (held, seen) = seen_secret(run, ctx);
    if held >= number {
        return Err(Error::CacheBehind(format!("Secret {:?} (it holds token {held})", runs::child_name(&name))));
    }
    let desired = children::desired_secret(run, &token, number, &info)?;
    // The token's audit line is written before the token leaves the process.
    let actors = auth.actors().to_vec();
    let audit_scopes: Vec<String> = auth.scopes.iter().map(ToString::to_string).collect();
    let action = if rotation.is_some() { AuditAction::Rotated } else { AuditAction::Minted };
    Record {
        scopes: &audit_scopes,
        audiences: &auth.audiences,
        jti: Some(&claims.jti),
        exp: Some(expires.as_second()),
        reason: rotation.map(plan::Mint::as_str),
        task: rotation.is_none().then_some(run.spec.task.as_str()),
        ..Record::new(action, &run.spec.principal, &actors, &ns, &name, &run.spec.agent)
    }
    .emit();
    // Remembered before the write's answer: a write that fails may still have landed.
    let uid = run.uid().unwrap_or_default();
    ctx.numbered(&uid, Some((number, None)));
    let api = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    tracing::debug!(run = %name, number, held, over = ?seen, known = ?secret, "writing the run token");
    let version = owned::put_over(&api, &desired, run, secret, seen).await?;
    tracing::debug!(run = %name, number, version = ?version, "run token written");
    ctx.numbered(&uid, Some((number, version)));
    ctx.hold(&uid, Some(auth.authority.clone()));
    ctx.metrics.token_minted("run");
    Ok(Minted { issued_at: now, expires_at: expires, jti: claims.jti })
}

async fn authorize(run: &AgentRun, ctx: &Context, auth: Authorization, now: Timestamp) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let agent = agent_of(run, ctx)?;
    // Build every child first: a template that cannot become a pod is a denial, before
    // anything is created.
    let pod = match children::desired_pod(run, &agent, &auth, &ctx.cfg.children, now) {
        Ok(p) => p,
        Err(e) => {
            let refusal = Refusal { reason: Reason::InvalidSpec, message: e.to_string(), denied_scopes: vec![] };
            return deny(run, ctx, refusal, now).await;
        }
    };
    let sa = children::desired_service_account(run, &agent, &auth);

    let mut status = run.status.clone().unwrap_or_default();
    auth.record_in(&mut status);
    // Each child is created (or, if the cache shows the run's own, written at its uid): a name
    // someone else took first fails the run (`name_taken`), and what was made is removed.
    let sa_known = owned::known(&ctx.stores.service_accounts, run);
    owned::put(&Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns), &sa, run, sa_known).await?;
    // Write-ahead audit: the decision's line is written (and flushed) before the token exists,
    // and `mint` writes the token's line before the token leaves the process. A crash may leave
    // a line for a token never used, never a token without its line.
    let actors = chain_of(&status);
    Record {
        scopes: &status.granted_scopes,
        audiences: &status.granted_audiences,
        task: Some(&run.spec.task),
        reason: Some("Authorized"),
        ..Record::new(AuditAction::Authorized, &run.spec.principal, &actors, &ns, &name, &run.spec.agent)
    }
    .emit();
    let secret_known = owned::known(&ctx.stores.secrets, run).unwrap_or(Found::Absent);
    // A Secret of the run's already (Deputy stopped after writing it, before the status):
    // its token is counted, and the new one numbered after it.
    let tokens = plan::tokens_written(&status, secret_token(run, ctx));
    let minted = mint(run, ctx, &auth, tokens, secret_known, None, now).await?;
    status.rotations = tokens;
    let exp = minted.expires_at;

    status.phase = Some(RunPhase::Authorized);
    status.service_account = Some(runs::child_name(&name));
    minted.record_in(&mut status);
    status.reason = Some("Authorized".into());
    status.message = Some(format!("authorised by {}", auth.grants.join(", ")));
    let scopes_text = status.granted_scopes.join(" ");
    set_condition(
        &mut status.conditions,
        Condition::new(
            COND_AUTHORIZED,
            ConditionStatus::True,
            "Authorized",
            format!("granted {scopes_text}"),
            now,
            run.metadata.generation,
        ),
    );
    set_condition(
        &mut status.conditions,
        Condition::new(
            COND_TOKEN_ISSUED,
            ConditionStatus::True,
            "Minted",
            format!("run token expires at {exp}"),
            now,
            run.metadata.generation,
        ),
    );
    write_status(run, ctx, status.clone()).await?;

    let pod_known = owned::known(&ctx.stores.pods, run);
    owned::put(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &pod, run, pod_known).await?;

    ctx.metrics.run_authorized();
    ctx.touch_status_of(&AgentRun { status: Some(status.clone()), ..run.clone() });
    publish(
        ctx,
        run,
        EventType::Normal,
        "Authorized",
        "Authorize",
        format!("identity {} granted {scopes_text}", auth.identity),
    )
    .await;
    Ok(next_wakeup(run, &status, ctx, now))
}

/// Looks at the run's children: the cache's copy when it shows the run's own, else the API
/// server's (a cache may lag Deputy's own create, and it holds only labelled objects).
async fn observe_children(run: &AgentRun, ctx: &Context) -> Result<Children, Error> {
    let ns = run.namespace().unwrap_or_default();
    let child = runs::child_name(&run.name_any());
    // The pod cache selects on the `managed-by` label: a pod found there carries it.
    let cached = owned::cached(&ctx.stores.pods, run).filter(|p| runs::owned_by(&p.metadata, run));
    let (pod, labelled) = match cached {
        Some(p) => (Some(p), true),
        None => {
            let p = Api::<PodPhase>::namespaced(ctx.client.clone(), &ns).get_opt(&child).await?.map(Arc::new);
            let (key, value) = runs::MANAGED_BY;
            let labelled = p
                .as_deref()
                .and_then(|p| p.metadata.labels.as_ref())
                .is_some_and(|l| l.get(key).map(String::as_str) == Some(value));
            (p, labelled)
        }
    };
    let pod = match pod.as_deref() {
        None => plan::Pod::absent(),
        Some(p) => plan::Pod {
            found: runs::found(Some(&p.metadata), run),
            end: runs::pod_end(p),
            running: p.phase() == Some("Running"),
            labelled,
        },
    };
    let service_account = owned::look(
        &Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns),
        owned::cached(&ctx.stores.service_accounts, run).as_deref(),
        run,
    )
    .await?;
    let secret = owned::look(
        &Api::<Secret>::namespaced(ctx.client.clone(), &ns),
        owned::cached(&ctx.stores.secrets, run).as_deref(),
        run,
    )
    .await?;
    Ok(Children { pod, service_account, secret, secret_token: secret_token(run, ctx) })
}

/// The number of the token the run's Secret holds: its annotation in the cache (the cache
/// holds only Deputy-labelled Secrets; one not owned by the run counts nothing), or this
/// process's memory of its last write when that is ahead.
fn secret_token(run: &AgentRun, ctx: &Context) -> u32 {
    seen_secret(run, ctx).0
}

/// The run's Secret as this process last saw it: the number of the token it holds and its
/// resourceVersion, from this process's own last write when the cache is behind it, else from
/// the cache's copy (`None`: neither knows a version).
fn seen_secret(run: &AgentRun, ctx: &Context) -> (u32, Option<String>) {
    let cached = owned::cached(&ctx.stores.secrets, run).filter(|s| runs::owned_by(&s.metadata, run));
    let cached_number = cached.as_ref().map_or(0, |s| runs::token_number(&s.metadata));
    let cached_version = cached.and_then(|s| s.metadata.resource_version.clone());
    match ctx.token_number(&run.uid().unwrap_or_default()) {
        (mine, my_version) if mine > cached_number => (mine, my_version.or(cached_version)),
        _ => (cached_number, cached_version),
    }
}

/// Keeps an active run going, as planned: puts back its pod's label, recreates its missing
/// children (never writing to an object under a child's name that is not the run's own),
/// follows its pod and rotates its token.
async fn keep_active(
    run: &AgentRun,
    ctx: &Context,
    mut status: AgentRunStatus,
    keep: Keep,
    secret: Found,
    now: Timestamp,
) -> Result<Action, Error> {
    let Keep { auth, relabel_pod, pod, create_service_account, mint: why, tokens } = keep;
    // The status reports the decision just made (narrowed bounds apply from the next mint).
    auth.record_in(&mut status);
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let child = runs::child_name(&name);

    if let Some(uid) = relabel_pod {
        // Without the label the cache would not follow the pod, and its end would go unseen.
        let (key, value) = runs::MANAGED_BY;
        tracing::warn!(namespace = %ns, run = %name, "the run's pod lost its {key} label; putting it back");
        let patch = json!({"metadata": {"uid": uid, "labels": {key: value}}});
        Api::<PodPhase>::namespaced(ctx.client.clone(), &ns)
            .patch(&child, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        publish(
            ctx,
            run,
            EventType::Warning,
            "PodRelabelled",
            "Relabel",
            format!("the pod {child:?} lost its {key} label, which Deputy watches it by; it was put back"),
        )
        .await;
    }
    match pod {
        PodStep::Leave => {}
        PodStep::MarkRunning => {
            status.phase = Some(RunPhase::Running);
            status.reason = Some("PodRunning".into());
            status.message = Some("the run's pod is running".into());
        }
        PodStep::Recreate => {
            let agent = agent_of(run, ctx)?;
            match children::desired_pod(run, &agent, &auth, &ctx.cfg.children, now) {
                Ok(p) => {
                    tracing::info!(namespace = %ns, run = %name, "the run's pod is missing; creating it again");
                    owned::put(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &p, run, Some(Found::Absent)).await?;
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, run = %name, error = %e, "the run's pod is missing and cannot be built")
                }
            }
        }
    }
    if create_service_account {
        let sa = children::desired_service_account(run, &*agent_of(run, ctx)?, &auth);
        owned::put(&Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns), &sa, run, Some(Found::Absent)).await?;
    }
    if let Some(why) = why {
        let minted = mint(run, ctx, &auth, tokens, secret, Some(why), now).await?;
        let exp = minted.expires_at;
        minted.record_in(&mut status);
        status.rotations = tokens;
        set_condition(
            &mut status.conditions,
            Condition::new(
                COND_TOKEN_ISSUED,
                ConditionStatus::True,
                "Rotated",
                format!("run token expires at {exp}"),
                now,
                run.metadata.generation,
            ),
        );
    }
    write_status(run, ctx, status.clone()).await?;
    Ok(next_wakeup(run, &status, ctx, now))
}

/// The run's Agent, from the cache.
fn agent_of(run: &AgentRun, ctx: &Context) -> Result<Arc<crate::resources::Agent>, Error> {
    let ns = run.namespace().unwrap_or_default();
    ctx.stores.agents.get(&ObjectRef::new(&run.spec.agent).within(&ns)).ok_or(Error::MissingField("agent"))
}

/// Ends a run: terminal status first (so every replica's token endpoint refuses its tokens at
/// once), then its credentials are deleted, then `revokedAt` records that they are gone.
/// Marks the run ended (the ended annotation, at its uid) before its status says so, unless it
/// is marked already: from then on no status brings it back.
async fn mark_ended(run: &AgentRun, ctx: &Context, why: End) -> Result<(), Error> {
    if run.annotations().contains_key(ENDED_ANNOTATION) {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"uid": run.uid(), "annotations": {ENDED_ANNOTATION: why.as_str()}}
    });
    let api: Api<AgentRun> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    api.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

async fn end(run: &AgentRun, ctx: &Context, why: End, message: &str) -> Result<Action, Error> {
    let now = ctx.now();
    let tokens =
        plan::tokens_written(run.status.as_ref().unwrap_or(&AgentRunStatus::default()), secret_token(run, ctx));
    ctx.hold(&run.uid().unwrap_or_default(), None);
    ctx.numbered(&run.uid().unwrap_or_default(), None);
    mark_ended(run, ctx, why).await?;
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let mut status = run.status.clone().unwrap_or_default();
    let was_active = status.phase.is_some_and(RunPhase::is_active);
    // Every token the run had is counted, one whose status write was lost too.
    status.rotations = status.rotations.max(tokens.saturating_sub(1));
    let (phase, reason) = (why.phase(), why.as_str());
    status.phase = Some(phase);
    status.reason = Some(reason.into());
    status.message = Some(message.into());
    status.completed_at = Some(now);
    let revoked = why.is_revocation();
    set_condition(
        &mut status.conditions,
        Condition::new(COND_REVOKED, ConditionStatus::True, reason, message, now, run.metadata.generation),
    );
    if revoked {
        set_condition(
            &mut status.conditions,
            Condition::new(COND_AUTHORIZED, ConditionStatus::False, reason, message, now, run.metadata.generation),
        );
    }
    set_condition(
        &mut status.conditions,
        Condition::new(
            COND_TOKEN_ISSUED,
            ConditionStatus::False,
            "Revoked",
            "the run's tokens are no longer valid",
            now,
            run.metadata.generation,
        ),
    );
    write_status(run, ctx, status.clone()).await?;

    let actors = chain_of(&status);
    Record {
        scopes: &status.granted_scopes,
        audiences: &status.granted_audiences,
        jti: status.token_id.as_deref(),
        reason: Some(reason),
        message: Some(message),
        ..Record::new(AuditAction::Revoked, &run.spec.principal, &actors, &ns, &name, &run.spec.agent)
    }
    .emit();
    ctx.metrics.run_ended(why);
    publish(
        ctx,
        run,
        if revoked || phase == RunPhase::Failed { EventType::Warning } else { EventType::Normal },
        reason,
        "Revoke",
        message.to_string(),
    )
    .await;

    remove_credentials(run, ctx, why.stops_pod()).await?;
    status.revoked_at = Some(ctx.now());
    let updated = AgentRun { status: Some(status.clone()), ..run.clone() };
    // Not write_status: it compares with the cached status, which still lacks revokedAt.
    status.observed_generation = run.metadata.generation;
    patch_status(run, ctx, &status).await?;
    if was_active {
        ctx.touch_status_of(&updated);
    }
    Ok(Action::await_change())
}

/// Deletes the run's Secret and ServiceAccount (bound SA tokens die with it) and, when asked,
/// its pod. Missing objects are fine.
async fn remove_credentials(run: &AgentRun, ctx: &Context, pod_too: bool) -> Result<(), Error> {
    let ns = run.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    owned::remove(&secrets, owned::cached(&ctx.stores.secrets, run).as_deref(), run).await?;
    let service_accounts = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns);
    owned::remove(&service_accounts, owned::cached(&ctx.stores.service_accounts, run).as_deref(), run).await?;
    if pod_too {
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
        owned::remove(&pods, owned::cached(&ctx.stores.pods, run).as_deref(), run).await?;
    }
    Ok(())
}

/// A child's name is held by an object the run does not own. One on its way out (a run
/// deleted and created again under its name, whose old pod is still stopping) is waited for;
/// any other ends the run `Failed` with `ChildConflict`: Deputy never adopts, writes to or
/// deletes it, and removes whatever of the run's own it had made.
async fn name_taken(run: &AgentRun, ctx: &Context, taken: Taken) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    if taken.leaving {
        let mut status = run.status.clone().unwrap_or_default();
        if !status.phase.is_some_and(RunPhase::is_active) {
            let already = status.reason.as_deref() == Some("NameInUse");
            let message = format!("{taken}; the run starts when it is gone");
            status.phase = Some(RunPhase::Pending);
            status.reason = Some("NameInUse".into());
            status.message = Some(message.clone());
            write_status(run, ctx, status).await?;
            if !already {
                publish(ctx, run, EventType::Normal, "NameInUse", "Authorize", format!("waiting: {message}")).await;
            }
        }
        return Ok(requeue(Duration::from_secs(2)));
    }
    tracing::warn!(namespace = %ns, run = %run.name_any(), %taken, "a child's name is taken by an object the run does not own");
    let message = format!("{taken}: Deputy does not adopt, change or delete it, and the run cannot go on without it");
    end(run, ctx, End::ChildConflict, &message).await
}

/// The run is being deleted: revoke it if it was live, remove its credentials, and let the
/// finalizer go (the garbage collector removes the rest by owner reference).
async fn cleanup(run: &AgentRun, ctx: &Context) -> Result<Action, Error> {
    let status = run.status.clone().unwrap_or_default();
    let uid = run.uid().unwrap_or_default();
    ctx.hold(&uid, None);
    ctx.numbered(&uid, None);
    // A second cleanup (the finalizer's removal not yet in the cache) records nothing again.
    if status.phase.is_some_and(RunPhase::is_active) && !ctx.cache_is_behind(&uid, run.status.as_ref()) {
        let ns = run.namespace().unwrap_or_default();
        let name = run.name_any();
        let actors = chain_of(&status);
        Record {
            scopes: &status.granted_scopes,
            audiences: &status.granted_audiences,
            jti: status.token_id.as_deref(),
            reason: Some(End::RunDeleted.as_str()),
            ..Record::new(AuditAction::Revoked, &run.spec.principal, &actors, &ns, &name, &run.spec.agent)
        }
        .emit();
        ctx.metrics.run_ended(End::RunDeleted);
        ctx.touch_status_of(run);
        // Remembered as ended (nothing is written: the run is going away).
        ctx.ended(&uid);
    }
    remove_credentials(run, ctx, true).await?;
    Ok(Action::await_change())
}

/// The earliest future `notBefore`/`expiresAt` among the grants for this run's
/// (principal, agent).
fn next_grant_change(run: &AgentRun, ctx: &Context, now: Timestamp) -> Option<Timestamp> {
    let ns = run.namespace();
    ctx.stores
        .grants
        .state()
        .iter()
        .filter(|g| g.namespace() == ns && g.spec.principal == run.spec.principal && g.spec.agent == run.spec.agent)
        .filter_map(|g| authorization::grant_window(&g.spec, now).ok()?.next_change())
        .min()
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let d = at.as_millisecond() - now.as_millisecond();
    Duration::from_millis(u64::try_from(d.max(0)).unwrap_or(0))
}

/// Requeue exactly at the next moment that matters: rotation, deadline, or a grant change.
fn next_wakeup(run: &AgentRun, status: &AgentRunStatus, ctx: &Context, now: Timestamp) -> Action {
    match plan::wake_at(status, &run.uid().unwrap_or_default(), next_grant_change(run, ctx, now)) {
        Some(t) => requeue(until(now, t)),
        None => requeue(Duration::from_secs(300)),
    }
}
