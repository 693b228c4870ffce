//! Writing and deleting a run's children without ever touching an object the run does not own.
//!
//! A child's name is predictable (`deputy-run-<run>`), so anyone who may create Secrets,
//! ServiceAccounts or Pods in the namespace can take it first. A server-side apply would adopt
//! such an object (and keep whatever its maker put in it: annotations that map the
//! ServiceAccount to a cloud role, a Secret they can read), so a child is first *created*,
//! which fails when the name is taken; every later write and every delete names the child's
//! uid as a precondition, so an object replaced in between is never written or deleted.

use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Error, MANAGER};
use crate::resources::AgentRun;
use crate::runs::{self, Found};

/// A child's name is held by someone else's object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the {kind} {name:?} exists and is not this run's own{}", if *.leaving { " (it is being deleted)" } else { "" })]
pub struct Taken {
    pub kind: String,
    pub name: String,
    /// Being deleted: the name will be free soon.
    pub leaving: bool,
}

/// The error for `name`, of kind `K`, held by someone else.
pub fn taken<K: Resource<DynamicType = ()>>(name: &str, leaving: bool) -> Error {
    Error::NameTaken(Taken { kind: K::kind(&()).into_owned(), name: name.to_string(), leaving })
}

/// The cache's copy of the run's child (of the kind the store holds), if any.
pub fn cached<C>(store: &Store<C>, run: &AgentRun) -> Option<Arc<C>>
where
    C: Resource<DynamicType = ()> + Clone,
{
    let ns = run.metadata.namespace.as_deref().unwrap_or_default();
    store.get(&ObjectRef::new(&runs::child_name(&run.name_any())).within(ns))
}

/// What the cache tells of the run's child without asking the API server: only that it is the
/// run's own (the cache may be behind, and a foreign object is usually not in it at all).
pub fn known<C>(store: &Store<C>, run: &AgentRun) -> Option<Found>
where
    C: Resource<DynamicType = ()> + Clone,
{
    cached(store, run).map(|c| runs::found(Some(c.meta()), run)).filter(|f| matches!(f, Found::Ours { .. }))
}

/// Whose the object under the run's child name is. The cache's copy answers when it shows the
/// run's own child; otherwise the API server does (the caches hold only Deputy-labelled
/// objects, so a tenant's object under the name is not in them).
pub async fn look<K, C>(api: &Api<K>, cached: Option<&C>, run: &AgentRun) -> Result<Found, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    C: Resource<DynamicType = ()>,
{
    if let Some(meta) = cached.map(Resource::meta).filter(|m| runs::owned_by(m, run)) {
        return Ok(runs::found(Some(meta), run));
    }
    let meta = api.get_metadata_opt(&runs::child_name(&run.name_any())).await?;
    Ok(runs::found(meta.as_ref().map(|m| &m.metadata), run))
}

/// Writes `obj` as the run's child. `known` is what the caller already knows of the name
/// (`None`: nothing). The run's own child is applied with its uid as a precondition; a free
/// name is created; a name held by someone else is never written (`Error::NameTaken`).
pub async fn put<K>(api: &Api<K>, obj: &K, run: &AgentRun, known: Option<Found>) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = obj.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    let uid = match known {
        Some(Found::Ours { uid }) => uid,
        Some(Found::Foreign { leaving }) => return Err(taken::<K>(&name, leaving)),
        Some(Found::Absent) | None => {
            let params = PostParams { field_manager: Some(MANAGER.to_string()), ..Default::default() };
            match api.create(&params, obj).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => match look::<K, K>(api, None, run).await? {
                    Found::Ours { uid } => uid,
                    Found::Foreign { leaving } => return Err(taken::<K>(&name, leaving)),
                    // Deleted again since: the next reconcile creates it.
                    Found::Absent => return Err(taken::<K>(&name, true)),
                },
                Err(e) => return Err(e.into()),
            }
        }
    };
    let mut obj = obj.clone();
    // The API server refuses the write when the object under the name has another uid (422,
    // the uid is immutable) or when there is none (409, uid mismatch).
    obj.meta_mut().uid = Some(uid);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj)).await?;
    Ok(())
}

/// Writes the run's Secret, which holds its token: like [`put`], but only over the copy this
/// process last saw (`seen`, its resourceVersion, as a precondition). A Secret written since by
/// a process that stopped, whose token this one never counted, is never written over with a
/// token of the same number: the write is [`Error::CacheBehind`] (or a 409), retried once the
/// cache shows that Secret. Returns the resourceVersion the write made.
pub async fn put_over(
    api: &Api<Secret>,
    obj: &Secret,
    run: &AgentRun,
    known: Found,
    seen: Option<String>,
) -> Result<Option<String>, Error> {
    let name = obj.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    match known {
        Found::Foreign { leaving } => Err(taken::<Secret>(&name, leaving)),
        Found::Ours { uid } => {
            let Some(version) = seen else { return Err(Error::CacheBehind(format!("Secret {name:?}"))) };
            let mut obj = obj.clone();
            obj.metadata.uid = Some(uid);
            obj.metadata.resource_version = Some(version);
            let written = api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj)).await?;
            Ok(written.metadata.resource_version)
        }
        Found::Absent => {
            let params = PostParams { field_manager: Some(MANAGER.to_string()), ..Default::default() };
            match api.create(&params, obj).await {
                Ok(created) => Ok(created.metadata.resource_version),
                Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => {
                    match look::<Secret, Secret>(api, None, run).await? {
                        Found::Ours { .. } => Err(Error::CacheBehind(format!("Secret {name:?}"))),
                        Found::Foreign { leaving } => Err(taken::<Secret>(&name, leaving)),
                        Found::Absent => Err(taken::<Secret>(&name, true)),
                    }
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Deletes the run's own child, if there is one; someone else's is left alone.
pub async fn remove<K, C>(api: &Api<K>, cached: Option<&C>, run: &AgentRun) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    C: Resource<DynamicType = ()>,
{
    let Found::Ours { uid } = look(api, cached, run).await? else { return Ok(()) };
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::background()
    };
    match api.delete(&runs::child_name(&run.name_any()), &params).await {
        Ok(_) => Ok(()),
        // Gone already, or replaced by an object that is not ours (the uid precondition).
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
