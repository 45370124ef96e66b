//! The gateway side of the overlay: one node = one propagate pipe.
//!
//! - **Bus → pipes**: every node of a group this gateway carries has a *feeder*, one bus
//!   subscription that publishes each stored event, whatever its origin, into the node's
//!   pipe as an envelope with its offset and epoch. Peers receive items from there, in offset
//!   order, and catch up by offset when gossip missed one.
//! - **Pipes → Bus**: a member peer's publication (an envelope without an offset, already
//!   validated by the overlay node: signed by the publisher it names, from a member of the
//!   group) becomes a bus publish by that peer, subject to the node's publish model. Its
//!   stored event then goes out through the feeder with an offset; raw publications are never
//!   forwarded as items, and stored events are never taken back in, so nothing loops — also
//!   with several gateways in one overlay. The publication's identity is the publish's
//!   idempotency key, so a copy that reaches the gateway twice is stored once.
//! - **Catch-up**: [`StoreCatchUp`] answers from the store's history.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use juxta_core::{
    Affiliation, Bus, Change, Delivery, Error, Event, Grants, NodeName, Origin, Pattern, Principal,
    Publish, PublishModel, Resume, Subscription,
};
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catchup::{self, CatchUpRequest, CatchUpResponse, Page};
use crate::envelope::{BATCH_OVERHEAD, Envelope, MAX_BATCH, MAX_ENVELOPE_BYTES, encode_message};
use crate::node::{CatchUpSource, Overlay, OverlayEvent};

/// How often the gateway looks for nodes created (or deleted) since.
pub const NODE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A busy pipe sends at most one message per this period: the events its node stored
/// meanwhile go out together as one batch (see [`crate::envelope`]), so that each member checks
/// one signature for them instead of one per event. A pipe that was quiet for this long sends
/// its next event at once.
pub const PIPE_COALESCE: Duration = Duration::from_millis(4);

/// How long the bridge trusts that a node of a group it does not carry stays out of it.
const SKIPPED_RECHECK: Duration = Duration::from_secs(30);

/// Answers catch-up requests from the store's history.
#[derive(Clone, Debug)]
pub struct StoreCatchUp {
    bus: Bus,
}

impl StoreCatchUp {
    /// Serves `bus`'s store.
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    async fn serve(bus: Bus, request: CatchUpRequest) -> CatchUpResponse {
        let Ok(node) = NodeName::new(&request.node) else {
            return CatchUpResponse::refused("bad_request", "not a node name");
        };
        let limit = request.limit.clamp(1, catchup::MAX_PAGE_ITEMS) as usize;
        let page = match bus.store().read(&node, request.after, limit).await {
            Ok(p) => p,
            Err(Error::NodeNotFound(_)) => {
                return CatchUpResponse::refused("node_not_found", "no such node");
            }
            Err(e) => return CatchUpResponse::refused("unavailable", e.to_string()),
        };
        if page.meta.config.group != request.group {
            // Not in the group the peer proved membership of: as if it did not exist.
            return CatchUpResponse::refused("node_not_found", "no such node in this group");
        }
        let mut items = Vec::with_capacity(page.records.len());
        let mut bytes = 0;
        for record in page.records {
            let event = Event::new(node.clone(), page.meta.epoch, record, Origin::History);
            let encoded = Envelope::from_event(&event).encode();
            bytes += encoded.len();
            if bytes > catchup::MAX_PAGE_BYTES && !items.is_empty() {
                break;
            }
            items.push(serde_bytes::ByteBuf::from(encoded));
        }
        CatchUpResponse::Page(Page {
            epoch: page.meta.epoch.0,
            first_offset: page.meta.first_offset,
            last_offset: page.meta.last_offset,
            items,
        })
    }
}

impl CatchUpSource for StoreCatchUp {
    fn page(
        &self,
        _peer: PeerId,
        request: CatchUpRequest,
    ) -> Pin<Box<dyn Future<Output = CatchUpResponse> + Send>> {
        Box::pin(Self::serve(self.bus.clone(), request))
    }
}

/// What the bridge counts, for metrics.
pub trait BridgeObserver: Send + Sync + 'static {
    /// A pipe message was rejected (by the overlay's validation, or here); `reason` is a
    /// stable code.
    fn rejected(&self, reason: &str);
    /// A peer's publication was stored.
    fn ingested(&self);
    /// A stored event went into a pipe.
    fn egressed(&self);
}

/// Runs the bridge until `shutdown`: feeders for every node of the `groups` this gateway
/// carries, and peers' publications into the bus.
pub async fn run(
    bus: Bus,
    overlay: Overlay,
    mut events: mpsc::Receiver<OverlayEvent>,
    groups: Vec<String>,
    advert_ttl: Duration,
    observer: Arc<dyn BridgeObserver>,
    shutdown: CancellationToken,
) {
    // Scanning talks to the overlay node and waits for its answers, so it runs on a task
    // of its own: the node's task may be waiting for this loop to take its events.
    let scanning = shutdown.child_token();
    tokio::spawn(scan_loop(
        bus.clone(),
        overlay,
        groups,
        advert_ttl,
        observer.clone(),
        scanning.clone(),
    ));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = events.recv() => match event {
                None => break,
                Some(OverlayEvent::ItemReceived { group, envelope, source }) => {
                    if envelope.offset.is_none() {
                        if let Err(reason) = ingest(&bus, &group, envelope, source).await {
                            tracing::debug!(%source, reason, "overlay: refused a peer's publication");
                            observer.rejected(reason);
                        } else {
                            observer.ingested();
                        }
                    }
                }
                Some(OverlayEvent::MessageRejected { reason, .. } | OverlayEvent::Refused { reason, .. }) => observer.rejected(reason),
                Some(_) => {}
            },
        }
    }
    // Ends the scanner and, through it, the feeders.
    scanning.cancel();
}

/// Every [`NODE_SCAN_INTERVAL`]: feeders for new nodes, and the advertisements.
async fn scan_loop(
    bus: Bus,
    overlay: Overlay,
    groups: Vec<String>,
    advert_ttl: Duration,
    observer: Arc<dyn BridgeObserver>,
    shutdown: CancellationToken,
) {
    let mut feeders: HashMap<NodeName, (String, CancellationToken)> = HashMap::new();
    let mut skipped = (HashSet::new(), tokio::time::Instant::now());
    let mut scan = tokio::time::interval(NODE_SCAN_INTERVAL);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut adverts = Adverts::new(advert_ttl);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = scan.tick() => {
                scan_nodes(
                    &bus,
                    &overlay,
                    &groups,
                    &mut feeders,
                    &mut skipped,
                    &observer,
                    &shutdown,
                )
                .await;
                adverts.refresh(&overlay, &groups, &feeders).await;
            }
        }
    }
    for (_, token) in feeders.values() {
        token.cancel();
    }
}

/// The gateway's advertisements: one per carried group, listing its nodes, published again
/// when the nodes change and before it expires.
struct Adverts {
    ttl: Duration,
    /// Per group: the nodes advertised last, and when.
    last: HashMap<String, (Vec<String>, tokio::time::Instant)>,
}

impl Adverts {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: HashMap::new(),
        }
    }

    async fn refresh(
        &mut self,
        overlay: &Overlay,
        groups: &[String],
        feeders: &HashMap<NodeName, (String, CancellationToken)>,
    ) {
        for group in groups {
            let mut nodes: Vec<String> = feeders
                .iter()
                .filter(|(_, (g, token))| g == group && !token.is_cancelled())
                .map(|(n, _)| n.as_str().to_owned())
                .collect();
            nodes.sort();
            let due = match self.last.get(group) {
                None => true,
                Some((before, at)) => *before != nodes || at.elapsed() >= self.ttl / 2,
            };
            if !due {
                continue;
            }
            match overlay.advertise(group, nodes.clone()).await {
                Ok(()) => {
                    self.last
                        .insert(group.clone(), (nodes, tokio::time::Instant::now()));
                }
                Err(e) => tracing::warn!(%group, error = %e, "overlay: advertising failed"),
            }
        }
    }
}

/// Starts feeders for new nodes of carried groups; forgets ended ones.
async fn scan_nodes(
    bus: &Bus,
    overlay: &Overlay,
    groups: &[String],
    feeders: &mut HashMap<NodeName, (String, CancellationToken)>,
    skipped: &mut (HashSet<NodeName>, tokio::time::Instant),
    observer: &Arc<dyn BridgeObserver>,
    shutdown: &CancellationToken,
) {
    feeders.retain(|_, (_, token)| !token.is_cancelled());
    // Names only (one cheap read however many nodes there are); a node's configuration is
    // read when it is new here, and again for nodes of other groups now and then (their
    // group may change).
    let names = match bus.store().node_names().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "overlay: listing nodes failed");
            return;
        }
    };
    if skipped.1.elapsed() >= SKIPPED_RECHECK {
        skipped.0.clear();
        skipped.1 = tokio::time::Instant::now();
    }
    skipped.0.retain(|n| names.binary_search(n).is_ok());
    for name in names {
        if feeders.contains_key(&name) || skipped.0.contains(&name) {
            continue;
        }
        let meta = match bus.store().node(&name).await {
            Ok(Some(meta)) => meta,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "overlay: reading a node failed");
                return;
            }
        };
        if !groups.contains(&meta.config.group) {
            skipped.0.insert(name);
            continue;
        }
        let group = meta.config.group.clone();
        if let Err(e) = overlay.subscribe(&group, meta.name.as_str()).await {
            tracing::warn!(node = %meta.name, error = %e, "overlay: joining a pipe failed");
            continue;
        }
        let token = shutdown.child_token();
        feeders.insert(meta.name.clone(), (group.clone(), token.clone()));
        tokio::spawn(feed(
            bus.clone(),
            overlay.clone(),
            meta.name,
            group,
            observer.clone(),
            token,
        ));
    }
}

/// Publishes `node`'s events into its pipe until the node is deleted or `token` cancelled
/// (then the token is cancelled, so the next scan may start a new feeder). Events that are
/// ready together — or stored within [`PIPE_COALESCE`] of the previous message — go out as one
/// batch.
async fn feed(
    bus: Bus,
    overlay: Overlay,
    node: NodeName,
    group: String,
    observer: Arc<dyn BridgeObserver>,
    token: CancellationToken,
) {
    let mut sub = match bus
        .subscribe(&Principal::Admin, &node, Resume::default())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%node, error = %e, "overlay: feeder could not subscribe");
            token.cancel();
            return;
        }
    };
    let mut last_sent: Option<tokio::time::Instant> = None;
    // An event that did not fit into the previous message.
    let mut carried: Option<Arc<Event>> = None;
    loop {
        let first = match carried.take() {
            Some(event) => event,
            None => {
                let delivery = tokio::select! {
                    () = token.cancelled() => return,
                    d = sub.next() => d,
                };
                match delivery {
                    Some(Ok(Delivery::Event(event))) => event,
                    // Missed events are in history: peers catch up by offset.
                    Some(Ok(Delivery::Lost { .. })) => continue,
                    Some(Err(e)) => {
                        tracing::debug!(%node, error = %e, "overlay: feeder ended");
                        break;
                    }
                    None => break,
                }
            }
        };
        if let Some(due) = last_sent.map(|at| at + PIPE_COALESCE)
            && due > tokio::time::Instant::now()
        {
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep_until(due) => {}
            }
        }
        let (message, events, deleted) = batch(&mut sub, &first, &mut carried);
        // No peer in the pipe yet is normal: peers catch up by offset when they join.
        match overlay.publish_encoded(&group, &node, message).await {
            Ok(()) => (0..events).for_each(|_| observer.egressed()),
            Err(e) => tracing::trace!(%node, error = %e, "overlay: pipe publish"),
        }
        last_sent = Some(tokio::time::Instant::now());
        if deleted {
            break;
        }
    }
    token.cancel();
}

/// One pipe message: `first` and whatever `sub` has ready after it, up to [`MAX_BATCH`]
/// events and [`MAX_ENVELOPE_BYTES`]; an event that does not fit is left in `carried`.
/// Returns the message, its number of events and whether the last is the node's deletion.
fn batch(
    sub: &mut Subscription,
    first: &Event,
    carried: &mut Option<Arc<Event>>,
) -> (Vec<u8>, usize, bool) {
    let one = Envelope::from_event(first).encode();
    let mut size = one.len() + BATCH_OVERHEAD;
    let mut encoded = vec![one];
    let mut deleted = matches!(first.change, Change::Deleted);
    let mut last = first.offset;
    while !deleted && encoded.len() < MAX_BATCH {
        match sub.try_next() {
            Some(Delivery::Event(event)) => {
                let e = Envelope::from_event(&event).encode();
                if size + e.len() > MAX_ENVELOPE_BYTES
                    || event.epoch != first.epoch
                    || event.offset <= last
                {
                    *carried = Some(event);
                    break;
                }
                size += e.len();
                last = event.offset;
                deleted = matches!(event.change, Change::Deleted);
                encoded.push(e);
            }
            Some(Delivery::Lost { .. }) => {}
            None => break,
        }
    }
    let events = encoded.len();
    (encode_message(encoded), events, deleted)
}

/// Stores a member peer's publication; `Err` with a stable reason when it may not be.
async fn ingest(
    bus: &Bus,
    group: &str,
    envelope: Envelope,
    source: PeerId,
) -> Result<(), &'static str> {
    let (Some(id), Some(payload)) = (envelope.item_id.clone(), envelope.payload.clone()) else {
        return Err("invalid");
    };
    let node = envelope.node.clone();
    let meta = bus
        .store()
        .node(&node)
        .await
        .map_err(|_| "unavailable")?
        .ok_or("unknown_node")?;
    if meta.config.group != group {
        return Err("wrong_group");
    }
    let peer = source.to_string();
    let allowed = match meta.config.publish_model {
        PublishModel::Open | PublishModel::Subscribers => true,
        PublishModel::Publishers => bus
            .store()
            .affiliations(&node)
            .await
            .map_err(|_| "unavailable")?
            .iter()
            .any(|(who, a)| {
                **who == *peer
                    && matches!(
                        a,
                        Affiliation::Owner | Affiliation::Publisher | Affiliation::PublishOnly
                    )
            }),
    };
    if !allowed {
        return Err("forbidden");
    }
    let who = Principal::Subject {
        name: Arc::from(peer.as_str()),
        grants: Arc::new(Grants {
            publish: vec![Pattern::new(node.as_str())],
            subscribe: Vec::new(),
            admin: false,
        }),
    };
    let key: String = envelope
        .message_id()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    bus.publish(
        &who,
        Publish {
            node,
            id: Some(id),
            payload,
            idempotency_key: Some(key),
        },
        Origin::Overlay,
    )
    .await
    .map(|_| ())
    .map_err(|e| e.code())
}
