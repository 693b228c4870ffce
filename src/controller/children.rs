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
use serde::Serialize;

use crate::authorization::Authorization;
use crate::resources::{Agent, AgentRun};
use crate::runs::contract::{
    ACTOR_TOKEN_PATH, ACTOR_TOKEN_SECONDS, ENV_ACTOR_TOKEN_FILE, ENV_RUN_FILE, ENV_TOKEN_ENDPOINT, ENV_TOKEN_FILE,
    MOUNT_PATH, RUN_JSON_KEY, SECRET_TYPE, TOKEN_KEY, VOLUME_NAME, file,
};
use crate::runs::{AGENT_LABEL, MANAGED_BY, RUN_LABEL, child_name, label_value};

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
pub fn desired_secret(
    run: &AgentRun,
    token: &str,
    number: u32,
    info: &RunInfo<'_>,
) -> Result<Secret, serde_json::Error> {
    let run_json = serde_json::to_vec_pretty(info)?;
    let mut metadata = child_meta(run);
    metadata.annotations =
        Some(BTreeMap::from([(crate::runs::TOKEN_NUMBER_ANNOTATION.to_string(), number.to_string())]));
    Ok(Secret {
        metadata,
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
        var(ENV_TOKEN_FILE, file(TOKEN_KEY)),
        var(ENV_ACTOR_TOKEN_FILE, file(ACTOR_TOKEN_PATH)),
        var(ENV_RUN_FILE, file(RUN_JSON_KEY)),
        var(ENV_TOKEN_ENDPOINT, cfg.token_endpoint.clone()),
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
