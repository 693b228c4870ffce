//! The objects a run owns, built by pure functions from the run, its authorisation and the
//! operator's settings: a ServiceAccount, a Secret with the run token, and the Pod.
//! Names are deterministic, every child carries a controller owner reference to the run and
//! the standard `app.kubernetes.io/*` labels, and the controller writes them with
//! server-side apply under one field manager.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    EnvVar, KeyToPath, Pod, PodTemplateSpec, ProjectedVolumeSource, Secret, SecretProjection, ServiceAccount,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use kube::Resource;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::authorization::Authorization;
use crate::resources::{Agent, AgentRun, RunPhase};

/// Where the projected volume is mounted in every container.
pub const MOUNT_PATH: &str = "/var/run/secrets/deputy.dev";
/// The name of the projected volume (reserved in templates).
pub const VOLUME_NAME: &str = "deputy-token";
/// Data keys of the run Secret, which are also the file names in the volume.
pub const TOKEN_KEY: &str = "token";
pub const RUN_JSON_KEY: &str = "run.json";
pub const ACTOR_TOKEN_PATH: &str = "actor-token";
/// Lifetime of the bound service-account token that authenticates the pod (the kubelet
/// refreshes it).
pub const ACTOR_TOKEN_SECONDS: i64 = 600;
/// The Secret type of run-token Secrets.
pub const SECRET_TYPE: &str = "deputy.dev/run-token";
/// The label every child carries, for selecting them.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "deputy");
pub const RUN_LABEL: &str = "deputy.dev/run";
pub const AGENT_LABEL: &str = "deputy.dev/agent";

/// Operator settings the children depend on.
#[derive(Clone, Debug)]
pub struct ChildConfig {
    /// The token issuer (`iss`), also the audience of the pod's actor token.
    pub issuer: String,
    /// The URL of the token endpoint, given to the pod.
    pub token_endpoint: String,
}

/// Why a pod cannot be built from the run's template (the run is then denied, `InvalidSpec`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

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

/// How a run ends when its pod is deleted (or gone while the run was running).
pub const POD_DELETED: (RunPhase, &str, &str) = (RunPhase::Failed, "PodDeleted", "the run's pod was deleted");

/// How a run's pod ended, if it has: the run's final phase, a reason and a message. A pod
/// being deleted counts as failed.
pub fn pod_end(pod: &PodPhase) -> Option<(RunPhase, &'static str, &'static str)> {
    match pod.phase() {
        Some("Succeeded") => Some((RunPhase::Succeeded, "PodSucceeded", "the run's pod completed")),
        Some("Failed") => Some((RunPhase::Failed, "PodFailed", "the run's pod failed")),
        _ if pod.metadata.deletion_timestamp.is_some() => Some(POD_DELETED),
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

/// The labels of every child of `run`.
pub fn labels(run: &AgentRun) -> BTreeMap<String, String> {
    let name = run.metadata.name.as_deref().unwrap_or("");
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "deputy-run".to_string()),
        ("app.kubernetes.io/instance".to_string(), label_value(name)),
        ("app.kubernetes.io/component".to_string(), "agent-run".to_string()),
        ("app.kubernetes.io/part-of".to_string(), "deputy".to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (RUN_LABEL.to_string(), label_value(name)),
        (AGENT_LABEL.to_string(), label_value(&run.spec.agent)),
    ])
}

fn child_meta(run: &AgentRun) -> ObjectMeta {
    let name = run.metadata.name.as_deref().unwrap_or("");
    ObjectMeta {
        name: Some(child_name(name)),
        namespace: run.metadata.namespace.clone(),
        labels: Some(labels(run)),
        owner_references: run.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// The run's own ServiceAccount. Its Kubernetes API token is not mounted unless the Agent
/// asks for it.
pub fn desired_service_account(run: &AgentRun, agent: &Agent, auth: &Authorization) -> ServiceAccount {
    let mut meta = child_meta(run);
    meta.annotations = Some(BTreeMap::from([("deputy.dev/identity".to_string(), auth.identity.clone())]));
    ServiceAccount {
        metadata: meta,
        automount_service_account_token: Some(agent.spec.automount_service_account_token),
        ..Default::default()
    }
}

/// What the pod reads from `run.json`.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo<'a> {
    pub issuer: &'a str,
    pub token_endpoint: &'a str,
    pub identity: &'a str,
    pub namespace: &'a str,
    pub run: &'a str,
    pub principal: &'a str,
    pub scopes: Vec<String>,
    pub audiences: &'a [String],
    pub token_file: String,
    pub actor_token_file: String,
    /// When the current token in `token` expires.
    pub token_expires_at: Timestamp,
    /// When Deputy will replace it. Re-read `token` before every use.
    pub next_rotation_at: Timestamp,
    pub deadline: Timestamp,
}

/// The Secret that holds the run token and `run.json`; the kubelet projects both into the
/// pod and updates them atomically on rotation.
pub fn desired_secret(run: &AgentRun, token: &str, info: &RunInfo<'_>) -> Result<Secret, serde_json::Error> {
    let run_json = serde_json::to_vec_pretty(info)?;
    Ok(Secret {
        metadata: child_meta(run),
        type_: Some(SECRET_TYPE.to_string()),
        data: Some(BTreeMap::from([
            (TOKEN_KEY.to_string(), ByteString(token.as_bytes().to_vec())),
            (RUN_JSON_KEY.to_string(), ByteString(run_json)),
        ])),
        ..Default::default()
    })
}

/// Environment given to every container.
pub fn env(cfg: &ChildConfig) -> Vec<EnvVar> {
    let var = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), value_from: None };
    vec![
        var("DEPUTY_TOKEN_FILE", format!("{MOUNT_PATH}/{TOKEN_KEY}")),
        var("DEPUTY_ACTOR_TOKEN_FILE", format!("{MOUNT_PATH}/{ACTOR_TOKEN_PATH}")),
        var("DEPUTY_RUN_FILE", format!("{MOUNT_PATH}/{RUN_JSON_KEY}")),
        var("DEPUTY_TOKEN_ENDPOINT", cfg.token_endpoint.clone()),
    ]
}

/// The run's pod, from the Agent's `spec.template` with Deputy's parts set: service account,
/// projected token volume, environment, `activeDeadlineSeconds` and a restart policy that
/// ends. The run contributes only `args` and plain `env` for the first container: nothing a
/// run says can add a volume, host access, a security context or a container.
pub fn desired_pod(
    run: &AgentRun,
    agent: &Agent,
    auth: &Authorization,
    cfg: &ChildConfig,
    now: Timestamp,
) -> Result<Pod, TemplateError> {
    let template: PodTemplateSpec = serde_json::from_value(agent.spec.template.clone())
        .map_err(|e| TemplateError(format!("the Agent's spec.template is not a PodTemplateSpec: {e}")))?;
    let mut spec = template.spec.ok_or_else(|| TemplateError("the Agent's spec.template.spec is required".into()))?;
    let tmeta = template.metadata.unwrap_or_default();

    match spec.restart_policy.as_deref() {
        None => spec.restart_policy = Some("Never".into()),
        Some("Never" | "OnFailure") => {}
        Some(other) => {
            return Err(TemplateError(format!(
                "the Agent's spec.template.spec.restartPolicy {other:?} is not allowed: a run's pod must end (use Never or OnFailure)"
            )));
        }
    }
    let sa = child_name(run.metadata.name.as_deref().unwrap_or(""));
    spec.service_account_name = Some(sa);
    spec.service_account = None;
    spec.automount_service_account_token = Some(agent.spec.automount_service_account_token);
    let left = (auth.deadline.as_second() - now.as_second()).max(1);
    spec.active_deadline_seconds = Some(spec.active_deadline_seconds.map_or(left, |own| own.min(left)));

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    if volumes.iter().any(|v| v.name == VOLUME_NAME) {
        return Err(TemplateError(format!("volume name {VOLUME_NAME:?} is reserved for Deputy")));
    }
    volumes.push(Volume {
        name: VOLUME_NAME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o440),
            sources: Some(vec![
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: child_name(run.metadata.name.as_deref().unwrap_or("")),
                        items: Some(vec![
                            KeyToPath { key: TOKEN_KEY.into(), path: TOKEN_KEY.into(), mode: None },
                            KeyToPath { key: RUN_JSON_KEY.into(), path: RUN_JSON_KEY.into(), mode: None },
                        ]),
                        optional: Some(false),
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(cfg.issuer.clone()),
                        expiration_seconds: Some(ACTOR_TOKEN_SECONDS),
                        path: ACTOR_TOKEN_PATH.into(),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    });

    // The run's part: args and plain env for the agent container (the first).
    let first =
        spec.containers.first_mut().ok_or_else(|| TemplateError("the Agent's template has no container".into()))?;
    if !run.spec.args.is_empty() {
        first.args = Some(run.spec.args.clone());
    }
    if !run.spec.env.is_empty() {
        let set = first.env.get_or_insert_with(Vec::new);
        for e in &run.spec.env {
            if e.name.starts_with("DEPUTY_") {
                return Err(TemplateError(format!("spec.env: {:?} is reserved for Deputy", e.name)));
            }
            if set.iter().any(|t| t.name == e.name) {
                return Err(TemplateError(format!(
                    "spec.env: {:?} is set by the Agent and may not be changed",
                    e.name
                )));
            }
            set.push(EnvVar { name: e.name.clone(), value: Some(e.value.clone()), value_from: None });
        }
    }

    let our_env = env(cfg);
    let mount = VolumeMount {
        name: VOLUME_NAME.into(),
        mount_path: MOUNT_PATH.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let containers = spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten());
    for c in containers {
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        if mounts.iter().any(|m| m.mount_path.trim_end_matches('/') == MOUNT_PATH) {
            return Err(TemplateError(format!("container {:?} already mounts something at {MOUNT_PATH}", c.name)));
        }
        mounts.push(mount.clone());
        let env = c.env.get_or_insert_with(Vec::new);
        env.retain(|e| !our_env.iter().any(|o| o.name == e.name));
        env.extend(our_env.iter().cloned());
    }

    let mut meta = child_meta(run);
    let mut labels = tmeta.labels.unwrap_or_default();
    labels.extend(meta.labels.take().unwrap_or_default());
    meta.labels = Some(labels);
    meta.annotations = tmeta.annotations;
    Ok(Pod { metadata: meta, spec: Some(spec), status: None })
}

/// When to re-mint a token issued at `issued_at` that expires at `expires_at`: at half its
/// lifetime plus a jitter of up to a tenth of it, derived from the run's uid and rotation
/// count (so it is stable across reconciles but differs between runs).
pub fn rotation_at(issued_at: Timestamp, expires_at: Timestamp, uid: &str, rotations: u32) -> Timestamp {
    let lifetime = (expires_at.as_second() - issued_at.as_second()).max(0);
    let spread = (lifetime / 10).max(1);
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("{uid}/{rotations}").as_bytes());
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&d.as_ref()[..8]);
    let jitter = i64::try_from(u64::from_le_bytes(eight) % spread.unsigned_abs()).unwrap_or(0);
    // Never at the issue time itself (a lifetime of one second would rotate at once).
    let offset = (lifetime / 2 + jitter).max(lifetime.min(1));
    issued_at.saturating_add(SignedDuration::from_secs(offset)).unwrap_or(issued_at)
}

/// When to re-mint a run token issued at `issued_at` that expires at `expires_at`, for a run
/// whose deadline is `deadline`; `rotations` counts the tokens minted before the next one.
/// `None` when the token already lives until the deadline: a new one could not live longer, so
/// the last token of a run simply lasts until its deadline (re-minting it was a hot loop once
/// its remaining life fell to a second).
pub fn next_rotation(
    issued_at: Timestamp,
    expires_at: Timestamp,
    deadline: Timestamp,
    uid: &str,
    rotations: u32,
) -> Option<Timestamp> {
    (expires_at < deadline).then(|| rotation_at(issued_at, expires_at, uid, rotations))
}

#[cfg(test)]
#[path = "children_tests.rs"]
mod tests;
