//! Prometheus metrics. Every label value comes from a bounded set (a static reason or
//! category), never from an error message or an object name.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::authorization::Reason;
use crate::runs::End;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// All of Deputy's metrics and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    reconcile_seconds: Histogram,
    runs_authorized: Counter,
    runs_denied: Family<ReasonLabel, Counter>,
    runs_ended: Family<ReasonLabel, Counter>,
    pub active_runs: Gauge,
    tokens_minted: Family<KindLabel, Counter>,
    exchanges: Family<ResultLabel, Counter>,
    exchange_seconds: Histogram,
    token_reviews: Family<ResultLabel, Counter>,
    introspections: Family<ResultLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("deputy");
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            runs_authorized: Counter::default(),
            runs_denied: Family::default(),
            runs_ended: Family::default(),
            active_runs: Gauge::default(),
            tokens_minted: Family::default(),
            exchanges: Family::default(),
            exchange_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            token_reviews: Family::default(),
            introspections: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "AgentRun reconciles by result (ok or an error category)",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one AgentRun reconcile",
            m.reconcile_seconds.clone(),
        );
        registry.register("runs_authorized", "Runs authorised", m.runs_authorized.clone());
        registry.register("runs_denied", "Runs denied, by reason", m.runs_denied.clone());
        registry.register("runs_ended", "Runs ended or revoked, by reason", m.runs_ended.clone());
        registry.register("active_runs", "Runs currently Authorized or Running", m.active_runs.clone());
        registry.register("tokens_minted", "Tokens minted, by kind (run or exchanged)", m.tokens_minted.clone());
        registry.register(
            "token_exchanges",
            "Token exchange requests by result (ok or the OAuth error code)",
            m.exchanges.clone(),
        );
        registry.register("token_exchange_duration_seconds", "Latency of POST /token", m.exchange_seconds.clone());
        registry.register(
            "token_reviews",
            "TokenReview lookups by result (cache_hit, authenticated, rejected, error)",
            m.token_reviews.clone(),
        );
        registry.register(
            "introspections",
            "Introspection requests by result (active, inactive, unauthorized)",
            m.introspections.clone(),
        );
        // Every end reason is exported from the start (at 0): the label set is `End::ALL`.
        for why in End::ALL {
            let _ = m.runs_ended.get_or_create(&ReasonLabel { reason: why.as_str().into() });
        }
        Metrics { registry, ..m }
    }

    pub fn observe_reconcile(&self, took: Duration, error_category: Option<&'static str>) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        let result = error_category.unwrap_or("ok").to_string();
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
    }
    pub fn run_authorized(&self) {
        self.runs_authorized.inc();
    }
    pub fn run_denied(&self, reason: Reason) {
        self.runs_denied.get_or_create(&ReasonLabel { reason: reason.as_str().into() }).inc();
    }
    pub fn run_ended(&self, why: End) {
        self.runs_ended.get_or_create(&ReasonLabel { reason: why.as_str().into() }).inc();
    }
    pub fn token_minted(&self, kind: &'static str) {
        self.tokens_minted.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }
    pub fn exchange(&self, result: &'static str, took: Duration) {
        self.exchanges.get_or_create(&ResultLabel { result: result.into() }).inc();
        self.exchange_seconds.observe(took.as_secs_f64());
    }
    pub fn token_review(&self, result: &'static str) {
        self.token_reviews.get_or_create(&ResultLabel { result: result.into() }).inc();
    }
    pub fn introspection(&self, result: &'static str) {
        self.introspections.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::End;

    #[test]
    fn exposition_has_bounded_labels() {
        let m = super::Metrics::new();
        m.run_ended(End::GrantDeleted);
        m.exchange("ok", std::time::Duration::from_millis(1));
        let text = m.encode();
        assert!(text.contains("deputy_runs_ended_total{reason=\"GrantDeleted\"} 1"), "{text}");
        for why in End::ALL.iter().filter(|w| **w != End::GrantDeleted) {
            let line = format!("deputy_runs_ended_total{{reason=\"{}\"}} 0", why.as_str());
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains("deputy_token_exchange_duration_seconds_bucket"));
    }
}
