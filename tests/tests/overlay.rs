//! The overlay end to end, through the real binary: `juxta peer` (an edge peer in its own
//! process) joins a gateway's pipe, catches up on history, receives live REST items, and
//! publishes items that reach a WebSocket subscriber and other peers, in order, once.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use juxta_tests::interop::Slixmpp;
use juxta_tests::peer::{Peer, peer_id};
use juxta_tests::{Server, ServerOptions, WsClient, unique};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_peer_catches_up_follows_live_items_and_publishes_to_websocket_subscribers()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("pipe");
    api.create_node(&node, Some(&json!({"publish_model": "open"})))
        .await?;
    api.publish(&node, &json!({"id": "r1", "payload": {"t": 1}}))
        .await?
        .expect(201)?;

    let dir = tempfile::tempdir()?;
    let follower_dir = dir.path().join("follower");
    let mut follower = Peer::start(&server, &["--subscribe", &node], &follower_dir)?;
    // History first (catch-up), then live items.
    let first = follower.next().await?;
    ensure!(
        first["type"] == "event" && first["offset"] == 1 && first["item"]["id"] == "r1",
        "{first}"
    );
    api.publish(&node, &json!({"id": "r2", "payload": {"t": 2}}))
        .await?
        .expect(201)?;
    let second = follower.next().await?;
    ensure!(
        second["offset"] == 2 && second["item"]["payload"]["t"] == 2,
        "{second}"
    );

    // Another peer publishes two lines (one is not JSON): the good one reaches a WebSocket
    // subscriber and the follower, with the publishing peer as publisher.
    let mut ws = WsClient::connect(&server.ws_url(), server.admin_key()).await?;
    ws.subscribed(&node, None, None).await?;
    let publisher_dir = dir.path().join("publisher");
    let publisher_id = peer_id(&server, &publisher_dir)?;
    let mut publisher = Peer::start(&server, &["--publish", &node], &publisher_dir)?;
    let mut stdin = publisher.stdin()?;
    stdin.write_all(b"{\"from\":\"peer\"}\nnot json\n").await?;
    drop(stdin);
    let refused = publisher.next().await?;
    ensure!(
        refused["type"] == "error" && refused["code"] == "invalid_json",
        "{refused}"
    );
    let status = publisher.exit(WAIT).await?;
    ensure!(status.success(), "juxta peer --publish: {status}");

    let event = ws.next_event().await?;
    ensure!(
        event["offset"] == 3
            && event["item"]["payload"]["from"] == "peer"
            && event["item"]["publisher"] == publisher_id.as_str(),
        "{event}"
    );
    let third = follower.next().await?;
    ensure!(
        third["offset"] == 3 && third["item"]["publisher"] == publisher_id.as_str(),
        "{third}"
    );
    // Once each: nothing more arrives for the follower.
    follower.silent_for(Duration::from_secs(2)).await?;

    // The gateway reports itself and the connected follower.
    let overlay = api
        .call(reqwest::Method::GET, "/api/v1/overlay", None)
        .await?
        .expect(200)?;
    let follower_id = peer_id(&server, &follower_dir)?;
    ensure!(
        overlay["connected_peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == follower_id.as_str())),
        "{overlay}"
    );
    ensure!(overlay["groups"] == json!(["public"]), "{overlay}");
    Ok(())
}

/// `juxta peer --discover G` lists the JSON lines of what G offers: every node of the group
/// with the peers serving it (the gateway, and an edge peer following one), and each peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_lists_the_groups_nodes_and_the_peers_serving_them() -> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let (a, b) = (unique("disc-a"), unique("disc-b"));
    api.create_node(&a, None).await?;
    api.create_node(&b, None).await?;
    let gateway = server
        .p2p_addr()
        .and_then(|a| a.rsplit('/').next())
        .context("gateway peer id")?
        .to_owned();
    let dir = tempfile::tempdir()?;
    let follower_dir = dir.path().join("follower");
    let follower_id = peer_id(&server, &follower_dir)?;
    let mut follower = Peer::start(&server, &["--subscribe", &a], &follower_dir)?;
    drop(follower.stdin()?);

    // The gateway advertises new nodes within a scan, the follower once it is connected:
    // ask until both show up.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (nodes, peers) = loop {
        let out = Command::new(server.binary())
            .args(["peer", "--bootstrap"])
            .arg(server.p2p_addr().context("p2p address")?)
            .arg("--identity-dir")
            .arg(dir.path().join("asker"))
            .args(["--discover", "public"])
            .output()
            .await?;
        ensure!(out.status.success(), "juxta peer --discover: {out:?}");
        let lines: Vec<Value> = String::from_utf8(out.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let nodes: Vec<&Value> = lines.iter().filter(|l| l["type"] == "node").collect();
        let peers: Vec<&Value> = lines.iter().filter(|l| l["type"] == "peer").collect();
        let serving_a = nodes
            .iter()
            .find(|n| n["node"] == a.as_str())
            .map(|n| n["peers"].clone());
        let done = serving_a.is_some_and(|p| {
            p.as_array().is_some_and(|p| {
                p.iter().any(|x| x == gateway.as_str())
                    && p.iter().any(|x| x == follower_id.as_str())
            })
        }) && nodes.iter().any(|n| n["node"] == b.as_str());
        if done {
            break (
                nodes.into_iter().cloned().collect::<Vec<_>>(),
                peers.into_iter().cloned().collect::<Vec<_>>(),
            );
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "discovery never listed both nodes and both peers: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let only_b = nodes
        .iter()
        .find(|n| n["node"] == b.as_str())
        .context("b")?;
    ensure!(only_b["peers"] == json!([gateway]), "{only_b}");
    let gw = peers
        .iter()
        .find(|p| p["peer"] == gateway.as_str())
        .context("gateway listed")?;
    ensure!(
        gw["role"] == "gateway" && gw["expires_at"].as_u64().is_some_and(|t| t > 0),
        "{gw}"
    );
    let f = peers
        .iter()
        .find(|p| p["peer"] == follower_id.as_str())
        .context("follower listed")?;
    ensure!(f["role"] == "edge" && f["nodes"] == json!([a]), "{f}");
    follower.kill().await;
    Ok(())
}

/// Two gateways with their own stores in one overlay: a member peer's publication is stored
/// once by each and reaches a WebSocket subscriber on one and an XMPP client on the other;
/// stored events never come back in, so a REST item stays on its own gateway, with no echo
/// and no loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_in_one_overlay_each_store_a_peers_publication_once_without_echo() -> Result<()>
{
    let a = Server::start_default().await?;
    let a_addr = a.p2p_addr().context("a's p2p address")?.to_owned();
    let b =
        Server::start(ServerOptions::new().env("JUXTA_P2P__BOOTSTRAP", format!("[\"{a_addr}\"]")))
            .await?;
    let node = unique("twogw");
    for s in [&a, &b] {
        s.api()
            .create_node(&node, Some(&json!({"publish_model": "open"})))
            .await?;
    }
    b.api()
        .call(
            reqwest::Method::PUT,
            "/api/v1/accounts/bob",
            Some(&json!({"password": "bob pass"})),
        )
        .await?
        .expect(201)?;
    // Both gateways carry the pipe, and b is connected to a.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let o = b
            .api()
            .call(reqwest::Method::GET, "/api/v1/overlay", None)
            .await?
            .expect(200)?;
        let a_id = a_addr.rsplit('/').next().unwrap_or_default();
        if o["connected_peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == a_id))
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "b never connected to a: {o}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut ws_a = WsClient::connect(&a.ws_url(), a.admin_key()).await?;
    ws_a.subscribed(&node, None, None).await?;
    let mut ws_b = WsClient::connect(&b.ws_url(), b.admin_key()).await?;
    ws_b.subscribed(&node, None, None).await?;
    let xmpp = b.xmpp_addr().context("b's XMPP address")?;
    let ca = b.data_dir().join("xmpp-localhost.crt");
    let client = Slixmpp::start(
        xmpp,
        "bob@localhost",
        "bob pass",
        &ca,
        &json!([
            {"op": "subscribe", "to": "pubsub.localhost", "node": node},
            {"op": "wait_events", "node": node, "count": 1, "timeout": 40},
        ]),
    )?;
    // The XMPP subscription is in when b counts three subscribers (its pipe feeder, the
    // WebSocket client, bob).
    juxta_tests::interop::wait_for_subscribers(&b, &node, 3, "bob").await?;

    // A peer joined through a publishes one item; gossip takes it to b as well. Publishing
    // may start before b has seen the peer in the pipe; the peer retries until a gateway
    // took it, and b gets it from a's forwarding.
    let dir = tempfile::tempdir()?;
    let publisher_dir = dir.path().join("publisher");
    let publisher_id = peer_id(&a, &publisher_dir)?;
    let mut publisher = Peer::start(&a, &["--publish", &node], &publisher_dir)?;
    let mut stdin = publisher.stdin()?;
    stdin.write_all(b"{\"from\":\"peer\"}\n").await?;
    drop(stdin);
    let status = publisher.exit(WAIT).await?;
    ensure!(status.success(), "juxta peer --publish: {status}");

    for (name, ws) in [("a", &mut ws_a), ("b", &mut ws_b)] {
        let e = ws.next_event().await?;
        ensure!(
            e["offset"] == 1
                && e["item"]["payload"]["from"] == "peer"
                && e["item"]["publisher"] == publisher_id.as_str(),
            "gateway {name}: {e}"
        );
    }
    let (ok, report) = client.finish(WAIT).await?;
    ensure!(ok, "XMPP client on b: {report}");
    let event = &report["steps"][1]["events"][0];
    ensure!(
        event["payload"]
            .as_str()
            .is_some_and(|p| p.contains("urn:xmpp:json:0") && p.contains("peer")),
        "XMPP client on b: {report}"
    );

    // A REST item on a stays on a: b ignores a's stored events (no echo), and neither
    // gateway takes its own or the other's stored events back in (no loop).
    a.api()
        .publish(&node, &json!({"id": "rest", "payload": {"n": 2}}))
        .await?
        .expect(201)?;
    let e = ws_a.next_event().await?;
    ensure!(e["offset"] == 2 && e["item"]["id"] == "rest", "{e}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a_items = a.api().all_items(&node).await?;
    let b_items = b.api().all_items(&node).await?;
    ensure!(a_items.len() == 2, "a stored {a_items:?}");
    ensure!(
        b_items.len() == 1 && b_items[0]["publisher"] == publisher_id.as_str(),
        "b stored {b_items:?}"
    );
    let quiet = tokio::time::timeout(Duration::from_secs(1), ws_b.next_event()).await;
    ensure!(quiet.is_err(), "b delivered more: {quiet:?}");
    Ok(())
}
