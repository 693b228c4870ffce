//! Every example in `examples/` parses into the Rust types, validates against the generated
//! CRD's `openAPIV3Schema` (with unknown fields refused, since a real API server would
//! silently prune them), and gets the documented outcome from the authorisation engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use deputy::authorization::{self, Decision, Input, Parent, Policy, Reason};
use deputy::registration::Registrations;
use deputy::resources::{self, Agent, AgentRun, AgentRunStatus, DelegationGrant, ResourceServer, RunPhase};
use serde_json::Value;

fn load_examples() -> Vec<(String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let mut docs = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    docs
}

/// Closes every object schema that lists its properties, as a structural schema prunes
/// unknown fields: a typo in an example must fail here rather than vanish on a cluster.
fn close_objects(schema: &mut Value) {
    if let Some(obj) = schema.as_object_mut() {
        let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if obj.contains_key("properties") && !preserve && !obj.contains_key("additionalProperties") {
            obj.insert("additionalProperties".into(), Value::Bool(false));
        }
        for (_, v) in obj.iter_mut() {
            close_objects(v);
        }
    } else if let Some(arr) = schema.as_array_mut() {
        arr.iter_mut().for_each(close_objects);
    }
}

fn schemas() -> BTreeMap<String, jsonschema::Validator> {
    resources::crds()
        .into_iter()
        .map(|crd| {
            let mut schema =
                serde_json::to_value(&crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            close_objects(&mut schema);
            // metadata is validated by the API server itself, not by the CRD schema.
            schema["properties"]["metadata"] = serde_json::json!({"type": "object"});
            schema["properties"]["apiVersion"] = serde_json::json!({"type": "string"});
            schema["properties"]["kind"] = serde_json::json!({"type": "string"});
            (crd.spec.names.kind.clone(), jsonschema::validator_for(&schema).unwrap())
        })
        .collect()
}

#[test]
fn examples_validate_against_the_crd_schemas() {
    let schemas = schemas();
    let mut seen = BTreeMap::<String, usize>::new();
    for (file, doc) in load_examples() {
        let kind = doc["kind"].as_str().unwrap().to_string();
        *seen.entry(kind.clone()).or_default() += 1;
        if doc["apiVersion"] != "deputy.dev/v1alpha1" {
            continue;
        }
        let errors: Vec<String> =
            schemas[&kind].iter_errors(&doc).map(|e| format!("{} at {}", e, e.instance_path)).collect();
        assert!(errors.is_empty(), "{file}: {kind} {}: {errors:?}", doc["metadata"]["name"]);
        match kind.as_str() {
            "Agent" => drop(serde_json::from_value::<Agent>(doc).unwrap()),
            "DelegationGrant" => drop(serde_json::from_value::<DelegationGrant>(doc).unwrap()),
            "AgentRun" => drop(serde_json::from_value::<AgentRun>(doc).unwrap()),
            "ResourceServer" => drop(serde_json::from_value::<ResourceServer>(doc).unwrap()),
            other => panic!("unexpected kind {other}"),
        }
    }
    assert!(
        seen["Agent"] >= 3 && seen["DelegationGrant"] >= 5 && seen["AgentRun"] >= 4 && seen["ResourceServer"] >= 4,
        "{seen:?}"
    );
}

#[test]
fn the_schema_check_catches_typos_and_bad_values() {
    let schemas = schemas();
    let (_, mut doc) = load_examples().into_iter().find(|(_, d)| d["kind"] == "AgentRun").unwrap();
    doc["spec"]["maxDurationn"] = Value::from("1h");
    assert!(!schemas["AgentRun"].is_valid(&doc), "unknown field refused");
    let (_, mut doc) = load_examples().into_iter().find(|(_, d)| d["kind"] == "AgentRun").unwrap();
    doc["spec"]["scopes"] = serde_json::json!(["compliance:*:audit"]);
    assert!(!schemas["AgentRun"].is_valid(&doc), "malformed scope refused");
}

#[derive(Default)]
struct Namespace {
    agents: Vec<Agent>,
    grants: Vec<DelegationGrant>,
    runs: Vec<AgentRun>,
}

/// Runs the engine over every run of the examples, parents first, recording each decision in
/// the run's status the way the controller does.
fn decide_all(now: jiff::Timestamp) -> BTreeMap<(String, String), (Decision, AgentRun)> {
    let mut namespaces = BTreeMap::<String, Namespace>::new();
    let mut servers: Vec<ResourceServer> = vec![];
    for (_, doc) in load_examples() {
        if doc["kind"] == "ResourceServer" {
            servers.push(serde_json::from_value(doc).unwrap());
            continue;
        }
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let entry = namespaces.entry(ns).or_default();
        match doc["kind"].as_str().unwrap() {
            "Agent" => entry.agents.push(serde_json::from_value(doc).unwrap()),
            "DelegationGrant" => entry.grants.push(serde_json::from_value(doc).unwrap()),
            "AgentRun" => entry.runs.push(serde_json::from_value(doc).unwrap()),
            _ => {}
        }
    }
    let policy = Policy::default();
    let mut out = BTreeMap::new();
    for (ns, mut n) in namespaces {
        // Parents before children.
        n.runs.sort_by_key(|r| r.spec.parent_run.is_some());
        let mut decided: Vec<(AgentRun, Decision)> = vec![];
        let registered = Registrations::for_namespace(&servers, &ns, None);
        for run in &n.runs {
            let agent = n.agents.iter().find(|a| a.metadata.name.as_deref() == Some(run.spec.agent.as_str()));
            let parent = run
                .spec
                .parent_run
                .as_ref()
                .and_then(|p| decided.iter().find(|(r, _)| r.metadata.name.as_ref() == Some(p)))
                .map(|(run, decision)| Parent { run, decision });
            let d = authorization::authorize(Input {
                run,
                agent,
                grants: &n.grants,
                parent,
                registered: &registered,
                now,
                policy: &policy,
            });
            let mut recorded = run.clone();
            let mut status = AgentRunStatus::default();
            match &d {
                Decision::Authorized(a) => {
                    a.record_in(&mut status);
                    status.phase = Some(RunPhase::Running);
                }
                Decision::Denied(_) => status.phase = Some(RunPhase::Denied),
            }
            recorded.status = Some(status);
            decided.push((recorded.clone(), d.clone()));
            out.insert((ns.clone(), run.metadata.name.clone().unwrap()), (d, recorded));
        }
    }
    out
}

#[test]
fn examples_get_their_documented_outcomes() {
    let now: jiff::Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
    let all = decide_all(now);
    let get = |ns: &str, name: &str| &all[&(ns.to_string(), name.to_string())];

    // Story 1: the agent's capability beyond the user's, narrowed by Alice's consent.
    let (d, _) = get("marketing", "gdpr-check-q4");
    let Decision::Authorized(a) = d else { panic!("gdpr-check-q4: {d:?}") };
    let scopes: Vec<String> = a.scopes.iter().map(|s| s.to_string()).collect();
    assert_eq!(scopes, ["compliance:audit:cross_dept", "compliance:privacy:check"]);
    assert_eq!(a.denied_scopes.len(), 1);
    assert_eq!(
        (a.denied_scopes[0].scope.as_str(), a.denied_scopes[0].reason.as_str()),
        ("marketing:write", "NotInAgentCeiling")
    );
    assert_eq!(a.identity, "spiffe://cluster.local/ns/marketing/agent/gdpr-compliance-agent/run/gdpr-check-q4");
    assert_eq!(a.token_ttl, jiff::SignedDuration::from_mins(10));
    assert_eq!(a.grants, ["alice-gdpr"]);

    // Story 2: a chain of two; payments-service taken away by the Deny grant.
    let (d, _) = get("supply-chain", "supply-chain-planner-7");
    let Decision::Authorized(planner) = d else { panic!("planner: {d:?}") };
    assert_eq!(planner.audiences, ["inventory-service", "orders-service"]);
    assert_eq!(planner.remaining_delegation_depth, 1);
    let (d, _) = get("supply-chain", "optimise-routes-7");
    let Decision::Authorized(child) = d else { panic!("optimiser: {d:?}") };
    let scopes: Vec<String> = child.scopes.iter().map(|s| s.to_string()).collect();
    assert_eq!(scopes, ["inventory:read"], "the child holds no more than its parent");
    assert_eq!(child.audiences, ["inventory-service"]);
    assert_eq!(child.remaining_delegation_depth, 0);
    assert_eq!(
        child.delegation_chain,
        [
            "alice@example.com",
            "spiffe://cluster.local/ns/supply-chain/agent/supply-chain-planner/run/supply-chain-planner-7",
            "spiffe://cluster.local/ns/supply-chain/agent/route-optimiser/run/optimise-routes-7",
        ]
    );
    assert_eq!(child.token_ttl, jiff::SignedDuration::from_mins(5));
    assert!(child.deadline <= planner.deadline);

    // Story 3: Deny wins over Allow.
    let (d, _) = get("marketing", "bob-gdpr-check");
    let Decision::Denied(r) = d else { panic!("bob: {d:?}") };
    assert_eq!(r.reason, Reason::DeniedByGrant);
    assert!(r.message.contains("bob-never-gdpr"), "{}", r.message);
}
