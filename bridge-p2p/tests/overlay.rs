//! Several overlay nodes in one process on loopback TCP: a gateway and edge peers that
//! bootstrap from it. Pipe messages reach every member once; forged, untrusted and
//! non-member messages are rejected and go no further; catch-up serves history and admits
//! a protected group's members.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use juxta_bridge_p2p::catchup::{CatchUpRequest, CatchUpResponse, Page};
use juxta_bridge_p2p::envelope::{Envelope, Kind};
use juxta_bridge_p2p::group::{Credential, Group, GroupKey, Membership};
use juxta_bridge_p2p::node::{CatchUpSource, Config, Overlay, OverlayEvent, Role};
use juxta_core::{Epoch, ItemId, NodeName, Payload};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, identity};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

/// History served by the test gateway: stored envelopes of one node.
struct History(Vec<Envelope>);

impl CatchUpSource for History {
    fn page(
        &self,
        _peer: PeerId,
        request: CatchUpRequest,
    ) -> Pin<Box<dyn Future<Output = CatchUpResponse> + Send>> {
        let items = self
            .0
            .iter()
            .filter(|e| e.node.as_str() == request.node && e.offset > Some(request.after))
            .take(request.limit as usize)
            .map(|e| serde_bytes::ByteBuf::from(e.encode()))
            .collect();
        let last = self.0.last().and_then(|e| e.offset).unwrap_or(0);
        Box::pin(async move {
            CatchUpResponse::Page(Page {
                epoch: 7,
                first_offset: 1,
                last_offset: last,
                items,
            })
        })
    }
}

fn stored(node: &str, offset: u64, text: &str) -> Envelope {
    Envelope {
        node: NodeName::new(node).expect("node"),
        kind: Kind::Published,
        item_id: Some(ItemId::new(&format!("i{offset}")).expect("id")),
        offset: Some(offset),
        epoch: Some(Epoch(7)),
        payload: Some(Payload::json(Bytes::from(format!("\"{text}\""))).expect("json")),
        publisher: "admin".to_owned(),
        time: 1,
        seq: None,
    }
}

struct Node {
    overlay: Overlay,
    events: mpsc::Receiver<OverlayEvent>,
    addr: Option<Multiaddr>,
}

async fn start(
    role: Role,
    bootstrap: Vec<Multiaddr>,
    groups: Vec<Group>,
    history: Option<Vec<Envelope>>,
) -> Node {
    let mut config = Config::new(role);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    config.bootstrap = bootstrap;
    config.groups = groups;
    let source = history.map(|h| Arc::new(History(h)) as Arc<dyn CatchUpSource>);
    let (overlay, mut events) =
        Overlay::spawn(identity::Keypair::generate_ed25519(), config, None, source)
            .await
            .expect("overlay starts");
    let addr = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(OverlayEvent::Listening(a)) = events.recv().await {
                return a;
            }
        }
    })
    .await
    .ok()
    .map(|a| a.with(Protocol::P2p(overlay.local_peer_id())));
    Node {
        overlay,
        events,
        addr,
    }
}

/// Waits until `node` sees at least `n` peers in the pipe.
async fn joined(node: &Node, group: &str, pipe: &str, n: usize) {
    tokio::time::timeout(WAIT, async {
        while node.overlay.pipe_peers(group, pipe).await.expect("running") < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} peers never joined {group}/{pipe}"));
}

/// Everything `node` reports within `quiet` of silence.
async fn drain(node: &mut Node, quiet: Duration) -> Vec<OverlayEvent> {
    let mut got = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(quiet, node.events.recv()).await {
        got.push(e);
    }
    got
}

fn items(events: &[OverlayEvent]) -> Vec<(Option<u64>, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            OverlayEvent::ItemReceived { envelope, .. } => Some((
                envelope.offset,
                envelope
                    .item_id
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

fn rejections(events: &[OverlayEvent]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| match e {
            OverlayEvent::MessageRejected { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_messages_reach_every_member_once_and_bad_ones_go_nowhere() {
    let mut gateway = start(Role::Gateway, vec![], vec![Group::public()], Some(vec![])).await;
    let g = gateway.addr.clone().expect("gateway listens");
    let mut a = start(Role::Edge, vec![g.clone()], vec![Group::public()], None).await;
    let mut b = start(Role::Edge, vec![g.clone()], vec![Group::public()], None).await;
    for n in [&gateway, &a, &b] {
        n.overlay
            .subscribe("public", "n1")
            .await
            .expect("subscribe");
    }
    joined(&gateway, "public", "n1", 2).await;
    joined(&a, "public", "n1", 1).await;
    joined(&b, "public", "n1", 1).await;

    // The gateway's stored events reach both edges, once each.
    for offset in 1..=3 {
        gateway
            .overlay
            .publish("public", &stored("n1", offset, "x"))
            .await
            .expect("publish");
    }
    let quiet = Duration::from_millis(1500);
    let (got_a, got_b) = tokio::join!(drain(&mut a, quiet), drain(&mut b, quiet));
    let expected = vec![
        (Some(1), "i1".to_owned()),
        (Some(2), "i2".to_owned()),
        (Some(3), "i3".to_owned()),
    ];
    assert_eq!(items(&got_a), expected);
    assert_eq!(items(&got_b), expected);

    // A member peer's publication reaches the gateway and the other edge.
    let payload = Payload::json(Bytes::from_static(b"{\"t\":1}")).expect("json");
    let mine = Envelope::publication(
        NodeName::new("n1").expect("node"),
        ItemId::new("from-a").expect("id"),
        payload.clone(),
        &a.overlay.local_peer_id(),
        1,
    );
    a.overlay.publish("public", &mine).await.expect("publish");
    let (got_g, got_b) = tokio::join!(drain(&mut gateway, quiet), drain(&mut b, quiet));
    assert_eq!(items(&got_g), vec![(None, "from-a".to_owned())]);
    assert_eq!(items(&got_b), vec![(None, "from-a".to_owned())]);

    // Forged publisher (a claims to be b) and a stored event from an edge: rejected by the
    // gateway, never forwarded to b.
    let forged = Envelope::publication(
        NodeName::new("n1").expect("node"),
        ItemId::new("forged").expect("id"),
        payload,
        &b.overlay.local_peer_id(),
        2,
    );
    a.overlay.publish("public", &forged).await.expect("publish");
    a.overlay
        .publish("public", &stored("n1", 99, "fake"))
        .await
        .expect("publish");
    let (got_g, got_b) = tokio::join!(drain(&mut gateway, quiet), drain(&mut b, quiet));
    assert!(items(&got_g).is_empty(), "{:?}", items(&got_g));
    let mut reasons = rejections(&got_g);
    reasons.sort_unstable();
    assert_eq!(reasons, vec!["forged_publisher", "untrusted_stored_event"]);
    assert!(items(&got_b).is_empty(), "b got {:?}", items(&got_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_serves_history_and_a_protected_group_admits_only_credentialed_members() {
    let key = GroupKey::generate();
    let secret = Group {
        name: "secret".to_owned(),
        membership: Membership::Protected(key.public()),
    };
    let history: Vec<Envelope> = (1..=5).map(|o| stored("s1", o, "h")).collect();
    let mut gateway = start(
        Role::Gateway,
        vec![],
        vec![Group::public(), secret.clone()],
        Some(history),
    )
    .await;
    let g = gateway.addr.clone().expect("gateway listens");
    let gateway_id = gateway.overlay.local_peer_id();
    let member = start(Role::Edge, vec![g.clone()], vec![secret.clone()], None).await;
    let outsider = start(Role::Edge, vec![g.clone()], vec![secret.clone()], None).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let credential = Credential::issue(&key, "secret", member.overlay.local_peer_id(), now + 3600);

    // Without a credential: refused.
    let ask = |credential: Option<Vec<u8>>, after: u64| CatchUpRequest {
        group: "secret".to_owned(),
        node: "s1".to_owned(),
        after,
        limit: 2,
        credential,
    };
    let refused = tokio::time::timeout(WAIT, outsider.overlay.catch_up(gateway_id, ask(None, 0)))
        .await
        .expect("answered in time")
        .expect("answered");
    assert!(
        matches!(&refused, CatchUpResponse::Refused { code, .. } if code == "not_member"),
        "{refused:?}"
    );
    // Another peer's credential does not work either.
    let stolen = tokio::time::timeout(
        WAIT,
        outsider
            .overlay
            .catch_up(gateway_id, ask(Some(credential.to_bytes()), 0)),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    assert!(
        matches!(stolen, CatchUpResponse::Refused { .. }),
        "{stolen:?}"
    );

    // The member pages through history, two items at a time.
    let mut offsets = Vec::new();
    let mut after = 0;
    loop {
        let page = tokio::time::timeout(
            WAIT,
            member
                .overlay
                .catch_up(gateway_id, ask(Some(credential.to_bytes()), after)),
        )
        .await
        .expect("answered in time")
        .expect("answered");
        let CatchUpResponse::Page(page) = page else {
            panic!("refused: {page:?}");
        };
        for bytes in &page.items {
            let e = Envelope::decode(bytes).expect("a valid envelope");
            offsets.push(e.offset.expect("stored"));
            after = e.offset.expect("stored");
        }
        if after >= page.last_offset {
            break;
        }
    }
    assert_eq!(offsets, vec![1, 2, 3, 4, 5]);

    // Publications in the protected pipe: the member's (admitted by its catch-up) arrive, the
    // outsider's are rejected.
    for n in [&gateway, &member, &outsider] {
        n.overlay
            .subscribe("secret", "s1")
            .await
            .expect("subscribe");
    }
    joined(&gateway, "secret", "s1", 2).await;
    joined(&member, "secret", "s1", 1).await;
    joined(&outsider, "secret", "s1", 1).await;
    let payload = Payload::json(Bytes::from_static(b"1")).expect("json");
    for (peer, id) in [(&member, "m1"), (&outsider, "o1")] {
        let e = Envelope::publication(
            NodeName::new("s1").expect("node"),
            ItemId::new(id).expect("id"),
            payload.clone(),
            &peer.overlay.local_peer_id(),
            1,
        );
        peer.overlay.publish("secret", &e).await.expect("publish");
    }
    let got = drain(&mut gateway, Duration::from_millis(1500)).await;
    assert_eq!(items(&got), vec![(None, "m1".to_owned())]);
    assert_eq!(rejections(&got), vec!["missing"]);
}
