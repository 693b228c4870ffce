//! A hostile tenant against a live `deputy run`, on both backends: creating an AgentRun must
//! never give more than its creator could do without Deputy. Each test reproduces one finding
//! of the adversarial review (issue 16) and shows it refused.
//!
//! On the real control plane the attacker is `bob@example.com`, a non-admin user who may create
//! runs and grants in the test namespace; on the test API server (no users, no RBAC) the same
//! requests are made by its only client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use deputy_controlplane::BOB;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::Client;
use serde_json::{Value, json};
use support::{Env, create_object, kube_backend};

const T: Duration = Duration::from_secs(30);

/// Bob's client: a non-admin user on the real control plane.
async fn bob(env: &Env) -> Client {
    match env.cluster {
        Some(cp) => {
            kube_backend::let_users_manage_runs(&env.client, &env.ns).await;
            kube_backend::user_client(cp, BOB).await
        }
        None => env.client.clone(),
    }
}

/// Bob's standing consent for the GDPR agent, and the example's Agent.
async fn bobs_grant(env: &Env, bob: &Client) {
    env.apply_example("gdpr-compliance.yaml").await;
    let grant = json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": "bob-gdpr", "namespace": env.ns},
        "spec": {"principal": BOB, "agent": "gdpr-compliance-agent",
                 "scopes": ["compliance:privacy:check"], "audiences": ["gdpr-compliance-service"]},
    });
    create_object(bob, &grant, true).await.expect("Bob writes his own grant");
}

fn bobs_run(env: &Env, name: &str) -> Value {
    json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": name, "namespace": env.ns},
        "spec": {"agent": "gdpr-compliance-agent", "principal": BOB, "task": "look around",
                 "scopes": ["compliance:privacy:check"], "audiences": ["gdpr-compliance-service"],
                 "maxDuration": "1h"},
    })
}

/// Finding 1 (critical): the run's pod template was a pod spec the operator created with its
/// own rights. Bob's run asks for Alice's run-token Secret, the host's root, privileges, host
/// namespaces, a node, a long-lived Kubernetes API token and another ServiceAccount; the pod
/// Deputy creates is the Agent's, with nothing of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cannot_add_volumes_host_access_or_identity_to_the_agents_pod() {
    let env = Env::start().await;
    let bob = bob(&env).await;
    bobs_grant(&env, &bob).await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;

    let attack = json!({"spec": {
        "serviceAccountName": "default",
        "automountServiceAccountToken": true,
        "hostPID": true, "hostNetwork": true, "hostIPC": true,
        "nodeName": "node-1",
        "volumes": [
            {"name": "alice", "secret": {"secretName": "deputy-run-gdpr-check-q4"}},
            {"name": "root", "hostPath": {"path": "/"}},
            {"name": "kube", "projected": {"sources": [{"serviceAccountToken": {"path": "t", "expirationSeconds": 86400}}]}},
        ],
        "containers": [{
            "name": "agent", "image": "docker.io/library/busybox:1.36",
            "securityContext": {"privileged": true},
            "envFrom": [{"secretRef": {"name": "deputy-run-gdpr-check-q4"}}],
            "volumeMounts": [{"name": "alice", "mountPath": "/alice"}, {"name": "root", "mountPath": "/host"}],
        }],
    }});
    let mut run = bobs_run(&env, "bob-attack");
    run["spec"]["template"] = attack.clone();
    run["spec"]["volumes"] = attack["spec"]["volumes"].clone();
    run["spec"]["serviceAccountName"] = json!("default");
    // Without strict validation (the API server's default), as a careless or hostile client sends it.
    create_object(&bob, &run, false).await.expect("the run is accepted; its unknown fields are not");
    env.wait_phase("bob-attack", "Authorized", T).await;

    let pod: Pod = env.pod("deputy-run-bob-attack").await;
    let spec = pod.spec.unwrap();
    let agent: Value = serde_json::to_value(env.agents().get("gdpr-compliance-agent").await.unwrap()).unwrap();
    let template = &agent["spec"]["template"]["spec"];
    assert_eq!(spec.service_account_name.as_deref(), Some("deputy-run-bob-attack"));
    assert_eq!(spec.automount_service_account_token, Some(false), "as the Agent says");
    assert_eq!((spec.host_pid, spec.host_network, spec.host_ipc), (None, None, None));
    assert_eq!(spec.node_name, None);
    let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(volumes, ["deputy-token"], "only Deputy's own volume");
    assert_eq!(spec.containers.len(), 1);
    let c = &spec.containers[0];
    assert_eq!(Some(c.image.clone().unwrap_or_default().as_str()), template["containers"][0]["image"].as_str());
    assert_eq!(c.command.as_ref().map(|v| json!(v)), Some(template["containers"][0]["command"].clone()));
    assert!(c.security_context.is_none(), "no privileges");
    assert!(c.env_from.is_none(), "no Secret through envFrom");
    let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(mounts, ["/var/run/secrets/deputy.dev"]);
}

/// A run may set plain env for its agent, never Deputy's own variables: refused by the CRD on
/// a real API server, and Denied by Deputy where nothing validates (the test API server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cannot_set_deputys_environment() {
    let env = Env::start().await;
    let bob = bob(&env).await;
    bobs_grant(&env, &bob).await;
    let mut run = bobs_run(&env, "bob-env");
    run["spec"]["env"] = json!([{"name": "DEPUTY_TOKEN_FILE", "value": "/tmp/forged"}]);
    match create_object(&bob, &run, false).await {
        Err((422, msg)) if env.cluster.is_some() => {
            assert!(msg.contains("DEPUTY_* environment variables are reserved for Deputy"), "{msg}")
        }
        Ok(_) if env.cluster.is_none() => {
            let denied = env.wait_phase("bob-env", "Denied", T).await;
            let st = denied.status.unwrap();
            assert_eq!(st.reason.as_deref(), Some("InvalidSpec"));
            assert!(st.message.unwrap_or_default().contains("reserved for Deputy"));
        }
        other => panic!("a DEPUTY_* env was not refused: {other:?}"),
    }
}

/// Runs in Deputy's own namespace are refused: the signing keys live there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_deputys_own_namespace_are_refused() {
    let env = Env::start().await;
    let mut run = bobs_run(&env, "in-deputy-ns");
    run["metadata"]["namespace"] = json!(env.operator_ns);
    // The admin creates it (no tenant may write there at all; this is the last line).
    create_object(&env.client, &run, true).await.unwrap();
    let runs: kube::Api<deputy::resources::AgentRun> = kube::Api::namespaced(env.client.clone(), &env.operator_ns);
    let denied = support::wait_until(T, || async {
        runs.get("in-deputy-ns").await.ok().and_then(|r| r.status).and_then(|s| s.reason).as_deref()
            == Some("ReservedNamespace")
    })
    .await;
    assert!(denied, "a run in Deputy's namespace is Denied: {:?}", runs.get("in-deputy-ns").await.unwrap().status);
    let pods: kube::Api<Pod> = kube::Api::namespaced(env.client.clone(), &env.operator_ns);
    assert!(pods.get_opt("deputy-run-in-deputy-ns").await.unwrap().is_none(), "no pod there");
}

fn claims(token: &str) -> Value {
    deputy::tokens::verify::peek_claims(token).unwrap()
}

/// Patches a run's status as anyone allowed to write `agentruns/status` could.
async fn forge_status(env: &Env, run: &str, status: Value) {
    let runs = env.runs();
    runs.patch_status(run, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&json!({"status": status})))
        .await
        .unwrap();
}

/// Finding 3 (high): status was trusted as authority. A status claiming a 999999h TTL, a 2099
/// deadline, another identity and chain, and a token due for rotation: the next token is minted
/// from the decision (the grant's 10m, the run's real identity), and the status is corrected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_status_is_never_read_back_as_authority() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let before = env.wait_phase("gdpr-check-q4", "Authorized", T).await.status.unwrap();
    let identity = before.identity.clone().unwrap();
    forge_status(
        &env,
        "gdpr-check-q4",
        json!({
            "tokenTTL": "999999h", "deadline": "2099-01-01T00:00:00Z",
            "identity": "spiffe://evil.example/run/x",
            "delegationChain": ["alice@example.com", "spiffe://evil.example/run/x"],
            "remainingDelegationDepth": 8,
            "grantedScopes": ["compliance:*", "payments:*"],
            // Due for rotation now.
            "tokenIssuedAt": "2020-01-01T00:00:00Z", "tokenExpiresAt": "2020-01-01T00:10:00Z",
        }),
    )
    .await;
    let rotated =
        env.wait_run("gdpr-check-q4", T, |r| r.status.as_ref().is_some_and(|s| s.rotations >= 1)).await.status.unwrap();
    let token = env.run_token("gdpr-check-q4").await.unwrap();
    let c = claims(&token);
    let lifetime = c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
    assert!(lifetime <= 600, "the grant's 10m bounds the token, not the status: {lifetime}s");
    assert_eq!(c["act"]["sub"], json!(identity), "the run's own identity: {c}");
    assert!(c["act"].get("act").is_none(), "no forged chain: {c}");
    assert_eq!(c["scope"], "compliance:audit:cross_dept compliance:privacy:check");
    // The status reports the decision again.
    assert_eq!(rotated.identity.as_deref(), Some(identity.as_str()));
    assert_eq!(rotated.token_ttl.as_deref(), Some("10m"));
    assert!(rotated.deadline.unwrap() < "2030-01-01T00:00:00Z".parse().unwrap());
    assert_eq!(rotated.remaining_delegation_depth, Some(0));
}

/// Finding 3: patching an ended run's phase back to Authorized made its old tokens work again,
/// and Deputy re-created its pod, ServiceAccount and Secret. Now the run stays ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_run_stays_ended_whatever_its_status_is_patched_to() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let token = env.run_token("gdpr-check-q4").await.unwrap();
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Succeeded").await;
    env.wait_run("gdpr-check-q4", T, |r| r.status.as_ref().is_some_and(|s| s.revoked_at.is_some())).await;

    forge_status(&env, "gdpr-check-q4", json!({"phase": "Authorized", "reason": "Authorized"})).await;
    // The token endpoint refuses its tokens at once (completedAt and revokedAt still say it ended).
    let caller = env.resource_server_token().await;
    let (status, body) = env.post("/introspect", &[("token", &token)], Some(&caller)).await;
    assert_eq!((status, &body["active"]), (200, &json!(false)), "{body}");
    // Deputy puts the run back to an end, says why, and creates nothing for it.
    let back = env
        .wait_run("gdpr-check-q4", T, |r| {
            r.status.as_ref().is_some_and(|s| s.reason.as_deref() == Some("StatusTampered"))
        })
        .await;
    assert_eq!(back.status.unwrap().phase, Some(deputy::resources::RunPhase::Revoked));
    assert!(env.run_token("gdpr-check-q4").await.is_none(), "no Secret again");
    let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> = env.api();
    assert!(sas.get_opt("deputy-run-gdpr-check-q4").await.unwrap().is_none(), "no ServiceAccount again");
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = env.api();
    let seen = support::wait_until(T, || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("StatusTampered"))
    })
    .await;
    assert!(seen, "a StatusTampered Event");
}

/// Finding 2 (high): grants added up as (∪ scopes) × (∪ audiences). Alice consents to
/// `data:write` at staging and `data:read` at prod; the run holds exactly those two pairs, is
/// bounded by the prod grant's 1m TTL, and `/token` refuses `data:write` for prod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_add_up_as_pairs_at_the_token_endpoint() {
    let env = Env::start().await;
    let ns = env.ns.clone();
    let template = json!({"spec": {"restartPolicy": "Never",
        "containers": [{"name": "agent", "image": "docker.io/library/busybox:1.36", "command": ["sleep", "300"]}]}});
    let objects = [
        json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "db-agent", "namespace": ns},
               "spec": {"scopes": ["data:*"], "audiences": ["staging-db", "prod-db"], "maxTokenTTL": "15m",
                        "template": template}}),
        json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant",
               "metadata": {"name": "alice-staging-write", "namespace": ns},
               "spec": {"principal": "alice@example.com", "agent": "db-agent", "scopes": ["data:write"],
                        "audiences": ["staging-db"], "maxTokenTTL": "10m"}}),
        json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant",
               "metadata": {"name": "alice-prod-read", "namespace": ns},
               "spec": {"principal": "alice@example.com", "agent": "db-agent", "scopes": ["data:read"],
                        "audiences": ["prod-db"], "maxTokenTTL": "1m", "maxRunDuration": "2m"}}),
        json!({"apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun", "metadata": {"name": "db-run", "namespace": ns},
               "spec": {"agent": "db-agent", "principal": "alice@example.com", "task": "migrate",
                        "scopes": ["data:read", "data:write"], "audiences": ["staging-db", "prod-db"],
                        "tokenTTL": "10m", "maxDuration": "1h"}}),
    ];
    env.register("staging-db", &["data:*"]).await;
    env.register("prod-db", &["data:*"]).await;
    for o in &objects {
        create_object(&env.client, o, true).await.unwrap();
    }
    let run = env.wait_phase("db-run", "Authorized", T).await;
    let st = run.status.unwrap();
    let authority: Vec<(String, Vec<String>)> =
        st.granted_authority.iter().map(|g| (g.audience.clone(), g.scopes.clone())).collect();
    assert_eq!(
        authority,
        [
            ("prod-db".to_string(), vec!["data:read".to_string()]),
            ("staging-db".to_string(), vec!["data:write".to_string()])
        ]
    );
    let subject = env.run_token("db-run").await.unwrap();
    let c = claims(&subject);
    assert!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap() <= 60, "the prod grant's 1m bounds: {c}");
    env.set_pod_phase("deputy-run-db-run", "Running").await;
    env.wait_phase("db-run", "Running", T).await;
    let actor = env.actor_token("db-run").await;
    let exchange = |audience: &'static str, scope: &'static str| {
        let (subject, actor) = (subject.clone(), actor.clone());
        let env = &env;
        async move {
            let mut form = support::exchange_form(&subject, &actor);
            form.retain(|(k, _)| *k != "audience");
            form.push(("audience", audience));
            form.push(("scope", scope));
            env.post("/token", &form, None).await
        }
    };
    let (status, body) = exchange("prod-db", "data:write").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "write at prod was never consented: {body}"
    );
    let (status, body) = exchange("staging-db", "data:write").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(claims(body["access_token"].as_str().unwrap())["aud"], "staging-db");
    let (status, body) = exchange("prod-db", "data:read").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = exchange("staging-db", "data:read").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "read at staging was never consented: {body}"
    );
}

/// Finding 4: child names were shortened, so a crafted 250-character run name mapped onto
/// another run's ServiceAccount and Secret. A run's name now fits its children unshortened:
/// refused by the CRD on a real API server, Denied by Deputy where nothing validates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_name_cannot_be_shortened_onto_another_runs_children() {
    let env = Env::start().await;
    let bob = bob(&env).await;
    bobs_grant(&env, &bob).await;
    let name = "r".repeat(243);
    let run = bobs_run(&env, &name);
    match create_object(&bob, &run, false).await {
        Err((422, msg)) if env.cluster.is_some() => assert!(msg.contains("at most 242 characters"), "{msg}"),
        Ok(_) if env.cluster.is_none() => {
            let denied = env.wait_phase(&name, "Denied", T).await;
            assert_eq!(denied.status.unwrap().reason.as_deref(), Some("InvalidSpec"));
            let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> = env.api();
            assert!(
                sas.list(&Default::default())
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .all(|s| { !s.metadata.name.as_deref().unwrap_or("").starts_with("deputy-run-rrr") })
            );
        }
        other => panic!("a 243-character run name was not refused: {other:?}"),
    }
}

/// The example's Agent and Alice's grant, without its ResourceServer.
async fn gdpr_unregistered(env: &Env) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gdpr-compliance.yaml");
    let yaml = std::fs::read_to_string(path).unwrap();
    let docs: Vec<String> = yaml
        .split("\n---\n")
        .filter(|d| d.contains("kind: Agent\n") || d.contains("kind: DelegationGrant\n"))
        .map(String::from)
        .collect();
    env.apply_yaml(&docs.join("\n---\n")).await;
}

fn alices_run(env: &Env, name: &str) -> Value {
    json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": name, "namespace": env.ns},
        "spec": {"agent": "gdpr-compliance-agent", "principal": "alice@example.com", "task": "check",
                 "scopes": ["compliance:privacy:check"], "audiences": ["gdpr-compliance-service"],
                 "maxDuration": "1h"},
    })
}

/// Finding 4 (Agents are namespaced and unowned): whoever could create an Agent got any scope
/// for any audience. An audience is now granted only where its owners register it: an Agent and
/// a grant in a namespace no ResourceServer selects give nothing; registered elsewhere, still
/// nothing; registered here, within the server's scopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_is_granted_only_where_a_resource_server_registers_it() {
    let env = Env::start().await;
    gdpr_unregistered(&env).await;
    env.apply_value(alices_run(&env, "unregistered")).await;
    // Pending, not Denied: the audience's owners may still register it.
    let waiting = env
        .wait_run("unregistered", T, |r| {
            r.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("AudienceNotRegistered")
        })
        .await
        .status
        .unwrap();
    assert_eq!(waiting.phase, Some(deputy::resources::RunPhase::Pending));
    assert!(waiting.service_account.is_none() && waiting.token_issued_at.is_none(), "no credentials: {waiting:?}");
    let msg = waiting.message.unwrap_or_default();
    assert!(msg.contains("no ResourceServer registers audience \"gdpr-compliance-service\""), "{msg}");

    // A tenant cannot register an audience for themselves: the kind is cluster-scoped, and
    // the roles that let Bob manage runs and grants say nothing about it.
    if env.cluster.is_some() {
        let bob = bob(&env).await;
        let own = json!({
            "apiVersion": "deputy.dev/v1alpha1", "kind": "ResourceServer", "metadata": {"name": format!("bob-{}", env.ns)},
            "spec": {"audience": "gdpr-compliance-service", "scopes": ["compliance:*"], "namespaceSelector": {}},
        });
        match create_object(&bob, &own, true).await {
            Err((403, _)) => {}
            other => panic!("Bob registered an audience: {other:?}"),
        }
    }

    // Registered for another namespace only.
    env.apply_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "ResourceServer",
        "metadata": {"name": format!("gdpr-elsewhere-{}", env.ns)},
        "spec": {"audience": "gdpr-compliance-service", "scopes": ["compliance:*"],
                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "elsewhere"}}},
    }))
    .await;
    env.apply_value(alices_run(&env, "elsewhere")).await;
    let waiting = env
        .wait_run("elsewhere", T, |r| {
            r.status.as_ref().and_then(|s| s.message.as_deref()).is_some_and(|m| m.contains("selects namespace"))
        })
        .await;
    assert_eq!(waiting.status.unwrap().phase, Some(deputy::resources::RunPhase::Pending), "the message says why");

    // Registered here, with a ceiling narrower than the Agent's and the grant's.
    env.register("gdpr-compliance-service", &["compliance:privacy:*"]).await;
    let mut run = alices_run(&env, "registered");
    run["spec"]["scopes"] = json!(["compliance:privacy:check", "compliance:audit:cross_dept"]);
    env.apply_value(run).await;
    let st = env.wait_phase("registered", "Authorized", T).await.status.unwrap();
    assert_eq!(st.granted_scopes, ["compliance:privacy:check"]);
    assert_eq!(st.denied_scopes.len(), 1);
    assert_eq!(
        (st.denied_scopes[0].scope.as_str(), st.denied_scopes[0].reason.as_str()),
        ("compliance:audit:cross_dept", "NotInResourceServerScopes")
    );
    // The run that waited is authorised now that its audience is registered here.
    env.wait_phase("unregistered", "Authorized", T).await;
}

/// A ResourceServer's `maxTokenTTL` bounds the exchanged tokens for its audience, and removing
/// the registration revokes the runs that relied on it (`AudienceNotRegistered`) and their
/// tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_server_bounds_exchanges_and_its_removal_revokes() {
    let env = Env::start().await;
    gdpr_unregistered(&env).await;
    let name = format!("gdpr-{}", env.ns);
    env.apply_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "ResourceServer", "metadata": {"name": name},
        "spec": {"audience": "gdpr-compliance-service", "scopes": ["compliance:*"], "maxTokenTTL": "30s",
                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.ns}}},
    }))
    .await;
    env.apply_value(alices_run(&env, "bounded")).await;
    env.wait_phase("bounded", "Authorized", T).await;
    env.set_pod_phase("deputy-run-bounded", "Running").await;
    env.wait_phase("bounded", "Running", T).await;
    let subject = env.run_token("bounded").await.unwrap();
    let actor = env.actor_token("bounded").await;
    let form = support::exchange_form(&subject, &actor);
    let (status, body) = env.post("/token", &form, None).await;
    assert_eq!(status, 200, "{body}");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!(expires_in <= 30, "the ResourceServer's 30s bounds the token: {body}");
    let c = claims(body["access_token"].as_str().unwrap());
    assert!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap() <= 30, "{c}");

    let servers: kube::Api<deputy::resources::ResourceServer> = kube::Api::all(env.client.clone());
    servers.delete(&name, &Default::default()).await.unwrap();
    let revoked = env.wait_phase("bounded", "Revoked", T).await.status.unwrap();
    assert_eq!(revoked.reason.as_deref(), Some("AudienceNotRegistered"), "{revoked:?}");
    let (status, body) = env.post("/token", &form, None).await;
    assert_eq!(status, 400, "a revoked run's token is refused: {body}");
}

/// Finding 5 (low): Deputy watches its pods by their `managed-by` label, so a pod whose label
/// was removed ended unseen. The pod leaves the watch, the run is reconciled, and applying the
/// run's pod puts the label back; its end is then seen and the run's credentials removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_label_is_removed_is_labelled_again_and_its_end_seen() {
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Running").await;
    env.wait_phase("gdpr-check-q4", "Running", T).await;
    let pods: kube::Api<Pod> = env.api();
    let key = deputy::runs::MANAGED_BY.0;
    let patch = json!({"metadata": {"labels": {key: null}}});
    pods.patch("deputy-run-gdpr-check-q4", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
    let relabelled = support::wait_until(T, || async {
        let pod = pods.get("deputy-run-gdpr-check-q4").await.unwrap();
        pod.metadata.labels.unwrap_or_default().contains_key(key)
    })
    .await;
    assert!(relabelled, "Deputy did not put its label back on the run's pod");
    env.set_pod_phase("deputy-run-gdpr-check-q4", "Succeeded").await;
    let done = env.wait_phase("gdpr-check-q4", "Succeeded", T).await;
    assert!(done.status.unwrap().completed_at.is_some());
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = env.api();
    let gone = support::wait_until(T, || async { !support::exists(&secrets, "deputy-run-gdpr-check-q4").await }).await;
    assert!(gone, "the run's Secret outlived its pod");
}

/// Bob, who may also make Secrets, ServiceAccounts and Pods in the namespace (the `edit`
/// role), and his grant.
async fn bob_with_workloads(env: &Env) -> Client {
    let bob = bob(env).await;
    if env.cluster.is_some() {
        kube_backend::let_user_manage_workloads(&env.client, &env.ns, BOB).await;
    }
    bobs_grant(env, &bob).await;
    bob
}

/// The metadata of the `kind` object `name` in the test namespace, if there is one.
async fn meta_of(env: &Env, kind: &str, name: &str) -> Option<kube::api::ObjectMeta> {
    let meta = match kind {
        "Secret" => env.api::<Secret>().get_metadata_opt(name).await.unwrap().map(|m| m.metadata),
        "ServiceAccount" => env.api::<ServiceAccount>().get_metadata_opt(name).await.unwrap().map(|m| m.metadata),
        "Pod" => env.api::<Pod>().get_metadata_opt(name).await.unwrap().map(|m| m.metadata),
        other => panic!("no such kind {other}"),
    };
    meta.filter(|m| m.deletion_timestamp.is_none())
}

/// Bob's object under `name`, made as Bob. A Pod needs the namespace's `default`
/// ServiceAccount, which the control plane makes shortly after the namespace.
async fn take_name(env: &Env, bob: &Client, kind: &str, name: &str, finalizer: bool) -> Value {
    let mut meta = json!({"name": name, "namespace": env.ns, "annotations": {"example.com/made-by": "bob"}});
    if finalizer {
        meta["finalizers"] = json!(["example.com/hold"]);
    }
    let obj = match kind {
        "Secret" => json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": {"token": "Ym9iJ3M="}}),
        "ServiceAccount" => {
            meta["annotations"]["eks.amazonaws.com/role-arn"] = json!("arn:aws:iam::111122223333:role/bob");
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
        }
        _ => json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                    "spec": {"containers": [{"name": "c", "image": "registry.example/bob:1"}]}}),
    };
    let deadline = std::time::Instant::now() + T;
    loop {
        match create_object(bob, &obj, true).await {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!("Bob could not make his {kind} {name}: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Finding (issue 16, names): a child's name is predictable (`deputy-run-<run>`), and a
/// server-side apply adopted whatever held it: a ServiceAccount Bob annotated with a cloud
/// role became the run's identity, a Secret he can read received the run token. Now each run
/// whose name Bob took first fails with `ChildConflict`; his objects stay exactly as he made
/// them (no owner, no token, not deleted) and nothing of the run's is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_childs_name_taken_first_is_never_adopted_written_or_deleted() {
    let env = Env::start().await;
    let bob = bob_with_workloads(&env).await;
    let kinds = ["Secret", "ServiceAccount", "Pod"];
    let mut made = vec![];
    for kind in kinds {
        let run = format!("taken-{}", kind.to_lowercase());
        let child = format!("deputy-run-{run}");
        made.push((kind, run.clone(), take_name(&env, &bob, kind, &child, false).await));
        create_object(&bob, &bobs_run(&env, &run), true).await.expect("Bob creates his run");
    }
    for (kind, run, bobs) in made {
        let child = format!("deputy-run-{run}");
        let done = env.wait_phase(&run, "Failed", T).await;
        let status = done.status.unwrap();
        assert_eq!(status.reason.as_deref(), Some("ChildConflict"), "{kind}: {status:?}");
        assert!(status.message.as_deref().unwrap_or_default().contains(kind), "{kind}: {status:?}");
        assert!(status.token_id.is_none(), "{kind}: a token was minted: {status:?}");
        let meta = meta_of(&env, kind, &child).await.unwrap_or_else(|| panic!("Bob's {kind} was deleted"));
        assert_eq!(meta.uid.as_deref(), bobs["metadata"]["uid"].as_str(), "{kind} was replaced");
        assert!(meta.owner_references.unwrap_or_default().is_empty(), "Bob's {kind} was adopted");
        assert!(meta.labels.unwrap_or_default().is_empty(), "Bob's {kind} was written to");
        let annotations = meta.annotations.unwrap_or_default();
        assert_eq!(annotations.get("example.com/made-by").map(String::as_str), Some("bob"), "{kind}");
        if kind == "Secret" {
            let data = env.api::<Secret>().get(&child).await.unwrap().data.unwrap_or_default();
            assert_eq!(
                data.get("token").map(|b| b.0.as_slice()),
                Some(&b"bob's"[..]),
                "the run token reached Bob's Secret"
            );
        }
        for other in kinds.iter().filter(|k| **k != kind) {
            let left = support::wait_until(T, || async { meta_of(&env, other, &child).await.is_none() }).await;
            assert!(left, "the failed run {run} left its {other} behind");
        }
    }
    let events = env.events_for("taken-secret").await;
    assert!(events.iter().any(|(kind, reason)| kind == "Warning" && reason == "ChildConflict"), "{events:?}");
}

/// The legitimate case beside it: a run deleted and made again under its name, while an old
/// child is still on its way out (here a Secret held by a finalizer), waits (`NameInUse`)
/// and starts once the name is free, instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waits_for_an_old_child_on_its_way_out() {
    let env = Env::start().await;
    let bob = bob_with_workloads(&env).await;
    take_name(&env, &bob, "Secret", "deputy-run-again", true).await;
    let secrets: kube::Api<Secret> = kube::Api::namespaced(bob.clone(), &env.ns);
    secrets.delete("deputy-run-again", &kube::api::DeleteParams::default()).await.unwrap();
    create_object(&bob, &bobs_run(&env, "again"), true).await.expect("Bob creates his run");
    let waiting =
        env.wait_run("again", T, |r| r.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("NameInUse")).await;
    assert_eq!(waiting.status.unwrap().phase.map(|p| p.as_str()), Some("Pending"));
    let release = json!({"metadata": {"finalizers": null}});
    secrets
        .patch("deputy-run-again", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&release))
        .await
        .unwrap();
    env.wait_phase("again", "Authorized", T).await;
    let meta = meta_of(&env, "Secret", "deputy-run-again").await.expect("the run's own Secret");
    assert!(
        meta.owner_references.unwrap_or_default().iter().any(|o| o.kind == "AgentRun" && o.controller == Some(true))
    );
}

/// Finding 4 (medium): narrowing a grant did not reach active runs. A lower token TTL and run
/// duration are reported at once and apply from the run's next token; a grant that no longer
/// consents to a pair the run holds revokes it (`AuthorityReduced`), with its credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrowing_a_grant_reaches_an_active_run() {
    use kube::api::{Patch, PatchParams};
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    let run = env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let created = run.metadata.creation_timestamp.clone().unwrap().0;
    let first = env.run_token("gdpr-check-q4").await.unwrap();
    let c = claims(&first);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600, "the grant's 10m: {c}");

    let narrow = json!({"spec": {"maxTokenTTL": "1m", "maxRunDuration": "30m"}});
    env.grants().patch("alice-gdpr", &PatchParams::default(), &Patch::Merge(&narrow)).await.unwrap();
    let reported = env
        .wait_run("gdpr-check-q4", T, |r| r.status.as_ref().and_then(|s| s.token_ttl.as_deref()) == Some("1m"))
        .await
        .status
        .unwrap();
    let deadline = created.checked_add(jiff::SignedDuration::from_mins(30)).unwrap();
    assert_eq!(reported.deadline, Some(deadline), "the deadline counts from creation: {reported:?}");
    assert_eq!(reported.phase, Some(deputy::resources::RunPhase::Authorized), "narrower, not revoked");

    // The next token (forced by removing the Secret) carries the narrower bounds.
    let secrets: kube::Api<Secret> = env.api();
    secrets.delete("deputy-run-gdpr-check-q4", &Default::default()).await.unwrap();
    let t0 = std::time::Instant::now();
    let next = loop {
        if let Some(t) = env.run_token("gdpr-check-q4").await.filter(|t| *t != first) {
            break t;
        }
        assert!(t0.elapsed() < T, "a new token after the Secret was removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let c = claims(&next);
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert!(exp - iat <= 60, "the narrowed 1m: {c}");
    assert!(exp <= deadline.as_second(), "never past the narrowed deadline: {c}");

    // Alice withdraws the audit scopes the run holds.
    let withdraw = json!({"spec": {"scopes": ["compliance:privacy:check"]}});
    env.grants().patch("alice-gdpr", &PatchParams::default(), &Patch::Merge(&withdraw)).await.unwrap();
    let ended = env.wait_phase("gdpr-check-q4", "Revoked", T).await.status.unwrap();
    assert_eq!(ended.reason.as_deref(), Some("AuthorityReduced"), "{ended:?}");
    let sas: kube::Api<ServiceAccount> = env.api();
    let gone = support::wait_until(T, || async {
        !support::exists(&secrets, "deputy-run-gdpr-check-q4").await
            && !support::exists(&sas, "deputy-run-gdpr-check-q4").await
    })
    .await;
    assert!(gone, "the revoked run's Secret and ServiceAccount are removed");
}

/// Finding 4 (medium): a sub-agent was authorised after its grant said depth 0. Lowering the
/// planner's `maxDelegationDepth` to 0 refuses a new sub-agent run (Denied) and ends the one
/// already running under it (Revoked), both `DelegationDepthExceeded`; the planner goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_a_grants_depth_reaches_the_chain() {
    use kube::api::{Patch, PatchParams};
    let env = Env::start().await;
    env.apply_example("supply-chain.yaml").await;
    env.wait_phase("supply-chain-planner-7", "Authorized", T).await;
    env.wait_phase("optimise-routes-7", "Authorized", T).await;

    let depth = json!({"spec": {"maxDelegationDepth": 0}});
    env.grants().patch("alice-planner", &PatchParams::default(), &Patch::Merge(&depth)).await.unwrap();
    let child = env.wait_phase("optimise-routes-7", "Revoked", T).await.status.unwrap();
    assert_eq!(child.reason.as_deref(), Some("DelegationDepthExceeded"), "{child:?}");

    env.apply_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": "optimise-routes-8", "namespace": env.ns},
        "spec": {"agent": "route-optimiser", "principal": "alice@example.com",
                 "parentRun": "supply-chain-planner-7", "task": "again",
                 "scopes": ["inventory:read"], "audiences": ["inventory-service"], "maxDuration": "30m"},
    }))
    .await;
    let denied = env.wait_phase("optimise-routes-8", "Denied", T).await.status.unwrap();
    assert_eq!(denied.reason.as_deref(), Some("DelegationDepthExceeded"), "{denied:?}");
    assert!(denied.token_issued_at.is_none() && denied.service_account.is_none(), "no credentials: {denied:?}");

    let planner = env.runs().get("supply-chain-planner-7").await.unwrap().status.unwrap();
    assert!(planner.phase.is_some_and(deputy::resources::RunPhase::is_active), "{planner:?}");
    assert_eq!(planner.remaining_delegation_depth, Some(0), "{planner:?}");
}

/// Finding 3 (high): raising a parent's `remainingDelegationDepth` in its status let a
/// grandchild be authorised beyond the grant's depth. The chain is decided from the grants up,
/// never from a status: the planner may delegate once, so its child may not, whatever the
/// child's status says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parents_forged_depth_never_lets_a_grandchild_through() {
    let env = Env::start().await;
    env.apply_example("supply-chain.yaml").await;
    env.wait_phase("optimise-routes-7", "Authorized", T).await;
    forge_status(&env, "optimise-routes-7", json!({"remainingDelegationDepth": 5})).await;
    env.apply_value(json!({
        "apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": "grandchild", "namespace": env.ns},
        "spec": {"agent": "route-optimiser", "principal": "alice@example.com",
                 "parentRun": "optimise-routes-7", "task": "one level too deep",
                 "scopes": ["inventory:read"], "audiences": ["inventory-service"], "maxDuration": "30m"},
    }))
    .await;
    let denied = env.wait_phase("grandchild", "Denied", T).await.status.unwrap();
    assert_eq!(denied.reason.as_deref(), Some("DelegationDepthExceeded"), "{denied:?}");
    assert!(denied.token_issued_at.is_none() && denied.service_account.is_none(), "no credentials: {denied:?}");
    // The parent's status reports the decision again.
    let parent = env
        .wait_run("optimise-routes-7", T, |r| r.status.as_ref().and_then(|s| s.remaining_delegation_depth) == Some(0))
        .await;
    assert!(parent.status.unwrap().phase.is_some_and(deputy::resources::RunPhase::is_active));
}

/// Finding 3: a status written back to live *with* its end removed (`completedAt` and
/// `revokedAt` nulled) is still an ended run: Deputy marks every run it ends
/// (`deputy.dev/ended`, with the reason), the token endpoint treats the mark as dead, and the
/// controller ends the run again for that reason, creating nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_deputy_ended_stays_ended_when_its_end_is_erased_from_the_status() {
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    let env = Env::start().await;
    env.apply_example("gdpr-compliance.yaml").await;
    env.wait_phase("gdpr-check-q4", "Authorized", T).await;
    let token = env.run_token("gdpr-check-q4").await.unwrap();
    // Ended by a withdrawn consent: no revoke annotation, and the pod is removed.
    let withdraw = json!({"spec": {"scopes": ["compliance:privacy:check"]}});
    env.grants().patch("alice-gdpr", &PatchParams::default(), &Patch::Merge(&withdraw)).await.unwrap();
    let ended = env.wait_phase("gdpr-check-q4", "Revoked", T).await;
    assert_eq!(
        ended.annotations().get(deputy::resources::ENDED_ANNOTATION).map(String::as_str),
        Some("AuthorityReduced")
    );
    let pods: kube::Api<Pod> = env.api();
    assert!(support::wait_until(T, || async { !support::exists(&pods, "deputy-run-gdpr-check-q4").await }).await);
    // Consent back, so that only the mark stands between the run and a new token.
    let restore = json!({"spec": {"scopes": ["compliance:audit:*", "compliance:privacy:check"]}});
    env.grants().patch("alice-gdpr", &PatchParams::default(), &Patch::Merge(&restore)).await.unwrap();

    forge_status(
        &env,
        "gdpr-check-q4",
        json!({"phase": "Authorized", "reason": "Authorized", "completedAt": null, "revokedAt": null}),
    )
    .await;
    let caller = env.resource_server_token().await;
    let (status, body) = env.post("/introspect", &[("token", &token)], Some(&caller)).await;
    assert_eq!((status, &body["active"]), (200, &json!(false)), "the mark makes it dead: {body}");
    // Ended again, for the reason the mark records.
    let back = env
        .wait_run("gdpr-check-q4", T, |r| {
            r.status.as_ref().is_some_and(|s| s.completed_at.is_some() && s.phase.is_some_and(|p| p.is_terminal()))
        })
        .await
        .status
        .unwrap();
    assert_eq!(back.phase, Some(deputy::resources::RunPhase::Revoked), "{back:?}");
    assert_eq!(back.reason.as_deref(), Some("AuthorityReduced"), "{back:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.run_token("gdpr-check-q4").await.is_none(), "no Secret again");
    assert!(!support::exists(&pods, "deputy-run-gdpr-check-q4").await, "no pod again");
}
