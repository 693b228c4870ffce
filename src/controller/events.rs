//! Kubernetes Events about runs (`events.k8s.io/v1`): one create per event, nothing kept.
//!
//! kube-runtime's `Recorder` keeps every Event it published for six minutes, to turn repeats
//! into a series, in a map it scans on every publish. Deputy publishes one Event per change
//! of a run's state, so repeats are rare (a retried failure, spaced by backoff), and with
//! 10,000 runs that map held tens of MiB and made each publish O(events). This publisher
//! creates the Event and forgets it.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};

/// The API server refuses an Event whose note is longer than this (bytes).
const MAX_NOTE_BYTES: usize = 1024;

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Publishes Events as one controller instance.
#[derive(Clone)]
pub struct Publisher {
    client: kube::Client,
    controller: String,
    instance: String,
}

impl Publisher {
    /// `instance` defaults to the controller's name.
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        Publisher {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.into()),
        }
    }

    /// Creates an Event about `regarding` in its namespace.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let ev = self.event(regarding, type_, reason, action, note, Timestamp::now());
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        Api::<Event>::namespaced(self.client.clone(), ns).create(&PostParams::default(), &ev).await?;
        Ok(())
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
        now: Timestamp,
    ) -> Event {
        let about = regarding.name.as_deref().unwrap_or(&self.controller);
        Event {
            metadata: ObjectMeta {
                // Unique per object and nanosecond, as kubectl and client-go name them.
                name: Some(format!("{about}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            type_: Some(match type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(truncate(note, MAX_NOTE_BYTES).into()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_cuts_at_a_character_boundary() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc");
        // "é" is two bytes: cutting inside it would leave invalid UTF-8.
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate(&"x".repeat(2000), MAX_NOTE_BYTES).len(), MAX_NOTE_BYTES);
    }

    #[tokio::test]
    async fn an_event_names_its_object_reporter_and_outcome() {
        // A client that is never used: building the Event makes no request.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let p = Publisher::new(client, "deputy", Some("deputy-0".into()));
        let regarding = ObjectReference {
            api_version: Some("deputy.dev/v1alpha1".into()),
            kind: Some("AgentRun".into()),
            name: Some("run-a".into()),
            namespace: Some("team".into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        };
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let ev = p.event(&regarding, EventType::Warning, "Denied", "Authorize", &"n".repeat(5000), now);
        assert_eq!(ev.metadata.name.as_deref(), Some(format!("run-a.{:x}", now.as_nanosecond()).as_str()));
        assert_eq!(ev.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(ev.regarding.as_ref(), Some(&regarding));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!((ev.reason.as_deref(), ev.action.as_deref()), (Some("Denied"), Some("Authorize")));
        assert_eq!(ev.note.as_deref().map(str::len), Some(MAX_NOTE_BYTES));
        assert_eq!(ev.reporting_controller.as_deref(), Some("deputy"));
        assert_eq!(ev.reporting_instance.as_deref(), Some("deputy-0"));
        assert_eq!(ev.event_time, Some(MicroTime(now)));
        assert!(ev.series.is_none());
    }
}
