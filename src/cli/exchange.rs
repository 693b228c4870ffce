//! `deputy exchange`: what an agent runs inside its pod to trade its run token for a token
//! bound to one audience (RFC 8693), reading the files and environment Deputy projects.

use std::time::Duration;

use clap::Args;

use crate::runs::contract::{
    ACTOR_TOKEN_PATH, ENV_ACTOR_TOKEN_FILE, ENV_TOKEN_ENDPOINT, ENV_TOKEN_FILE, GRANT_TYPE_EXCHANGE, MOUNT_PATH,
    RUN_JSON_KEY, TOKEN_KEY, TOKEN_TYPE_JWT,
};

#[derive(Args, Debug, Clone)]
pub struct ExchangeArgs {
    /// The audience (downstream service) the new token is for.
    #[arg(long)]
    pub audience: String,
    /// Scopes for the new token (repeat, or separate with spaces); default: all of the run's.
    #[arg(long)]
    pub scope: Vec<String>,
    /// The run token. Default: $DEPUTY_TOKEN_FILE, else /var/run/secrets/deputy.dev/token.
    #[arg(long, env = ENV_TOKEN_FILE)]
    pub token_file: Option<String>,
    /// The pod's actor token. Default: $DEPUTY_ACTOR_TOKEN_FILE, else …/actor-token.
    #[arg(long, env = ENV_ACTOR_TOKEN_FILE)]
    pub actor_token_file: Option<String>,
    /// The token endpoint. Default: $DEPUTY_TOKEN_ENDPOINT, else `tokenEndpoint` of run.json.
    #[arg(long, env = ENV_TOKEN_ENDPOINT)]
    pub endpoint: Option<String>,
    /// Print the whole JSON response instead of only the access token.
    #[arg(long)]
    pub json: bool,
}

fn endpoint_from_run_json() -> Option<String> {
    let raw = std::fs::read(format!("{MOUNT_PATH}/{RUN_JSON_KEY}")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get("tokenEndpoint").and_then(|e| e.as_str()).map(String::from)
}

/// Runs the exchange; returns the exit code.
pub async fn run(args: ExchangeArgs) -> i32 {
    match exchange(args).await {
        Ok(out) => {
            println!("{out}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn exchange(args: ExchangeArgs) -> Result<String, String> {
    // Files are read on every call: Deputy rotates the run token, the kubelet the actor token.
    let token_file = args.token_file.unwrap_or_else(|| format!("{MOUNT_PATH}/{TOKEN_KEY}"));
    let actor_file = args.actor_token_file.unwrap_or_else(|| format!("{MOUNT_PATH}/{ACTOR_TOKEN_PATH}"));
    let subject = super::token::read_token(&token_file)?;
    let actor = super::token::read_token(&actor_file)?;
    let endpoint = args
        .endpoint
        .or_else(endpoint_from_run_json)
        .ok_or("no token endpoint: set DEPUTY_TOKEN_ENDPOINT or pass --endpoint")?;
    let scope = args.scope.join(" ");
    let mut form = vec![
        ("grant_type", GRANT_TYPE_EXCHANGE),
        ("subject_token", subject.as_str()),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("actor_token", actor.as_str()),
        ("actor_token_type", TOKEN_TYPE_JWT),
        ("audience", args.audience.as_str()),
    ];
    if !scope.trim().is_empty() {
        form.push(("scope", scope.trim()));
    }
    let resp = crate::http_client::post_form(&endpoint, &form, None, Duration::from_secs(15))
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let body: serde_json::Value = serde_json::from_slice(&resp.body)
        .map_err(|_| format!("{endpoint} answered HTTP {} without JSON", resp.status))?;
    if resp.status != 200 {
        return Err(format!(
            "{}: {} (HTTP {})",
            body["error"].as_str().unwrap_or("error"),
            body["error_description"].as_str().unwrap_or(""),
            resp.status
        ));
    }
    if args.json {
        return Ok(body.to_string());
    }
    body["access_token"].as_str().map(String::from).ok_or_else(|| "the response has no access_token".to_string())
}
