//! The overlay node: one libp2p swarm, driven by one task, used through an [`Overlay`]
//! handle.
//!
//! Transports: TCP and WebSocket (Noise + Yamux), QUIC, DNS, and circuit relay v2 as a
//! client. Behaviours: identify, ping, gossipsub (the propagate pipes), Kademlia,
//! rendezvous, relay, DCUtR, AutoNAT and the catch-up protocol ([`crate::catchup`]).
//! Gateways ([`Role::Gateway`]) also run the relay and rendezvous servers and Kademlia in
//! server mode; edge peers ([`Role::Edge`]) only the clients.
//!
//! Every pipe message is validated before gossipsub forwards it: it must decode, name the
//! topic's node, be signed by the peer it names as publisher, and come from a member of
//! the group (a stored event, which carries an offset, only from a trusted gateway).
//! Rejected messages are not forwarded, their senders are penalised by gossipsub's peer
//! scoring, and each rejection is reported as [`OverlayEvent::MessageRejected`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, TopicHash};
use libp2p::kad::store::RecordStore as _;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, connection_limits, dcutr, identify, identity, kad, noise,
    ping, relay, rendezvous, tcp, yamux,
};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::advert::{self, AdvertRole, Advertisement};
use crate::catchup::{self, CatchUpRequest, CatchUpResponse};
use crate::envelope::Envelope;
use crate::group::{Credential, Group};

/// The identify protocol version juxta peers announce.
pub const PROTOCOL_VERSION: &str = "/juxta/1.0.0";
/// The Kademlia protocol of juxta overlays (kept apart from the public IPFS DHT).
pub const KAD_PROTOCOL: libp2p::StreamProtocol = libp2p::StreamProtocol::new("/juxta/kad/1.0.0");
/// Topic prefix of every propagate pipe.
pub const TOPIC_PREFIX: &str = "juxta/";
/// Default time a connection with nothing open stays up: long, because subscriptions are.
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default gossipsub heartbeat.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(700);
/// Most message ids one IHAVE or IWANT carries: 400 ids of 32 bytes (each 34 on the wire)
/// are 13.6 KB, inside the 16 KiB of control data a default gossipsub receiver accepts
/// per RPC. A longer list is cut to a random 400 (gossipsub's own truncation); what gossip
/// leaves out, edge peers still get from the gateway's flood publish or from catch-up.
pub const MAX_GOSSIP_IDS: usize = 400;
/// Most control bytes (IHAVE, IWANT, GRAFT, PRUNE, subscriptions) accepted in one RPC: room
/// for the 5000-id lists go-libp2p and js-libp2p send by default, with ids up to ~50 bytes.
pub const MAX_CONTROL_BYTES: usize = 256 * 1024;
/// Most pipes (topics) one peer may subscribe to.
pub const MAX_TOPICS_PER_PEER: usize = 10_000;
/// Commands queued to the swarm task before callers wait.
const COMMAND_QUEUE: usize = 1024;
/// Events queued for the owner of the overlay before the swarm task waits.
const EVENT_QUEUE: usize = 4096;
/// Catch-up pages read and waiting to be sent (the tasks reading them wait when it is full;
/// each peer has at most `Limits::max_catch_ups_per_peer` of them).
const ANSWER_QUEUE: usize = 256;
/// How often an edge peer looks for other members of its groups at its rendezvous points
/// (and dials the new ones).
const MEMBER_DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);
/// Most other members an edge peer dials by itself (gossipsub's mesh wants about 6).
const MAX_MEMBER_DIALS: usize = 8;
/// Longest wait for a catch-up answer; the edge peer asks again after it.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a rendezvous point's answer.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what one peer may hold open at this node; beyond them requests are refused and
/// counted ([`OverlayEvent::Refused`]) while everyone else is served.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections one peer may have established with this node.
    pub max_connections_per_peer: u32,
    /// Incoming connections established at once, in all.
    pub max_established_incoming: u32,
    /// Incoming connections still handshaking at once, in all.
    pub max_pending_incoming: u32,
    /// Catch-up requests of one peer being answered at once.
    pub max_catch_ups_per_peer: usize,
    /// Relay reservations in all (gateways).
    pub max_reservations: usize,
    /// Relay reservations one peer may hold (gateways).
    pub max_reservations_per_peer: usize,
    /// Relayed circuits in all (gateways).
    pub max_circuits: usize,
    /// Relayed circuits one peer may have (gateways).
    pub max_circuits_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections_per_peer: 8,
            max_established_incoming: 10_000,
            max_pending_incoming: 512,
            max_catch_ups_per_peer: 8,
            max_reservations: 4096,
            max_reservations_per_peer: 4,
            max_circuits: 4096,
            max_circuits_per_peer: 64,
        }
    }
}

/// The pipe (gossipsub topic) of `node` in `group`: `juxta/<group>/<node>`.
pub fn topic(group: &str, node: &str) -> IdentTopic {
    IdentTopic::new(format!("{TOPIC_PREFIX}{group}/{node}"))
}

/// The group and node a pipe's topic names.
pub fn parse_topic(topic: &TopicHash) -> Option<(&str, &str)> {
    topic.as_str().strip_prefix(TOPIC_PREFIX)?.split_once('/')
}

/// What a node does in the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A gateway: relay, rendezvous and Kademlia server, catch-up server.
    Gateway,
    /// An edge peer: clients only.
    Edge,
}

/// How to build an overlay node.
#[derive(Clone, Debug)]
pub struct Config {
    /// What this node is.
    pub role: Role,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/4001`, `/ip4/0.0.0.0/udp/4001/quic-v1`, …).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start; a `/p2p/<id>` suffix makes that peer trusted to send stored
    /// events.
    pub bootstrap: Vec<Multiaddr>,
    /// Groups whose pipes this node carries.
    pub groups: Vec<Group>,
    /// Time an unused connection stays up.
    pub idle_connection_timeout: Duration,
    /// Gossipsub heartbeat interval.
    pub heartbeat: Duration,
    /// Addresses others reach this node at, beyond what it listens on (a gateway behind a
    /// port forward or load balancer). A gateway also counts its concrete listen addresses
    /// (loopback ones only when it listens on nothing else).
    pub external: Vec<Multiaddr>,
    /// Lifetime of this node's advertisements (and rendezvous registrations); they are
    /// refreshed at half of it.
    pub advert_ttl: Duration,
    /// Per-peer and total bounds.
    pub limits: Limits,
    /// Where gossipsub records its own metrics (messages received per topic with and
    /// without duplicates, mesh sizes …), when given.
    pub gossip_metrics: Option<Arc<parking_lot::Mutex<prometheus_client::registry::Registry>>>,
}

impl Config {
    /// Defaults for `role`: no listen address, no bootstrap, the `public` group.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            groups: vec![Group::public()],
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT,
            external: Vec::new(),
            advert_ttl: advert::DEFAULT_ADVERT_TTL,
            limits: Limits::default(),
            gossip_metrics: None,
        }
    }
}

/// Why the overlay could not do something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// Building the swarm failed.
    #[error("building the overlay node: {0}")]
    Build(String),
    /// A listen address could not be used.
    #[error("listening on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The group is not one this node carries.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// No peer has joined the pipe yet (or none is reachable): gossipsub sends nowhere.
    /// Transient right after joining; peers that join later catch up.
    #[error("no peer in the pipe yet")]
    NoPeers,
    /// Gossipsub refused to publish (duplicate, too large …).
    #[error("publishing: {0}")]
    Publish(String),
    /// Subscribing failed.
    #[error("subscribing: {0}")]
    Subscribe(String),
    /// Dialing failed.
    #[error("dialing: {0}")]
    Dial(String),
    /// The catch-up request failed (not answered, connection lost, refused stream …).
    #[error("catch-up request: {0}")]
    CatchUp(String),
    /// A Kademlia or rendezvous lookup failed.
    #[error("lookup: {0}")]
    Lookup(String),
    /// The node's task has stopped.
    #[error("the overlay node has stopped")]
    Stopped,
}

/// Answers catch-up requests; gateways implement it over their store.
pub trait CatchUpSource: Send + Sync + 'static {
    /// The answer to `request` from `peer`. The credential in it has been checked already
    /// for protected groups.
    fn page(
        &self,
        peer: PeerId,
        request: CatchUpRequest,
    ) -> Pin<Box<dyn Future<Output = CatchUpResponse> + Send>>;
}

/// What the overlay reports to its owner.
#[derive(Debug)]
#[non_exhaustive]
pub enum OverlayEvent {
    /// A valid pipe message arrived (and gossipsub forwards it).
    ItemReceived {
        /// The group of the pipe.
        group: String,
        /// The message.
        envelope: Envelope,
        /// The peer that signed it.
        source: PeerId,
    },
    /// A pipe message was rejected; `reason` is a stable code for metrics.
    MessageRejected {
        /// Why.
        reason: &'static str,
        /// The peer that forwarded it to us.
        from: PeerId,
    },
    /// Listening on a new address.
    Listening(Multiaddr),
    /// A peer's first connection came up.
    PeerConnected(PeerId),
    /// A peer's last connection went down.
    PeerDisconnected(PeerId),
    /// Something a peer asked for was refused to protect this node (a limit was reached, a
    /// record did not check out); `reason` is a stable code for metrics.
    Refused {
        /// Why: `connection_limit`, `catch_up_limit`, `relay_reservation_denied`,
        /// `relay_circuit_denied`, `provider_key`, or an `advert_*` code.
        reason: &'static str,
        /// The peer, when known.
        peer: Option<PeerId>,
    },
    /// A hole punch (DCUtR) through a relayed connection ended.
    HolePunch {
        /// The other peer.
        peer: PeerId,
        /// Whether a direct connection now exists.
        direct: bool,
    },
}

/// The composed behaviour.
#[allow(
    missing_debug_implementations,
    reason = "libp2p behaviours are not Debug"
)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour<
        gossipsub::IdentityTransform,
        gossipsub::MaxCountSubscriptionFilter<PipeFilter>,
    >,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    rendezvous_server: Toggle<rendezvous::server::Behaviour>,
    rendezvous_client: rendezvous::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    catchup: request_response::cbor::Behaviour<CatchUpRequest, CatchUpResponse>,
}

/// Peers may subscribe only to juxta pipes.
#[derive(Debug, Default, Clone, Copy)]
pub struct PipeFilter;

impl gossipsub::TopicSubscriptionFilter for PipeFilter {
    fn can_subscribe(&mut self, topic: &TopicHash) -> bool {
        parse_topic(topic).is_some()
    }
}

/// Only juxta pipes, and many of them: gossipsub's default filter stops at 100 topics,
/// fewer than a gateway bridges.
fn pipe_filter() -> gossipsub::MaxCountSubscriptionFilter<PipeFilter> {
    gossipsub::MaxCountSubscriptionFilter {
        filter: PipeFilter,
        max_subscribed_topics: MAX_TOPICS_PER_PEER,
        max_subscriptions_per_request: MAX_TOPICS_PER_PEER,
    }
}

type Reply<T> = oneshot::Sender<Result<T, OverlayError>>;

enum Command {
    Subscribe(IdentTopic, Reply<()>),
    Publish(IdentTopic, Vec<u8>, Reply<()>),
    CatchUp(PeerId, CatchUpRequest, Reply<CatchUpResponse>),
    Dial(Multiaddr, Reply<()>),
    Admit(PeerId, Credential),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    TopicPeers(IdentTopic, oneshot::Sender<usize>),
    TopicPeerIds(IdentTopic, oneshot::Sender<Vec<PeerId>>),
    Advertise(String, Vec<String>, Reply<()>),
    GetProviders(kad::RecordKey, Reply<HashSet<PeerId>>),
    GetRecord(kad::RecordKey, Reply<Vec<kad::Record>>),
    RendezvousDiscover(String, PeerId, Reply<Vec<(PeerId, Vec<Multiaddr>)>>),
    PutRecord(kad::Record, Reply<()>),
    Listen(Multiaddr, Reply<()>),
}

/// A handle to a running overlay node. Cheap to clone; the node stops when every handle
/// is dropped.
#[derive(Clone, Debug)]
pub struct Overlay {
    commands: mpsc::Sender<Command>,
    local: PeerId,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Gossipsub's settings: the same for every pipe; `gateway` picks the mesh of a gateway
/// (gossipsub's defaults) or of an edge peer (small).
fn gossip_config(gateway: bool, heartbeat: Duration) -> Result<gossipsub::Config, OverlayError> {
    let mut gossip_builder = gossipsub::ConfigBuilder::default();
    if !gateway {
        // Edge peers get every stored event straight from a gateway (which floods its
        // publications to every peer in the pipe); their mesh among themselves is a
        // second path, kept to one peer (two at most): each extra mesh peer is one more
        // copy of every item to receive, signature-check and drop (measured: 1.6 copies
        // per delivery with two, 0.4 with one, tests/BENCHMARKS.md).
        gossip_builder
            .mesh_n_low(1)
            .mesh_n(1)
            .mesh_n_high(2)
            .mesh_outbound_min(0)
            .gossip_lazy(3);
    }
    gossip_builder
        .heartbeat_interval(heartbeat)
        .heartbeat_initial_delay(Duration::from_millis(100))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(crate::envelope::MAX_ENVELOPE_BYTES + 4096)
        // gossipsub 0.50 gossips up to 5000 message ids per IHAVE (and asks for as many
        // in an IWANT), ~170 KB, yet by default refuses an RPC whose control part is over
        // 16 KiB — and drops the connection's whole inbound stream with it, so a busy
        // pipe cut its own members off. Send lists that fit any receiver's default;
        // accept the longest lists other implementations send.
        .max_control_messages_sent(MAX_GOSSIP_IDS)
        .max_control_message_size(MAX_CONTROL_BYTES)
        .message_id_fn(|m: &gossipsub::Message| {
            // The publication's identity, or a batch's node, epoch and offsets (see
            // `envelope::message_id`); undecodable data gets a content hash and is rejected
            // in validation anyway.
            gossipsub::MessageId::new(&match crate::envelope::decode_message(&m.data) {
                Ok(e) => crate::envelope::message_id(&e),
                Err(_) => {
                    use sha2::Digest as _;
                    sha2::Sha256::digest(&m.data).to_vec()
                }
            })
        })
        .build()
        .map_err(|e| OverlayError::Build(e.to_string()))
}

impl Overlay {
    /// Builds the node, starts listening and dialing, and runs it on the current tokio
    /// runtime. Events go to the returned receiver (keep reading it: the node waits when it
    /// is full). `metrics` (made with `libp2p::metrics::Metrics::new` on the process's
    /// registry) records the behaviours' events; `catch_up` answers other peers' catch-up
    /// requests (gateways).
    pub async fn spawn(
        keypair: identity::Keypair,
        config: Config,
        metrics: Option<libp2p::metrics::Metrics>,
        catch_up: Option<Arc<dyn CatchUpSource>>,
    ) -> Result<(Self, mpsc::Receiver<OverlayEvent>), OverlayError> {
        let local = keypair.public().to_peer_id();
        let signer = keypair.clone();
        let gateway = config.role == Role::Gateway;
        let limits = config.limits;
        let advert_ttl = config.advert_ttl;
        let gossip_metrics = config.gossip_metrics.clone();
        let alone = config.bootstrap.is_empty();
        let gossip_config = gossip_config(gateway, config.heartbeat)?;
        let mut metrics = metrics;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| OverlayError::Build(e.to_string()))?
            .with_quic()
            .with_dns()
            .map_err(|e| OverlayError::Build(e.to_string()))?
            .with_websocket(noise::Config::new, yamux::Config::default)
            .await
            .map_err(|e| OverlayError::Build(e.to_string()))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| OverlayError::Build(e.to_string()))?
            .with_behaviour(|key, relay_client| {
                let peer = key.public().to_peer_id();
                let mut gossipsub = gossipsub::Behaviour::new_with_subscription_filter(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                    pipe_filter(),
                )?;
                if let Some(registry) = &gossip_metrics {
                    gossipsub = gossipsub
                        .with_metrics(&mut registry.lock(), gossipsub::MetricsConfig::default());
                }
                let mut kad_config = kad::Config::new(KAD_PROTOCOL);
                if alone {
                    // Nothing to bootstrap from until peers dial in.
                    kad_config.set_periodic_bootstrap_interval(None);
                }
                // Advertisements: every stored record is checked first (`kad_inbound`);
                // this node refreshes its own, Kademlia republishes provider records.
                kad_config
                    .set_max_packet_size(advert::MAX_ADVERT_BYTES + 16 * 1024)
                    .set_record_filtering(kad::StoreInserts::FilterBoth)
                    .set_record_ttl(Some(advert_ttl))
                    .set_publication_interval(None)
                    .set_provider_record_ttl(Some(advert_ttl))
                    .set_provider_publication_interval(Some(advert_ttl / 2));
                let store = kad::store::MemoryStore::with_config(
                    peer,
                    kad::store::MemoryStoreConfig {
                        max_records: 65_536,
                        max_value_bytes: advert::MAX_ADVERT_BYTES,
                        max_providers_per_key: 1024,
                        max_provided_keys: 65_536,
                    },
                );
                let mut kad = kad::Behaviour::with_config(peer, store, kad_config);
                if gateway {
                    kad.set_mode(Some(kad::Mode::Server));
                }
                let relay_config = relay::Config {
                    // Long-lived subscriptions go through circuits: no 2-minute / 128 KiB
                    // cut-off; reservations and circuits stay bounded in number.
                    max_circuit_duration: Duration::from_secs(24 * 3600),
                    max_circuit_bytes: 0,
                    max_reservations: limits.max_reservations,
                    max_reservations_per_peer: limits.max_reservations_per_peer,
                    max_circuits: limits.max_circuits,
                    max_circuits_per_peer: limits.max_circuits_per_peer,
                    ..relay::Config::default()
                };
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(
                        connection_limits::ConnectionLimits::default()
                            .with_max_established_per_peer(Some(limits.max_connections_per_peer))
                            .with_max_established_incoming(Some(limits.max_established_incoming))
                            .with_max_pending_incoming(Some(limits.max_pending_incoming)),
                    ),
                    identify: identify::Behaviour::new(identify::Config::new(
                        PROTOCOL_VERSION.to_owned(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::default(),
                    gossipsub,
                    kad,
                    rendezvous_server: Toggle::from(gateway.then(|| {
                        rendezvous::server::Behaviour::new(rendezvous::server::Config::default())
                    })),
                    rendezvous_client: rendezvous::client::Behaviour::new(key.clone()),
                    relay_server: Toggle::from(
                        gateway.then(|| relay::Behaviour::new(peer, relay_config)),
                    ),
                    relay_client,
                    dcutr: dcutr::Behaviour::new(peer),
                    autonat: autonat::Behaviour::new(peer, autonat::Config::default()),
                    catchup: request_response::cbor::Behaviour::with_codec(
                        request_response::cbor::codec::Codec::default()
                            .set_request_size_maximum(catchup::MAX_REQUEST_BYTES)
                            .set_response_size_maximum(catchup::MAX_RESPONSE_BYTES),
                        [(catchup::PROTOCOL, ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(CATCH_UP_TIMEOUT)
                            // Streams beyond this are dropped by libp2p unanswered; below
                            // it, `max_catch_ups_per_peer` refuses with a reason, counted.
                            .with_max_concurrent_streams(limits.max_catch_ups_per_peer.max(8) * 8),
                    ),
                })
            })
            .map_err(|e| OverlayError::Build(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
            .build();

        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| OverlayError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        for addr in &config.external {
            swarm.add_external_address(addr.clone());
        }
        let mut trusted = HashSet::new();
        for addr in &config.bootstrap {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                trusted.insert(peer);
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            swarm
                .dial(addr.clone())
                .map_err(|e| OverlayError::Dial(e.to_string()))?;
        }
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, event_rx) = mpsc::channel(EVENT_QUEUE);
        let groups = config
            .groups
            .iter()
            .map(|g| (g.name.clone(), g.clone()))
            .collect();
        let loopback_only = config.listen.iter().all(is_loopback);
        let task = Task {
            role: config.role,
            signer,
            advert_ttl,
            limits,
            loopback_only,
            relay_listeners: HashMap::new(),
            reserved_at: HashSet::new(),
            registered: HashMap::new(),
            kad_providers: HashMap::new(),
            kad_records: HashMap::new(),
            pending_rendezvous: HashMap::new(),
            provided: HashMap::new(),
            catch_ups_in_flight: HashMap::new(),
            swarm,
            events,
            groups,
            trusted,
            credentials: Arc::new(RwLock::new(HashMap::new())),
            catch_up,
            pending_catch_up: HashMap::new(),
            answers: mpsc::channel(ANSWER_QUEUE),
            metrics: metrics.take(),
        };
        tokio::spawn(task.run(command_rx));
        Ok((Self { commands, local }, event_rx))
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)?
    }

    /// Joins the pipe of `node` in `group`.
    pub async fn subscribe(&self, group: &str, node: &str) -> Result<(), OverlayError> {
        let t = topic(group, node);
        self.call(|r| Command::Subscribe(t, r)).await
    }

    /// Publishes `envelope` into its pipe in `group`. Fails when no peer has joined the
    /// pipe yet (gossipsub sends nowhere then); catch-up covers peers that join later.
    pub async fn publish(&self, group: &str, envelope: &Envelope) -> Result<(), OverlayError> {
        self.publish_encoded(group, &envelope.node, envelope.encode())
            .await
    }

    /// Publishes one pipe message of `node`, already encoded: an envelope or a batch
    /// ([`crate::envelope::encode_message`]).
    pub async fn publish_encoded(
        &self,
        group: &str,
        node: &juxta_core::NodeName,
        data: Vec<u8>,
    ) -> Result<(), OverlayError> {
        let t = topic(group, node.as_str());
        self.call(|r| Command::Publish(t, data, r)).await
    }

    /// Asks `peer` (a gateway) for a page of `request.node`'s history.
    pub async fn catch_up(
        &self,
        peer: PeerId,
        request: CatchUpRequest,
    ) -> Result<CatchUpResponse, OverlayError> {
        self.call(|r| Command::CatchUp(peer, request, r)).await
    }

    /// Dials `addr`.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), OverlayError> {
        self.call(|r| Command::Dial(addr, r)).await
    }

    /// Records a verified membership credential of `peer` (so its publications in that
    /// group are accepted).
    pub async fn admit(&self, peer: PeerId, credential: Credential) -> Result<(), OverlayError> {
        self.commands
            .send(Command::Admit(peer, credential))
            .await
            .map_err(|_| OverlayError::Stopped)
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::ListenAddrs(tx))
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)
    }

    /// The peers this node is connected to.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::ConnectedPeers(tx))
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)
    }

    /// How many peers this node knows to be in the pipe of `node` in `group`.
    pub async fn pipe_peers(&self, group: &str, node: &str) -> Result<usize, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::TopicPeers(topic(group, node), tx))
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)
    }

    /// The peers this node knows to be in the pipe of `node` in `group`.
    pub async fn pipe_members(&self, group: &str, node: &str) -> Result<Vec<PeerId>, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::TopicPeerIds(topic(group, node), tx))
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)
    }

    /// Publishes (or refreshes) this node's signed advertisement in `group`, serving
    /// `nodes`: a Kademlia record, and provider records for the group and each node (those
    /// no longer served stop being provided).
    pub async fn advertise(&self, group: &str, nodes: Vec<String>) -> Result<(), OverlayError> {
        let group = group.to_owned();
        self.call(|r| Command::Advertise(group, nodes, r)).await
    }

    /// Stores `record` in the DHT as it is (peers check it before they keep it).
    pub async fn put_record(&self, record: kad::Record) -> Result<(), OverlayError> {
        self.call(|r| Command::PutRecord(record, r)).await
    }

    /// Listens on `addr` as well; a `…/p2p/<relay>/p2p-circuit` address takes a relay
    /// reservation.
    pub async fn listen(&self, addr: Multiaddr) -> Result<(), OverlayError> {
        self.call(|r| Command::Listen(addr, r)).await
    }

    /// The peers providing `key` (see [`crate::advert`]), this node included.
    pub async fn get_providers(
        &self,
        key: kad::RecordKey,
    ) -> Result<HashSet<PeerId>, OverlayError> {
        self.call(|r| Command::GetProviders(key, r)).await
    }

    /// The Kademlia records stored under `key`, unchecked.
    pub async fn get_record(&self, key: kad::RecordKey) -> Result<Vec<kad::Record>, OverlayError> {
        self.call(|r| Command::GetRecord(key, r)).await
    }

    /// The peers registered in namespace `group` at the rendezvous point `point` (a
    /// connected gateway), with their addresses.
    pub async fn rendezvous_discover(
        &self,
        group: &str,
        point: PeerId,
    ) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, OverlayError> {
        let group = group.to_owned();
        tokio::time::timeout(
            RENDEZVOUS_TIMEOUT,
            self.call(|r| Command::RendezvousDiscover(group, point, r)),
        )
        .await
        .map_err(|_| OverlayError::Lookup("the rendezvous point did not answer".into()))?
    }
}

type Answer = (
    PeerId,
    request_response::ResponseChannel<CatchUpResponse>,
    CatchUpResponse,
);

type Registrations = Vec<(PeerId, Vec<Multiaddr>)>;

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

struct Task {
    role: Role,
    /// Signs this node's advertisements.
    signer: identity::Keypair,
    advert_ttl: Duration,
    limits: Limits,
    /// The node listens on loopback addresses only (tests, one machine).
    loopback_only: bool,
    /// Edge peers: relayed listeners (reservations) by relay (gateway).
    relay_listeners: HashMap<ListenerId, PeerId>,
    /// Edge peers: gateways that accepted our reservation.
    reserved_at: HashSet<PeerId>,
    /// Edge peers: when each rendezvous point last took our registration.
    registered: HashMap<PeerId, std::time::Instant>,
    kad_providers: HashMap<kad::QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    kad_records: HashMap<kad::QueryId, (Vec<kad::Record>, Reply<Vec<kad::Record>>)>,
    /// Discover requests waiting for a rendezvous point's answer, by point.
    pending_rendezvous: HashMap<PeerId, Vec<(String, Reply<Registrations>)>>,
    /// What this node provides, by group: the nodes it advertised last.
    provided: HashMap<String, BTreeSet<String>>,
    catch_ups_in_flight: HashMap<PeerId, usize>,
    swarm: Swarm<Behaviour>,
    events: mpsc::Sender<OverlayEvent>,
    groups: HashMap<String, Group>,
    /// Peers whose stored events (with offsets) are believed: the gateways we bootstrapped
    /// from.
    trusted: HashSet<PeerId>,
    credentials: Arc<RwLock<HashMap<(PeerId, String), Credential>>>,
    catch_up: Option<Arc<dyn CatchUpSource>>,
    pending_catch_up: HashMap<request_response::OutboundRequestId, Reply<CatchUpResponse>>,
    answers: (mpsc::Sender<Answer>, mpsc::Receiver<Answer>),
    metrics: Option<libp2p::metrics::Metrics>,
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut members = tokio::time::interval(MEMBER_DISCOVERY_INTERVAL);
        members.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => self.command(c),
                    None => return,
                },
                Some((peer, channel, response)) = self.answers.1.recv() => {
                    if let Some(n) = self.catch_ups_in_flight.get_mut(&peer) {
                        *n -= 1;
                        if *n == 0 {
                            self.catch_ups_in_flight.remove(&peer);
                        }
                    }
                    let _ = self.swarm.behaviour_mut().catchup.send_response(channel, response);
                }
                _ = members.tick(), if self.role == Role::Edge => self.find_members(),
                event = self.swarm.select_next_some() => {
                    if self.swarm_event(event).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Subscribe(t, reply) => {
                let r = b
                    .gossipsub
                    .subscribe(&t)
                    .map(|_| ())
                    .map_err(|e| OverlayError::Subscribe(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Publish(t, data, reply) => {
                // Nobody in the pipe: say so before gossipsub signs the message (the gateway
                // offers every stored event to its pipe, most often with no peer there).
                let hash = t.hash();
                if !b
                    .gossipsub
                    .all_peers()
                    .any(|(_, topics)| topics.contains(&&hash))
                {
                    let _ = reply.send(Err(OverlayError::NoPeers));
                    return;
                }
                let r = b
                    .gossipsub
                    .publish(t, data)
                    .map(|_| ())
                    .map_err(|e| match e {
                        gossipsub::PublishError::NoPeersSubscribedToTopic => OverlayError::NoPeers,
                        e => OverlayError::Publish(e.to_string()),
                    });
                let _ = reply.send(r);
            }
            Command::CatchUp(peer, request, reply) => {
                let id = b.catchup.send_request(&peer, request);
                self.pending_catch_up.insert(id, reply);
            }
            Command::Dial(addr, reply) => {
                let r = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| OverlayError::Dial(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Admit(peer, credential) => {
                self.credentials
                    .write()
                    .insert((peer, credential.group.clone()), credential);
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::TopicPeers(t, reply) => {
                let hash = t.hash();
                let n = b
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .count();
                let _ = reply.send(n);
            }
            Command::TopicPeerIds(t, reply) => {
                let hash = t.hash();
                let peers = b
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Advertise(group, nodes, reply) => {
                let _ = reply.send(self.advertise(&group, nodes));
            }
            Command::GetProviders(key, reply) => {
                let id = b.kad.get_providers(key);
                self.kad_providers.insert(id, (HashSet::new(), reply));
            }
            Command::PutRecord(record, reply) => {
                let r = b
                    .kad
                    .put_record(record, kad::Quorum::One)
                    .map(|_| ())
                    .map_err(|e| OverlayError::Publish(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Listen(addr, reply) => {
                let r = self.swarm.listen_on(addr.clone()).map(|_| ()).map_err(|e| {
                    OverlayError::Listen {
                        addr,
                        reason: e.to_string(),
                    }
                });
                let _ = reply.send(r);
            }
            Command::GetRecord(key, reply) => {
                let id = b.kad.get_record(key);
                self.kad_records.insert(id, (Vec::new(), reply));
            }
            Command::RendezvousDiscover(group, point, reply) => {
                let namespace = match rendezvous::Namespace::new(group.clone()) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = reply.send(Err(OverlayError::Lookup(e.to_string())));
                        return;
                    }
                };
                b.rendezvous_client
                    .discover(Some(namespace), None, None, point);
                self.pending_rendezvous
                    .entry(point)
                    .or_default()
                    .push((group, reply));
            }
        }
    }

    /// Signs and stores this node's advertisement in `group`, and provides the group's and
    /// the nodes' keys.
    fn advertise(&mut self, group: &str, nodes: Vec<String>) -> Result<(), OverlayError> {
        if !self.groups.contains_key(group) {
            return Err(OverlayError::UnknownGroup(group.to_owned()));
        }
        let now = now_secs();
        let addrs: Vec<Multiaddr> = self
            .swarm
            .external_addresses()
            .cloned()
            .chain(self.swarm.listeners().cloned())
            .filter(|a| self.loopback_only || is_relayed(a) || !is_loopback(a))
            .collect();
        let role = match self.role {
            Role::Gateway => AdvertRole::Gateway,
            Role::Edge => AdvertRole::Edge,
        };
        let ad = Advertisement::new(
            self.swarm.local_peer_id().to_owned(),
            group,
            role,
            nodes,
            addrs,
            now,
            self.advert_ttl,
        );
        let value = ad
            .sign(&self.signer)
            .map_err(|e| OverlayError::Publish(e.to_string()))?;
        let mut record = kad::Record::new(advert::advert_key(group, &ad.peer), value);
        record.expires = Some(std::time::Instant::now() + self.advert_ttl);
        let kad = &mut self.swarm.behaviour_mut().kad;
        // With no other Kademlia server around the query fails its quorum; the record is
        // stored here all the same and served from here.
        kad.put_record(record, kad::Quorum::One)
            .map_err(|e| OverlayError::Publish(e.to_string()))?;
        let now_serving: BTreeSet<String> = ad.nodes.iter().cloned().collect();
        let before = self.provided.remove(group).unwrap_or_default();
        for gone in before.difference(&now_serving) {
            kad.stop_providing(&advert::pipe_key(group, gone));
        }
        let mut keys = vec![advert::group_key(group)];
        keys.extend(
            now_serving
                .difference(&before)
                .map(|n| advert::pipe_key(group, n)),
        );
        for key in keys {
            if let Err(e) = kad.start_providing(key) {
                tracing::warn!(error = %e, "overlay: providing a key failed");
            }
        }
        self.provided.insert(group.to_owned(), now_serving);
        Ok(())
    }

    /// Edge peers: asks each gateway holding our reservation for the groups' other members,
    /// and renews registrations due for it.
    fn find_members(&mut self) {
        let due = self.advert_ttl / 2;
        let points: Vec<PeerId> = self.reserved_at.iter().copied().collect();
        for point in points {
            if self
                .registered
                .get(&point)
                .is_none_or(|at| at.elapsed() >= due)
            {
                self.register_at(point);
            }
            for group in self.groups.keys() {
                if let Ok(ns) = rendezvous::Namespace::new(group.clone()) {
                    self.swarm.behaviour_mut().rendezvous_client.discover(
                        Some(ns),
                        None,
                        None,
                        point,
                    );
                }
            }
        }
    }

    /// Edge peers: registers in every group's namespace at the rendezvous point `point`.
    fn register_at(&mut self, point: PeerId) {
        let ttl = self.advert_ttl.as_secs().max(rendezvous::MIN_TTL);
        for group in self.groups.keys() {
            let Ok(ns) = rendezvous::Namespace::new(group.clone()) else {
                continue;
            };
            if let Err(e) =
                self.swarm
                    .behaviour_mut()
                    .rendezvous_client
                    .register(ns, point, Some(ttl))
            {
                tracing::debug!(%point, error = %e, "overlay: rendezvous registration");
                return;
            }
        }
        self.registered.insert(point, std::time::Instant::now());
    }

    /// Checks a pipe message; the group and envelope when it is acceptable.
    fn validate(
        &self,
        message: &gossipsub::Message,
    ) -> Result<(String, Vec<Envelope>), &'static str> {
        let (group, node) = parse_topic(&message.topic).ok_or("unknown_topic")?;
        let g = self.groups.get(group).ok_or("unknown_group")?;
        // One envelope, or a batch of stored events of one node.
        let envelopes = crate::envelope::decode_message(&message.data).map_err(|e| e.code())?;
        for envelope in &envelopes {
            if envelope.node.as_str() != node {
                return Err("topic_mismatch");
            }
            envelope
                .check_source(message.source.as_ref())
                .map_err(|e| e.code())?;
        }
        let source = message.source.ok_or("unsigned")?;
        for envelope in &envelopes {
            if envelope.offset.is_some() {
                // A stored event: only gateways store.
                if !self.trusted.contains(&source) {
                    return Err("untrusted_stored_event");
                }
            } else {
                let credentials = self.credentials.read();
                let credential = credentials.get(&(source, group.to_owned()));
                g.admits(&source, credential, now_secs())
                    .map_err(|e| e.code())?;
            }
        }
        Ok((group.to_owned(), envelopes))
    }

    /// Handles one swarm event; `Err` when the owner stopped listening.
    async fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Result<(), ()> {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                // A gateway is reachable where it listens: confirming those addresses lets
                // the relay server accept reservations and Kademlia answer as a server.
                if self.role == Role::Gateway
                    && !is_relayed(&address)
                    && (self.loopback_only || !is_loopback(&address))
                {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(OverlayEvent::Listening(address)).await
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if self.role == Role::Edge
                    && self.trusted.contains(&peer_id)
                    && endpoint.is_dialer()
                    && !is_relayed(endpoint.get_remote_address())
                {
                    self.reserve(peer_id, endpoint.get_remote_address().clone());
                }
                if num_established.get() == 1 {
                    return self.emit(OverlayEvent::PeerConnected(peer_id)).await;
                }
                Ok(())
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                if let Some(relay) = self.relay_listeners.remove(&listener_id) {
                    self.reserved_at.remove(&relay);
                    self.registered.remove(&relay);
                }
                Ok(())
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                tracing::debug!(%send_back_addr, %cause, "overlay: refused a connection");
                self.emit(OverlayEvent::Refused {
                    reason: "connection_limit",
                    peer: None,
                })
                .await
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.emit(OverlayEvent::PeerDisconnected(peer_id)).await,
            SwarmEvent::NewExternalAddrCandidate { address } => {
                // Confirmed candidates let DCUtR and Kademlia's server mode work; AutoNAT
                // confirms them where it can. Gateways on public addresses accept theirs.
                tracing::debug!(%address, "overlay: external address candidate");
                Ok(())
            }
            SwarmEvent::Behaviour(event) => self.behaviour_event(event).await,
            _ => Ok(()),
        }
    }

    /// Edge peers: takes a reservation on the gateway `relay` (reached at `addr`), so that
    /// other peers can reach this one through it, and hole punching can start from there.
    fn reserve(&mut self, relay: PeerId, addr: Multiaddr) {
        if self.relay_listeners.values().any(|r| *r == relay) {
            return;
        }
        let mut circuit: Multiaddr = addr
            .iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .collect();
        circuit.push(Protocol::P2p(relay));
        circuit.push(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                self.relay_listeners.insert(id, relay);
            }
            Err(e) => tracing::warn!(%circuit, error = %e, "overlay: relay reservation"),
        }
    }

    async fn behaviour_event(&mut self, event: BehaviourEvent) -> Result<(), ()> {
        match event {
            BehaviourEvent::Gossipsub(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                if let gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                } = e
                {
                    return self
                        .pipe_message(propagation_source, message_id, message)
                        .await;
                }
                Ok(())
            }
            BehaviourEvent::Identify(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                if let identify::Event::Received { peer_id, info, .. } = e {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                Ok(())
            }
            BehaviourEvent::Catchup(e) => match self.catch_up_event(e) {
                Some(event) => self.emit(event).await,
                None => Ok(()),
            },
            BehaviourEvent::Kad(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                self.kad_event(e).await
            }
            BehaviourEvent::RelayClient(e) => {
                if let relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal: false,
                    ..
                } = e
                {
                    tracing::info!(relay = %relay_peer_id, "overlay: relay reservation accepted");
                    self.reserved_at.insert(relay_peer_id);
                    self.register_at(relay_peer_id);
                    self.find_members();
                }
                Ok(())
            }
            BehaviourEvent::RendezvousClient(e) => {
                self.rendezvous_event(e);
                Ok(())
            }
            BehaviourEvent::Ping(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                Ok(())
            }
            BehaviourEvent::RelayServer(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                let refused = match e {
                    relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                        Some(("relay_reservation_denied", src_peer_id))
                    }
                    relay::Event::CircuitReqDenied { src_peer_id, .. } => {
                        Some(("relay_circuit_denied", src_peer_id))
                    }
                    _ => None,
                };
                if let Some((reason, peer)) = refused {
                    return self
                        .emit(OverlayEvent::Refused {
                            reason,
                            peer: Some(peer),
                        })
                        .await;
                }
                Ok(())
            }
            BehaviourEvent::Dcutr(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                let peer = e.remote_peer_id;
                let direct = match &e.result {
                    Ok(_) => {
                        tracing::info!("dcutr: direct connection upgraded {peer}");
                        true
                    }
                    Err(error) => {
                        tracing::info!("dcutr: hole punch failed {peer}: {error}");
                        false
                    }
                };
                self.emit(OverlayEvent::HolePunch { peer, direct }).await
            }
            _ => Ok(()),
        }
    }

    async fn pipe_message(
        &mut self,
        from: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) -> Result<(), ()> {
        let verdict = self.validate(&message);
        let acceptance = match verdict {
            Ok(_) => MessageAcceptance::Accept,
            Err(_) => MessageAcceptance::Reject,
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &from, acceptance);
        match verdict {
            Ok((group, envelopes)) => {
                let source = message.source.unwrap_or(from);
                for envelope in envelopes {
                    self.emit(OverlayEvent::ItemReceived {
                        group: group.clone(),
                        envelope,
                        source,
                    })
                    .await?;
                }
                Ok(())
            }
            Err(reason) => {
                tracing::debug!(%from, reason, "overlay: rejected a pipe message");
                self.emit(OverlayEvent::MessageRejected { reason, from })
                    .await
            }
        }
    }

    /// Handles a catch-up protocol event; what to report, if anything.
    fn catch_up_event(
        &mut self,
        event: request_response::Event<CatchUpRequest, CatchUpResponse>,
    ) -> Option<OverlayEvent> {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let answers = self.answers.0.clone();
                if self.catch_ups_in_flight.get(&peer).copied().unwrap_or(0)
                    >= self.limits.max_catch_ups_per_peer
                {
                    let _ = self.swarm.behaviour_mut().catchup.send_response(
                        channel,
                        CatchUpResponse::refused(
                            "too_many_requests",
                            "too many catch-up requests at once; wait for the answers",
                        ),
                    );
                    return Some(OverlayEvent::Refused {
                        reason: "catch_up_limit",
                        peer: Some(peer),
                    });
                }
                // Refusals go out at once; pages are read from the store on a task of their
                // own and come back through `answers` (counted in flight until then).
                let response = self.check_catch_up(&peer, &request);
                match (response, &self.catch_up) {
                    (Some(refusal), _) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .catchup
                            .send_response(channel, refusal);
                    }
                    (None, None) => {
                        let _ = self.swarm.behaviour_mut().catchup.send_response(
                            channel,
                            CatchUpResponse::refused("unavailable", "this peer serves no history"),
                        );
                    }
                    (None, Some(source)) => {
                        *self.catch_ups_in_flight.entry(peer).or_default() += 1;
                        let page = source.page(peer, request);
                        tokio::spawn(async move {
                            let _ = answers.send((peer, channel, page.await)).await;
                        });
                    }
                }
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_catch_up.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending_catch_up.remove(&request_id) {
                    let _ = reply.send(Err(OverlayError::CatchUp(error.to_string())));
                }
            }
            _ => {}
        }
        None
    }

    /// Kademlia: checks what peers store here, and collects lookups' answers.
    async fn kad_event(&mut self, event: kad::Event) -> Result<(), ()> {
        match event {
            kad::Event::InboundRequest { request } => {
                let refused = match request {
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    } => match Advertisement::verify_record(&record, now_secs()) {
                        Ok(_) => {
                            if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record) {
                                tracing::debug!(error = %e, "overlay: storing a record");
                            }
                            None
                        }
                        Err(e) => Some((e.code(), Some(source))),
                    },
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    } => {
                        if advert::is_provider_key(&record.key) {
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .kad
                                .store_mut()
                                .add_provider(record);
                            None
                        } else {
                            Some(("provider_key", Some(record.provider)))
                        }
                    }
                    _ => None,
                };
                if let Some((reason, peer)) = refused {
                    tracing::debug!(?peer, reason, "overlay: refused a Kademlia record");
                    return self.emit(OverlayEvent::Refused { reason, peer }).await;
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                kad::QueryResult::GetProviders(r) => {
                    if let Some((found, _)) = self.kad_providers.get_mut(&id)
                        && let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r
                    {
                        found.extend(providers);
                    }
                    if step.last
                        && let Some((found, reply)) = self.kad_providers.remove(&id)
                    {
                        let _ = reply.send(Ok(found));
                    }
                }
                kad::QueryResult::GetRecord(r) => {
                    if let Some((found, _)) = self.kad_records.get_mut(&id)
                        && let Ok(kad::GetRecordOk::FoundRecord(peer_record)) = r
                    {
                        found.push(peer_record.record);
                    }
                    if step.last
                        && let Some((found, reply)) = self.kad_records.remove(&id)
                    {
                        let _ = reply.send(Ok(found));
                    }
                }
                _ => {}
            },
            _ => {}
        }
        Ok(())
    }

    /// Rendezvous (edge peers): answers discover requests and dials members found.
    fn rendezvous_event(&mut self, event: rendezvous::client::Event) {
        use rendezvous::client::Event;
        match event {
            Event::Discovered {
                rendezvous_node,
                registrations,
                ..
            } => {
                let local = *self.swarm.local_peer_id();
                let found: Vec<(String, PeerId, Vec<Multiaddr>)> = registrations
                    .iter()
                    .map(|r| {
                        (
                            r.namespace.to_string(),
                            r.record.peer_id(),
                            r.record.addresses().to_vec(),
                        )
                    })
                    .collect();
                if let Some(waiting) = self.pending_rendezvous.remove(&rendezvous_node) {
                    for (group, reply) in waiting {
                        let peers = found
                            .iter()
                            .filter(|(ns, _, _)| *ns == group)
                            .map(|(_, p, a)| (*p, a.clone()))
                            .collect();
                        let _ = reply.send(Ok(peers));
                    }
                }
                if self.role != Role::Edge {
                    return;
                }
                // Join other members directly (through the relay, then hole punching):
                // gossip then also flows peer to peer.
                let connected = self
                    .swarm
                    .connected_peers()
                    .filter(|p| !self.trusted.contains(p))
                    .count();
                let room = MAX_MEMBER_DIALS.saturating_sub(connected);
                let dial: Vec<(PeerId, Vec<Multiaddr>)> = found
                    .into_iter()
                    .filter(|(_, p, a)| *p != local && !a.is_empty() && !self.swarm.is_connected(p))
                    .map(|(_, p, a)| (p, a))
                    .take(room)
                    .collect();
                for (peer, addrs) in dial {
                    tracing::debug!(%peer, "overlay: dialing a group member");
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "overlay: dialing a member");
                    }
                }
            }
            Event::DiscoverFailed {
                rendezvous_node,
                error,
                ..
            } => {
                if let Some(waiting) = self.pending_rendezvous.remove(&rendezvous_node) {
                    for (_, reply) in waiting {
                        let _ = reply.send(Err(OverlayError::Lookup(format!("{error:?}"))));
                    }
                }
            }
            Event::RegisterFailed {
                rendezvous_node,
                error,
                ..
            } => {
                tracing::debug!(%rendezvous_node, ?error, "overlay: rendezvous registration refused");
                self.registered.remove(&rendezvous_node);
            }
            _ => {}
        }
    }

    /// A refusal for a catch-up request, or `None` when it may be served. A valid
    /// credential is remembered: it also admits the peer's publications in that group.
    fn check_catch_up(&self, peer: &PeerId, request: &CatchUpRequest) -> Option<CatchUpResponse> {
        let Some(group) = self.groups.get(&request.group) else {
            return Some(CatchUpResponse::refused(
                "node_not_found",
                format!("no group {:?} here", request.group),
            ));
        };
        let credential = match request.credential.as_deref().map(Credential::from_bytes) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                return Some(CatchUpResponse::refused("not_member", e.to_string()));
            }
            None => None,
        };
        if let Err(e) = group.admits(peer, credential.as_ref(), now_secs()) {
            return Some(CatchUpResponse::refused("not_member", e.to_string()));
        }
        if let Some(c) = credential {
            self.credentials
                .write()
                .insert((*peer, request.group.clone()), c);
        }
        None
    }

    async fn emit(&mut self, event: OverlayEvent) -> Result<(), ()> {
        self.events.send(event).await.map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of an IHAVE (or IWANT) RPC naming `ids` message ids of `id_len` bytes in the
    /// longest topic a pipe can have: each id is a length-delimited protobuf field (tag,
    /// length, bytes); the topic, the IHAVE and the control message add a tag and a length
    /// each (at most 3 bytes for these sizes).
    fn control_bytes(ids: usize, id_len: usize) -> usize {
        let topic = topic(
            &"g".repeat(crate::group::MAX_GROUP_NAME_BYTES),
            &"n".repeat(juxta_core::model::MAX_NAME_BYTES),
        );
        let topic_len = topic.hash().as_str().len();
        ids * (2 + id_len) + (1 + 2 + topic_len) + 2 * (1 + 3)
    }

    #[test]
    fn the_longest_gossip_we_send_fits_what_a_default_receiver_accepts_and_we_accept_theirs() {
        let stored = Envelope {
            node: juxta_core::NodeName::new("n").expect("node"),
            kind: crate::envelope::Kind::Purged,
            item_id: None,
            offset: Some(1),
            epoch: Some(juxta_core::Epoch(1)),
            payload: None,
            publisher: String::new(),
            time: 0,
            seq: None,
        };
        let id_len = stored.message_id().len();
        assert_eq!(id_len, 32, "message ids are SHA-256 digests");
        let default_limit = gossipsub::Config::default().max_control_message_size();
        for gateway in [true, false] {
            let config = gossip_config(gateway, DEFAULT_HEARTBEAT).expect("config");
            // What we send: a longer list than a default receiver accepts makes it drop
            // the connection's inbound stream (and, after five, stop reading us at all).
            assert!(
                control_bytes(config.max_control_messages_sent(), id_len) <= default_limit,
                "an IHAVE of {} ids is {} bytes, over {default_limit}",
                config.max_control_messages_sent(),
                control_bytes(config.max_control_messages_sent(), id_len)
            );
            // What we accept: the lists other peers send by default (5000 ids; ours are
            // 32 bytes, others' up to ~50).
            assert!(control_bytes(5000, 50) <= config.max_control_message_size());
        }
    }
}
