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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, TopicHash};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, identify, identity, kad, noise, ping, relay,
    rendezvous, tcp, yamux,
};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

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
/// Most pipes (topics) one peer may subscribe to.
pub const MAX_TOPICS_PER_PEER: usize = 10_000;
/// Commands queued to the swarm task before callers wait.
const COMMAND_QUEUE: usize = 1024;
/// Events queued for the owner of the overlay before the swarm task waits.
const EVENT_QUEUE: usize = 4096;
/// Catch-up answers waiting to be sent. Requests beyond request-response's stream limit
/// are refused by libp2p itself; a full queue drops the answer (the requester sees the
/// request fail and retries).
const ANSWER_QUEUE: usize = 256;

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
}

/// The composed behaviour.
#[allow(
    missing_debug_implementations,
    reason = "libp2p behaviours are not Debug"
)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
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
        let gateway = config.role == Role::Gateway;
        let alone = config.bootstrap.is_empty();
        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(config.heartbeat)
            .heartbeat_initial_delay(Duration::from_millis(100))
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(crate::envelope::MAX_ENVELOPE_BYTES + 4096)
            .message_id_fn(|m: &gossipsub::Message| {
                // The publication's identity (see `Envelope::message_id`); undecodable data
                // gets a content hash and is rejected in validation anyway.
                gossipsub::MessageId::new(&match Envelope::decode(&m.data) {
                    Ok(e) => e.message_id(),
                    Err(_) => {
                        use sha2::Digest as _;
                        sha2::Sha256::digest(&m.data).to_vec()
                    }
                })
            })
            .build()
            .map_err(|e| OverlayError::Build(e.to_string()))?;
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
                let gossipsub = gossipsub::Behaviour::new_with_subscription_filter(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                    pipe_filter(),
                )?;
                let mut kad_config = kad::Config::new(KAD_PROTOCOL);
                if alone {
                    // Nothing to bootstrap from until peers dial in.
                    kad_config.set_periodic_bootstrap_interval(None);
                }
                let mut kad = kad::Behaviour::with_config(
                    peer,
                    kad::store::MemoryStore::new(peer),
                    kad_config,
                );
                if gateway {
                    kad.set_mode(Some(kad::Mode::Server));
                }
                let relay_config = relay::Config {
                    // Long-lived subscriptions go through circuits: no 2-minute / 128 KiB
                    // cut-off; reservations and circuits stay bounded in number.
                    max_circuit_duration: Duration::from_secs(24 * 3600),
                    max_circuit_bytes: 0,
                    max_reservations: 1024,
                    max_circuits: 1024,
                    max_circuits_per_peer: 16,
                    ..relay::Config::default()
                };
                Ok(Behaviour {
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
                            .with_request_timeout(Duration::from_secs(30)),
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
        let task = Task {
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
        let t = topic(group, envelope.node.as_str());
        let data = envelope.encode();
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
}

type Answer = (
    request_response::ResponseChannel<CatchUpResponse>,
    CatchUpResponse,
);

struct Task {
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => self.command(c),
                    None => return,
                },
                Some((channel, response)) = self.answers.1.recv() => {
                    let _ = self.swarm.behaviour_mut().catchup.send_response(channel, response);
                }
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
        }
    }

    /// Checks a pipe message; the group and envelope when it is acceptable.
    fn validate(&self, message: &gossipsub::Message) -> Result<(String, Envelope), &'static str> {
        let (group, node) = parse_topic(&message.topic).ok_or("unknown_topic")?;
        let g = self.groups.get(group).ok_or("unknown_group")?;
        let envelope = Envelope::decode(&message.data).map_err(|e| e.code())?;
        if envelope.node.as_str() != node {
            return Err("topic_mismatch");
        }
        envelope
            .check_source(message.source.as_ref())
            .map_err(|e| e.code())?;
        let source = message.source.ok_or("unsigned")?;
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
        Ok((group.to_owned(), envelope))
    }

    /// Handles one swarm event; `Err` when the owner stopped listening.
    async fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Result<(), ()> {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.emit(OverlayEvent::Listening(address)).await
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => {
                self.emit(OverlayEvent::PeerConnected(peer_id)).await
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
            BehaviourEvent::Catchup(e) => {
                self.catch_up_event(e);
                Ok(())
            }
            BehaviourEvent::Kad(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
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
                Ok(())
            }
            BehaviourEvent::Dcutr(e) => {
                if let Some(m) = &mut self.metrics {
                    libp2p::metrics::Recorder::record(m, &e);
                }
                Ok(())
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
            Ok((group, envelope)) => {
                let source = message.source.unwrap_or(from);
                self.emit(OverlayEvent::ItemReceived {
                    group,
                    envelope,
                    source,
                })
                .await
            }
            Err(reason) => {
                tracing::debug!(%from, reason, "overlay: rejected a pipe message");
                self.emit(OverlayEvent::MessageRejected { reason, from })
                    .await
            }
        }
    }

    fn catch_up_event(&mut self, event: request_response::Event<CatchUpRequest, CatchUpResponse>) {
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
                let response = self.check_catch_up(&peer, &request);
                match (response, &self.catch_up) {
                    (Some(refusal), _) => {
                        let _ = answers.try_send((channel, refusal));
                    }
                    (None, None) => {
                        let _ = answers.try_send((
                            channel,
                            CatchUpResponse::refused("unavailable", "this peer serves no history"),
                        ));
                    }
                    (None, Some(source)) => {
                        let page = source.page(peer, request);
                        tokio::spawn(async move {
                            let _ = answers.send((channel, page.await)).await;
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
