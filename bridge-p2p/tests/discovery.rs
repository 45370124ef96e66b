//! Advertisements, discovery and per-peer limits, with real swarms on loopback TCP.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use juxta_bridge_p2p::advert::{self, AdvertRole, Advertisement};
use juxta_bridge_p2p::catchup::{CatchUpRequest, CatchUpResponse, Page};
use juxta_bridge_p2p::node::{CatchUpSource, Config, Limits, Overlay, OverlayEvent, Role};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, identity, kad};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

struct Node {
    overlay: Overlay,
    keypair: identity::Keypair,
    events: mpsc::Receiver<OverlayEvent>,
    addr: Multiaddr,
}

/// Answers every catch-up request with an empty page after `delay`.
struct Slow(Duration);

impl CatchUpSource for Slow {
    fn page(
        &self,
        _peer: PeerId,
        _request: CatchUpRequest,
    ) -> Pin<Box<dyn Future<Output = CatchUpResponse> + Send>> {
        let delay = self.0;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            CatchUpResponse::Page(Page {
                epoch: 1,
                first_offset: 1,
                last_offset: 0,
                items: Vec::new(),
            })
        })
    }
}

async fn start(config: Config, source: Option<Arc<dyn CatchUpSource>>) -> Node {
    let keypair = identity::Keypair::generate_ed25519();
    let (overlay, mut events) = Overlay::spawn(keypair.clone(), config, None, source)
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
    .expect("listening")
    .with(Protocol::P2p(overlay.local_peer_id()));
    Node {
        overlay,
        keypair,
        events,
        addr,
    }
}

fn config(role: Role, bootstrap: Vec<Multiaddr>) -> Config {
    let mut c = Config::new(role);
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    c.bootstrap = bootstrap;
    c
}

/// Waits for `node` to report a refusal with `reason`; what else it reported on the way.
async fn refused(node: &mut Node, reason: &str) -> Vec<OverlayEvent> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(e) = node.events.recv().await {
            if matches!(&e, OverlayEvent::Refused { reason: r, .. } if *r == reason) {
                return true;
            }
            seen.push(e);
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "no {reason} refusal; saw {:?}",
        seen.iter()
            .filter(|e| matches!(e, OverlayEvent::Refused { .. }))
            .collect::<Vec<_>>()
    );
    seen
}

/// Discovers `group` from `node` (through `point`) until `done` holds for the answer.
async fn discover_until(
    node: &Node,
    point: PeerId,
    done: impl Fn(&advert::Discovery) -> bool,
) -> advert::Discovery {
    let mut last = None;
    let r = tokio::time::timeout(WAIT, async {
        loop {
            let d = advert::discover(&node.overlay, "public", &[point])
                .await
                .expect("discover");
            if done(&d) {
                return d;
            }
            last = Some(d);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("discovery never got there; last answer: {last:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_the_groups_nodes_and_who_serves_them_and_forged_records_are_refused() {
    let mut gw_config = config(Role::Gateway, Vec::new());
    gw_config.advert_ttl = Duration::from_secs(3);
    let mut gateway = start(gw_config, None).await;
    let gw = gateway.overlay.local_peer_id();
    gateway
        .overlay
        .advertise("public", vec!["beta".into(), "alpha".into()])
        .await
        .expect("advertise");

    let member = start(config(Role::Edge, vec![gateway.addr.clone()]), None).await;
    let asker = start(config(Role::Edge, vec![gateway.addr.clone()]), None).await;
    let m = member.overlay.local_peer_id();
    // The member follows alpha: it advertises that once the gateway is its Kademlia server.
    tokio::time::timeout(WAIT, async {
        loop {
            member
                .overlay
                .advertise("public", vec!["alpha".into()])
                .await
                .expect("advertise");
            let providers = gateway
                .overlay
                .get_providers(advert::pipe_key("public", "alpha"))
                .await
                .expect("providers");
            if providers.contains(&m) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the member's provider record reached the gateway");

    let d = discover_until(&asker, gw, |d| d.peers.len() == 2 && d.nodes.len() == 2).await;
    assert_eq!(d.nodes["alpha"].len(), 2, "{d:#?}");
    assert!(
        d.nodes["alpha"].contains(&gw.to_string()) && d.nodes["alpha"].contains(&m.to_string())
    );
    assert_eq!(d.nodes["beta"], vec![gw.to_string()]);
    let g = d
        .peers
        .iter()
        .find(|p| p.peer == gw.to_string())
        .expect("gateway");
    assert_eq!(g.role, Some(AdvertRole::Gateway));
    assert_eq!(
        g.addrs,
        vec![
            gateway
                .addr
                .iter()
                .take(2)
                .collect::<Multiaddr>()
                .to_string()
        ]
    );
    let e = d
        .peers
        .iter()
        .find(|p| p.peer == m.to_string())
        .expect("member");
    assert_eq!(e.role, Some(AdvertRole::Edge));
    // The member also registered at the gateway's rendezvous point (namespace = group),
    // with its relayed address.
    assert!(e.found_in.contains(&"rendezvous"), "{e:?}");
    assert!(d.refused.is_empty(), "{d:?}");

    // Forged records: the member's record under the gateway's key; another key's signature
    // over the gateway's name; garbage. The gateway refuses each and keeps its own.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mine = Advertisement::new(
        m,
        "public",
        AdvertRole::Gateway,
        ["evil".into()],
        [],
        now,
        WAIT,
    )
    .sign(&member.keypair)
    .expect("sign");
    for (value, reason) in [
        (mine, "advert_wrong_key"),
        (b"\xa1\x00".to_vec(), "advert_malformed"),
    ] {
        member
            .overlay
            .put_record(kad::Record::new(advert::advert_key("public", &gw), value))
            .await
            .expect("put");
        refused(&mut gateway, reason).await;
    }
    let d = discover_until(&asker, gw, |d| d.nodes.len() == 2).await;
    assert!(!d.nodes.contains_key("evil"), "{d:?}");

    // Expiry: the gateway's advertisement lives 3 s; unrefreshed, it disappears from
    // discovery, and a refresh brings it back.
    let d = discover_until(&asker, gw, |d| {
        d.peers
            .iter()
            .all(|p| p.peer != gw.to_string() || p.role.is_none())
    })
    .await;
    assert!(
        !d.nodes.contains_key("beta"),
        "expired advertisement still served: {d:?}"
    );
    gateway
        .overlay
        .advertise(
            "public",
            vec!["alpha".into(), "beta".into(), "gamma".into()],
        )
        .await
        .expect("refresh");
    let d = discover_until(&asker, gw, |d| d.nodes.contains_key("gamma")).await;
    assert_eq!(d.nodes["gamma"], vec![gw.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_refused_and_counted_while_others_are_served() {
    let mut gw_config = config(Role::Gateway, Vec::new());
    gw_config.limits = Limits {
        max_connections_per_peer: 2,
        max_catch_ups_per_peer: 2,
        max_reservations: 1,
        ..Limits::default()
    };
    let mut gateway = start(
        gw_config,
        Some(Arc::new(Slow(Duration::from_millis(300))) as Arc<dyn CatchUpSource>),
    )
    .await;
    let gw = gateway.overlay.local_peer_id();
    let flood = start(config(Role::Edge, vec![gateway.addr.clone()]), None).await;
    let good = start(config(Role::Edge, vec![gateway.addr.clone()]), None).await;

    // Reservations beyond the limit: each edge peer asks for one on connecting, and the
    // gateway holds one in all here.
    refused(&mut gateway, "relay_reservation_denied").await;

    // Catch-up requests beyond the per-peer limit: refused with a reason, not queued.
    let request = || CatchUpRequest {
        group: "public".into(),
        node: "n".into(),
        after: 0,
        limit: 10,
        credential: None,
    };
    let mut calls = Vec::new();
    for _ in 0..40 {
        let o = flood.overlay.clone();
        calls.push(tokio::spawn(async move { o.catch_up(gw, request()).await }));
    }
    let good_answer = good.overlay.catch_up(gw, request()).await;
    let mut served = 0;
    let mut limited = 0;
    for c in calls {
        match c.await.expect("task") {
            Ok(CatchUpResponse::Page(_)) => served += 1,
            Ok(CatchUpResponse::Refused { code, .. }) if code == "too_many_requests" => {
                limited += 1
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(
        served >= 2 && limited > 0,
        "served {served}, refused {limited}"
    );
    refused(&mut gateway, "catch_up_limit").await;
    assert!(
        matches!(good_answer, Ok(CatchUpResponse::Page(_))),
        "the well-behaved peer was not served: {good_answer:?}"
    );

    // Connections beyond the per-peer limit.
    for _ in 0..6 {
        flood
            .overlay
            .dial(gateway.addr.clone())
            .await
            .expect("dial");
    }
    refused(&mut gateway, "connection_limit").await;
    let again = good.overlay.catch_up(gw, request()).await;
    assert!(
        matches!(again, Ok(CatchUpResponse::Page(_))),
        "the well-behaved peer was not served after the flood: {again:?}"
    );
}
