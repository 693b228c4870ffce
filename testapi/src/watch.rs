//! Watches: newline-delimited JSON events streamed from the store's event history.

use crate::error::ApiError;
use crate::resources::ResourceDef;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventType, Shared, lock};
use axum::body::Body;
use axum::response::Response;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc;

/// What a list or watch selects.
#[derive(Debug, Clone)]
pub struct Filter {
    pub res: ResourceDef,
    pub version: String,
    pub ns: Option<String>,
    pub labels: Option<LabelSelector>,
    pub fields: Option<FieldSelector>,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns_ok =
            self.ns.as_deref().is_none_or(|ns| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns));
        ns_ok
            && self.labels.as_ref().is_none_or(|l| l.matches(obj))
            && self.fields.as_ref().is_none_or(|f| f.matches(obj))
    }

    /// The object relabelled with the requested apiVersion.
    pub fn present(&self, obj: &Value) -> Value {
        let mut o = obj.clone();
        if let Some(m) = o.as_object_mut() {
            m.insert("apiVersion".into(), Value::String(self.res.group_version(&self.version)));
            m.insert("kind".into(), Value::String(self.res.kind.clone()));
        }
        o
    }
}

pub struct WatchOptions {
    /// `None`: start with synthetic ADDED events for the current objects.
    pub resource_version: Option<u64>,
    pub send_initial_events: bool,
    pub bookmarks: bool,
    pub timeout: Duration,
    pub bookmark_interval: Duration,
}

fn line(typ: &str, object: Value) -> bytes::Bytes {
    let mut v = serde_json::to_vec(&json!({"type": typ, "object": object})).unwrap_or_default();
    v.push(b'\n');
    bytes::Bytes::from(v)
}

fn bookmark(filter: &Filter, rv: u64, initial_end: bool) -> bytes::Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": filter.res.kind, "apiVersion": filter.res.group_version(&filter.version), "metadata": meta}),
    )
}

/// Start a watch: returns the streaming response.
pub fn watch(shared: Shared, filter: Filter, opts: WatchOptions) -> Response {
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(64);
    tokio::spawn(run(shared, filter, opts, tx));
    let mut rx = rx;
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok::<_, std::convert::Infallible>)));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

async fn run(shared: Shared, filter: Filter, opts: WatchOptions, tx: mpsc::Sender<bytes::Bytes>) {
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let mut first: Vec<bytes::Bytes> = Vec::new();
    let start = {
        let st = lock(&shared);
        let rx = st.notify.subscribe();
        match opts.resource_version {
            Some(n) if !opts.send_initial_events => {
                if n < st.compacted {
                    let err = ApiError::gone(format!("too old resource version: {n} ({})", st.compacted + 1));
                    first.push(line("ERROR", err.status()));
                    None
                } else {
                    Some((n, rx))
                }
            }
            _ => {
                let res_key = filter.res.key();
                for obj in st.list(&res_key, filter.ns.as_deref(), |o| filter.matches(o)) {
                    first.push(line("ADDED", filter.present(&obj)));
                }
                if opts.send_initial_events {
                    first.push(bookmark(&filter, st.rv, true));
                }
                Some((st.rv, rx))
            }
        }
    };
    for b in first {
        if tx.send(b).await.is_err() {
            return;
        }
    }
    let Some((mut last, mut rx)) = start else { return };
    let mut tick = tokio::time::interval(opts.bookmark_interval);
    tick.tick().await;
    // When the first event held back (of a delayed resource) is due.
    let mut due: Option<tokio::time::Instant>;
    loop {
        rx.borrow_and_update();
        let batch: Option<Vec<bytes::Bytes>> = {
            let st = lock(&shared);
            if st.down {
                // An outage ends the watch (the client's next one is refused).
                return;
            }
            let res_key = filter.res.key();
            // A watcher that fell behind the history it could replay gets 410 Gone (as from a
            // real API server) rather than silently skipping events.
            let behind = st.compacted > last;
            // The history is ordered by resourceVersion: start at the first event after
            // `last` rather than scanning all of it for every watcher on every change.
            let from = st.history.partition_point(|e| e.rv <= last);
            // A delayed resource's events are held back until they are old enough (in order:
            // nothing after the first one held back is sent yet).
            let delay = st.watch_delays.get(&filter.res.plural).copied();
            let now = std::time::Instant::now();
            let held = delay.and_then(|d| {
                st.history.range(from..).find(|e| e.res == res_key && e.at + d > now).map(|e| (e.rv, e.at + d))
            });
            due = held.map(|(_, at)| tokio::time::Instant::from_std(at));
            let out = st
                .history
                .range(from..)
                .take_while(|e| held.is_none_or(|(rv, _)| e.rv < rv))
                .filter(|e| e.res == res_key)
                .filter_map(|e| {
                    let now = filter.matches(&e.object);
                    let before = e.old.as_ref().is_some_and(|o| filter.matches(o));
                    let typ = match (e.typ, before, now) {
                        (EventType::Deleted, _, true) => "DELETED",
                        (EventType::Added, _, true) => "ADDED",
                        (EventType::Modified, true, true) => "MODIFIED",
                        (EventType::Modified, false, true) => "ADDED",
                        (EventType::Modified, true, false) => "DELETED",
                        _ => return None,
                    };
                    Some(line(typ, filter.present(&e.object)))
                })
                .collect();
            last = match held {
                Some((rv, _)) => last.max(rv - 1),
                None => last.max(st.rv),
            };
            (!behind).then_some(out)
        };
        let Some(batch) = batch else {
            let err = ApiError::gone("too old resource version: the watch fell behind the history");
            let _ = tx.send(line("ERROR", err.status())).await;
            return;
        };
        for b in batch {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let held_back = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = held_back => {}
            _ = tick.tick() => {
                if opts.bookmarks && tx.send(bookmark(&filter, last, false)).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                if opts.bookmarks {
                    let _ = tx.send(bookmark(&filter, last, false)).await;
                }
                return;
            }
            _ = tx.closed() => return,
        }
    }
}
