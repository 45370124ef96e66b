//! The XMPP bridge's metrics; they register into the gateway's one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

/// Labels by stanza kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `iq`, `message` or `presence`.
    pub kind: &'static str,
}

/// Metric handles.
#[derive(Debug, Default)]
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
        m
    }
}
