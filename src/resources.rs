//! The four custom resources of `deputy.dev/v1alpha1`: [`ResourceServer`] (cluster-scoped),
//! [`Agent`], [`DelegationGrant`] and [`AgentRun`], exactly as `DESIGN.md` fixes them.
//!
//! Every field a user writes stays a plain string or list here (durations, timestamps, the pod
//! template): the API server checks them with the schema and CEL rules below, and the
//! authorisation engine parses them again and turns anything malformed into an `Invalid`
//! decision. A hand-edited object can therefore never stop the operator from deserialising
//! the rest of the namespace.
//!
//! `///` comments on fields are user-facing: they become the CRD descriptions that
//! `kubectl explain` shows.

// kube-derive's repeated `printcolumn(...)` arguments trip this lint; they are not duplicates.
#![allow(clippy::duplicated_attributes)]

use jiff::Timestamp;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Deputy resource.
pub const GROUP: &str = "deputy.dev";
/// The API version of every Deputy resource.
pub const VERSION: &str = "v1alpha1";
/// The annotation Deputy puts on a run when it ends it (the value is the end's reason): the
/// run's own record that it ended, kept beside the status rather than in it, so that a status
/// written back to a live phase (completedAt and revokedAt removed too) does not bring the run
/// back. Only Deputy, the run's principal or someone allowed to act for them may change a
/// `deputy.dev/` annotation (the chart's admission policy).
pub const ENDED_ANNOTATION: &str = "deputy.dev/ended";

/// CEL: a duration in Deputy's grammar (`90s`, `15m`, `1h30m`), which is also a valid Go
/// duration, so CEL's `duration()` accepts it.
const DURATION_RULE: &str = "self.matches('^([0-9]{1,6}[hms]){1,3}$')";
const DURATION_MESSAGE: &str = "must be a duration made of hours, minutes and seconds, such as 90s, 15m or 1h30m";
/// The regular expression every scope pattern matches (see `crate::scope` for the grammar).
pub const SCOPE_PATTERN: &str = r"^[A-Za-z0-9_.\-/]+(:[A-Za-z0-9_.\-/]+)*(:\*)?$";

// ---------------------------------------------------------------------------------------
// ResourceServer
// ---------------------------------------------------------------------------------------

/// A downstream service that accepts Deputy's tokens for its audience, and the namespaces whose
/// runs may be given tokens for it. Cluster-scoped: written by cluster administrators (or the
/// service's owners, by RBAC on this kind), never by the tenants whose runs use it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "deputy.dev",
    version = "v1alpha1",
    kind = "ResourceServer",
    shortname = "rs",
    category = "deputy",
    doc = "A ResourceServer registers an audience (a downstream service that accepts Deputy's tokens): which namespaces' runs may be given tokens for it, with at most which scopes and for how long. An audience no ResourceServer registers for a run's namespace is never granted.",
    printcolumn(name = "Audience", type_ = "string", json_path = ".spec.audience"),
    printcolumn(name = "Scopes", type_ = "string", json_path = ".spec.scopes"),
    printcolumn(name = "Max TTL", type_ = "string", json_path = ".spec.maxTokenTTL"),
    printcolumn(name = "DPoP", type_ = "boolean", json_path = ".spec.requireDPoP"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ResourceServerSpec {
    /// The exact `aud` string of tokens for this service (Agents, grants and runs name it), or
    /// a canonical https URI (RFC 8707 resource indicator).
    #[schemars(length(min = 1, max = 253))]
    pub audience: String,

    /// Scope patterns this service honours: a ceiling on what any run holds for it.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_.\-/]+(:[A-Za-z0-9_.\-/]+)*(:\*)?$"))
    )]
    pub scopes: Vec<String>,

    /// The namespaces whose runs may be given tokens for this audience, by their labels.
    /// `{}` selects every namespace. Select by `kubernetes.io/metadata.name` (which the API
    /// server sets to the namespace's name) or by labels that only administrators may write:
    /// whoever can label a namespace can make it match.
    pub namespace_selector: NamespaceSelector,

    /// The longest lifetime of an exchanged token for this audience (at most 5m, the limit of
    /// every exchanged token).
    #[serde(default, rename = "maxTokenTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}[hms]){1,3}$') || (duration(self) >= duration('10s') && duration(self) <= duration('5m'))").message("must be between 10s and 5m"))]
    pub max_token_ttl: Option<String>,

    /// Whether every exchange for this audience must carry a DPoP proof (RFC 9449), so that its
    /// tokens are bound to the caller's key.
    #[serde(default, rename = "requireDPoP", skip_serializing_if = "std::ops::Not::not")]
    pub require_dpop: bool,
}

/// A label selector (the shape of `metav1.LabelSelector`): every `matchLabels` entry and every
/// expression must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    /// Labels the namespace must carry, with these values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub match_labels: std::collections::BTreeMap<String, String>,
    /// Requirements on the namespace's labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One requirement of a [`NamespaceSelector`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)").message("In and NotIn need values; Exists and DoesNotExist take none"))]
pub struct SelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// The values of `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub values: Vec<String>,
}

/// The operator of a [`SelectorRequirement`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

// ---------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------

/// What an agent is allowed to be. Written by the platform team: the capability ceiling of
/// every run of this agent, whoever it acts for.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "deputy.dev",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    status = "AgentStatus",
    shortname = "agent",
    category = "deputy",
    doc = "An Agent is a kind of AI agent registered by the platform team: the scopes, audiences and token lifetime any run of it may have, and the pod every run of it starts.",
    printcolumn(name = "Audiences", type_ = "string", json_path = ".spec.audiences"),
    printcolumn(name = "Max TTL", type_ = "string", json_path = ".spec.maxTokenTTL"),
    printcolumn(name = "Active Runs", type_ = "integer", json_path = ".status.activeRuns"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// What the agent does, for people reading the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// The capability ceiling: scope patterns a run of this agent may ever hold, whatever its
    /// principal granted. A scope is colon-separated segments (`compliance:audit`); a final
    /// `:*` matches one or more further segments (`compliance:*` matches `compliance:audit`
    /// and `compliance:audit:cross_dept`, but not `compliance`).
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_.\-/]+(:[A-Za-z0-9_.\-/]+)*(:\*)?$"))
    )]
    pub scopes: Vec<String>,

    /// Audiences (downstream services) a run of this agent may obtain tokens for.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub audiences: Vec<String>,

    /// The longest lifetime of any token a run of this agent receives (for example `15m`).
    #[serde(rename = "maxTokenTTL")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}[hms]){1,3}$') || (duration(self) >= duration('30s') && duration(self) <= duration('24h'))").message("must be between 30s and 24h"))]
    pub max_token_ttl: String,

    /// The pod every run of this agent starts (a PodTemplateSpec), written by the platform
    /// team: what runs, and with what volumes, security context and host access, is the
    /// Agent's to decide, never a run's. Deputy sets the service account, the projected token
    /// volume at `/var/run/secrets/deputy.dev/`, the `DEPUTY_*` environment variables and
    /// `activeDeadlineSeconds`; a run adds only its `args` and `env` to the first container.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: serde_json::Value,

    /// Whether a run's pod gets the Kubernetes API credentials of its own per-run service
    /// account mounted. Off by default: an agent has no Kubernetes API access unless the
    /// platform team turns this on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub automount_service_account_token: bool,
}

/// What Deputy observed about an Agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Number of active runs (Authorized or Running) of this agent.
    #[serde(default)]
    pub active_runs: u32,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------------------
// DelegationGrant
// ---------------------------------------------------------------------------------------

/// Whether a grant gives authority (`Allow`) or takes it away (`Deny`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Effect {
    /// The grant adds its scopes and audiences to what the principal lets the agent do.
    #[default]
    Allow,
    /// The grant subtracts its scopes and audiences (an empty list means all of them).
    Deny,
}

/// A principal's standing consent for an agent to act on their behalf (RFC 8693 `may_act`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "deputy.dev",
    version = "v1alpha1",
    kind = "DelegationGrant",
    namespaced,
    status = "DelegationGrantStatus",
    shortname = "dg",
    category = "deputy",
    doc = "A DelegationGrant records a principal's consent that an Agent may act on their behalf, within these scopes, audiences and lifetimes (Allow), or a standing refusal (Deny).",
    printcolumn(name = "Principal", type_ = "string", json_path = ".spec.principal"),
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(name = "Effect", type_ = "string", json_path = ".spec.effect"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Active Runs", type_ = "integer", json_path = ".status.activeRuns"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.notBefore) || !has(self.expiresAt) || timestamp(self.notBefore) < timestamp(self.expiresAt)").message("notBefore must be earlier than expiresAt"))]
#[x_kube(validation = Rule::new("self.effect == 'Deny' || size(self.scopes) > 0").message("an Allow grant must name at least one scope"))]
#[x_kube(validation = Rule::new("self.effect == 'Deny' || size(self.audiences) > 0").message("an Allow grant must name at least one audience"))]
#[serde(rename_all = "camelCase")]
pub struct DelegationGrantSpec {
    /// The human (or upstream identity) giving consent, e.g. `alice@example.com`. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("principal is immutable"))]
    pub principal: String,

    /// The name of the Agent (in this namespace) this grant is for. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("agent is immutable"))]
    pub agent: String,

    /// `Allow` adds authority; `Deny` takes its scopes and audiences away from whatever the
    /// Allow grants give ("Alice may not use this agent against payments-service"). Deny
    /// always wins.
    #[serde(default)]
    pub effect: Effect,

    /// Scope patterns granted (Allow) or taken away (Deny; empty means every scope).
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_.\-/]+(:[A-Za-z0-9_.\-/]+)*(:\*)?$"))
    )]
    pub scopes: Vec<String>,

    /// Audiences granted (Allow) or taken away (Deny; empty means every audience).
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub audiences: Vec<String>,

    /// The longest lifetime of a run token issued under this grant (e.g. `10m`).
    #[serde(default, rename = "maxTokenTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub max_token_ttl: Option<String>,

    /// The longest a run under this grant may last, from its start (e.g. `2h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub max_run_duration: Option<String>,

    /// How many further hops of delegation a run under this grant may make: 0 means the
    /// agent may not hand work to sub-agents, 1 allows one level of sub-agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 8))]
    pub max_delegation_depth: Option<u32>,

    /// The grant is not in force before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$')").message("must be an RFC 3339 timestamp such as 2026-11-01T00:00:00Z"))]
    pub not_before: Option<String>,

    /// The grant is not in force from this time on (RFC 3339); runs relying on it are revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$')").message("must be an RFC 3339 timestamp such as 2026-12-31T00:00:00Z"))]
    pub expires_at: Option<String>,
}

/// Whether a grant is in force.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GrantPhase {
    /// In force now.
    Active,
    /// Not yet in force (before `notBefore`).
    Pending,
    /// No longer in force (at or after `expiresAt`).
    Expired,
    /// The spec cannot be used (see the conditions).
    Invalid,
}

/// What Deputy observed about a DelegationGrant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegationGrantStatus {
    /// `Active`, `Pending` (before `notBefore`), `Expired` (from `expiresAt`) or `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GrantPhase>,
    /// Number of active runs that rely on this grant.
    #[serde(default)]
    pub active_runs: u32,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

// ---------------------------------------------------------------------------------------
// AgentRun
// ---------------------------------------------------------------------------------------

/// One task execution of an Agent for a principal.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "deputy.dev",
    version = "v1alpha1",
    kind = "AgentRun",
    namespaced,
    status = "AgentRunStatus",
    shortname = "ar",
    category = "deputy",
    doc = "An AgentRun is one task an Agent performs for a principal: Deputy authorises it against the principal's DelegationGrants, gives it its own identity and a short-lived delegated token, runs its pod, and revokes everything when it ends.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Principal", type_ = "string", json_path = ".spec.principal"),
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(name = "Parent", type_ = "string", json_path = ".spec.parentRun", priority = 1),
    printcolumn(name = "Scopes", type_ = "string", json_path = ".status.grantedScopes", priority = 1),
    printcolumn(name = "Token Expires", type_ = "string", json_path = ".status.tokenExpiresAt"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 242").message("an AgentRun name is at most 242 characters: its ServiceAccount, Secret and Pod are named deputy-run-<name>, which must be unique")
)]
#[x_kube(validation = Rule::new("has(self.parentRun) == has(oldSelf.parentRun) && (!has(self.parentRun) || self.parentRun == oldSelf.parentRun)").message("parentRun is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct AgentRunSpec {
    /// The name of the Agent (in this namespace) that performs the task. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("agent is immutable"))]
    pub agent: String,

    /// The principal the agent acts for, e.g. `alice@example.com`. Immutable. Admission
    /// allows only that user (or someone allowed to `act-for` them) to name them.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("principal is immutable"))]
    pub principal: String,

    /// The task, in words. Recorded in every audit line and in the token's `task` claim.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub task: String,

    /// Scopes the run asks for. It receives their intersection with the Agent's ceiling, the
    /// principal's grants (and its parent run's scopes); a run left with none is Denied.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_.\-/]+(:[A-Za-z0-9_.\-/]+)*(:\*)?$"))
    )]
    pub scopes: Vec<String>,

    /// Audiences (downstream services) the run needs tokens for.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub audiences: Vec<String>,

    /// Lifetime of each run token (e.g. `10m`); the token is rotated at about half of it.
    /// Bounded by the Agent, the grants and the operator's global maximum.
    #[serde(default, rename = "tokenTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}[hms]){1,3}$') || (duration(self) >= duration('30s') && duration(self) <= duration('24h'))").message("must be between 30s and 24h"))]
    pub token_ttl: Option<String>,

    /// Hard deadline, counted from the run's start: past it the run is Expired, its
    /// credentials are revoked and its pod is stopped (e.g. `1h`).
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}[hms]){1,3}$') || (duration(self) >= duration('1m') && duration(self) <= duration('168h'))").message("must be between 1m and 168h"))]
    pub max_duration: String,

    /// The run this one is a sub-agent of, in the same namespace. Immutable. Authority only
    /// narrows down a chain: the child gets at most what its parent holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub parent_run: Option<String>,

    /// Arguments for the Agent's first container (replacing the template's `args`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,

    /// Environment variables for the Agent's first container: plain values only. A name the
    /// Agent's template sets, or a `DEPUTY_*` name, is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<RunEnvVar>,
}

/// One plain environment variable of a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct RunEnvVar {
    /// A C identifier; `DEPUTY_*` is reserved.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    #[x_kube(validation = Rule::new("!self.startsWith('DEPUTY_')").message("DEPUTY_* environment variables are reserved for Deputy"))]
    pub name: String,
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A PodTemplateSpec (metadata and spec) for the run's pod.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Where a run is in its life. `Denied`, `Succeeded`, `Failed`, `Revoked` and `Expired`
/// are terminal: a terminal run holds no credentials and is never re-activated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RunPhase {
    /// Not yet decided.
    Pending,
    /// Authorised: identity minted, token projected, pod created.
    Authorized,
    /// The pod runs.
    Running,
    /// The pod ended successfully.
    Succeeded,
    /// The pod failed.
    Failed,
    /// Authority was withdrawn (grant, agent or parent gone, or the run revoked itself).
    Revoked,
    /// `maxDuration` (or a bound on it) passed.
    Expired,
    /// The run was refused, or its spec is invalid; the reason says which.
    Denied,
}

impl RunPhase {
    /// Only an active run's tokens are valid.
    pub fn is_active(self) -> bool {
        matches!(self, RunPhase::Authorized | RunPhase::Running)
    }
    /// Terminal phases are final.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunPhase::Pending | RunPhase::Authorized | RunPhase::Running)
    }
    /// The phase as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Pending => "Pending",
            RunPhase::Authorized => "Authorized",
            RunPhase::Running => "Running",
            RunPhase::Succeeded => "Succeeded",
            RunPhase::Failed => "Failed",
            RunPhase::Revoked => "Revoked",
            RunPhase::Expired => "Expired",
            RunPhase::Denied => "Denied",
        }
    }
}

/// The scopes a run holds for one audience.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GrantedAuthority {
    pub audience: String,
    pub scopes: Vec<String>,
}

/// A scope the run asked for and did not get, with the reason.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeniedScope {
    /// The requested scope.
    pub scope: String,
    /// Why it was not granted (a machine-readable reason such as `NotInAgentCeiling`).
    pub reason: String,
}

/// What Deputy decided and did for an AgentRun.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRunStatus {
    /// `Pending`, `Authorized`, `Running`, `Succeeded`, `Failed`, `Revoked`, `Expired` or
    /// `Denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// The run's own identity: `spiffe://<trust-domain>/ns/<ns>/agent/<agent>/run/<run>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The per-run ServiceAccount (`deputy-run-<run>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The Allow grant(s) the run relies on, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// What the run holds: for each audience, the scopes it may use there. A report of the
    /// last decision, for people; never read back as authority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_authority: Vec<GrantedAuthority>,
    /// Every scope the run holds for some audience, after attenuation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_scopes: Vec<String>,
    /// Audiences the run may obtain tokens for, after attenuation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_audiences: Vec<String>,
    /// Scopes asked for but not granted, each with its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_scopes: Vec<DeniedScope>,
    /// The principal first, then every acting run identity, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegation_chain: Vec<String>,
    /// How many further hops of sub-agents this run may still start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_delegation_depth: Option<u32>,
    /// Lifetime of each run token, as granted.
    #[serde(default, rename = "tokenTTL", skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<String>,
    /// When the current run token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub token_issued_at: Option<Timestamp>,
    /// When the current run token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub token_expires_at: Option<Timestamp>,
    /// The `jti` of the current run token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// How many times the run token has been re-minted.
    #[serde(default)]
    pub rotations: u32,
    /// When the run was authorised (its deadline counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub started_at: Option<Timestamp>,
    /// The hard deadline: the earliest of `maxDuration`, the grants' bounds and the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub deadline: Option<Timestamp>,
    /// When the run reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub completed_at: Option<Timestamp>,
    /// When the run's credentials were revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub revoked_at: Option<Timestamp>,
    /// A machine-readable reason for the current phase (e.g. `GrantDeleted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation of the current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Authorized`, `TokenIssued`, `Revoked`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A standard condition (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, e.g. `Authorized`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase machine-readable reason.
    pub reason: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// When the status last changed.
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub last_transition_time: Timestamp,
    /// The generation of the spec the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Whether a condition holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
        }
    }
}

impl Condition {
    /// A new condition, holding or not.
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        now: Timestamp,
        generation: Option<i64>,
    ) -> Self {
        Condition {
            type_: type_.to_string(),
            status: status.as_str().to_string(),
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: generation,
        }
    }
}

/// Sets `cond` in `conditions`, keeping the old transition time when the status did not
/// change (the convention of `meta.SetStatusCondition`).
pub fn set_condition(conditions: &mut Vec<Condition>, mut cond: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == cond.type_) {
        Some(existing) => {
            if existing.status == cond.status {
                cond.last_transition_time = existing.last_transition_time;
            }
            *existing = cond;
        }
        None => conditions.push(cond),
    }
}

/// The CRDs of all three resources, in the order they are printed by `deputy crd`.
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![ResourceServer::crd(), Agent::crd(), DelegationGrant::crd(), AgentRun::crd()]
}

/// The CRDs as YAML documents, one per kind, keyed by the file name used in `crds/`.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let kind = crd.spec.names.kind.to_lowercase();
            Ok((format!("{kind}.yaml"), serde_yaml::to_string(&crd)?))
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream (what `deputy crd` prints).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for (_, doc) in crd_files()? {
        out.push_str("---\n");
        out.push_str(&doc);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_split_into_active_and_terminal() {
        use RunPhase::*;
        for p in [Pending, Authorized, Running, Succeeded, Failed, Revoked, Expired, Denied] {
            assert!(!(p.is_active() && p.is_terminal()), "{p:?}");
        }
        assert!(Authorized.is_active() && Running.is_active());
        assert!(!Pending.is_active() && !Pending.is_terminal());
        for p in [Succeeded, Failed, Revoked, Expired, Denied] {
            assert!(p.is_terminal(), "{p:?}");
        }
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t1 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let mut conds = vec![];
        set_condition(&mut conds, Condition::new("Authorized", ConditionStatus::True, "A", "", t0, Some(1)));
        set_condition(&mut conds, Condition::new("Authorized", ConditionStatus::True, "B", "", t1, Some(2)));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, t0);
        assert_eq!(conds[0].reason, "B");
        set_condition(&mut conds, Condition::new("Authorized", ConditionStatus::False, "C", "", t1, Some(3)));
        assert_eq!(conds[0].last_transition_time, t1);
    }

    #[test]
    fn crds_carry_short_names_status_and_cel_rules() {
        let crds = crds();
        let shorts: Vec<_> = crds.iter().map(|c| c.spec.names.short_names.clone().unwrap_or_default()).collect();
        assert_eq!(shorts, [["rs"], ["agent"], ["dg"], ["ar"]].map(|s| vec![s[0].to_string()]));
        let scopes: Vec<&str> = crds.iter().map(|c| c.spec.scope.as_str()).collect();
        assert_eq!(scopes, ["Cluster", "Namespaced", "Namespaced", "Namespaced"]);
        for crd in &crds {
            let v = &crd.spec.versions[0];
            // A ResourceServer is written by administrators only and has nothing to report.
            let has_status = v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some();
            assert_eq!(has_status, crd.spec.names.kind != "ResourceServer", "{}", crd.spec.names.kind);
            assert!(v.additional_printer_columns.as_ref().is_some_and(|c| c.len() >= 3));
        }
        let yaml = crd_yaml().unwrap_or_default();
        for rule in ["principal is immutable", "agent is immutable", "parentRun is immutable", "duration(self)"] {
            assert!(yaml.contains(rule), "missing rule {rule}");
        }
    }
}
