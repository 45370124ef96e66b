//! The core's metrics. Names are constants here; everything registers into the one
//! prometheus-client registry the gateway owns.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Seconds a store commit took (one fsync serves the whole batch).
pub const STORE_COMMIT_SECONDS: &str = "juxta_store_commit_seconds";
/// Operations per store commit.
pub const STORE_BATCH_OPS: &str = "juxta_store_batch_ops";
/// Failed store commits.
pub const STORE_ERRORS: &str = "juxta_store_errors";
/// Events committed and handed to fan-out.
pub const EVENTS: &str = "juxta_events";
/// Live subscriptions across all adapters.
pub const SUBSCRIBERS: &str = "juxta_subscribers";
/// Subscribers that fell behind their queue, by what happened next.
pub const SUBSCRIBER_OVERFLOWS: &str = "juxta_subscriber_overflows";
/// History pages read to replay or catch up subscribers.
pub const HISTORY_READS: &str = "juxta_history_reads";

/// What happened to a subscriber that fell behind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    /// `catch_up` (refilled from history), `lost` (told what it missed) or `disconnected`.
    pub outcome: &'static str,
}

/// The core's metric handles.
#[derive(Debug)]
pub struct Metrics {
    /// See [`STORE_COMMIT_SECONDS`].
    pub store_commit_seconds: Histogram,
    /// See [`STORE_BATCH_OPS`].
    pub store_batch_ops: Histogram,
    /// See [`STORE_ERRORS`].
    pub store_errors: Counter,
    /// See [`EVENTS`].
    pub events: Counter,
    /// See [`SUBSCRIBERS`].
    pub subscribers: Gauge,
    /// See [`SUBSCRIBER_OVERFLOWS`].
    pub overflows: Family<OverflowLabels, Counter>,
    /// See [`HISTORY_READS`].
    pub history_reads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            store_commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            store_batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            store_errors: Counter::default(),
            events: Counter::default(),
            subscribers: Gauge::default(),
            overflows: Family::default(),
            history_reads: Counter::default(),
        }
    }
}

impl Metrics {
    /// New handles, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            STORE_COMMIT_SECONDS,
            "Seconds per store commit",
            m.store_commit_seconds.clone(),
        );
        registry.register(
            STORE_BATCH_OPS,
            "Operations per store commit",
            m.store_batch_ops.clone(),
        );
        registry.register(STORE_ERRORS, "Failed store commits", m.store_errors.clone());
        registry.register(EVENTS, "Events committed and fanned out", m.events.clone());
        registry.register(SUBSCRIBERS, "Live subscriptions", m.subscribers.clone());
        registry.register(
            SUBSCRIBER_OVERFLOWS,
            "Subscribers that fell behind their queue, by outcome",
            m.overflows.clone(),
        );
        registry.register(
            HISTORY_READS,
            "History pages read for replay and catch-up",
            m.history_reads.clone(),
        );
        m
    }

    pub(crate) fn observe_commit(&self, took: Duration, ops: usize) {
        self.store_commit_seconds.observe(took.as_secs_f64());
        self.store_batch_ops.observe(ops as f64);
    }

    pub(crate) fn overflow(&self, outcome: &'static str) {
        self.overflows
            .get_or_create(&OverflowLabels { outcome })
            .inc();
    }
}

/// 1 while the shared engine (Redis) is reachable and its subscriptions are up.
pub const ENGINE_UP: &str = "juxta_engine_up";
/// Times the engine's pub/sub connections were re-established.
pub const ENGINE_RECONNECTS: &str = "juxta_engine_reconnects";
/// Events recovered from a node's Stream because their notification was missed.
pub const ENGINE_GAP_FILLS: &str = "juxta_engine_gap_fills";
/// Counter: nodes given a new epoch because Redis lost events it had acknowledged.
pub const ENGINE_EPOCH_CHANGES: &str = "juxta_engine_epoch_changes";

/// The shared engine's metric handles (registered only when the Redis engine is used).
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// See [`ENGINE_UP`].
    pub up: Gauge,
    /// See [`ENGINE_RECONNECTS`].
    pub reconnects: Counter,
    /// See [`ENGINE_GAP_FILLS`].
    pub gap_fills: Counter,
    /// See [`ENGINE_EPOCH_CHANGES`].
    pub epoch_changes: Counter,
}

impl EngineMetrics {
    /// New handles, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            ENGINE_UP,
            "1 while the Redis engine and its subscriptions are up",
            m.up.clone(),
        );
        registry.register(
            ENGINE_RECONNECTS,
            "Engine pub/sub connections re-established",
            m.reconnects.clone(),
        );
        registry.register(
            ENGINE_GAP_FILLS,
            "Events recovered from a node's Redis Stream after a missed notification",
            m.gap_fills.clone(),
        );
        registry.register(
            ENGINE_EPOCH_CHANGES,
            "Nodes given a new epoch because Redis had lost events it acknowledged",
            m.epoch_changes.clone(),
        );
        m
    }
}
