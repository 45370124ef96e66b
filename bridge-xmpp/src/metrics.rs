//! The XMPP bridge's metrics; they register into the gateway's one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Open client connections.
pub const SESSIONS: &str = "juxta_xmpp_sessions";
/// Connections that bound a resource.
pub const BOUND: &str = "juxta_xmpp_bound";
/// Failed SASL attempts.
pub const AUTH_FAILURES: &str = "juxta_xmpp_auth_failures";
/// Stanzas clients sent that the session passed on, by kind.
pub const STANZAS_IN: &str = "juxta_xmpp_stanzas_in";
/// Bytes read from and written to clients.
pub const BYTES_IN: &str = "juxta_xmpp_bytes_in";
/// See [`BYTES_IN`].
pub const BYTES_OUT: &str = "juxta_xmpp_bytes_out";
/// Connections refused by the per-IP limit.
pub const REFUSED: &str = "juxta_xmpp_refused_connections";
/// 1 while the external component stream (XEP-0114) is authenticated, else 0.
pub const COMPONENT_UP: &str = "juxta_xmpp_component_up";
/// Component streams the server authenticated.
pub const COMPONENT_CONNECTS: &str = "juxta_xmpp_component_connects";
/// Component connection attempts that did not reach the server (TCP).
pub const COMPONENT_CONNECT_FAILURES: &str = "juxta_xmpp_component_connect_failures";
/// Component streams that reached the server but were not authenticated (wrong secret,
/// unknown component, timeout).
pub const COMPONENT_HANDSHAKE_FAILURES: &str = "juxta_xmpp_component_handshake_failures";
/// Stanzas from the server refused by the component (misaddressed, invalid, no `from`).
pub const COMPONENT_REJECTED: &str = "juxta_xmpp_component_rejected_stanzas";

/// Stanzas sent to clients, by kind.
pub const STANZAS_OUT: &str = "juxta_xmpp_stanzas_out";
/// Notification copies queued for recipients.
pub const NOTIFICATIONS: &str = "juxta_xmpp_notifications";
/// Notification copies refused because the recipient's queue was full.
pub const NOTIFICATIONS_REFUSED: &str = "juxta_xmpp_notifications_refused";
/// Time to queue one event's notification for all of a node's recipients.
pub const NOTIFICATION_FANOUT_SECONDS: &str = "juxta_xmpp_notification_fanout_seconds";
/// Streams closed because they did not read their notifications fast enough.
pub const OVERLOADED: &str = "juxta_xmpp_overloaded_streams";

/// Labels by stanza kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `iq`, `message` or `presence`.
    pub kind: &'static str,
}

/// Metric handles.
#[derive(Debug)]
pub struct Metrics {
    /// See [`SESSIONS`].
    pub sessions: Gauge,
    /// See [`BOUND`].
    pub bound: Counter,
    /// See [`AUTH_FAILURES`].
    pub auth_failures: Counter,
    /// See [`STANZAS_IN`].
    pub stanzas_in: Family<KindLabels, Counter>,
    /// See [`BYTES_IN`].
    pub bytes_in: Counter,
    /// See [`BYTES_OUT`].
    pub bytes_out: Counter,
    /// See [`REFUSED`].
    pub refused: Counter,
    /// See [`STANZAS_OUT`].
    pub stanzas_out: Family<KindLabels, Counter>,
    /// See [`NOTIFICATIONS`].
    pub notifications: Counter,
    /// See [`NOTIFICATIONS_REFUSED`].
    pub notifications_refused: Counter,
    /// See [`NOTIFICATION_FANOUT_SECONDS`].
    pub notification_fanout_seconds: Histogram,
    /// See [`OVERLOADED`].
    pub overloaded: Counter,
    /// See [`COMPONENT_UP`].
    pub component_up: Gauge,
    /// See [`COMPONENT_CONNECTS`].
    pub component_connects: Counter,
    /// See [`COMPONENT_CONNECT_FAILURES`].
    pub component_connect_failures: Counter,
    /// See [`COMPONENT_HANDSHAKE_FAILURES`].
    pub component_handshake_failures: Counter,
    /// See [`COMPONENT_REJECTED`].
    pub component_rejected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions: Gauge::default(),
            bound: Counter::default(),
            auth_failures: Counter::default(),
            stanzas_in: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            refused: Counter::default(),
            stanzas_out: Family::default(),
            notifications: Counter::default(),
            notifications_refused: Counter::default(),
            // 10 µs to about 5 s.
            notification_fanout_seconds: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            overloaded: Counter::default(),
            component_up: Gauge::default(),
            component_connects: Counter::default(),
            component_connect_failures: Counter::default(),
            component_handshake_failures: Counter::default(),
            component_rejected: Counter::default(),
        }
    }
}

impl Metrics {
    /// New handles, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(SESSIONS, "Open XMPP client connections", m.sessions.clone());
        registry.register(
            BOUND,
            "XMPP connections that bound a resource",
            m.bound.clone(),
        );
        registry.register(
            AUTH_FAILURES,
            "Failed XMPP SASL attempts",
            m.auth_failures.clone(),
        );
        registry.register(
            STANZAS_IN,
            "Stanzas from XMPP clients passed on, by kind",
            m.stanzas_in.clone(),
        );
        registry.register(BYTES_IN, "Bytes read from XMPP clients", m.bytes_in.clone());
        registry.register(
            BYTES_OUT,
            "Bytes written to XMPP clients",
            m.bytes_out.clone(),
        );
        registry.register(
            REFUSED,
            "XMPP connections refused by the per-IP limit",
            m.refused.clone(),
        );
        registry.register(
            STANZAS_OUT,
            "Stanzas sent to XMPP clients and servers, by kind",
            m.stanzas_out.clone(),
        );
        registry.register(
            NOTIFICATIONS,
            "Pubsub notification copies queued for recipients",
            m.notifications.clone(),
        );
        registry.register(
            NOTIFICATIONS_REFUSED,
            "Pubsub notification copies refused by a full recipient queue",
            m.notifications_refused.clone(),
        );
        registry.register(
            NOTIFICATION_FANOUT_SECONDS,
            "Time to queue one event's notification for all recipients",
            m.notification_fanout_seconds.clone(),
        );
        registry.register(
            OVERLOADED,
            "XMPP streams closed for not reading their notifications",
            m.overloaded.clone(),
        );
        registry.register(
            COMPONENT_UP,
            "1 while the XMPP external component stream is authenticated",
            m.component_up.clone(),
        );
        registry.register(
            COMPONENT_CONNECTS,
            "XMPP component streams the server authenticated",
            m.component_connects.clone(),
        );
        registry.register(
            COMPONENT_CONNECT_FAILURES,
            "XMPP component connection attempts that did not reach the server",
            m.component_connect_failures.clone(),
        );
        registry.register(
            COMPONENT_HANDSHAKE_FAILURES,
            "XMPP component streams the server did not authenticate",
            m.component_handshake_failures.clone(),
        );
        registry.register(
            COMPONENT_REJECTED,
            "Stanzas from the XMPP server refused by the component",
            m.component_rejected.clone(),
        );
        m
    }
}
