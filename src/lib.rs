//! Deputy: a Kubernetes operator that gives every AI-agent run its own short-lived identity
//! carrying the consent of the human it acts for (OAuth 2.0 Token Exchange, RFC 8693).
//!
//! Modules, one per concern:
//! - [`resources`]: the `deputy.dev/v1alpha1` custom resources and their CRDs;
//! - [`scope`], [`duration`]: the small grammars users write in those resources;
//! - [`registration`]: which audiences the ResourceServers register for a namespace;
//! - [`authorization`]: the pure decision engine (run ∩ agent ∩ resource server ∩ grants ∩ parent);
//! - [`runs`]: what the controller and the token endpoint both know of a run (child names,
//!   ownership by uid, the pod's end, the one liveness rule) and the pod contract;
//! - [`tokens`]: claims, signing keys, minting and verification of JWTs;
//! - [`lease`]: the leader's own check that it still holds its Lease;
//! - [`cli`]: the `deputy` command line.

pub mod audit;
pub mod authorization;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod http_client;
pub mod lease;
pub mod metrics;
pub mod registration;
pub mod resources;
pub mod runs;
pub mod scope;
pub mod server;
pub mod signing;
pub mod tokens;
