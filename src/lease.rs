//! The leader's own check of its Lease.
//!
//! kube-lease-manager (0.13) reports a lost lease only when it reads another holder. When its
//! renewals fail — the API server unreachable from this replica alone, a network partition —
//! it logs the error and keeps saying "leader" while the lease runs out; another replica then
//! takes the lease and both reconcile. So the leader reads the Lease itself: it may act as
//! leader until the last renewal it saw, plus the lease's duration, less a margin (the time to
//! stop, and clock skew between replicas); past that, or once another holder is seen, it steps
//! down, before any other replica may take over.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::Api;

/// Why this replica can no longer act as leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// No renewal seen in time: the lease may have run out for the other replicas.
    NotRenewed { until: Timestamp },
    /// Another replica holds it (or nobody does).
    Taken { holder: Option<String> },
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::NotRenewed { until } => write!(f, "no renewal of the lease seen in time (it was ours until {until})"),
            Lost::Taken { holder: Some(h) } => write!(f, "the lease is held by {h:?}"),
            Lost::Taken { holder: None } => write!(f, "the lease is held by nobody"),
        }
    }
}

/// Until when the holder `identity` may act as leader, from one read of the Lease: its last
/// renewal (or acquisition) plus its duration, less `margin`. `Err`: the lease is not ours.
pub fn holds_until(spec: Option<&LeaseSpec>, identity: &str, margin: SignedDuration) -> Result<Timestamp, Lost> {
    let holder = spec.and_then(|s| s.holder_identity.clone());
    let Some(spec) = spec.filter(|_| holder.as_deref() == Some(identity)) else {
        return Err(Lost::Taken { holder });
    };
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    let duration = spec.lease_duration_seconds.map(|s| SignedDuration::from_secs(i64::from(s.max(0))));
    match (renewed, duration) {
        (Some(r), Some(d)) => Ok(r.checked_add(d - margin).unwrap_or(r)),
        // A lease without times cannot be relied on: it is as good as expired.
        _ => Err(Lost::NotRenewed { until: renewed.unwrap_or(Timestamp::UNIX_EPOCH) }),
    }
}

/// The margin and the interval between reads for a lease of `duration` renewed `grace`
/// before it ends: a quarter of the grace each (at least 100 ms), so a renewal has three
/// quarters of the grace to land and be read before the leader gives up.
pub fn timings(duration: Duration, grace: Duration) -> (SignedDuration, Duration) {
    let quarter = (grace / 4).max(Duration::from_millis(100)).min(duration / 4);
    (SignedDuration::try_from(quarter).unwrap_or(SignedDuration::ZERO), quarter)
}

/// Resolves once a read of the Lease shows it held by `identity` and not yet run out: until
/// when it may act as leader. A replica restarted under the same identity is "elected" at
/// once by kube-lease-manager, on the lease its previous life held (maybe run out, and free
/// for another replica to take); it renews at once, and this waits for that renewal.
pub async fn confirm(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    margin: SignedDuration,
    every: Duration,
) -> Timestamp {
    loop {
        if let Ok(Ok(Some(lease))) =
            tokio::time::timeout(every.max(Duration::from_millis(500)), api.get_opt(name)).await
            && let Ok(until) = holds_until(lease.spec.as_ref(), identity, margin)
            && until > Timestamp::now()
        {
            return until;
        }
        tokio::time::sleep(every).await;
    }
}

/// Resolves once this replica can no longer be sure it holds the Lease `name` as `identity`.
/// `until` is when it may act as leader without another read ([`confirm`]).
pub async fn watch(
    api: Api<Lease>,
    name: &str,
    identity: &str,
    mut until: Timestamp,
    margin: SignedDuration,
    every: Duration,
) -> Lost {
    loop {
        // A read that fails or hangs changes nothing: the deadline stands.
        let left = Duration::try_from(until.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO);
        match tokio::time::timeout(every.min(left).max(Duration::from_millis(1)), api.get_opt(name)).await {
            Ok(Ok(Some(lease))) => match holds_until(lease.spec.as_ref(), identity, margin) {
                Ok(t) => until = t,
                Err(lost) => return lost,
            },
            Ok(Ok(None)) => return Lost::Taken { holder: None },
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the leader lease"),
            Err(_) => tracing::warn!("reading the leader lease timed out"),
        }
        let left = until.duration_since(Timestamp::now());
        if left <= SignedDuration::ZERO {
            return Lost::NotRenewed { until };
        }
        tokio::time::sleep(every.min(Duration::try_from(left).unwrap_or(Duration::ZERO))).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn spec(holder: Option<&str>, renewed: Option<i64>, acquired: Option<i64>, secs: Option<i32>) -> LeaseSpec {
        let at = |s: i64| MicroTime(Timestamp::from_second(s).unwrap());
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: renewed.map(at),
            acquire_time: acquired.map(at),
            lease_duration_seconds: secs,
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_ours_until_its_last_renewal_plus_its_duration_less_the_margin() {
        let ts = |s: i64| Timestamp::from_second(s).unwrap();
        let m = SignedDuration::from_secs(1);
        let cases: Vec<(&str, Option<LeaseSpec>, Result<Timestamp, Lost>)> = vec![
            ("renewed", Some(spec(Some("a"), Some(100), Some(50), Some(15))), Ok(ts(114))),
            ("only acquired", Some(spec(Some("a"), None, Some(50), Some(15))), Ok(ts(64))),
            (
                "another holder",
                Some(spec(Some("b"), Some(100), None, Some(15))),
                Err(Lost::Taken { holder: Some("b".into()) }),
            ),
            ("released", Some(spec(None, Some(100), None, Some(15))), Err(Lost::Taken { holder: None })),
            ("no spec", None, Err(Lost::Taken { holder: None })),
            ("no duration", Some(spec(Some("a"), Some(100), None, None)), Err(Lost::NotRenewed { until: ts(100) })),
            (
                "no times",
                Some(spec(Some("a"), None, None, Some(15))),
                Err(Lost::NotRenewed { until: Timestamp::UNIX_EPOCH }),
            ),
            ("negative duration", Some(spec(Some("a"), Some(100), None, Some(-5))), Ok(ts(99))),
        ];
        for (name, spec, want) in cases {
            assert_eq!(holds_until(spec.as_ref(), "a", m), want, "{name}");
        }
    }

    #[test]
    fn the_margin_leaves_most_of_the_grace_for_the_renewal() {
        let s = Duration::from_secs;
        assert_eq!(timings(s(15), s(5)), (SignedDuration::from_millis(1250), Duration::from_millis(1250)));
        assert_eq!(timings(s(4), s(1)), (SignedDuration::from_millis(250), Duration::from_millis(250)));
        // Never under 100 ms, never over a quarter of the lease.
        assert_eq!(timings(s(2), Duration::from_millis(10)).1, Duration::from_millis(100));
        assert_eq!(timings(Duration::from_millis(200), s(1)).1, Duration::from_millis(50));
    }
}
