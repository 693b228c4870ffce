//! The checklist: kube 5 against the test API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deputy_testapi::{TestApiServer, TokenSpec, UserInfo};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{conditions, wait::await_condition, watcher};
use kube::{Client, CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(group = "example.com", version = "v1", kind = "Foo", namespaced, status = "FooStatus", shortname = "fo")]
pub struct FooSpec {
    pub size: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct FooStatus {
    pub ready: bool,
    pub observed: i32,
}

async fn setup() -> (TestApiServer, Client) {
    let server = TestApiServer::start().await.unwrap();
    let path = std::env::temp_dir().join(format!("testapi-{}.kubeconfig", server.addr().port()));
    server.write_kubeconfig(&path).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    let _ = std::fs::remove_file(&path);
    (server, Client::try_from(config).unwrap())
}

async fn register_foo(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Foo::crd()).await.unwrap();
    timeout(T, await_condition(crds, "foos.example.com", conditions::is_crd_established())).await.unwrap().unwrap();
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    c.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    c
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn crud_resource_versions_and_conflicts() {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let a = api.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    assert_eq!(a.metadata.generation, Some(1));
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());
    assert_eq!(code(api.create(&PostParams::default(), &cm("a", &[])).await.unwrap_err()), 409);
    assert_eq!(code(api.get("missing").await.unwrap_err()), 404);

    let mut b = a.clone();
    b.data = Some(BTreeMap::from([("k".to_string(), "w".to_string())]));
    let b = api.replace("a", &PostParams::default(), &b).await.unwrap();
    assert!(
        b.resource_version().unwrap().parse::<u64>().unwrap() > a.resource_version().unwrap().parse::<u64>().unwrap()
    );
    assert_eq!(b.metadata.generation, Some(2));
    // Stale resourceVersion -> 409; missing -> 404; mismatched name -> 400.
    assert_eq!(code(api.replace("a", &PostParams::default(), &a).await.unwrap_err()), 409);
    assert_eq!(code(api.replace("nope", &PostParams::default(), &cm("nope", &[])).await.unwrap_err()), 404);
    assert_eq!(code(api.replace("a", &PostParams::default(), &cm("b", &[])).await.unwrap_err()), 400);
    // Mismatched namespace -> 400; generateName works.
    let mut other = cm("x", &[]);
    other.metadata.namespace = Some("other".into());
    assert_eq!(code(api.create(&PostParams::default(), &other).await.unwrap_err()), 400);
    let mut g = ConfigMap::default();
    g.metadata.generate_name = Some("gen-".into());
    let g = api.create(&PostParams::default(), &g).await.unwrap();
    assert!(g.name_any().starts_with("gen-") && g.name_any().len() > 4);
    // A list carries the current resourceVersion; all-namespaces list works.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    assert!(list.metadata.resource_version.is_some());
    let all: Api<ConfigMap> = Api::all(api.clone().into_client());
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 2);
}

type EventStream = futures::stream::BoxStream<'static, kube::Result<WatchEvent<ConfigMap>>>;

async fn next(s: &mut EventStream) -> WatchEvent<ConfigMap> {
    timeout(T, s.try_next()).await.unwrap().unwrap().unwrap()
}

#[tokio::test]
async fn raw_watch_and_resume() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("pre", &[])).await.unwrap();
    let mut stream = api.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    assert!(matches!(next(&mut stream).await, WatchEvent::Added(c) if c.name_any() == "pre"));
    let created = api.create(&PostParams::default(), &cm("live", &[])).await.unwrap();
    assert!(matches!(next(&mut stream).await, WatchEvent::Added(c) if c.name_any() == "live"));
    api.patch("live", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}}))).await.unwrap();
    assert!(matches!(next(&mut stream).await, WatchEvent::Modified(c) if c.data.as_ref().unwrap()["k"] == "2"));
    api.delete("live", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next(&mut stream).await, WatchEvent::Deleted(c) if c.name_any() == "live"));

    // Resume from the create's resourceVersion: replays the modify and the delete.
    let mut resumed = api.watch(&WatchParams::default(), &created.resource_version().unwrap()).await.unwrap().boxed();
    assert!(matches!(next(&mut resumed).await, WatchEvent::Modified(_)));
    assert!(matches!(next(&mut resumed).await, WatchEvent::Deleted(_)));

    // Too old: 410 Gone as an ERROR event.
    server.compact_history();
    let mut old = api.watch(&WatchParams::default(), &created.resource_version().unwrap()).await.unwrap().boxed();
    assert!(matches!(next(&mut old).await, WatchEvent::Error(e) if e.code == 410));

    // Bookmarks carry the current resourceVersion.
    let mut bm = api.watch(&WatchParams::default(), &server.resource_version().to_string()).await.unwrap().boxed();
    assert!(
        matches!(next(&mut bm).await, WatchEvent::Bookmark(b) if b.metadata.resource_version == server.resource_version().to_string())
    );
}

#[tokio::test]
async fn a_delayed_watch_sees_each_event_late_and_in_order_while_reads_are_current() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut stream = api.watch(&WatchParams::default(), &server.resource_version().to_string()).await.unwrap().boxed();
    server.delay_watch("configmaps", Duration::from_millis(700));
    let started = std::time::Instant::now();
    api.create(&PostParams::default(), &cm("late", &[])).await.unwrap();
    api.patch("late", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}}))).await.unwrap();
    // A read is current at once.
    assert_eq!(api.get("late").await.unwrap().data.unwrap()["k"], "2");
    assert!(timeout(Duration::from_millis(300), stream.try_next()).await.is_err(), "nothing yet");
    assert!(matches!(next(&mut stream).await, WatchEvent::Added(c) if c.name_any() == "late"));
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(matches!(next(&mut stream).await, WatchEvent::Modified(c) if c.data.as_ref().unwrap()["k"] == "2"));
    // Ended: the next event is seen at once.
    server.delay_watch("configmaps", Duration::ZERO);
    let t = std::time::Instant::now();
    api.delete("late", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next(&mut stream).await, WatchEvent::Deleted(_)));
    assert!(t.elapsed() < Duration::from_millis(500));
}

async fn watcher_round_trip(config: watcher::Config) {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("before", &[])).await.unwrap();
    let mut events = watcher(api.clone(), config).boxed();
    let mut next = async || timeout(T, events.try_next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(next().await, watcher::Event::Init));
    assert!(matches!(next().await, watcher::Event::InitApply(c) if c.name_any() == "before"));
    assert!(matches!(next().await, watcher::Event::InitDone));
    api.create(&PostParams::default(), &cm("x", &[])).await.unwrap();
    assert!(matches!(next().await, watcher::Event::Apply(c) if c.name_any() == "x"));
    api.patch("x", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "changed"}}))).await.unwrap();
    assert!(matches!(next().await, watcher::Event::Apply(c) if c.data.as_ref().unwrap()["k"] == "changed"));
    api.delete("x", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next().await, watcher::Event::Delete(c) if c.name_any() == "x"));
}

#[tokio::test]
async fn watcher_list_watch() {
    watcher_round_trip(watcher::Config::default()).await;
}

#[tokio::test]
async fn watcher_streaming_list() {
    watcher_round_trip(watcher::Config::default().streaming_lists()).await;
}

#[derive(Debug)]
enum Never {}
impl std::fmt::Display for Never {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}
impl std::error::Error for Never {}

#[tokio::test]
async fn controller_reconciles_custom_resource() {
    let (server, client) = setup().await;
    register_foo(&client).await;
    let foos: Api<Foo> = Api::namespaced(client.clone(), "default");
    foos.create(&PostParams::default(), &Foo::new("one", FooSpec { size: 3 })).await.unwrap();
    // The first status write conflicts: the controller must retry.
    server.fail_next_writes("foos/status", 1, 409);

    struct Ctx {
        api: Api<Foo>,
        runs: AtomicUsize,
    }
    let ctx = Arc::new(Ctx { api: foos.clone(), runs: AtomicUsize::new(0) });
    async fn reconcile(foo: Arc<Foo>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        ctx.runs.fetch_add(1, Ordering::SeqCst);
        let status = json!({"status": {"ready": true, "observed": foo.spec.size}});
        ctx.api.patch_status(&foo.name_any(), &PatchParams::default(), &Patch::Merge(status)).await?;
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<Foo>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(50))
    }
    let controller = tokio::spawn(
        Controller::new(foos.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {}),
    );

    let ready = |want: i32| {
        await_condition(foos.clone(), "one", move |f: Option<&Foo>| {
            f.and_then(|f| f.status.as_ref()).is_some_and(|s| s.ready && s.observed == want)
        })
    };
    timeout(T, ready(3)).await.unwrap().unwrap();
    foos.patch("one", &PatchParams::default(), &Patch::Merge(json!({"spec": {"size": 5}}))).await.unwrap();
    timeout(T, ready(5)).await.unwrap().unwrap();
    let foo = foos.get("one").await.unwrap();
    assert_eq!(foo.metadata.generation, Some(2), "status writes do not bump generation");
    assert!(ctx.runs.load(Ordering::SeqCst) >= 3, "conflict, retry, and the spec change");
    assert!(server.stats().count("foos", "WATCH") >= 1);
    assert!(server.stats().count("foos/status", "PATCH") >= 3);
    controller.abort();
}

#[tokio::test]
async fn status_subresource_is_separate() {
    let (_s, client) = setup().await;
    register_foo(&client).await;
    let foos: Api<Foo> = Api::namespaced(client, "default");
    let mut foo = Foo::new("s", FooSpec { size: 1 });
    foo.status = Some(FooStatus { ready: true, observed: 9 });
    let created = foos.create(&PostParams::default(), &foo).await.unwrap();
    assert_eq!(created.status, None, "status is dropped on create");

    let st = foos
        .patch_status(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 7}, "status": {"ready": true, "observed": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(st.spec.size, 1, "the status endpoint ignores spec");
    assert_eq!(st.status, Some(FooStatus { ready: true, observed: 1 }));
    assert_eq!(st.metadata.generation, Some(1));

    let mut main = st.clone();
    main.spec.size = 2;
    main.status = Some(FooStatus { ready: false, observed: 100 });
    let main = foos.replace("s", &PostParams::default(), &main).await.unwrap();
    assert_eq!(main.spec.size, 2);
    assert_eq!(main.status, Some(FooStatus { ready: true, observed: 1 }), "the main endpoint ignores status");
    assert_eq!(main.metadata.generation, Some(2));

    let mut s2 = main.clone();
    s2.status = Some(FooStatus { ready: false, observed: 2 });
    let s2 = foos.replace_status("s", &PostParams::default(), &s2).await.unwrap();
    assert_eq!(s2.status.unwrap().observed, 2);
    assert_eq!(s2.metadata.generation, Some(2));
    // Pods always have a status subresource: tests play the kubelet by patching it.
    let pods: Api<Pod> = Api::namespaced(foos.into_client(), "default");
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
    )
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let p = pods
        .patch_status("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}})))
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    let running = pods.list(&ListParams::default().fields("status.phase=Running")).await.unwrap();
    assert_eq!(running.items.len(), 1);
}

#[tokio::test]
async fn server_side_apply() {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("mgr-a").force();
    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1", "keep": "x"}}, "data": {"one": "1", "two": "2"}});
    let c = api.patch("ssa", &pp, &Patch::Apply(&first)).await.unwrap();
    assert_eq!(c.data.as_ref().unwrap().len(), 2);
    // Another manager owns "keep" and "three".
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"keep": "x"}}, "data": {"three": "3"}});
    api.patch("ssa", &PatchParams::apply("mgr-b"), &Patch::Apply(&other)).await.unwrap();
    // mgr-a drops "two" and both labels: its own fields go, the shared label stays.
    let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"one": "uno"}});
    let c = api.patch("ssa", &pp, &Patch::Apply(&second)).await.unwrap();
    let data = c.data.unwrap();
    assert_eq!(data.get("one").map(String::as_str), Some("uno"));
    assert!(!data.contains_key("two"));
    assert_eq!(data.get("three").map(String::as_str), Some("3"));
    assert_eq!(c.metadata.labels.unwrap(), BTreeMap::from([("keep".to_string(), "x".to_string())]));
    // YAML bodies are accepted too (that's what kubectl sends), and a manager is required.
    let bad = api.patch("ssa", &PatchParams::default(), &Patch::Apply(&second)).await.unwrap_err();
    assert_eq!(code(bad), 400);
}

/// A uid in a written object is a precondition, as on a real API server (checked against
/// kube-apiserver v1.35: 422 "field is immutable" for another object's uid, 409 "uid
/// mismatch" for an apply onto a name with no object).
#[tokio::test]
async fn a_uid_in_the_body_is_a_precondition() {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let uid = api.create(&PostParams::default(), &cm("held", &[])).await.unwrap().metadata.uid.unwrap();
    let pp = PatchParams::apply("mgr").force();
    let body = |name: &str, uid: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "uid": uid}, "data": {"k": "w"}});
    let c = api.patch("held", &pp, &Patch::Apply(&body("held", &uid))).await.unwrap();
    assert_eq!(c.data.unwrap().get("k").map(String::as_str), Some("w"));
    let other = "00000000-0000-0000-0000-000000000000";
    assert_eq!(code(api.patch("held", &pp, &Patch::Apply(&body("held", other))).await.unwrap_err()), 422);
    assert_eq!(code(api.patch("gone", &pp, &Patch::Apply(&body("gone", &uid))).await.unwrap_err()), 409);
    assert!(api.get_opt("gone").await.unwrap().is_none());
    let merge = json!({"metadata": {"uid": other, "labels": {"x": "y"}}});
    assert_eq!(code(api.patch("held", &PatchParams::default(), &Patch::Merge(&merge)).await.unwrap_err()), 422);
    let merge = json!({"metadata": {"uid": uid, "labels": {"x": "y"}}});
    api.patch("held", &PatchParams::default(), &Patch::Merge(&merge)).await.unwrap();
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("p", &[("a", "1")])).await.unwrap();
    let c = api
        .patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"a": null, "b": "2"}}})))
        .await
        .unwrap();
    assert_eq!(c.labels().clone(), BTreeMap::from([("b".to_string(), "2".to_string())]));
    let ops: json_patch::Patch = serde_json::from_value(
        json!([{"op": "test", "path": "/data/k", "value": "v"}, {"op": "replace", "path": "/data/k", "value": "w"}]),
    )
    .unwrap();
    let c = api.patch("p", &PatchParams::default(), &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(c.data.unwrap()["k"], "w");
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/k", "value": "nope"}])).unwrap();
    assert_eq!(code(api.patch("p", &PatchParams::default(), &Patch::<()>::Json(failing)).await.unwrap_err()), 422);
    let c = api.patch("p", &PatchParams::default(), &Patch::Strategic(json!({"data": {"s": "1"}}))).await.unwrap();
    assert_eq!(c.data.unwrap().len(), 2);
    // A stale resourceVersion inside a patch is a precondition.
    let stale = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"x": "y"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(code(stale), 409);
}

#[tokio::test]
async fn finalizers_and_deletion_timestamp() {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut c = cm("f", &[]);
    c.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &c).await.unwrap();
    api.delete("f", &DeleteParams::default()).await.unwrap();
    let held = api.get("f").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    // No new finalizers once deleting.
    let add = api
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold", "new"]}})),
        )
        .await
        .unwrap_err();
    assert_eq!(code(add), 422);
    api.patch("f", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert_eq!(code(api.get("f").await.unwrap_err()), 404);
}

#[tokio::test]
async fn kube_finalizer_helper_round_trip() {
    let (_s, client) = setup().await;
    register_foo(&client).await;
    let foos: Api<Foo> = Api::namespaced(client, "default");
    foos.create(&PostParams::default(), &Foo::new("fin", FooSpec { size: 1 })).await.unwrap();
    let cleaned = Arc::new(AtomicUsize::new(0));
    let run = async |cleaned: Arc<AtomicUsize>| {
        let obj = Arc::new(foos.get("fin").await.unwrap());
        kube::runtime::finalizer(&foos, "example.com/cleanup", obj, |ev| async move {
            if let kube::runtime::finalizer::Event::Cleanup(_) = ev {
                cleaned.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, Never>(Action::await_change())
        })
        .await
        .unwrap()
    };
    run(cleaned.clone()).await; // adds the finalizer
    assert_eq!(foos.get("fin").await.unwrap().finalizers(), ["example.com/cleanup"]);
    run(cleaned.clone()).await; // apply
    foos.delete("fin", &DeleteParams::default()).await.unwrap();
    assert!(foos.get("fin").await.unwrap().meta().deletion_timestamp.is_some());
    run(cleaned.clone()).await; // cleanup, removes the finalizer
    assert_eq!(cleaned.load(Ordering::SeqCst), 1);
    assert_eq!(code(foos.get("fin").await.unwrap_err()), 404);
}

fn owned_by(mut s: Secret, owner: &ConfigMap) -> Secret {
    s.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.name_any(),
        uid: owner.uid().unwrap(),
        ..Default::default()
    }]);
    s
}

#[tokio::test]
async fn owner_reference_cascade() {
    let (_s, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let owner = cms.create(&PostParams::default(), &cm("owner", &[])).await.unwrap();
    let mut s = Secret::default();
    s.metadata.name = Some("child".into());
    secrets.create(&PostParams::default(), &owned_by(s.clone(), &owner)).await.unwrap();
    let mut held = s.clone();
    held.metadata.name = Some("held-child".into());
    held.metadata.finalizers = Some(vec!["x/y".into()]);
    secrets.create(&PostParams::default(), &owned_by(held, &owner)).await.unwrap();
    // A grandchild owned by a config map that the owner also owns.
    let mut mid = cm("mid", &[]);
    mid.metadata.owner_references = owned_by(Secret::default(), &owner).metadata.owner_references;
    let mid = cms.create(&PostParams::default(), &mid).await.unwrap();
    s.metadata.name = Some("grandchild".into());
    secrets.create(&PostParams::default(), &owned_by(s, &mid)).await.unwrap();

    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(secrets.get("child").await.unwrap_err()), 404);
    assert_eq!(code(cms.get("mid").await.unwrap_err()), 404);
    assert_eq!(code(secrets.get("grandchild").await.unwrap_err()), 404);
    assert!(secrets.get("held-child").await.unwrap().metadata.deletion_timestamp.is_some());
}

#[tokio::test]
async fn label_selectors() {
    let (_s, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for (n, labels) in [("a", vec![("app", "web"), ("tier", "front")]), ("b", vec![("app", "db")]), ("c", vec![])] {
        api.create(&PostParams::default(), &cm(n, &labels)).await.unwrap();
    }
    let names = async |sel: &str| -> Vec<String> {
        api.list(&ListParams::default().labels(sel)).await.unwrap().items.iter().map(|c| c.name_any()).collect()
    };
    assert_eq!(names("app=web").await, ["a"]);
    assert_eq!(names("app!=web").await, ["b", "c"]);
    assert_eq!(names("app in (web,db)").await, ["a", "b"]);
    assert_eq!(names("app notin (web)").await, ["b", "c"]);
    assert_eq!(names("app,!tier").await, ["b"]);
    assert_eq!(names("!app").await, ["c"]);
    let by_name = api.list(&ListParams::default().fields("metadata.name=b")).await.unwrap();
    assert_eq!(by_name.items.len(), 1);
}

#[tokio::test]
async fn crd_registration_and_discovery() {
    let (_s, client) = setup().await;
    let foos: Api<Foo> = Api::namespaced(client.clone(), "default");
    assert_eq!(code(foos.list(&ListParams::default()).await.unwrap_err()), 404, "not served before the CRD exists");
    register_foo(&client).await;
    let discovery = kube::discovery::Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery.get("example.com").expect("group discovered");
    let (ar, caps) = group.recommended_kind("Foo").expect("kind discovered");
    assert_eq!(ar.plural, "foos");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(caps.subresources.iter().any(|(r, _)| r.plural == "foos/status" || r.plural == "status"), "{caps:?}");
    assert!(discovery.get("").is_some_and(|g| g.recommended_kind("Pod").is_some()));
    // Deleting the CRD stops serving the resource.
    Api::<CustomResourceDefinition>::all(client).delete("foos.example.com", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(foos.list(&ListParams::default()).await.unwrap_err()), 404);
}

async fn review(
    client: &Client,
    token: &str,
    audiences: &[&str],
) -> k8s_openapi::api::authentication::v1::TokenReviewStatus {
    let api: Api<TokenReview> = Api::all(client.clone());
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &tr).await.unwrap().status.unwrap()
}

#[tokio::test]
async fn token_request_and_review() {
    let (server, client) = setup().await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "agents");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "agents");
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("runner".into());
    let sa = sas.create(&PostParams::default(), &sa).await.unwrap();
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "job"}, "spec": {"serviceAccountName": "runner", "containers": [{"name": "c", "image": "i"}]}})).unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();

    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["deputy".into()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                kind: Some("Pod".into()),
                name: Some("job".into()),
                uid: pod.uid(),
                ..Default::default()
            }),
        },
        ..Default::default()
    };
    let issued = sas.create_token_request("runner", &PostParams::default(), &req).await.unwrap();
    let token = issued.status.unwrap().token;
    let ok = review(&client, &token, &["deputy"]).await;
    assert!(ok.authenticated.unwrap(), "{ok:?}");
    let user = ok.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:agents:runner"));
    assert_eq!(user.uid, sa.uid());
    assert!(user.groups.unwrap().contains(&"system:serviceaccounts:agents".to_string()));
    assert_eq!(user.extra.unwrap()["authentication.kubernetes.io/pod-name"], ["job"]);
    assert_eq!(ok.audiences.unwrap(), ["deputy"]);

    let mismatch = review(&client, &token, &["someone-else"]).await;
    assert_eq!(mismatch.authenticated, Some(false));
    assert!(mismatch.error.is_some());
    assert_eq!(review(&client, "garbage", &[]).await.authenticated, Some(false));
    // No TokenRequest for a missing service account.
    assert_eq!(code(sas.create_token_request("ghost", &PostParams::default(), &req).await.unwrap_err()), 404);

    // Deleting the pod invalidates the pod-bound token; an unbound one survives until the SA goes.
    let unbound = server.issue_token(TokenSpec {
        namespace: "agents".into(),
        service_account: "runner".into(),
        audiences: vec!["deputy".into()],
        expires_in: Duration::from_secs(600),
        pod: None,
    });
    pods.delete("job", &DeleteParams::default()).await.unwrap();
    assert_eq!(review(&client, &token, &["deputy"]).await.authenticated, Some(false));
    assert_eq!(review(&client, &unbound, &["deputy"]).await.authenticated, Some(true));
    sas.delete("runner", &DeleteParams::default()).await.unwrap();
    let mut again = ServiceAccount::default();
    again.metadata.name = Some("runner".into());
    sas.create(&PostParams::default(), &again).await.unwrap();
    assert_eq!(review(&client, &unbound, &["deputy"]).await.authenticated, Some(false), "re-created SA has a new uid");

    // Arbitrary users and expiry.
    let user =
        UserInfo { username: "alice".into(), uid: "u1".into(), groups: vec!["devs".into()], extra: BTreeMap::new() };
    server.register_token("alice-token", user.clone(), vec!["deputy".into()], None);
    assert_eq!(review(&client, "alice-token", &["deputy"]).await.user.unwrap().username.as_deref(), Some("alice"));
    server.register_token(
        "old",
        user,
        vec!["deputy".into()],
        Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1)),
    );
    assert_eq!(review(&client, "old", &["deputy"]).await.authenticated, Some(false));
    assert_eq!(server.token_reviews(), 8);
}

#[tokio::test]
async fn fault_injection_stats_and_http_controls() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    server.fail_next_writes("configmaps", 2, 409);
    assert_eq!(code(api.create(&PostParams::default(), &cm("a", &[])).await.unwrap_err()), 409);
    assert_eq!(code(api.create(&PostParams::default(), &cm("a", &[])).await.unwrap_err()), 409);
    api.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    api.get("a").await.unwrap();
    api.list(&ListParams::default()).await.unwrap();
    let stats = server.stats();
    assert_eq!(
        (stats.count("configmaps", "CREATE"), stats.count("configmaps", "GET"), stats.count("configmaps", "LIST")),
        (3, 1, 1)
    );
    server.reset_stats();
    assert_eq!(server.stats().count("configmaps", "CREATE"), 0);

    // The same controls over HTTP, for other processes.
    let body = serde_json::to_vec(&json!({"resource": "configmaps", "count": 1, "code": 500})).unwrap();
    let req = http::Request::post("/testapi/faults").header("content-type", "application/json").body(body).unwrap();
    client.request_text(req).await.unwrap();
    assert_eq!(code(api.delete("a", &DeleteParams::default()).await.unwrap_err()), 500);
    let stats: serde_json::Value =
        client.request(http::Request::get("/testapi/stats").body(vec![]).unwrap()).await.unwrap();
    assert_eq!(stats["configmaps"]["DELETE"], 1);
    let body =
        serde_json::to_vec(&json!({"namespace": "ns", "serviceAccount": "sa", "audiences": ["x"], "expiresIn": 600}))
            .unwrap();
    let tok: serde_json::Value =
        client.request(http::Request::post("/testapi/tokens").body(body).unwrap()).await.unwrap();
    assert!(tok["token"].as_str().is_some());
}
