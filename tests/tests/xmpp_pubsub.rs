//! XMPP pubsub end to end, through the real binary: slixmpp (a client library we did not
//! write) logs in over STARTTLS with SCRAM, creates and subscribes to a node, and items
//! cross between it and REST / WebSocket in both directions, retractions too.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use juxta_tests::interop::{Slixmpp, wait_for_subscribers, xmpp_server};
use juxta_tests::{WsClient, unique};
use serde_json::{Value, json};

#[tokio::test]
async fn items_and_retractions_cross_between_rest_websocket_and_an_xmpp_client() -> Result<()> {
    let server = xmpp_server("alice", "s3cret pass").await?;
    let api = server.api();
    let node = unique("xnode");
    let xmpp = server.xmpp_addr().context("no XMPP address")?;
    let ca = server.data_dir().join("xmpp-localhost.crt");
    let steps = json!([
        {"op": "disco_info", "to": "pubsub.localhost"},
        {"op": "create", "to": "pubsub.localhost", "node": node},
        {"op": "subscribe", "to": "pubsub.localhost", "node": node},
        {"op": "wait_events", "node": node, "count": 1, "timeout": 30},
        {"op": "publish", "to": "pubsub.localhost", "node": node, "id": "x1",
         "payload": "<entry xmlns='urn:example:entry'>from xmpp</entry>"},
        {"op": "retract", "to": "pubsub.localhost", "node": node, "id": "r1"},
        {"op": "items", "to": "pubsub.localhost", "node": node},
        {"op": "wait_events", "node": node, "count": 4, "timeout": 30},
    ]);
    let client = Slixmpp::start(xmpp, "alice@localhost", "s3cret pass", &ca, &steps)?;

    // Once alice's node exists and her subscription feeds it, a WebSocket client subscribes
    // and REST publishes.
    wait_for_subscribers(&server, &node, 1, "the XMPP client").await?;
    let mut ws = WsClient::connect(&server.ws_url(), server.admin_key()).await?;
    ws.subscribed(&node, None, None).await?;
    api.publish(&node, &json!({"id": "r1", "payload": {"t": 21.5}}))
        .await?
        .expect(201)?;

    // The WebSocket subscriber sees its own REST item, alice's XML item, alice's retraction.
    let events = ws.events(3).await?;
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or(""),
                e["item"]["id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    ensure!(
        kinds
            == [
                ("published", "r1"),
                ("published", "x1"),
                ("retracted", "r1")
            ],
        "{events:?}"
    );
    ensure!(
        events[1]["item"]["xml"]
            .as_str()
            .is_some_and(|x| x.contains("from xmpp") && x.contains("urn:example:entry")),
        "the XML payload reaches WebSocket intact: {events:?}"
    );
    ensure!(
        events[1]["item"]["publisher"] == "alice@localhost",
        "{events:?}"
    );
    // REST retracts alice's item: she gets the notification.
    api.retract(&node, "x1").await?.expect(200)?;

    let (ok, report) = client.finish(Duration::from_secs(120)).await?;
    ensure!(ok, "slixmpp failed: {report}");
    let steps = report["steps"].as_array().context("steps")?;
    let features = steps[0]["features"].to_string();
    ensure!(
        features.contains("http://jabber.org/protocol/pubsub#publish")
            && features.contains("http://jabber.org/protocol/pubsub#subscribe"),
        "{report}"
    );
    ensure!(steps[2]["subscription"] == "subscribed", "{report}");
    let first = &steps[3]["events"][0];
    ensure!(
        first["id"] == "r1"
            && first["payload"]
                .as_str()
                .is_some_and(|p| p.contains("urn:xmpp:json:0") && p.contains("21.5")),
        "the REST item reaches XMPP with the same id, as XEP-0335 JSON: {report}"
    );
    let all: Vec<(String, String)> = steps[7]["events"]
        .as_array()
        .context("events")?
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("published", "r1"),
        ("published", "x1"),
        ("retracted", "r1"),
        ("retracted", "x1"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    ensure!(all == want, "{report}");
    let items: Vec<&Value> = steps[6]["items"]
        .as_array()
        .context("items")?
        .iter()
        .collect();
    ensure!(
        items.len() == 1 && items[0]["id"] == "x1",
        "after retracting r1 only x1 is left: {report}"
    );
    Ok(())
}
