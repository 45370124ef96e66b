//! The edge peer against a gateway node in the same process, on loopback TCP: it catches
//! up on history, follows live events, fills gaps from history, reports trimmed history,
//! and `juxta peer`'s loop publishes input lines and prints JSON lines.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use juxta_bridge_p2p::catchup::{CatchUpRequest, CatchUpResponse, Page};
use juxta_bridge_p2p::envelope::{Envelope, Kind};
use juxta_bridge_p2p::group::{Credential, Group, GroupKey, Membership};
use juxta_bridge_p2p::node::{CatchUpSource, Config, Overlay, OverlayEvent, Role};
use juxta_bridge_p2p::peer::{self, EdgePeer, PeerConfig, PeerEvent};
use juxta_core::{Epoch, ItemId, NodeName, Payload};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, identity};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);
const EPOCH: u64 = 7;

/// The test gateway's history of node `n1`: stored envelopes, and the oldest offset it
/// still holds (a trimmed history starts above 1); and the `after` of every catch-up request
/// it answered.
struct History {
    envelopes: Mutex<Vec<Envelope>>,
    first_offset: u64,
    requests: Mutex<Vec<u64>>,
}

impl History {
    fn push(&self, envelope: Envelope) {
        self.envelopes.lock().expect("lock").push(envelope);
    }

    fn requests(&self) -> Vec<u64> {
        self.requests.lock().expect("lock").clone()
    }
}

struct Source(Arc<History>);

impl CatchUpSource for Source {
    fn page(
        &self,
        _peer: PeerId,
        request: CatchUpRequest,
    ) -> Pin<Box<dyn Future<Output = CatchUpResponse> + Send>> {
        self.0.requests.lock().expect("lock").push(request.after);
        let envelopes = self.0.envelopes.lock().expect("lock");
        let items = envelopes
            .iter()
            .filter(|e| e.node.as_str() == request.node && e.offset > Some(request.after))
            .take(request.limit as usize)
            .map(|e| serde_bytes::ByteBuf::from(e.encode()))
            .collect();
        let last = envelopes.last().and_then(|e| e.offset).unwrap_or(0);
        let page = Page {
            epoch: EPOCH,
            first_offset: self.0.first_offset,
            last_offset: last,
            items,
        };
        Box::pin(async move { CatchUpResponse::Page(page) })
    }
}

fn n1() -> NodeName {
    NodeName::new("n1").expect("node")
}

fn stored(offset: u64) -> Envelope {
    Envelope {
        node: n1(),
        kind: Kind::Published,
        item_id: Some(ItemId::new(&format!("i{offset}")).expect("id")),
        offset: Some(offset),
        epoch: Some(Epoch(EPOCH)),
        payload: Some(Payload::json(Bytes::from(format!("{{\"n\":{offset}}}"))).expect("json")),
        publisher: "admin".to_owned(),
        time: 1,
        seq: None,
    }
}

struct Gateway {
    overlay: Overlay,
    events: mpsc::Receiver<OverlayEvent>,
    addr: Multiaddr,
    history: Arc<History>,
}

impl Gateway {
    /// A gateway node serving `offsets` of `n1` (from `first_offset` on) and carrying its
    /// pipe.
    async fn start(offsets: impl IntoIterator<Item = u64>, first_offset: u64) -> Self {
        Self::start_in(Group::public(), offsets, first_offset).await
    }

    /// The same in `group`.
    async fn start_in(
        group: Group,
        offsets: impl IntoIterator<Item = u64>,
        first_offset: u64,
    ) -> Self {
        let history = Arc::new(History {
            envelopes: Mutex::new(offsets.into_iter().map(stored).collect()),
            first_offset,
            requests: Mutex::new(Vec::new()),
        });
        let mut config = Config::new(Role::Gateway);
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        let name = group.name.clone();
        config.groups = vec![group];
        let source = Arc::new(Source(history.clone())) as Arc<dyn CatchUpSource>;
        let (overlay, mut events) = Overlay::spawn(
            identity::Keypair::generate_ed25519(),
            config,
            None,
            Some(source),
        )
        .await
        .expect("gateway starts");
        let addr = tokio::time::timeout(WAIT, async {
            loop {
                match events.recv().await {
                    Some(OverlayEvent::Listening(a)) => return a,
                    Some(_) => {}
                    None => panic!("gateway stopped"),
                }
            }
        })
        .await
        .expect("gateway listens")
        .with(Protocol::P2p(overlay.local_peer_id()));
        overlay.subscribe(&name, "n1").await.expect("subscribe");
        Self {
            overlay,
            events,
            addr,
            history,
        }
    }

    /// Waits until the edge peer has joined the pipe (so gossip reaches it).
    async fn until_peer_in_pipe(&self) {
        tokio::time::timeout(WAIT, async {
            while self
                .overlay
                .pipe_peers("public", "n1")
                .await
                .expect("running")
                < 1
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the edge peer joins the pipe");
    }

    /// Waits until the peer has asked for no history for longer than it waits before its
    /// recheck after connecting ([`peer::PIPE_SETTLE`]): it has caught up and has nothing
    /// outstanding or planned, so what it reports next can only be set off by the pipe.
    async fn until_peer_settled(&self) {
        tokio::time::timeout(WAIT, async {
            let mut before = self.history.requests().len();
            loop {
                tokio::time::sleep(peer::PIPE_SETTLE + Duration::from_millis(500)).await;
                let now = self.history.requests().len();
                if now == before && now > 0 {
                    return;
                }
                before = now;
            }
        })
        .await
        .expect("the peer stops asking for history");
    }

    /// Stores `offset` and sends its stored event into the pipe.
    async fn store_and_publish(&self, offset: u64) {
        self.history.push(stored(offset));
        self.publish(offset).await;
    }

    /// Sends `offset`'s stored event into the pipe.
    async fn publish(&self, offset: u64) {
        self.overlay
            .publish("public", &stored(offset))
            .await
            .expect("publish");
    }
}

fn config(gateway: &Gateway) -> PeerConfig {
    let mut c = PeerConfig::new(vec![gateway.addr.clone()]);
    c.subscribe = vec![n1()];
    c
}

/// What a peer reported, compactly: `"5"` for an event at offset 5, `"lost 1..=3"`, `"reset"`.
fn describe(event: &PeerEvent) -> String {
    match event {
        PeerEvent::Event(e) => {
            assert_eq!(e.node, n1());
            e.offset.to_string()
        }
        PeerEvent::Lost { from, to, .. } => format!("lost {from}..={to}"),
        PeerEvent::Reset { .. } => "reset".to_owned(),
        other => format!("{other:?}"),
    }
}

/// What the peer reports up to and including the event at offset `last`.
async fn until_offset(peer: &mut EdgePeer, last: u64) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(e) = peer.next().await {
            let done = matches!(&e, PeerEvent::Event(ev) if ev.offset >= last);
            seen.push(describe(&e));
            if done {
                return;
            }
        }
        panic!("the peer stopped");
    })
    .await;
    assert!(found.is_ok(), "offset {last} never came; got {seen:?}");
    seen
}

/// Asserts the peer reports nothing more for a while.
async fn assert_quiet(peer: &mut EdgePeer) {
    if let Ok(e) = tokio::time::timeout(Duration::from_secs(1), peer.next()).await {
        panic!("nothing more expected, got {:?}", e.as_ref().map(describe));
    }
}

fn strings(offsets: impl IntoIterator<Item = u64>) -> Vec<String> {
    offsets.into_iter().map(|o| o.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_peer_gets_history_in_order_then_live_events_each_once() {
    let gateway = Gateway::start(1..=5, 1).await;
    let mut peer = EdgePeer::join(identity::Keypair::generate_ed25519(), config(&gateway))
        .await
        .expect("joins");

    assert_eq!(until_offset(&mut peer, 5).await, strings(1..=5));

    // Caught up and idle: 6..=8 can only come through the pipe.
    gateway.until_peer_in_pipe().await;
    gateway.until_peer_settled().await;
    for offset in 6..=8 {
        gateway.store_and_publish(offset).await;
    }
    assert_eq!(until_offset(&mut peer, 8).await, strings(6..=8));
    assert_quiet(&mut peer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_gap_in_the_pipe_the_peer_fills_it_from_history_before_going_on() {
    let gateway = Gateway::start(1..=8, 1).await;
    let mut peer = EdgePeer::join(identity::Keypair::generate_ed25519(), config(&gateway))
        .await
        .expect("joins");
    assert_eq!(until_offset(&mut peer, 8).await, strings(1..=8));

    // 9 is stored but never reaches the pipe; 10 does, and only the pipe carries it (a
    // gateway that stored it would serve it too, but this proves the peer held it back).
    gateway.until_peer_in_pipe().await;
    gateway.until_peer_settled().await;
    let asked_before = gateway.history.requests().len();
    gateway.history.push(stored(9));
    gateway.publish(10).await;

    assert_eq!(until_offset(&mut peer, 10).await, strings(9..=10));
    assert_quiet(&mut peer).await;
    let asked = gateway.history.requests();
    assert!(
        asked[asked_before..].contains(&8),
        "the gap made the peer ask for what follows 8: {asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_trimmed_history_the_peer_reports_what_was_lost_before_the_rest() {
    let gateway = Gateway::start(4..=6, 4).await;
    let mut peer = EdgePeer::join(identity::Keypair::generate_ed25519(), config(&gateway))
        .await
        .expect("joins");

    let first = tokio::time::timeout(WAIT, peer.next())
        .await
        .expect("in time")
        .expect("an event");
    assert_eq!(describe(&first), "lost 1..=3");
    let line: serde_json::Value = serde_json::from_str(&first.json_line()).expect("json");
    assert_eq!(line["type"], "error");
    assert_eq!(line["code"], "events_lost");
    assert_eq!(line["node"], "n1");
    assert_eq!(
        (line["from"].as_u64(), line["to"].as_u64()),
        (Some(1), Some(3))
    );

    assert_eq!(until_offset(&mut peer, 6).await, strings(4..=6));
    assert_quiet(&mut peer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_loop_publishes_json_lines_refuses_others_and_prints_only_json() {
    let mut gateway = Gateway::start(1..=2, 1).await;
    let keypair = identity::Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let input = tokio::io::BufReader::new(&b"{\"a\":1}\nnot json\n"[..]);
    let mut out = Vec::new();

    tokio::time::timeout(
        WAIT * 2,
        peer::run_cli(keypair, config(&gateway), Some(n1()), input, &mut out, true),
    )
    .await
    .expect("returns once the input is published")
    .expect("runs");

    // The publication reached the gateway as this peer's, without an offset (the gateway
    // stores it and assigns one).
    let envelope = tokio::time::timeout(WAIT, async {
        loop {
            match gateway.events.recv().await {
                Some(OverlayEvent::ItemReceived {
                    envelope, source, ..
                }) if envelope.offset.is_none() => {
                    assert_eq!(source, me);
                    return envelope;
                }
                Some(_) => {}
                None => panic!("gateway stopped"),
            }
        }
    })
    .await
    .expect("the publication reaches the gateway");
    assert_eq!(envelope.node, n1());
    assert_eq!(envelope.publisher, me.to_string());
    assert_eq!(
        envelope.payload.map(|p| p.bytes),
        Some(Bytes::from_static(b"{\"a\":1}"))
    );

    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let refused: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "error").collect();
    assert_eq!(refused.len(), 1, "{text}");
    assert_eq!(refused[0]["code"], "invalid_json", "{text}");
    assert_eq!(refused[0]["node"], "n1");
    for l in lines.iter().filter(|l| l["type"] != "error") {
        assert_eq!(l["type"], "event", "{text}");
        assert_eq!(l["node"], "n1", "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_a_protected_group_publishes_once_it_has_shown_its_credential() {
    let key = GroupKey::generate();
    let lab = Group {
        name: "lab".to_owned(),
        membership: Membership::Protected(key.public()),
    };
    let mut gateway = Gateway::start_in(lab, [], 1).await;
    let keypair = identity::Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Subscribed to nothing: no catch-up would show the credential; publishing must.
    let mut config = PeerConfig::new(vec![gateway.addr.clone()]);
    config.group = "lab".to_owned();
    config.credential = Some(Credential::issue(&key, "lab", me, now + 3600));
    let peer = EdgePeer::join(keypair, config).await.expect("joins");

    let payload = Payload::json(Bytes::from_static(b"{\"t\":1}")).expect("json");
    let id = tokio::time::timeout(WAIT, peer.publish(&n1(), None, payload))
        .await
        .expect("in time")
        .expect("published");
    peer.flush(&n1()).await.expect("the gateway answers");

    let got = tokio::time::timeout(WAIT, async {
        loop {
            match gateway.events.recv().await {
                Some(OverlayEvent::ItemReceived { envelope, .. }) => return Ok(envelope),
                Some(OverlayEvent::MessageRejected { reason, .. }) => return Err(reason),
                Some(_) => {}
                None => panic!("gateway stopped"),
            }
        }
    })
    .await
    .expect("the publication reaches the gateway");
    let envelope = got.expect("accepted, not rejected");
    assert_eq!(envelope.item_id, Some(id));
    assert_eq!(envelope.publisher, me.to_string());
}
