//! Why a run ended: one typed reason, used by the status (`reason`), Events, audit lines and
//! the `deputy_runs_ended_total` metric, whose label set is [`End::ALL`].

use crate::authorization::Reason;
use crate::resources::RunPhase;

/// Defines `End` from one list: each reason, the phase a run ends in with it, and the message
/// recorded when nothing more specific is known. `ALL` and `as_str` follow from the list, so a
/// reason cannot be missing from the metric's label set.
macro_rules! ends {
    ($($(#[doc = $doc:literal])* $name:ident => $phase:ident, $message:literal;)*) => {
        /// Why a run ended.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum End {
            $($(#[doc = $doc])* $name,)*
        }

        impl End {
            /// Every reason, in the order of the list.
            pub const ALL: &'static [End] = &[$(End::$name),*];

            /// The reason as written in the status, Events, audit lines and metric labels.
            pub fn as_str(self) -> &'static str {
                match self { $(End::$name => stringify!($name),)* }
            }

            /// The reason named `s` (as written by [`End::as_str`]).
            pub fn parse(s: &str) -> Option<End> {
                match s { $(stringify!($name) => Some(End::$name),)* _ => None }
            }

            /// The phase a run ends in.
            pub fn phase(self) -> RunPhase {
                match self { $(End::$name => RunPhase::$phase,)* }
            }

            /// The message recorded when the cause gives no more detail.
            pub fn message(self) -> &'static str {
                match self { $(End::$name => $message,)* }
            }
        }
    };
}

ends! {
    /// The run's pod completed.
    PodSucceeded => Succeeded, "the run's pod completed";
    /// The run's pod failed.
    PodFailed => Failed, "the run's pod failed";
    /// The run's pod was deleted (or is gone while the run was running).
    PodDeleted => Failed, "the run's pod was deleted";
    /// A child's name is held by an object the run does not own.
    ChildConflict => Failed, "a child's name is held by an object the run does not own";
    /// The run reached `maxDuration` from its creation.
    DeadlineExceeded => Expired, "the run reached its deadline";
    /// The AgentRun was deleted while active.
    RunDeleted => Revoked, "the run was deleted";
    /// The run revoked its own tokens at the token endpoint.
    SelfRevoked => Revoked, "the run revoked its own tokens";
    /// The grants now give less than the run's current token carries.
    AuthorityReduced => Revoked, "the run's grants no longer cover what its token carries";
    /// Someone wrote an ended run's status back to a live phase.
    StatusTampered => Revoked, "the status of this ended run was written back to a live phase";
    /// The Agent is gone or being deleted.
    AgentDeleted => Revoked, "the run's Agent was deleted";
    /// No Allow grant covers the run any more.
    GrantDeleted => Revoked, "no grant allows the run any more";
    /// Every grant that allowed the run has expired.
    GrantExpired => Revoked, "the run's grants have expired";
    /// The grants that allowed the run are not in force yet (their `notBefore` moved ahead).
    GrantNotYetValid => Revoked, "the run's grants are not in force yet";
    /// The parent run ended (or is gone).
    ParentEnded => Revoked, "the parent run ended";
    /// A Deny grant refuses the run.
    DeniedByGrant => Revoked, "a Deny grant refuses the run";
    /// A Deny grant is malformed, so Deputy fails closed.
    InvalidDenyGrant => Revoked, "a Deny grant is malformed";
    /// The run's spec is no longer valid.
    InvalidSpec => Revoked, "the run's spec is not valid";
    /// The Agent's spec is no longer valid.
    InvalidAgent => Revoked, "the run's Agent is not valid";
    /// None of the run's scopes is granted any more.
    NoScopesGranted => Revoked, "none of the run's scopes is granted any more";
    /// None of the run's audiences is granted any more.
    NoAudienceGranted => Revoked, "none of the run's audiences is granted any more";
    /// No ResourceServer registers the run's audiences for its namespace any more.
    AudienceNotRegistered => Revoked, "no ResourceServer registers the run's audiences any more";
    /// The run is in Deputy's own namespace.
    ReservedNamespace => Revoked, "the run is in Deputy's own namespace";
    /// The parent run acts for another principal.
    ParentPrincipalMismatch => Revoked, "the parent run acts for another principal";
    /// The chain has more hops than the grants allow.
    DelegationDepthExceeded => Revoked, "the chain of runs is longer than the grants allow";
}

impl End {
    /// Why an active run ends when a fresh decision refuses it.
    pub fn lost(reason: Reason) -> End {
        match reason {
            Reason::AgentNotFound | Reason::AgentDeleted => End::AgentDeleted,
            Reason::NoGrant => End::GrantDeleted,
            Reason::GrantExpired => End::GrantExpired,
            Reason::GrantNotYetValid => End::GrantNotYetValid,
            Reason::ParentNotFound | Reason::ParentNotActive | Reason::ParentPending => End::ParentEnded,
            Reason::DeniedByGrant => End::DeniedByGrant,
            Reason::InvalidDenyGrant => End::InvalidDenyGrant,
            Reason::InvalidSpec => End::InvalidSpec,
            Reason::InvalidAgent => End::InvalidAgent,
            Reason::NoScopesGranted => End::NoScopesGranted,
            Reason::NoAudienceGranted => End::NoAudienceGranted,
            Reason::AudienceNotRegistered => End::AudienceNotRegistered,
            Reason::ReservedNamespace => End::ReservedNamespace,
            Reason::ParentPrincipalMismatch => End::ParentPrincipalMismatch,
            Reason::DelegationDepthExceeded => End::DelegationDepthExceeded,
        }
    }

    /// Whether the run's pod is stopped when it ends so (a finished pod is kept for its logs).
    pub fn stops_pod(self) -> bool {
        !matches!(self, End::PodSucceeded | End::PodFailed | End::PodDeleted)
    }

    /// Whether the end is a revocation (the run lost what it held before finishing).
    pub fn is_revocation(self) -> bool {
        matches!(self.phase(), RunPhase::Revoked | RunPhase::Expired)
    }
}
