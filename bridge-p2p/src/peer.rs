//! The edge peer: join a group through gateways, follow nodes' pipes in offset order, publish.
//!
//! This is the library behind `juxta peer` (API.md, "Overlay"): [`EdgePeer::join`] starts an
//! overlay node in the [`Role::Edge`] role, dials the bootstrap gateways and joins the pipes of
//! the subscribed nodes; [`EdgePeer::next`] yields every event of those nodes, in offset order
//! per node, each offset once; [`EdgePeer::publish`] puts a publication into a pipe, which a
//! gateway stores (its stored event then comes back through the pipe with an offset).
//!
//! # How a best-effort pipe becomes reliable here
//!
//! Gossipsub may lose, repeat or reorder messages, and sends nothing to a peer before it has
//! joined. Every stored event carries its offset and epoch, so a peer keeps, per node, the
//! next offset it expects and asks the gateway for history (the [`crate::catchup`] protocol)
//! whenever the pipe alone cannot tell it what comes next:
//!
//! - right after joining (from the `after` resume point, or from the start of history);
//! - when a message arrives ahead of the next offset (a gap): it waits, the gap is filled
//!   from history, then it is delivered;
//! - once more [`PIPE_SETTLE`] after a gateway connection comes up (after joining, and
//!   after a reconnect), when the gateway surely knows this peer is in the pipe;
//! - when a message names another epoch than the one seen (the history was reset);
//! - [`TAIL_CHECK`] after the last item the pipe delivered, once it has been quiet that
//!   long: items lost at the end of a burst have no later item to reveal the gap.
//!
//! Offsets already delivered are dropped. What history no longer holds is reported as
//! [`PeerEvent::Lost`], never skipped silently; a reset history as [`PeerEvent::Reset`].
//!
//! # Layout
//!
//! - `Cursor`: one node's position. Pure logic, no I/O: it takes pipe messages and catch-up
//!   pages (and `now` for retry times), and returns the events to deliver and whether it
//!   needs history. Tested step by step in this module's tests.
//! - `Driver`: one task that owns the overlay's event receiver, sends catch-up requests (at
//!   most [`MAX_CATCH_UPS_IN_FLIGHT`], retried with backoff), redials gateways, and hands
//!   [`PeerEvent`]s to [`EdgePeer::next`] through a bounded queue.
//! - [`run_cli`]: `juxta peer`: events out as JSON lines, payload lines in.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use juxta_core::{Change, Epoch, Event, Item, ItemId, NodeName, Origin, Payload, Record};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, identity};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::advert;
use crate::catchup::{self, CatchUpRequest, CatchUpResponse, Page};
use crate::envelope::{Envelope, Kind, MAX_ENVELOPE_BYTES};
use crate::group::{Credential, Group, Membership, PUBLIC_GROUP, validate_group_name};
use crate::node::{self, Overlay, OverlayError, OverlayEvent, Role};

/// Events waiting for [`EdgePeer::next`]. When the queue is full the driver waits, and with
/// it the overlay node: a slow reader slows the peer down instead of growing memory (gossip
/// that the node then misses is filled in from history by catch-up).
pub const EVENT_QUEUE: usize = 1024;
/// Most pipe messages one node holds while it waits for the gap before them to be filled.
/// Beyond it the highest offsets are dropped: catch-up fetches them again in order.
pub const MAX_AHEAD_ITEMS: usize = 1024;
/// Most payload bytes one node holds ahead of a gap (same policy as [`MAX_AHEAD_ITEMS`]).
pub const MAX_AHEAD_BYTES: usize = 8 * 1024 * 1024;
/// Catch-up requests outstanding at once, over all nodes; more wait for one to finish.
pub const MAX_CATCH_UPS_IN_FLIGHT: usize = 16;
/// First wait before a failed catch-up is asked again; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait before a failed catch-up is asked again.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long after joining the peer checks that a gateway connection came up (and redials if
/// not); after a gateway connection drops it redials after [`RETRY_MIN`], doubling up to
/// [`RETRY_MAX`].
pub const FIRST_REDIAL: Duration = Duration::from_secs(5);
/// How long after a gateway connection comes up each node asks for history once more.
///
/// Gossipsub tells the gateway about this peer's pipes over the new connection, concurrently
/// with the first catch-up request; an event stored after that request was served but
/// before the subscription arrived would reach the peer neither way, and for a quiet node
/// nothing else would reveal the gap. Asking again once subscriptions have been exchanged
/// closes that window.
pub const PIPE_SETTLE: Duration = Duration::from_secs(2);
/// How long after the last item a pipe delivered the peer asks history whether anything
/// came after it: a gap shows when a later item arrives, but items lost at the end of a
/// burst have no later item to show them.
pub const TAIL_CHECK: Duration = Duration::from_secs(2);
/// How long [`EdgePeer::publish`] waits for a peer to join the pipe. Gossipsub refuses to
/// publish into a pipe nobody has joined yet, which is the normal state right after joining.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(10);
/// How often [`EdgePeer::publish`] looks whether a peer has joined the pipe while it waits.
const PUBLISH_POLL: Duration = Duration::from_millis(100);
/// Longest input line [`run_cli`] publishes: the gateway's default payload limit, plus one
/// byte for a `\r` before the newline.
pub const MAX_LINE_BYTES: usize = juxta_core::bus::DEFAULT_MAX_PAYLOAD_BYTES + 1;

/// How an edge peer joins.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Gateway addresses, each ending in `/p2p/<peer id>`: those peers answer catch-up and
    /// are the only ones trusted to send stored events. At least one is required.
    pub bootstrap: Vec<Multiaddr>,
    /// The peer group whose pipes to join ([`PUBLIC_GROUP`] by default).
    pub group: String,
    /// This peer's membership credential, for a protected group. It is sent with catch-up
    /// requests, which is also how a gateway learns to accept this peer's publications.
    pub credential: Option<Credential>,
    /// The nodes to follow.
    pub subscribe: Vec<NodeName>,
    /// Resume points: the last offset already seen of a subscribed node. A subscribed node
    /// without an entry starts from the beginning of its history (0).
    pub after: HashMap<NodeName, u64>,
    /// Addresses to listen on (none by default: an edge peer dials out).
    pub listen: Vec<Multiaddr>,
    /// Where gossipsub records its metrics ([`node::Config::gossip_metrics`]).
    pub gossip_metrics: Option<Arc<parking_lot::Mutex<prometheus_client::registry::Registry>>>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            bootstrap: Vec::new(),
            group: PUBLIC_GROUP.to_owned(),
            credential: None,
            subscribe: Vec::new(),
            after: HashMap::new(),
            listen: Vec::new(),
            gossip_metrics: None,
        }
    }
}

impl PeerConfig {
    /// The defaults, bootstrapping from `bootstrap`.
    pub fn new(bootstrap: Vec<Multiaddr>) -> Self {
        Self {
            bootstrap,
            ..Self::default()
        }
    }

    /// Checks the configuration for `peer`; the gateways' peer ids and the subscribed nodes
    /// without duplicates.
    fn check(&self, peer: &PeerId) -> Result<(Vec<PeerId>, Vec<NodeName>), PeerError> {
        let bad = |why: String| Err(PeerError::Config(why));
        if self.bootstrap.is_empty() {
            return bad("at least one bootstrap gateway address is needed".into());
        }
        let mut gateways = Vec::new();
        for addr in &self.bootstrap {
            match addr.iter().last() {
                Some(Protocol::P2p(id)) => {
                    if !gateways.contains(&id) {
                        gateways.push(id);
                    }
                }
                _ => {
                    return bad(format!(
                        "bootstrap address {addr} must end in /p2p/<the gateway's peer id>"
                    ));
                }
            }
        }
        validate_group_name(&self.group).map_err(|e| PeerError::Config(e.to_string()))?;
        if let Some(c) = &self.credential {
            if c.group != self.group {
                return bad(format!(
                    "the credential is for group {:?}, not {:?}",
                    c.group, self.group
                ));
            }
            if c.peer != *peer {
                return bad(format!(
                    "the credential is for peer {}, not this peer ({peer})",
                    c.peer
                ));
            }
            if c.expires_at <= now_secs() {
                return bad(format!(
                    "the credential expired at {} (unix seconds)",
                    c.expires_at
                ));
            }
        }
        let mut seen = HashSet::new();
        let subscribe: Vec<NodeName> = self
            .subscribe
            .iter()
            .filter(|n| seen.insert((*n).clone()))
            .cloned()
            .collect();
        if subscribe.len() > node::MAX_TOPICS_PER_PEER {
            return bad(format!(
                "{} nodes subscribed; at most {} pipes can be joined",
                subscribe.len(),
                node::MAX_TOPICS_PER_PEER
            ));
        }
        if let Some(node) = self.after.keys().find(|n| !seen.contains(*n)) {
            return bad(format!(
                "a resume point is given for {node}, which is not subscribed"
            ));
        }
        Ok((gateways, subscribe))
    }
}

/// Reads `--after NODE=OFFSET`.
pub fn parse_after(s: &str) -> Result<(NodeName, u64), PeerError> {
    let bad = |why: String| PeerError::Config(format!("--after {s:?}: {why}"));
    let (node, offset) = s
        .rsplit_once('=')
        .ok_or_else(|| bad("expected NODE=OFFSET".into()))?;
    let node = NodeName::new(node).map_err(|e| bad(e.to_string()))?;
    let offset = offset
        .parse()
        .map_err(|_| bad("the offset must be a non-negative integer".into()))?;
    Ok((node, offset))
}

/// What an edge peer reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PeerEvent {
    /// The next event of a subscribed node.
    Event(Arc<Event>),
    /// Events `from..=to` of `node` are no longer in history: they were missed.
    Lost {
        /// The node.
        node: NodeName,
        /// First offset missed.
        from: u64,
        /// Last offset missed.
        to: u64,
    },
    /// `node`'s history was reset (its epoch changed); events start over from the oldest
    /// offset the new history holds.
    Reset {
        /// The node.
        node: NodeName,
    },
    /// The gateway refused to serve `node`'s history (`code`: `not_member`, `node_not_found`,
    /// `bad_request`, `unavailable`). The peer keeps asking, with backoff; the same refusal
    /// is reported once.
    Refused {
        /// The node.
        node: NodeName,
        /// The gateway's stable reason code.
        code: String,
        /// For people.
        message: String,
    },
}

impl PeerEvent {
    /// The JSON line `juxta peer` prints (without the newline): an event exactly as the
    /// WebSocket sends it (`{"type":"event",…}`); a loss as the WebSocket's `events_lost`
    /// error; a reset as an `epoch_changed` error; a refusal as an error with the gateway's
    /// code.
    pub fn json_line(&self) -> String {
        match self {
            PeerEvent::Event(event) => {
                // A JSON payload published pretty-printed keeps its line breaks, which can
                // only be whitespace between tokens (inside strings they are escaped):
                // spaces instead keep the value and make it one line.
                let text = String::from_utf8_lossy(event.json());
                if text.contains(['\n', '\r']) {
                    text.replace(['\n', '\r'], " ")
                } else {
                    text.into_owned()
                }
            }
            PeerEvent::Lost { node, from, to } => serde_json::json!({
                "type": "error", "code": "events_lost", "node": node.as_str(), "from": from, "to": to,
                "message": format!("events {from}..={to} are no longer in history; they were missed"),
            })
            .to_string(),
            PeerEvent::Reset { node } => serde_json::json!({
                "type": "error", "code": "epoch_changed", "node": node.as_str(),
                "message": "the node's history was reset; events start over from the oldest offset it holds",
            })
            .to_string(),
            PeerEvent::Refused {
                node,
                code,
                message,
            } => error_line(code, Some(node), message),
        }
    }
}

/// `{"type":"error","code","node"?,"message"}`.
fn error_line(code: &str, node: Option<&NodeName>, message: &str) -> String {
    let mut v = serde_json::json!({"type": "error", "code": code, "message": message});
    if let (Some(node), Some(map)) = (node, v.as_object_mut()) {
        map.insert("node".into(), node.as_str().into());
    }
    v.to_string()
}

/// Why the edge peer could not do something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The configuration is not usable.
    #[error("invalid peer configuration: {0}")]
    Config(String),
    /// The overlay node failed (or stopped).
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The gateway refused (`not_member`: the credential is missing, expired or not for
    /// this peer and group).
    #[error("the gateway refused: {code}: {message}")]
    Refused {
        /// The gateway's stable reason code.
        code: String,
        /// For people.
        message: String,
    },
    /// No gateway joined the pipe within [`PUBLISH_WAIT`], so a publication would be stored
    /// by no one.
    #[error("no gateway has joined the pipe of {node} (is a gateway that carries it connected?)")]
    NoPeers {
        /// The node.
        node: NodeName,
    },
    /// The payload is larger than a pipe message may carry.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Reading input or writing output failed.
    #[error("input/output: {0}")]
    Io(#[from] std::io::Error),
}

impl PeerError {
    /// A stable short code, as error lines carry it.
    pub fn code(&self) -> &str {
        match self {
            PeerError::Config(_) => "invalid_config",
            PeerError::Overlay(_) => "overlay",
            PeerError::Refused { code, .. } => code,
            PeerError::NoPeers { .. } => "no_peers",
            PeerError::TooLarge { .. } => "payload_too_large",
            PeerError::Io(_) => "io",
        }
    }
}

/// A running edge peer. Dropping it stops the peer.
#[derive(Debug)]
pub struct EdgePeer {
    overlay: Overlay,
    peer_id: PeerId,
    group: String,
    /// The credential's bytes, as catch-up requests carry them.
    credential: Option<Vec<u8>>,
    gateways: Vec<PeerId>,
    /// Filled by the driver task; bounded ([`EVENT_QUEUE`]).
    events: mpsc::Receiver<PeerEvent>,
    /// The last publication sequence number used (see [`EdgePeer::publish`]).
    seq: AtomicU64,
    /// Counts gateway connections coming up (the driver increments it): a gateway that
    /// reconnected may have restarted and forgotten this peer's credential.
    connections: Arc<AtomicU64>,
    /// `connections + 1` at the last time gateways accepted this peer's credential; 0 for
    /// never.
    admitted: AtomicU64,
}

impl EdgePeer {
    /// Starts the overlay node ([`Role::Edge`], with `keypair` as its identity), dials the
    /// bootstrap gateways and joins the pipes of `config.subscribe` in `config.group`.
    /// Catching up on each subscribed node's history starts at once.
    pub async fn join(keypair: identity::Keypair, config: PeerConfig) -> Result<Self, PeerError> {
        let peer_id = keypair.public().to_peer_id();
        let (gateways, subscribe) = config.check(&peer_id)?;
        let mut node_config = node::Config::new(Role::Edge);
        node_config.listen = config.listen.clone();
        let advert_ttl = node_config.advert_ttl;
        node_config.gossip_metrics = config.gossip_metrics.clone();
        node_config.bootstrap = config.bootstrap.clone();
        // Open here even for a protected group: an edge peer has neither the group's public
        // key nor the other members' credentials (gateways learn those from catch-up
        // requests), so it could only reject its fellow members' publications. It delivers
        // stored events only, which the node accepts from the bootstrap gateways alone, and
        // the gateways check every publication before storing it.
        node_config.groups = vec![Group {
            name: config.group.clone(),
            membership: Membership::Open,
        }];
        let (overlay, overlay_events) = Overlay::spawn(keypair, node_config, None, None).await?;
        for node in &subscribe {
            overlay.subscribe(&config.group, node.as_str()).await?;
        }
        let credential = config.credential.as_ref().map(Credential::to_bytes);
        let connections = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let now = Instant::now();
        let cursors: Vec<Cursor> = subscribe
            .iter()
            .map(|n| Cursor::new(n.clone(), config.after.get(n).copied().unwrap_or(0)))
            .collect();
        let mut driver = Driver {
            overlay: overlay.clone(),
            group: config.group.clone(),
            credential: credential.clone(),
            gateways: gateways.clone(),
            bootstrap: config.bootstrap.clone(),
            rotation: 0,
            index: subscribe.iter().cloned().zip(0..).collect(),
            queued: vec![None; cursors.len()],
            cursors,
            queue: BTreeSet::new(),
            in_flight: FuturesUnordered::new(),
            connected: HashSet::new(),
            connections: connections.clone(),
            redial_at: Some(now + FIRST_REDIAL),
            redial_backoff: RETRY_MIN,
            advertise_at: None,
            advert_ttl,
            subscribed: subscribe.iter().map(|n| n.as_str().to_owned()).collect(),
            ready: VecDeque::new(),
            out: tx,
        };
        for i in 0..driver.cursors.len() {
            driver.schedule(i, now);
        }
        tokio::spawn(tracing::Instrument::instrument(
            driver.run(overlay_events),
            tracing::info_span!("edge_peer", peer = %peer_id),
        ));
        tracing::info!(peer = %peer_id, group = %config.group, nodes = subscribe.len(), "edge peer: joined");
        Ok(Self {
            overlay,
            peer_id,
            group: config.group,
            credential,
            gateways,
            events: rx,
            seq: AtomicU64::new(0),
            connections,
            admitted: AtomicU64::new(0),
        })
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The overlay node this peer runs (for its addresses, peers, pipes).
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// The next event of any subscribed node: per node in offset order, each offset once.
    ///
    /// Stored events from the pipe are delivered when they carry the next offset; one ahead
    /// of it (a gap), the first ones after joining, and a reconnect to the gateway make the
    /// peer catch up from the gateway's history (pages of up to [`catchup::MAX_PAGE_ITEMS`])
    /// first. Offsets already delivered are dropped. If history no longer covers a gap,
    /// [`PeerEvent::Lost`] comes first; if the history was reset, [`PeerEvent::Reset`], and
    /// the node starts over from the oldest offset its new history holds. Other peers' raw
    /// publications are not events: the gateway stores them, and their stored events follow.
    ///
    /// `None` once the overlay node has stopped. Cancel-safe.
    pub async fn next(&mut self) -> Option<PeerEvent> {
        self.events.recv().await
    }

    /// Publishes `payload` into `node`'s pipe as this peer's publication, with `item_id` or
    /// a fresh one, which it returns.
    ///
    /// Sequence numbers (a publication's identity, with the peer id) come from the clock in
    /// microseconds and always increase, so a restarted peer does not reuse them. While no
    /// peer has joined the pipe yet — normal right after joining — it waits and retries, up
    /// to [`PUBLISH_WAIT`]. In a protected group it first presents the credential to the
    /// gateways (once, and again after a reconnect), since that is how they learn to accept
    /// this peer's publications.
    ///
    /// Success means the publication left for at least one peer; the gateway stores it and
    /// its stored event appears in the pipe. [`EdgePeer::flush`] waits until the gateways
    /// have received it.
    pub async fn publish(
        &self,
        node: &NodeName,
        item_id: Option<ItemId>,
        payload: Payload,
    ) -> Result<ItemId, PeerError> {
        let limit = MAX_ENVELOPE_BYTES - 4096;
        if payload.len() > limit {
            return Err(PeerError::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        if self.credential.is_some() {
            let generation = self.connections.load(Ordering::Acquire) + 1;
            if self.admitted.load(Ordering::Acquire) != generation {
                self.present_credential(node).await?;
                self.admitted.store(generation, Ordering::Release);
            }
        }
        let id = item_id.unwrap_or_else(ItemId::generate);
        let envelope = Envelope::publication(
            node.clone(),
            id.clone(),
            payload,
            &self.peer_id,
            self.next_seq(),
        );
        let deadline = Instant::now() + PUBLISH_WAIT;
        loop {
            // Only a gateway stores a publication: other peers in the pipe hold it back (it
            // has no offset yet), and gossipsub does not send it again to a gateway that
            // joins the mesh later. So a gateway must be in the pipe first.
            let members = self
                .overlay
                .pipe_members(&self.group, node.as_str())
                .await?;
            if !members.iter().any(|m| self.gateways.contains(m)) {
                if Instant::now() >= deadline {
                    return Err(PeerError::NoPeers { node: node.clone() });
                }
                tokio::time::sleep(PUBLISH_POLL).await;
                continue;
            }
            match self.overlay.publish(&self.group, &envelope).await {
                Ok(()) => {
                    tracing::debug!(%node, item = %id, "edge peer: published");
                    return Ok(id);
                }
                Err(OverlayError::NoPeers) => {
                    // Nobody in the pipe yet, or the mesh is still forming: transient.
                    if Instant::now() >= deadline {
                        return Err(PeerError::NoPeers { node: node.clone() });
                    }
                    tokio::time::sleep(PUBLISH_POLL).await;
                }
                Err(OverlayError::Publish(reason)) => {
                    if self.overlay.pipe_peers(&self.group, node.as_str()).await? > 0 {
                        // Peers are there, so this is not the transient "nobody joined yet".
                        return Err(OverlayError::Publish(reason).into());
                    }
                    if Instant::now() >= deadline {
                        return Err(PeerError::NoPeers { node: node.clone() });
                    }
                    tokio::time::sleep(PUBLISH_POLL).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the gateways have received what this peer published so far: one catch-up
    /// round trip to each (an empty page), which travels the connections the publications
    /// took, behind them. Call it before dropping the peer, which closes those connections
    /// at once. Ok when at least one gateway answered.
    pub async fn flush(&self, node: &NodeName) -> Result<(), PeerError> {
        self.round_trip(node).await.map(|_| ())
    }

    /// Presents the credential to every gateway, with an empty catch-up request; a gateway
    /// that accepts it remembers it (see `node.rs`), and refuses otherwise.
    async fn present_credential(&self, node: &NodeName) -> Result<(), PeerError> {
        let answers = self.round_trip(node).await?;
        for answer in answers {
            if let CatchUpResponse::Refused { code, message } = answer
                && code == "not_member"
            {
                return Err(PeerError::Refused { code, message });
            }
        }
        Ok(())
    }

    /// An empty catch-up request (after the last possible offset) to every gateway; the
    /// answers of those that answered, or the first error when none did.
    async fn round_trip(&self, node: &NodeName) -> Result<Vec<CatchUpResponse>, PeerError> {
        let request = CatchUpRequest {
            group: self.group.clone(),
            node: node.to_string(),
            after: u64::MAX,
            limit: 1,
            credential: self.credential.clone(),
        };
        let results = futures_util::future::join_all(
            self.gateways
                .iter()
                .map(|g| self.overlay.catch_up(*g, request.clone())),
        )
        .await;
        let mut answers = Vec::new();
        let mut error = None;
        for result in results {
            match result {
                Ok(answer) => answers.push(answer),
                Err(e) => {
                    tracing::debug!(error = %e, "edge peer: a gateway did not answer");
                    error.get_or_insert(e);
                }
            }
        }
        match (answers.is_empty(), error) {
            (true, Some(e)) => Err(e.into()),
            _ => Ok(answers),
        }
    }

    fn next_seq(&self) -> u64 {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        next_seq(&self.seq, now_us)
    }
}

/// The next publication sequence number after the one in `last`: the clock in
/// microseconds, or one more than the last if the clock has not moved on (or went back).
fn next_seq(last: &AtomicU64, now_us: u64) -> u64 {
    let mut prev = last.load(Ordering::Relaxed);
    loop {
        let seq = now_us.max(prev.saturating_add(1));
        match last.compare_exchange_weak(prev, seq, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return seq,
            Err(actual) => prev = actual,
        }
    }
}

/// What `juxta peer` does: joins, prints every event as one JSON line
/// ([`PeerEvent::json_line`]) to `out`, and, when `publish` names a node, reads `input`
/// line by line and publishes each line as a JSON payload into that node's pipe.
///
/// A line that is not JSON is refused with an error line (`"code":"invalid_json"`), one
/// longer than [`MAX_LINE_BYTES`] with `payload_too_large`, a publication that fails with
/// its error's code ([`PeerError::code`]); empty lines are skipped; the loop goes on in
/// every case. When the input ends and `stop_after_input` is true, it waits until the
/// gateways have received what was published ([`EdgePeer::flush`]) and returns; otherwise
/// it goes on printing events. Without `publish` the input is not read and it runs until
/// the overlay node stops (an error) or writing fails.
/// Finds what `group` offers (`juxta peer --discover`): joins through `config.bootstrap`
/// without following any node, then asks the gateways' Kademlia records and rendezvous
/// registrations ([`advert::discover`]) until a gateway's advertisement turns up or
/// `patience` runs out (then returns what was found).
pub async fn discover(
    keypair: identity::Keypair,
    mut config: PeerConfig,
    patience: Duration,
) -> Result<advert::Discovery, PeerError> {
    config.subscribe.clear();
    config.after.clear();
    let group = config.group.clone();
    let peer = EdgePeer::join(keypair, config).await?;
    let deadline = Instant::now() + patience;
    loop {
        let connected = peer.overlay.connected_peers().await?;
        let points: Vec<PeerId> = peer
            .gateways
            .iter()
            .filter(|g| connected.contains(g))
            .copied()
            .collect();
        if !points.is_empty() {
            let found = advert::discover(&peer.overlay, &group, &points).await?;
            let gateway_found = found
                .peers
                .iter()
                .any(|p| p.role == Some(advert::AdvertRole::Gateway));
            if gateway_found || Instant::now() >= deadline {
                return Ok(found);
            }
        } else if Instant::now() >= deadline {
            return Err(PeerError::Config(
                "no bootstrap gateway could be reached".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// [`discover`]'s answer as JSON lines: one `{"type":"node",…}` per node with the peers
/// serving it, then one `{"type":"peer",…}` per peer found.
pub fn discovery_lines(d: &advert::Discovery) -> Vec<String> {
    let mut lines = Vec::new();
    for (node, peers) in &d.nodes {
        lines.push(
            serde_json::json!({"type": "node", "group": d.group, "node": node, "peers": peers})
                .to_string(),
        );
    }
    for p in &d.peers {
        let mut v = serde_json::to_value(p).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("type".into(), "peer".into());
            o.insert("group".into(), d.group.clone().into());
        }
        lines.push(v.to_string());
    }
    for (reason, n) in &d.refused {
        lines.push(
            serde_json::json!({"type": "refused", "group": d.group, "reason": reason, "count": n})
                .to_string(),
        );
    }
    lines
}

pub async fn run_cli(
    keypair: identity::Keypair,
    config: PeerConfig,
    publish: Option<NodeName>,
    mut input: impl AsyncBufRead + Unpin,
    mut out: impl AsyncWrite + Unpin,
    stop_after_input: bool,
) -> Result<(), PeerError> {
    let mut peer = EdgePeer::join(keypair, config).await?;
    let mut lines = LineReader::new(MAX_LINE_BYTES);
    let mut reading = publish.is_some();
    loop {
        tokio::select! {
            event = peer.next() => match event {
                Some(event) => write_line(&mut out, &event.json_line()).await?,
                None => return Err(OverlayError::Stopped.into()),
            },
            line = lines.next(&mut input), if reading => {
                let Some(node) = &publish else {
                    reading = false;
                    continue;
                };
                match line? {
                    Line::End => {
                        reading = false;
                        if stop_after_input {
                            if let Err(e) = peer.flush(node).await {
                                tracing::warn!(error = %e, "edge peer: could not confirm the gateways received the publications");
                            }
                            out.flush().await?;
                            return Ok(());
                        }
                    }
                    Line::TooLong => {
                        let message = format!("line longer than {MAX_LINE_BYTES} bytes; not published");
                        write_line(&mut out, &error_line("payload_too_large", Some(node), &message)).await?;
                    }
                    Line::Text(text) => {
                        if let Some(error) = publish_line(&peer, node, text).await? {
                            write_line(&mut out, &error).await?;
                        }
                    }
                }
            }
        }
    }
}

/// Publishes one input line; an error line to print when it was refused, `Err` when the
/// peer cannot go on.
async fn publish_line(
    peer: &EdgePeer,
    node: &NodeName,
    text: Vec<u8>,
) -> Result<Option<String>, PeerError> {
    let mut text = text;
    if text.last() == Some(&b'\r') {
        text.pop();
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let payload = match Payload::json(Bytes::from(text)) {
        Ok(p) => p,
        Err(e) => return Ok(Some(error_line("invalid_json", Some(node), &e.to_string()))),
    };
    match peer.publish(node, None, payload).await {
        Ok(_) => Ok(None),
        Err(e @ (PeerError::Overlay(OverlayError::Stopped) | PeerError::Io(_))) => Err(e),
        Err(e) => Ok(Some(error_line(e.code(), Some(node), &e.to_string()))),
    }
}

async fn write_line(out: &mut (impl AsyncWrite + Unpin), line: &str) -> std::io::Result<()> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await
}

/// What [`LineReader::next`] read.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// One line, without its `\n`.
    Text(Vec<u8>),
    /// A line longer than the limit (its bytes were skipped).
    TooLong,
    /// The input ended.
    End,
}

/// Reads lines of at most `limit` bytes, never holding more. Cancel-safe: a partly read
/// line stays here until the next call.
#[derive(Debug)]
struct LineReader {
    limit: usize,
    buf: Vec<u8>,
    too_long: bool,
    started: bool,
}

impl LineReader {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            buf: Vec::new(),
            too_long: false,
            started: false,
        }
    }

    async fn next(&mut self, input: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<Line> {
        loop {
            let available = input.fill_buf().await?;
            if available.is_empty() {
                // The last line may lack its newline.
                return Ok(if self.started {
                    self.finish()
                } else {
                    Line::End
                });
            }
            self.started = true;
            let (chunk, used, complete) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            if !self.too_long {
                if self.buf.len() + chunk.len() > self.limit {
                    self.too_long = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            input.consume(used);
            if complete {
                return Ok(self.finish());
            }
        }
    }

    fn finish(&mut self) -> Line {
        self.started = false;
        if std::mem::take(&mut self.too_long) {
            Line::TooLong
        } else {
            Line::Text(std::mem::take(&mut self.buf))
        }
    }
}

/// The core event a stored envelope reports; `None` for a publication (no offset) or an
/// envelope missing what its kind needs (decoding refuses those).
pub fn stored_event(envelope: &Envelope) -> Option<Event> {
    let (offset, epoch) = (envelope.offset?, envelope.epoch?);
    let change = match envelope.kind {
        Kind::Published => Change::Published(Item {
            id: envelope.item_id.clone()?,
            payload: envelope.payload.clone()?,
            publisher: Arc::from(envelope.publisher.as_str()),
            published_at: envelope.time,
        }),
        Kind::Retracted => Change::Retracted(envelope.item_id.clone()?),
        Kind::Purged => Change::Purged,
        Kind::Deleted => Change::Deleted,
    };
    let record = Record {
        offset,
        change,
        at: envelope.time,
    };
    Some(Event::new(
        envelope.node.clone(),
        epoch,
        record,
        Origin::Overlay,
    ))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One subscribed node's position in its history: pure state, no I/O.
#[derive(Debug)]
struct Cursor {
    node: NodeName,
    /// The next offset to deliver.
    next: u64,
    /// The history the offsets belong to; unknown until the first catch-up page.
    epoch: Option<Epoch>,
    /// Stored events that arrived ahead of `next`, waiting for the gap to be filled
    /// (bounded: [`MAX_AHEAD_ITEMS`], [`MAX_AHEAD_BYTES`]).
    ahead: BTreeMap<u64, Envelope>,
    ahead_bytes: usize,
    /// History must be asked (again).
    wanted: bool,
    /// A catch-up request is outstanding.
    in_flight: bool,
    /// Not before this (after a failure).
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    backoff: Duration,
    /// The refusal last reported, so that one that persists is reported once.
    refusal: Option<String>,
    /// Ask again at this time even when caught up: set when a gateway connection comes up,
    /// [`PIPE_SETTLE`] later (see there).
    recheck_at: Option<Instant>,
}

impl Cursor {
    /// A cursor that has seen everything up to `after` and wants history from there.
    fn new(node: NodeName, after: u64) -> Self {
        Self {
            node,
            next: after.saturating_add(1),
            epoch: None,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            wanted: true,
            in_flight: false,
            retry_at: None,
            backoff: RETRY_MIN,
            refusal: None,
            recheck_at: None,
        }
    }

    /// When the next catch-up request should go out, if one is wanted and none is
    /// outstanding.
    fn due_at(&self, now: Instant) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        let wanted = self.wanted.then(|| self.retry_at.unwrap_or(now));
        match (wanted, self.recheck_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The catch-up request to send now; marks it outstanding.
    fn request(
        &mut self,
        now: Instant,
        group: &str,
        credential: Option<Vec<u8>>,
    ) -> CatchUpRequest {
        if self.recheck_at.is_some_and(|at| at <= now) {
            self.recheck_at = None;
        }
        self.in_flight = true;
        self.wanted = false;
        self.retry_at = None;
        CatchUpRequest {
            group: group.to_owned(),
            node: self.node.to_string(),
            after: self.next.saturating_sub(1),
            limit: catchup::MAX_PAGE_ITEMS,
            credential,
        }
    }

    /// History must be asked again soon: a gap, another epoch, a reconnect. A retry waiting
    /// after a failure comes forward to at most [`RETRY_MIN`] from now.
    fn want(&mut self, now: Instant) {
        self.wanted = true;
        if let Some(at) = &mut self.retry_at {
            *at = (*at).min(now + RETRY_MIN);
        }
    }

    /// A gateway connection came up (after joining, or again): ask for what went by at
    /// `at` at the latest, with a fresh backoff.
    fn connected(&mut self, at: Instant) {
        self.backoff = RETRY_MIN;
        if let Some(retry) = &mut self.retry_at {
            *retry = (*retry).min(at);
        }
        self.recheck_at = Some(at);
    }

    /// A stored event from the pipe.
    fn handle_live(&mut self, envelope: Envelope, now: Instant, out: &mut VecDeque<PeerEvent>) {
        let (Some(offset), Some(epoch)) = (envelope.offset, envelope.epoch) else {
            // A peer's publication: the gateway stores it, and its stored event follows.
            return;
        };
        if offset < self.next {
            // Delivered already (or before the resume point). An old message of another
            // epoch is stale; a new history is noticed from its messages at or past `next`
            // or on the next catch-up.
            return;
        }
        match self.epoch {
            Some(known) if known != epoch => {
                // Another history: catch-up tells where it starts.
                self.want(now);
            }
            Some(_) if offset == self.next => {
                self.deliver(envelope, out);
                self.drain_ahead(out);
                // Gossip dropped the last items of a burst: nothing later shows the gap.
                // Once the pipe has been quiet for a while, history confirms the tail.
                self.recheck_at = Some(now + TAIL_CHECK);
            }
            _ => {
                // Ahead of a gap, or the epoch is not known yet: hold it until history has
                // filled what comes before. A request already out is enough: what it does not
                // fill is still held when its page arrives, and asked for then.
                let held = self.hold(offset, envelope);
                if !self.in_flight || !held {
                    self.want(now);
                }
            }
        }
    }

    /// A catch-up page answering this cursor's request.
    fn handle_page(&mut self, page: Page, now: Instant, out: &mut VecDeque<PeerEvent>) {
        tracing::debug!(node = %self.node, next = self.next, items = page.items.len(), last = page.last_offset, "edge peer: catch-up page");
        self.in_flight = false;
        self.refusal = None;
        let epoch = Epoch(page.epoch);
        match self.epoch {
            Some(known) if known != epoch => {
                out.push_back(PeerEvent::Reset {
                    node: self.node.clone(),
                });
                self.epoch = Some(epoch);
                self.next = page.first_offset.max(1);
                self.ahead.retain(|_, e| e.epoch == Some(epoch));
                self.ahead_bytes = self.ahead.values().map(held_size).sum();
                // The page answered an offset of the old history: ask again from the start.
                self.wanted = true;
                self.backoff = RETRY_MIN;
                return;
            }
            Some(_) => {}
            None => self.epoch = Some(epoch),
        }
        let before = self.next;
        if page.first_offset > self.next {
            self.lose(page.first_offset - 1, out);
        }
        for bytes in &page.items {
            let envelope = match Envelope::decode(bytes) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(node = %self.node, error = %e, "edge peer: undecodable catch-up item");
                    continue;
                }
            };
            let Some(offset) = envelope.offset else {
                continue;
            };
            if envelope.node != self.node || envelope.epoch != Some(epoch) || offset < self.next {
                continue;
            }
            if offset > self.next {
                // History has no entry in between.
                self.lose(offset - 1, out);
            }
            self.deliver(envelope, out);
        }
        self.drain_ahead(out);
        let behind = self.next <= page.last_offset;
        let more = behind || !self.ahead.is_empty();
        if more && self.next == before {
            // No progress: the gateway's history does not reach what the pipe showed yet
            // (another gateway lagging behind), or it served nothing. Ask again later, later
            // each time.
            self.wanted = true;
            self.retry_after_failure(now);
        } else {
            self.backoff = RETRY_MIN;
            // `wanted` may also have been set while the request was out (a reconnect,
            // another epoch, an event that did not fit): then ask again too.
            self.wanted |= more;
            if self.next > before {
                // History had what the pipe did not bring: the pipe may be failing this
                // peer (a gateway dropping messages for it). Keep confirming the tail until
                // a check finds nothing new.
                let tail = now + TAIL_CHECK;
                self.recheck_at = Some(self.recheck_at.map_or(tail, |at| at.min(tail)));
            }
        }
    }

    /// The gateway refused the request.
    fn handle_refused(
        &mut self,
        code: String,
        message: String,
        now: Instant,
        out: &mut VecDeque<PeerEvent>,
    ) {
        self.handle_failure(now);
        if self.refusal.as_deref() != Some(code.as_str()) {
            self.refusal = Some(code.clone());
            out.push_back(PeerEvent::Refused {
                node: self.node.clone(),
                code,
                message,
            });
        }
    }

    /// The request failed (no answer, connection lost): retry after the backoff.
    fn handle_failure(&mut self, now: Instant) {
        self.in_flight = false;
        self.wanted = true;
        self.retry_after_failure(now);
    }

    fn retry_after_failure(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    fn deliver(&mut self, envelope: Envelope, out: &mut VecDeque<PeerEvent>) {
        let Some(offset) = envelope.offset else {
            return;
        };
        match stored_event(&envelope) {
            Some(event) => out.push_back(PeerEvent::Event(Arc::new(event))),
            // Decoding refuses such envelopes; should one get here, say so.
            None => out.push_back(PeerEvent::Lost {
                node: self.node.clone(),
                from: offset,
                to: offset,
            }),
        }
        self.next = offset.saturating_add(1);
    }

    /// Reports `next..=to` as lost and moves past them.
    fn lose(&mut self, to: u64, out: &mut VecDeque<PeerEvent>) {
        out.push_back(PeerEvent::Lost {
            node: self.node.clone(),
            from: self.next,
            to,
        });
        self.next = to.saturating_add(1);
    }

    /// Keeps an event that arrived ahead of `next`, within the bounds: when they are
    /// reached the highest offsets go (catch-up fetches them again, in order). False when
    /// it was not kept for want of room.
    fn hold(&mut self, offset: u64, envelope: Envelope) -> bool {
        if self.ahead.contains_key(&offset) {
            return true;
        }
        let size = held_size(&envelope);
        while self.ahead.len() >= MAX_AHEAD_ITEMS || self.ahead_bytes + size > MAX_AHEAD_BYTES {
            match self.ahead.last_key_value() {
                Some((&last, _)) if last > offset => {
                    if let Some(dropped) = self.ahead.remove(&last) {
                        self.ahead_bytes -= held_size(&dropped);
                    }
                }
                // Nothing higher to make room with (or nothing at all): leave this one to
                // catch-up.
                _ => return false,
            }
        }
        self.ahead_bytes += size;
        self.ahead.insert(offset, envelope);
        true
    }

    /// Delivers held events that are next now; drops those behind or of another epoch.
    fn drain_ahead(&mut self, out: &mut VecDeque<PeerEvent>) {
        while let Some(entry) = self.ahead.first_entry() {
            let offset = *entry.key();
            if offset > self.next {
                break;
            }
            let envelope = entry.remove();
            self.ahead_bytes -= held_size(&envelope);
            if offset == self.next && envelope.epoch == self.epoch {
                self.deliver(envelope, out);
            }
        }
    }
}

/// What a held envelope counts against [`MAX_AHEAD_BYTES`].
fn held_size(envelope: &Envelope) -> usize {
    envelope.payload.as_ref().map_or(0, Payload::len) + 128
}

type CatchUpFuture =
    Pin<Box<dyn Future<Output = (usize, Result<CatchUpResponse, OverlayError>)> + Send>>;

/// The task behind an [`EdgePeer`]: overlay events in, catch-up requests out, peer events
/// into the bounded queue.
struct Driver {
    overlay: Overlay,
    group: String,
    credential: Option<Vec<u8>>,
    /// The bootstrap gateways' peer ids, in configuration order.
    gateways: Vec<PeerId>,
    bootstrap: Vec<Multiaddr>,
    /// Which gateway to ask when none is connected; moves on after a failure.
    rotation: usize,
    cursors: Vec<Cursor>,
    index: HashMap<NodeName, usize>,
    /// Cursors waiting to send a catch-up request, by due time; `queued[i]` is cursor `i`'s
    /// entry. Keeps the work per event independent of the number of nodes.
    queue: BTreeSet<(Instant, usize)>,
    queued: Vec<Option<Instant>>,
    /// At most [`MAX_CATCH_UPS_IN_FLIGHT`].
    in_flight: FuturesUnordered<CatchUpFuture>,
    /// Gateways connected now.
    connected: HashSet<PeerId>,
    connections: Arc<AtomicU64>,
    redial_at: Option<Instant>,
    redial_backoff: Duration,
    /// When to publish this peer's advertisement (again): soon after a gateway connection
    /// comes up, then at half its lifetime.
    advertise_at: Option<Instant>,
    advert_ttl: Duration,
    /// The nodes this peer follows, for its advertisement.
    subscribed: Vec<String>,
    /// Peer events produced and not yet handed over.
    ready: VecDeque<PeerEvent>,
    out: mpsc::Sender<PeerEvent>,
}

impl Driver {
    async fn run(mut self, mut events: mpsc::Receiver<OverlayEvent>) {
        loop {
            // The queue is bounded: a slow reader makes this wait, and the overlay node
            // behind it (the node's own event queue is bounded too).
            while let Some(event) = self.ready.pop_front() {
                if self.out.send(event).await.is_err() {
                    return;
                }
            }
            self.start_catch_ups(Instant::now());
            let wake = self.wake_at();
            tokio::select! {
                () = self.out.closed() => return,
                event = events.recv() => match event {
                    Some(event) => self.overlay_event(event, Instant::now()),
                    None => return,
                },
                Some((i, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.catch_up_done(i, result, Instant::now());
                }
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = Instant::now();
                    self.redial(now);
                    self.advertise(now);
                }
            }
        }
    }

    /// Puts cursor `i` in the queue at its due time, or takes it out.
    fn schedule(&mut self, i: usize, now: Instant) {
        let due = self.cursors.get(i).and_then(|c| c.due_at(now));
        let Some(slot) = self.queued.get_mut(i) else {
            return;
        };
        if *slot == due {
            return;
        }
        if let Some(old) = slot.take() {
            self.queue.remove(&(old, i));
        }
        if let Some(at) = due {
            self.queue.insert((at, i));
            *slot = Some(at);
        }
    }

    fn start_catch_ups(&mut self, now: Instant) {
        // Never None: the configuration has at least one gateway.
        let Some(gateway) = self.gateway() else {
            return;
        };
        while self.in_flight.len() < MAX_CATCH_UPS_IN_FLIGHT {
            let Some(&(at, i)) = self.queue.first() else {
                return;
            };
            if at > now {
                return;
            }
            self.queue.remove(&(at, i));
            if let Some(slot) = self.queued.get_mut(i) {
                *slot = None;
            }
            let Some(cursor) = self.cursors.get_mut(i) else {
                continue;
            };
            let request = cursor.request(now, &self.group, self.credential.clone());
            tracing::debug!(node = %cursor.node, after = request.after, %gateway, "edge peer: catching up");
            let overlay = self.overlay.clone();
            self.in_flight.push(Box::pin(async move {
                (i, overlay.catch_up(gateway, request).await)
            }));
        }
    }

    /// The gateway to ask: a connected one, else the next in turn.
    fn gateway(&self) -> Option<PeerId> {
        self.gateways
            .iter()
            .find(|g| self.connected.contains(*g))
            .or_else(|| {
                self.gateways
                    .get(self.rotation % self.gateways.len().max(1))
            })
            .copied()
    }

    /// The earliest timer: a catch-up retry (when there is room for it) or a redial.
    fn wake_at(&self) -> Option<Instant> {
        let retry = (self.in_flight.len() < MAX_CATCH_UPS_IN_FLIGHT)
            .then(|| self.queue.first().map(|&(at, _)| at))
            .flatten();
        [retry, self.redial_at, self.advertise_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Publishes this peer's advertisement when due (see [`crate::advert`]).
    fn advertise(&mut self, now: Instant) {
        if self.advertise_at.is_none_or(|at| at > now) {
            return;
        }
        // On a task of its own: the node's task may be waiting for this driver to take its
        // events, and would never answer a command awaited here.
        let (overlay, group, nodes) = (
            self.overlay.clone(),
            self.group.clone(),
            self.subscribed.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = overlay.advertise(&group, nodes).await {
                tracing::debug!(error = %e, "edge peer: advertising failed");
            }
        });
        self.advertise_at = Some(now + self.advert_ttl / 2);
    }

    fn overlay_event(&mut self, event: OverlayEvent, now: Instant) {
        match event {
            OverlayEvent::ItemReceived {
                group, envelope, ..
            } => {
                if group != self.group {
                    return;
                }
                let Some(&i) = self.index.get(&envelope.node) else {
                    return;
                };
                if let Some(cursor) = self.cursors.get_mut(i) {
                    cursor.handle_live(envelope, now, &mut self.ready);
                }
                self.schedule(i, now);
            }
            OverlayEvent::PeerConnected(peer) if self.gateways.contains(&peer) => {
                tracing::info!(%peer, "edge peer: connected to a gateway");
                self.connected.insert(peer);
                self.connections.fetch_add(1, Ordering::AcqRel);
                self.redial_at = None;
                self.redial_backoff = RETRY_MIN;
                // Once Kademlia knows the gateway (identify runs first).
                self.advertise_at = Some(now + PIPE_SETTLE);
                // Whatever went by while disconnected (or while joining) comes from history,
                // once the pipe's subscription has surely reached the gateway.
                let at = now + PIPE_SETTLE;
                for i in 0..self.cursors.len() {
                    if let Some(cursor) = self.cursors.get_mut(i) {
                        cursor.connected(at);
                    }
                    self.schedule(i, now);
                }
            }
            OverlayEvent::PeerDisconnected(peer) if self.gateways.contains(&peer) => {
                tracing::warn!(%peer, "edge peer: disconnected from a gateway");
                self.connected.remove(&peer);
                if self.connected.is_empty() {
                    self.redial_backoff = RETRY_MIN;
                    self.redial_at = Some(now + self.redial_backoff);
                }
            }
            OverlayEvent::MessageRejected { reason, from } => {
                tracing::debug!(%from, reason, "edge peer: rejected a pipe message");
            }
            _ => {}
        }
    }

    fn catch_up_done(
        &mut self,
        i: usize,
        result: Result<CatchUpResponse, OverlayError>,
        now: Instant,
    ) {
        let Some(cursor) = self.cursors.get_mut(i) else {
            return;
        };
        match result {
            Ok(CatchUpResponse::Page(page)) => cursor.handle_page(page, now, &mut self.ready),
            Ok(CatchUpResponse::Refused { code, message }) => {
                tracing::warn!(node = %cursor.node, %code, %message, "edge peer: catch-up refused");
                cursor.handle_refused(code, message, now, &mut self.ready);
            }
            Err(e) => {
                tracing::warn!(node = %cursor.node, error = %e, "edge peer: catch-up failed");
                cursor.handle_failure(now);
                self.rotation = self.rotation.wrapping_add(1);
            }
        }
        self.schedule(i, now);
    }

    /// Dials the gateways again when none is connected (libp2p does not redial by itself).
    fn redial(&mut self, now: Instant) {
        if self.redial_at.is_none_or(|at| at > now) {
            return;
        }
        if !self.connected.is_empty() {
            self.redial_at = None;
            return;
        }
        tracing::info!("edge peer: no gateway connected; dialing again");
        // On a task of its own, like advertising (see there).
        let (overlay, bootstrap) = (self.overlay.clone(), self.bootstrap.clone());
        tokio::spawn(async move {
            for addr in bootstrap {
                if let Err(e) = overlay.dial(addr.clone()).await {
                    tracing::warn!(%addr, error = %e, "edge peer: dialing a gateway failed");
                }
            }
        });
        self.redial_at = Some(now + self.redial_backoff);
        self.redial_backoff = (self.redial_backoff * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeName {
        NodeName::new("n1").expect("node")
    }

    fn stored(offset: u64, epoch: u64) -> Envelope {
        Envelope {
            node: node(),
            kind: Kind::Published,
            item_id: Some(ItemId::new(&format!("i{offset}")).expect("id")),
            offset: Some(offset),
            epoch: Some(Epoch(epoch)),
            payload: Some(Payload::json(Bytes::from_static(b"1")).expect("json")),
            publisher: "admin".to_owned(),
            time: 1,
            seq: None,
        }
    }

    fn page(epoch: u64, first: u64, last: u64, offsets: impl IntoIterator<Item = u64>) -> Page {
        Page {
            epoch,
            first_offset: first,
            last_offset: last,
            items: offsets
                .into_iter()
                .map(|o| serde_bytes::ByteBuf::from(stored(o, epoch).encode()))
                .collect(),
        }
    }

    /// A compact picture of what came out.
    fn seen(out: &mut VecDeque<PeerEvent>) -> Vec<String> {
        out.drain(..)
            .map(|e| match e {
                PeerEvent::Event(e) => format!("{}", e.offset),
                PeerEvent::Lost { from, to, .. } => format!("lost {from}..={to}"),
                PeerEvent::Reset { .. } => "reset".to_owned(),
                PeerEvent::Refused { code, .. } => format!("refused {code}"),
            })
            .collect()
    }

    fn caught_up(after: u64, epoch: u64) -> Cursor {
        let mut c = Cursor::new(node(), 0);
        let now = Instant::now();
        c.request(now, "public", None);
        c.handle_page(page(epoch, 1, after, 1..=after), now, &mut VecDeque::new());
        // History brought items: one tail check follows, and finds nothing more.
        let later = now + TAIL_CHECK;
        assert_eq!(c.due_at(now), Some(later), "a tail check");
        assert_eq!(c.request(later, "public", None).after, after);
        c.handle_page(page(epoch, 1, after, []), later, &mut VecDeque::new());
        assert_eq!(c.due_at(later), None, "caught up");
        c
    }

    #[test]
    fn a_new_cursor_asks_for_history_after_its_resume_point() {
        let mut c = Cursor::new(node(), 7);
        let now = Instant::now();
        assert_eq!(c.due_at(now), Some(now));
        let r = c.request(now, "lab", Some(vec![1]));
        assert_eq!(
            (r.group.as_str(), r.node.as_str(), r.after, r.limit),
            ("lab", "n1", 7, catchup::MAX_PAGE_ITEMS)
        );
        assert_eq!(r.credential, Some(vec![1]));
        assert_eq!(c.due_at(now), None, "one request at a time");
    }

    #[test]
    fn live_events_before_the_first_page_wait_for_it_and_come_after_history() {
        let mut c = Cursor::new(node(), 0);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.request(now, "public", None);
        c.handle_live(stored(4, 7), now, &mut out);
        assert!(out.is_empty(), "held until history is known");
        c.handle_page(page(7, 1, 3, 1..=3), now, &mut out);
        assert_eq!(seen(&mut out), ["1", "2", "3", "4"]);
        assert_eq!(c.due_at(now), Some(now + TAIL_CHECK), "only the tail check");
    }

    #[test]
    fn live_events_in_order_are_delivered_once_and_repeats_are_dropped() {
        let mut c = caught_up(2, 7);
        let now = Instant::now();
        let mut out = VecDeque::new();
        for o in [3, 3, 2, 4, 1, 4] {
            c.handle_live(stored(o, 7), now, &mut out);
        }
        assert_eq!(seen(&mut out), ["3", "4"]);
        assert_eq!(
            c.due_at(now),
            Some(now + TAIL_CHECK),
            "no gap: no catch-up now, only the tail check once the pipe is quiet"
        );
    }

    #[test]
    fn a_gap_holds_later_events_until_catch_up_fills_it_in_order() {
        let mut c = caught_up(8, 7);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.handle_live(stored(10, 7), now, &mut out);
        c.handle_live(stored(11, 7), now, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.due_at(now), Some(now), "the gap asks for history");
        assert_eq!(c.request(now, "public", None).after, 8);
        c.handle_page(page(7, 1, 11, [9, 10, 11]), now, &mut out);
        assert_eq!(seen(&mut out), ["9", "10", "11"]);
        assert_eq!(c.due_at(now), Some(now + TAIL_CHECK), "only the tail check");
    }

    #[test]
    fn history_trimmed_past_the_resume_point_is_reported_lost_before_the_rest() {
        let mut c = Cursor::new(node(), 0);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.request(now, "public", None);
        c.handle_page(page(7, 4, 5, [4, 5]), now, &mut out);
        assert_eq!(seen(&mut out), ["lost 1..=3", "4", "5"]);
        let mut c = caught_up(2, 7);
        c.handle_live(stored(9, 7), now, &mut out);
        c.request(now, "public", None);
        c.handle_page(page(7, 6, 9, [6, 7, 8, 9]), now, &mut out);
        assert_eq!(seen(&mut out), ["lost 3..=5", "6", "7", "8", "9"]);
    }

    #[test]
    fn a_full_page_asks_for_the_next_one() {
        let mut c = Cursor::new(node(), 0);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.request(now, "public", None);
        c.handle_page(page(7, 1, 5, 1..=2), now, &mut out);
        assert_eq!(seen(&mut out), ["1", "2"]);
        assert_eq!(c.due_at(now), Some(now));
        assert_eq!(c.request(now, "public", None).after, 2);
        c.handle_page(page(7, 1, 5, 3..=5), now, &mut out);
        assert_eq!(seen(&mut out), ["3", "4", "5"]);
        assert_eq!(c.due_at(now), Some(now + TAIL_CHECK), "only the tail check");
    }

    #[test]
    fn another_epoch_resets_the_cursor_to_the_start_of_the_new_history() {
        let mut c = caught_up(5, 7);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.handle_live(stored(6, 8), now, &mut out);
        assert!(out.is_empty(), "not delivered: another history");
        assert_eq!(c.due_at(now), Some(now));
        assert_eq!(c.request(now, "public", None).after, 5);
        c.handle_page(page(8, 2, 6, [6]), now, &mut out);
        assert_eq!(seen(&mut out), ["reset"]);
        assert_eq!(
            c.request(now, "public", None).after,
            1,
            "starts over from the new history's first offset"
        );
        c.handle_page(page(8, 2, 6, 2..=6), now, &mut out);
        assert_eq!(seen(&mut out), ["2", "3", "4", "5", "6"]);
        c.handle_live(stored(7, 7), now, &mut out);
        assert!(
            out.is_empty(),
            "the old history's offset 7 is not the new one's"
        );
        assert_eq!(c.due_at(now), Some(now), "and makes the peer look again");
    }

    #[test]
    fn failures_retry_with_growing_backoff_and_a_refusal_is_reported_once() {
        let mut c = Cursor::new(node(), 0);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.request(now, "public", None);
        c.handle_refused("not_member".into(), "no".into(), now, &mut out);
        assert_eq!(c.due_at(now), Some(now + RETRY_MIN));
        c.request(now, "public", None);
        c.handle_refused("not_member".into(), "no".into(), now, &mut out);
        assert_eq!(c.due_at(now), Some(now + RETRY_MIN * 2));
        c.request(now, "public", None);
        c.handle_failure(now);
        assert_eq!(c.due_at(now), Some(now + RETRY_MIN * 4));
        assert_eq!(seen(&mut out), ["refused not_member"]);
        let soon = now + Duration::from_millis(100);
        c.connected(soon);
        assert_eq!(
            c.due_at(now),
            Some(soon),
            "a reconnect brings the retry forward"
        );
    }

    #[test]
    fn a_caught_up_cursor_asks_once_more_after_a_gateway_connection_settles() {
        let mut c = caught_up(3, 7);
        let now = Instant::now();
        let mut out = VecDeque::new();
        let at = now + PIPE_SETTLE;
        c.connected(at);
        assert_eq!(c.due_at(now), Some(at));
        // A full page sent before then does not count as the recheck.
        c.handle_live(stored(5, 7), now, &mut out);
        assert_eq!(c.request(now, "public", None).after, 3);
        c.handle_page(page(7, 1, 5, [4, 5]), now, &mut out);
        assert_eq!(seen(&mut out), ["4", "5"]);
        assert_eq!(c.due_at(now), Some(at));
        assert_eq!(c.request(at, "public", None).after, 5);
        c.handle_page(page(7, 1, 6, [6]), at, &mut out);
        assert_eq!(seen(&mut out), ["6"]);
        assert_eq!(
            c.due_at(at),
            Some(at + TAIL_CHECK),
            "once; then the tail check, since history brought an item"
        );
    }

    #[test]
    fn a_page_that_makes_no_progress_is_asked_again_later_not_at_once() {
        let mut c = caught_up(3, 7);
        let now = Instant::now();
        let mut out = VecDeque::new();
        c.handle_live(stored(6, 7), now, &mut out);
        c.request(now, "public", None);
        c.handle_page(page(7, 1, 3, []), now, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.due_at(now), Some(now + RETRY_MIN));
    }

    #[test]
    fn events_held_ahead_of_a_gap_are_bounded_and_flow_once_the_gap_closes() {
        let mut c = caught_up(1, 7);
        let now = Instant::now();
        let mut out = VecDeque::new();
        let beyond = 3 + MAX_AHEAD_ITEMS as u64 + 10;
        for o in 3..beyond {
            c.handle_live(stored(o, 7), now, &mut out);
        }
        assert!(out.is_empty(), "2 is missing");
        assert_eq!(c.ahead.len(), MAX_AHEAD_ITEMS);
        assert!(c.ahead_bytes <= MAX_AHEAD_BYTES);
        let kept = 2 + MAX_AHEAD_ITEMS as u64;
        assert_eq!(
            c.ahead.keys().next_back(),
            Some(&kept),
            "the lowest are kept"
        );
        // The missing one arrives: it and everything held behind it go out, in order.
        c.handle_live(stored(2, 7), now, &mut out);
        let expected: Vec<String> = (2..=kept).map(|o| o.to_string()).collect();
        assert_eq!(seen(&mut out), expected);
        assert!(c.ahead.is_empty());
        assert_eq!(c.ahead_bytes, 0);
        // What did not fit comes from history.
        assert_eq!(c.request(now, "public", None).after, kept);
        c.handle_page(page(7, 1, beyond - 1, (kept + 1)..beyond), now, &mut out);
        assert_eq!(seen(&mut out).len(), (beyond - 1 - kept) as usize);
        assert_eq!(c.due_at(now), Some(now + TAIL_CHECK), "only the tail check");
    }

    #[test]
    fn stored_envelopes_become_core_events_and_publications_do_not() {
        let event = stored_event(&stored(3, 7)).expect("stored");
        assert_eq!(
            (event.offset, event.epoch, event.origin),
            (3, Epoch(7), Origin::Overlay)
        );
        let json: serde_json::Value = serde_json::from_slice(event.json()).expect("json");
        assert_eq!(json["type"], "event");
        assert_eq!(json["kind"], "published");
        assert_eq!(json["item"]["id"], "i3");
        let peer = identity::Keypair::generate_ed25519().public().to_peer_id();
        let publication = Envelope::publication(
            node(),
            ItemId::new("x").expect("id"),
            Payload::json(Bytes::from_static(b"1")).expect("json"),
            &peer,
            1,
        );
        assert!(stored_event(&publication).is_none());
        let mut retracted = stored(4, 7);
        retracted.kind = Kind::Retracted;
        retracted.payload = None;
        let event = stored_event(&retracted).expect("stored");
        assert!(matches!(&event.change, Change::Retracted(id) if id.as_str() == "i4"));
    }

    #[test]
    fn json_lines_are_single_line_json_in_the_websocket_shapes() {
        let mut pretty = stored(1, 7);
        pretty.payload =
            Some(Payload::json(Bytes::from_static(b"{\n  \"a\": 1\n}")).expect("json"));
        let event = PeerEvent::Event(Arc::new(stored_event(&pretty).expect("stored")));
        let lost = PeerEvent::Lost {
            node: node(),
            from: 1,
            to: 3,
        };
        let reset = PeerEvent::Reset { node: node() };
        for (e, code) in [
            (&event, None),
            (&lost, Some("events_lost")),
            (&reset, Some("epoch_changed")),
        ] {
            let line = e.json_line();
            assert!(!line.contains('\n'), "{line}");
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            assert_eq!(v["node"], "n1");
            match code {
                Some(code) => {
                    assert_eq!(v["type"], "error");
                    assert_eq!(v["code"], code);
                }
                None => assert_eq!(v["item"]["payload"]["a"], 1, "{v}"),
            }
        }
        let v: serde_json::Value = serde_json::from_str(&lost.json_line()).expect("json");
        assert_eq!((v["from"].as_u64(), v["to"].as_u64()), (Some(1), Some(3)));
    }

    #[tokio::test]
    async fn the_line_reader_splits_lines_and_refuses_long_ones_without_holding_them() {
        let input = b"{\"a\":1}\r\nxxxxxxxxxxxx\n\nlast";
        let mut input = tokio::io::BufReader::with_capacity(4, &input[..]);
        let mut lines = LineReader::new(10);
        let mut got = Vec::new();
        loop {
            match lines.next(&mut input).await.expect("read") {
                Line::End => break,
                line => got.push(line),
            }
        }
        assert_eq!(
            got,
            [
                Line::Text(b"{\"a\":1}\r".to_vec()),
                Line::TooLong,
                Line::Text(Vec::new()),
                Line::Text(b"last".to_vec()),
            ]
        );
    }

    #[test]
    fn configurations_are_checked_before_anything_starts() {
        let peer = identity::Keypair::generate_ed25519().public().to_peer_id();
        let gateway = identity::Keypair::generate_ed25519().public().to_peer_id();
        let good: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{gateway}")
            .parse()
            .expect("addr");
        let mut c = PeerConfig::new(vec![good.clone(), good.clone()]);
        c.subscribe = vec![node(), node()];
        let (gateways, nodes) = c.check(&peer).expect("valid");
        assert_eq!((gateways, nodes), (vec![gateway], vec![node()]));

        let mut bad = PeerConfig::new(vec!["/ip4/127.0.0.1/tcp/4001".parse().expect("addr")]);
        assert!(matches!(bad.check(&peer), Err(PeerError::Config(_))));
        bad.bootstrap.clear();
        assert!(matches!(bad.check(&peer), Err(PeerError::Config(_))));
        let mut bad = PeerConfig::new(vec![good.clone()]);
        bad.group = "Not A Group".into();
        assert!(matches!(bad.check(&peer), Err(PeerError::Config(_))));
        let mut bad = PeerConfig::new(vec![good.clone()]);
        bad.after.insert(node(), 3);
        assert!(
            matches!(bad.check(&peer), Err(PeerError::Config(_))),
            "after without subscribe"
        );
        let key = crate::group::GroupKey::generate();
        let mut bad = PeerConfig::new(vec![good]);
        bad.group = "lab".into();
        bad.credential = Some(Credential::issue(&key, "lab", gateway, now_secs() + 60));
        assert!(
            matches!(bad.check(&peer), Err(PeerError::Config(_))),
            "someone else's"
        );
        bad.credential = Some(Credential::issue(&key, "lab", peer, now_secs() + 60));
        assert!(bad.check(&peer).is_ok());
        bad.credential = Some(Credential::issue(&key, "lab", peer, now_secs() - 1));
        assert!(
            matches!(bad.check(&peer), Err(PeerError::Config(_))),
            "expired"
        );
    }

    #[test]
    fn resume_points_parse_from_node_equals_offset() {
        assert_eq!(
            parse_after("a/b=12").ok(),
            Some((NodeName::new("a/b").expect("n"), 12))
        );
        for bad in ["a", "a=", "a=-1", "=3", "a b=1"] {
            assert!(parse_after(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sequence_numbers_follow_the_clock_and_increase_even_when_it_does_not() {
        let last = AtomicU64::new(0);
        assert_eq!(next_seq(&last, 1_000), 1_000);
        assert_eq!(next_seq(&last, 1_000), 1_001, "same microsecond");
        assert_eq!(next_seq(&last, 900), 1_002, "clock went back");
        assert_eq!(next_seq(&last, 5_000), 5_000);
    }
}
