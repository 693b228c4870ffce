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
use super::{Context, Error, FINALIZER, MANAGER, requeue};
use crate::audit::{Action as AuditAction, Record};
use crate::authorization::{self, Authorization, Decision, Input, Parent, Reason, Refusal};
use crate::resources::{AgentRun, AgentRunStatus, Condition, DelegationGrant, RunPhase, set_condition};
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

fn now() -> Timestamp {
    Timestamp::now()
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

async fn apply(run: &AgentRun, ctx: &Context) -> Result<Action, Error> {
    let now = now();
    let status = run.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or(RunPhase::Pending);
    // Before the cache check: a stale copy of our own writes never shows `completedAt` with a
    // live phase (the terminal phase is written with it), so this is someone else's write.
    if status_regressed(&status) {
        // Someone wrote an ended run's status back to a live phase. It stays ended: nothing is
        // created for it again, and every replica refuses its tokens (see `is_active`).
        tracing::warn!(phase = ?phase, "the status of an ended run was written back to a live phase; it stays ended");
        publish(
            ctx,
            run,
            EventType::Warning,
            "StatusTampered",
            "Revoke",
            format!("status.phase {phase:?} on a run that completed or was revoked: the run stays ended"),
        )
        .await;
        remove_credentials(run, ctx, true).await?;
        let mut s = status.clone();
        s.phase = Some(RunPhase::Revoked);
        s.reason = Some(End::StatusTampered.as_str().into());
        s.message = Some(End::StatusTampered.message().into());
        write_status(run, ctx, s).await?;
        return Ok(Action::await_change());
    }

    if ctx.cache_is_behind(&run.uid().unwrap_or_default(), run.status.as_ref()) {
        // Our own last write has not reached the cache yet: acting on this copy would mint
        // or revoke a second time. The watch event of that write triggers the next reconcile.
        return Ok(Action::requeue(std::time::Duration::from_millis(500)));
    }

    if phase.is_terminal() {
        // Final. Make sure nothing it held survives (e.g. the operator died mid-revocation).
        if status.revoked_at.is_none() && phase != RunPhase::Denied {
            // The pod is kept only when the recorded reason says it ended by itself.
            let stop = status.reason.as_deref().and_then(End::parse).is_none_or(End::stops_pod);
            remove_credentials(run, ctx, stop).await?;
            let mut s = status.clone();
            s.revoked_at = Some(now);
            write_status(run, ctx, s).await?;
        }
        return Ok(Action::await_change());
    }

    if run.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }

    if phase.is_active() && run.annotations().contains_key(runs::REVOKE_ANNOTATION) {
        return end(run, ctx, End::SelfRevoked, End::SelfRevoked.message()).await;
    }
    let decision = decide(run, ctx, now);
    if let Decision::Authorized(auth) = &decision
        && now >= auth.deadline
    {
        // The deadline is the decision's (from the run's creation), never the status's.
        return end(run, ctx, End::DeadlineExceeded, End::DeadlineExceeded.message()).await;
    }

    match (phase.is_active(), decision) {
        (false, Decision::Authorized(_)) => {
            // Before granting anything, decide again on a fresh read of the grants: the
            // grant cache and the run cache are separate watches, and a Deny grant created just
            // before the run must never lose that race.
            let api: Api<DelegationGrant> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
            let fresh = api.list(&ListParams::default()).await?.items;
            settle_pending(run, ctx, decide_with(run, ctx, &fresh, now), now).await
        }
        (false, refused) => settle_pending(run, ctx, refused, now).await,
        (true, Decision::Denied(refusal)) => end(run, ctx, End::lost(refusal.reason), &refusal.message).await,
        (true, Decision::Authorized(auth)) => {
            // The status is a report anyone allowed to write it can change: it only hints that
            // authority shrank. What the run holds is what its current token (signed by us)
            // carries.
            let hinted = authority_reduced(&held_by_status(&status), &auth).is_some();
            if hinted
                && let Some(held) = held_by_token(run, ctx).await?
                && let Some(why) = authority_reduced(&held, &auth)
            {
                return end(run, ctx, End::AuthorityReduced, &why).await;
            }
            keep_active(run, ctx, status, &auth, now).await
        }
    }
}

/// Whether a status says the run ended (`completedAt`, `revokedAt`) yet shows a live or
/// pending phase: only a write by someone else does that (Deputy sets the terminal phase in
/// the same write as `completedAt`).
fn status_regressed(status: &AgentRunStatus) -> bool {
    let ended = status.completed_at.is_some() || status.revoked_at.is_some();
    ended && !status.phase.is_some_and(RunPhase::is_terminal)
}

/// Carries out the decision for a run that is not active yet: authorise it, let it wait for
/// something it names, or deny it for good.
async fn settle_pending(run: &AgentRun, ctx: &Context, decision: Decision, now: Timestamp) -> Result<Action, Error> {
    match decision {
        Decision::Authorized(auth) => authorize(run, ctx, auth, now).await,
        Decision::Denied(refusal) if refusal.reason.is_transient() => wait(run, ctx, refusal, now).await,
        Decision::Denied(refusal) => deny(run, ctx, refusal, now).await,
    }
}

/// The (audience, scopes) pairs a run holds.
type Held = Vec<(String, Vec<scope::Scope>)>;

fn held_by_status(status: &AgentRunStatus) -> Held {
    status
        .granted_authority
        .iter()
        .map(|g| (g.audience.clone(), scope::parse_all(&g.scopes).unwrap_or_default()))
        .collect()
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

/// An active run keeps only what it was given; if its grants now give less, it is revoked
/// rather than silently narrowed (its tokens already carry the old pairs).
fn authority_reduced(held: &Held, auth: &Authorization) -> Option<String> {
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
        false,
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

/// Mints a run token into the run's Secret from the decision just made (never from the
/// status); returns the new token's issue and expiry times and its jti. `rotations` is the
/// count the status will hold once this token is recorded (the seed of its rotation time).
async fn mint(
    run: &AgentRun,
    ctx: &Context,
    auth: &Authorization,
    (rotations, secret): (u32, Option<Found>),
    now: Timestamp,
) -> Result<(Timestamp, Timestamp, String), Error> {
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
        next_rotation_at: next.min(expires),
        deadline,
    };
    let secret_found = secret;
    let secret = children::desired_secret(run, &token, &info)?;
    owned::put(&Api::<Secret>::namespaced(ctx.client.clone(), &ns), &secret, run, secret_found).await?;
    ctx.metrics.token_minted("run");
    Ok((now, expires, claims.jti))
}

async fn authorize(run: &AgentRun, ctx: &Context, auth: Authorization, now: Timestamp) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let agent =
        ctx.stores.agents.get(&ObjectRef::new(&run.spec.agent).within(&ns)).ok_or(Error::MissingField("agent"))?;
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
    let child = runs::child_name(&name);
    let sa_known = owned::known(
        ctx.stores.service_accounts.get(&ObjectRef::new(&child).within(&ns)).as_ref().map(|m| &m.metadata),
        run,
    );
    owned::put(&Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns), &sa, run, sa_known).await?;
    let secret_known =
        owned::known(ctx.stores.secrets.get(&ObjectRef::new(&child).within(&ns)).as_ref().map(|m| &m.metadata), run);
    let (iat, exp, jti) = mint(run, ctx, &auth, (status.rotations, secret_known), now).await?;
    let (actors, scopes, audiences) =
        (chain_of(&status), status.granted_scopes.clone(), status.granted_audiences.clone());
    let base = Record {
        scopes: &scopes,
        audiences: &audiences,
        task: Some(&run.spec.task),
        ..Record::new(AuditAction::Authorized, &run.spec.principal, &actors, &ns, &name, &run.spec.agent)
    };
    // The token exists from the moment its Secret is written: the audit line says so then,
    // even if a later write fails.
    Record { action: AuditAction::Minted, jti: Some(&jti), exp: Some(exp.as_second()), ..base.clone() }.emit();

    status.phase = Some(RunPhase::Authorized);
    status.service_account = Some(runs::child_name(&name));
    status.token_issued_at = Some(iat);
    status.token_expires_at = Some(exp);
    status.token_id = Some(jti.clone());
    status.reason = Some("Authorized".into());
    status.message = Some(format!("authorised by {}", auth.grants.join(", ")));
    let scopes_text = status.granted_scopes.join(" ");
    set_condition(
        &mut status.conditions,
        Condition::new(
            COND_AUTHORIZED,
            true,
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
            true,
            "Minted",
            format!("run token expires at {exp}"),
            now,
            run.metadata.generation,
        ),
    );
    write_status(run, ctx, status.clone()).await?;

    let pod_known =
        owned::known(ctx.stores.pods.get(&ObjectRef::new(&child).within(&ns)).as_ref().map(|p| &p.metadata), run);
    owned::put(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &pod, run, pod_known).await?;

    Record { reason: Some("Authorized"), ..base }.emit();
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

/// An active run: follow its pod, rotate its token, recreate missing children (never writing
/// to an object under a child's name that is not the run's own).
async fn keep_active(
    run: &AgentRun,
    ctx: &Context,
    mut status: AgentRunStatus,
    auth: &Authorization,
    now: Timestamp,
) -> Result<Action, Error> {
    // The status reports the decision just made (narrowed bounds apply from the next mint).
    auth.record_in(&mut status);
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let child = runs::child_name(&name);

    // The pod: the cache's copy when it is the run's own, else the API server's (the cache
    // may lag our own create, and it follows the `managed-by` label only).
    let mut pod = ctx.stores.pods.get(&ObjectRef::new(&child).within(&ns)).filter(|p| runs::owned_by(&p.metadata, run));
    if pod.is_none() {
        pod = Api::<PodPhase>::namespaced(ctx.client.clone(), &ns).get_opt(&child).await?.map(Arc::new);
    }
    match runs::found(pod.as_deref().map(|p| &p.metadata), run) {
        Found::Foreign { leaving } => return Err(owned::taken::<Pod>(&child, leaving)),
        Found::Ours { uid } => {
            let (key, value) = runs::MANAGED_BY;
            let labels = pod.as_deref().and_then(|p| p.metadata.labels.as_ref());
            if labels.and_then(|l| l.get(key)).map(String::as_str) != Some(value) {
                // Without the label the cache would not follow the pod, and its end would go unseen.
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
        }
        Found::Absent => {}
    }
    if let Some(ended) = pod.as_deref().and_then(runs::pod_end) {
        return end(run, ctx, ended, ended.message()).await;
    }
    match pod.as_ref() {
        None if status.phase == Some(RunPhase::Running) => {
            return end(run, ctx, End::PodDeleted, End::PodDeleted.message()).await;
        }
        None => {
            // Authorized but the pod is missing (e.g. the operator stopped before creating it).
            let agent = ctx
                .stores
                .agents
                .get(&ObjectRef::new(&run.spec.agent).within(&ns))
                .ok_or(Error::MissingField("agent"))?;
            match children::desired_pod(run, &agent, auth, &ctx.cfg.children, now) {
                Ok(p) => {
                    tracing::info!(namespace = %ns, run = %name, "the run's pod is missing; creating it again");
                    owned::put(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &p, run, Some(Found::Absent)).await?;
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, run = %name, error = %e, "the run's pod is missing and cannot be built")
                }
            }
        }
        Some(p) if status.phase == Some(RunPhase::Authorized) && p.phase() == Some("Running") => {
            status.phase = Some(RunPhase::Running);
            status.reason = Some("PodRunning".into());
            status.message = Some("the run's pod is running".into());
        }
        _ => {}
    }

    // The ServiceAccount and the Secret must exist while the run is active.
    let sa_api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns);
    let cached = ctx.stores.service_accounts.get(&ObjectRef::new(&child).within(&ns));
    let sa = owned::look(&sa_api, &child, cached.as_ref().map(|m| &m.metadata), run).await?;
    if sa == Found::Absent {
        let agent =
            ctx.stores.agents.get(&ObjectRef::new(&run.spec.agent).within(&ns)).ok_or(Error::MissingField("agent"))?;
        owned::put(&sa_api, &children::desired_service_account(run, &agent, auth), run, Some(sa)).await?;
    } else if let Found::Foreign { leaving } = sa {
        return Err(owned::taken::<ServiceAccount>(&child, leaving));
    }
    let cached = ctx.stores.secrets.get(&ObjectRef::new(&child).within(&ns));
    let secret = owned::look(
        &Api::<Secret>::namespaced(ctx.client.clone(), &ns),
        &child,
        cached.as_ref().map(|m| &m.metadata),
        run,
    )
    .await?;
    if let Found::Foreign { leaving } = secret {
        return Err(owned::taken::<Secret>(&child, leaving));
    }
    let secret_missing = secret == Found::Absent;

    // Rotation at about half the token's life (or at once if the Secret went missing).
    let due = match (status.token_issued_at, status.token_expires_at) {
        (Some(iat), Some(exp)) => {
            children::next_rotation(iat, exp, auth.deadline, &run.uid().unwrap_or_default(), status.rotations + 1)
                .is_some_and(|at| now >= at)
        }
        _ => true,
    };
    if due || secret_missing {
        let (iat, exp, jti) = mint(run, ctx, auth, (status.rotations + 1, Some(secret)), now).await?;
        status.token_issued_at = Some(iat);
        status.token_expires_at = Some(exp);
        status.token_id = Some(jti.clone());
        status.rotations += 1;
        set_condition(
            &mut status.conditions,
            Condition::new(
                COND_TOKEN_ISSUED,
                true,
                "Rotated",
                format!("run token expires at {exp}"),
                now,
                run.metadata.generation,
            ),
        );
        let actors = chain_of(&status);
        Record {
            scopes: &status.granted_scopes,
            audiences: &status.granted_audiences,
            jti: Some(&jti),
            exp: Some(exp.as_second()),
            reason: Some(if secret_missing { "SecretMissing" } else { "Rotation" }),
            ..Record::new(AuditAction::Rotated, &run.spec.principal, &actors, &ns, &name, &run.spec.agent)
        }
        .emit();
    }
    write_status(run, ctx, status.clone()).await?;
    Ok(next_wakeup(run, &status, ctx, now))
}

/// Ends a run: terminal status first (so every replica's token endpoint refuses its tokens at
/// once), then its credentials are deleted, then `revokedAt` records that they are gone.
async fn end(run: &AgentRun, ctx: &Context, why: End, message: &str) -> Result<Action, Error> {
    let now = now();
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let mut status = run.status.clone().unwrap_or_default();
    let was_active = status.phase.is_some_and(RunPhase::is_active);
    let (phase, reason) = (why.phase(), why.as_str());
    status.phase = Some(phase);
    status.reason = Some(reason.into());
    status.message = Some(message.into());
    status.completed_at = Some(now);
    let revoked = why.is_revocation();
    set_condition(
        &mut status.conditions,
        Condition::new(COND_REVOKED, true, reason, message, now, run.metadata.generation),
    );
    if revoked {
        set_condition(
            &mut status.conditions,
            Condition::new(COND_AUTHORIZED, false, reason, message, now, run.metadata.generation),
        );
    }
    set_condition(
        &mut status.conditions,
        Condition::new(
            COND_TOKEN_ISSUED,
            false,
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
    status.revoked_at = Some(Timestamp::now());
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
    let child = runs::child_name(&run.name_any());
    let cached = ctx.stores.secrets.get(&ObjectRef::new(&child).within(&ns));
    let api = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    owned::remove(&api, &child, cached.as_ref().map(|m| &m.metadata), run).await?;
    let cached = ctx.stores.service_accounts.get(&ObjectRef::new(&child).within(&ns));
    let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns);
    owned::remove(&api, &child, cached.as_ref().map(|m| &m.metadata), run).await?;
    if pod_too {
        let cached = ctx.stores.pods.get(&ObjectRef::new(&child).within(&ns));
        let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
        owned::remove(&api, &child, cached.as_ref().map(|p| &p.metadata), run).await?;
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
        let ended =
            AgentRunStatus { phase: Some(RunPhase::Revoked), revoked_at: Some(Timestamp::now()), ..status.clone() };
        ctx.wrote(&uid, &ended);
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
        .flat_map(|g| [g.spec.not_before.clone(), g.spec.expires_at.clone()])
        .flatten()
        .filter_map(|t| t.parse::<Timestamp>().ok())
        .filter(|t| *t > now)
        .min()
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let d = at.as_millisecond() - now.as_millisecond();
    Duration::from_millis(u64::try_from(d.max(0)).unwrap_or(0))
}

/// Requeue exactly at the next moment that matters: rotation, deadline, or a grant change.
fn next_wakeup(run: &AgentRun, status: &AgentRunStatus, ctx: &Context, now: Timestamp) -> Action {
    let mut at: Vec<Timestamp> = vec![];
    if let (Some(iat), Some(exp), Some(deadline)) = (status.token_issued_at, status.token_expires_at, status.deadline) {
        at.extend(children::next_rotation(iat, exp, deadline, &run.uid().unwrap_or_default(), status.rotations + 1));
    }
    at.extend(status.deadline);
    at.extend(next_grant_change(run, ctx, now));
    match at.into_iter().min() {
        Some(t) => requeue(until(now, t)),
        None => requeue(Duration::from_secs(300)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_regressed_when_it_ended_but_shows_a_live_or_pending_phase() {
        let at: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap_or(Timestamp::UNIX_EPOCH);
        let st = |phase: Option<RunPhase>, completed: bool, revoked: bool| AgentRunStatus {
            phase,
            completed_at: completed.then_some(at),
            revoked_at: revoked.then_some(at),
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
}
