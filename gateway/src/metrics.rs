//! The gateway's metrics and the one registry everything registers into.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Open TCP connections to the HTTP front.
pub const HTTP_CONNECTIONS: &str = "juxta_http_connections";
/// HTTP requests by route and status.
pub const HTTP_REQUESTS: &str = "juxta_http_requests";
/// Open WebSocket sessions.
pub const WS_SESSIONS: &str = "juxta_ws_sessions";
/// Open SSE streams.
pub const SSE_STREAMS: &str = "juxta_sse_streams";
/// Events written to clients, by transport.
pub const DELIVERIES: &str = "juxta_deliveries";
/// Errors reported to clients, by code.
pub const CLIENT_ERRORS: &str = "juxta_client_errors";
/// Clients disconnected because a write did not finish within the write timeout.
pub const STALLED_CLIENTS: &str = "juxta_stalled_clients";

/// Labels of [`HTTP_REQUESTS`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The matched route template.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Labels by transport.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `ws` or `sse`.
    pub transport: &'static str,
}

/// Labels by error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The stable error code.
    pub code: &'static str,
}

/// The HTTP front's metric handles.
#[derive(Debug)]
pub struct HttpMetrics {
    /// See [`HTTP_CONNECTIONS`].
    pub connections: Gauge,
    /// See [`HTTP_REQUESTS`].
    pub requests: Family<RequestLabels, Counter>,
    /// See [`WS_SESSIONS`].
    pub ws_sessions: Gauge,
    /// See [`SSE_STREAMS`].
    pub sse_streams: Gauge,
    /// See [`DELIVERIES`].
    pub deliveries: Family<TransportLabels, Counter>,
    /// See [`CLIENT_ERRORS`].
    pub client_errors: Family<CodeLabels, Counter>,
    /// See [`STALLED_CLIENTS`].
    pub stalled: Counter,
    /// The `ws` counter of [`DELIVERIES`], resolved once: it is on the hot path.
    pub ws_deliveries: Counter,
    /// The `sse` counter of [`DELIVERIES`].
    pub sse_deliveries: Counter,
}

impl HttpMetrics {
    /// New handles, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::new();
        registry.register(
            HTTP_CONNECTIONS,
            "Open TCP connections to the HTTP front",
            m.connections.clone(),
        );
        registry.register(
            HTTP_REQUESTS,
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            WS_SESSIONS,
            "Open WebSocket sessions",
            m.ws_sessions.clone(),
        );
        registry.register(
            SSE_STREAMS,
            "Open Server-Sent Events streams",
            m.sse_streams.clone(),
        );
        registry.register(
            DELIVERIES,
            "Events written to clients, by transport",
            m.deliveries.clone(),
        );
        registry.register(
            CLIENT_ERRORS,
            "Errors reported to clients, by code",
            m.client_errors.clone(),
        );
        registry.register(
            STALLED_CLIENTS,
            "Clients disconnected for not reading",
            m.stalled.clone(),
        );
        m
    }

    /// New, unregistered handles.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let deliveries = Family::<TransportLabels, Counter>::default();
        let ws_deliveries = deliveries
            .get_or_create(&TransportLabels { transport: "ws" })
            .clone();
        let sse_deliveries = deliveries
            .get_or_create(&TransportLabels { transport: "sse" })
            .clone();
        Self {
            connections: Gauge::default(),
            requests: Family::default(),
            ws_sessions: Gauge::default(),
            sse_streams: Gauge::default(),
            deliveries,
            client_errors: Family::default(),
            stalled: Counter::default(),
            ws_deliveries,
            sse_deliveries,
        }
    }
}

impl HttpMetrics {
    /// Counts an error reported to a client.
    pub fn client_error(&self, code: &'static str) {
        self.client_errors.get_or_create(&CodeLabels { code }).inc();
    }
}

/// Overlay pipe messages refused, by reason (undecodable, forged publisher, not a member,
/// forbidden by the publish model, …).
pub const OVERLAY_REJECTED: &str = "juxta_overlay_rejected";
/// Member peers' publications stored.
pub const OVERLAY_INGESTED: &str = "juxta_overlay_ingested";
/// Stored events sent into pipes.
pub const OVERLAY_EGRESSED: &str = "juxta_overlay_egressed";

/// Labels by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The stable reason code.
    pub reason: String,
}

/// The overlay bridge's metric handles.
#[derive(Debug, Default)]
pub struct OverlayMetrics {
    /// See [`OVERLAY_REJECTED`].
    pub rejected: Family<ReasonLabels, Counter>,
    /// See [`OVERLAY_INGESTED`].
    pub ingested: Counter,
    /// See [`OVERLAY_EGRESSED`].
    pub egressed: Counter,
}

impl OverlayMetrics {
    /// Registers the handles in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            OVERLAY_REJECTED,
            "Overlay pipe messages refused, by reason",
            m.rejected.clone(),
        );
        registry.register(
            OVERLAY_INGESTED,
            "Member peers' publications stored",
            m.ingested.clone(),
        );
        registry.register(
            OVERLAY_EGRESSED,
            "Stored events sent into overlay pipes",
            m.egressed.clone(),
        );
        m
    }
}

impl juxta_bridge_p2p::bridge::BridgeObserver for OverlayMetrics {
    fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    fn ingested(&self) {
        self.ingested.inc();
    }

    fn egressed(&self) {
        self.egressed.inc();
    }
}
