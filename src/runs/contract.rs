//! The contract between a run's pod and Deputy (DESIGN.md, "The files in the pod"): where the
//! token volume is mounted, the file names in it, the environment every container gets, and
//! the OAuth grant and token types the pod uses at the token endpoint. The controller builds
//! pods from it, the token endpoint checks requests against it, and the `deputy` CLI (which
//! runs inside agent pods) reads it.

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

/// The environment variables every container gets, naming the files above and the endpoint.
pub const ENV_TOKEN_FILE: &str = "DEPUTY_TOKEN_FILE";
pub const ENV_ACTOR_TOKEN_FILE: &str = "DEPUTY_ACTOR_TOKEN_FILE";
pub const ENV_RUN_FILE: &str = "DEPUTY_RUN_FILE";
pub const ENV_TOKEN_ENDPOINT: &str = "DEPUTY_TOKEN_ENDPOINT";

/// RFC 8693 token exchange, the only grant the token endpoint serves.
pub const GRANT_TYPE_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The path of a file in the volume, as a container sees it.
pub fn file(key: &str) -> String {
    format!("{MOUNT_PATH}/{key}")
}
