//! XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`, through the real binary: xmpp.js (a
//! client library we did not write) logs in with SCRAM, subscribes and publishes, and items
//! cross between it, REST and a juxta WebSocket subscriber; bad framing gets the RFC 6120
//! stream error and ends only that stream.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt as _, StreamExt as _};
use juxta_tests::interop::{XmppJs, wait_for_subscribers, xmpp_server};
use juxta_tests::{Server, WsClient, unique};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const OPEN: &str =
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";

fn xmpp_ws_url(server: &Server) -> String {
    server.base_url().replace("http://", "ws://") + "/xmpp-websocket"
}

#[tokio::test]
async fn an_xmppjs_client_over_websocket_and_rest_exchange_items() -> Result<()> {
    let server = xmpp_server("alice", "s3cret pass").await?;
    let api = server.api();
    let node = unique("wsx");
    api.create_node(
        &node,
        Some(&json!({"publish_model": "open", "send_last_published_item": "never"})),
    )
    .await?;
    let steps = json!([
        {"op": "ping", "to": "localhost"},
        {"op": "subscribe", "to": "pubsub.localhost", "node": node},
        {"op": "publish", "to": "pubsub.localhost", "node": node, "id": "x1",
         "payload": "<entry xmlns='urn:example:entry'>from the browser side</entry>"},
        {"op": "wait_events", "node": node, "count": 2, "timeout": 30},
    ]);
    let mut ws = WsClient::connect(&server.ws_url(), server.admin_key()).await?;
    ws.subscribed(&node, None, None).await?;
    let client = XmppJs::start(
        &xmpp_ws_url(&server),
        "alice@localhost",
        "s3cret pass",
        &steps,
    )?;

    // Once alice is subscribed, REST publishes.
    wait_for_subscribers(&server, &node, 2, "xmpp.js").await?;
    api.publish(&node, &json!({"id": "r1", "payload": {"t": 21.5}}))
        .await?
        .expect(201)?;

    // The WebSocket subscriber gets both items, alice's with its XML and publisher intact.
    let events = ws.events(2).await?;
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["item"]["id"].as_str().unwrap_or(""))
        .collect();
    ids.sort_unstable();
    ensure!(ids == ["r1", "x1"], "{events:?}");
    let x1 = events
        .iter()
        .find(|e| e["item"]["id"] == "x1")
        .context("x1")?;
    ensure!(
        x1["item"]["xml"]
            .as_str()
            .is_some_and(|x| x.contains("from the browser side") && x.contains("urn:example:entry")),
        "{x1}"
    );
    ensure!(x1["item"]["publisher"] == "alice@localhost", "{x1}");

    let (ok, report) = client.finish(Duration::from_secs(60)).await?;
    ensure!(ok, "xmpp.js failed: {report}");
    ensure!(
        report["jid"]
            .as_str()
            .is_some_and(|j| j.starts_with("alice@localhost/")),
        "{report}"
    );
    let steps = report["steps"].as_array().context("steps")?;
    ensure!(steps[1]["subscription"] == "subscribed", "{report}");
    let got = steps[3]["events"].as_array().context("events")?;
    let r1 = got
        .iter()
        .find(|e| e["id"] == "r1")
        .with_context(|| format!("the REST item reached xmpp.js: {report}"))?;
    ensure!(
        r1["from"] == "pubsub.localhost"
            && r1["payload"]
                .as_str()
                .is_some_and(|p| p.contains("urn:xmpp:json:0") && p.contains("21.5")),
        "the REST item reaches xmpp.js as XEP-0335 JSON: {report}"
    );
    ensure!(
        got.iter().any(|e| e["id"] == "x1"),
        "alice is notified of her own item: {report}"
    );
    Ok(())
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(server: &Server) -> Result<RawWs> {
    let mut request = xmpp_ws_url(server).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    ensure!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .is_some_and(|v| v == "xmpp"),
        "the server confirms the xmpp subprotocol: {response:?}"
    );
    Ok(ws)
}

/// Reads text messages until one contains `marker`; returns them all.
async fn read_until(ws: &mut RawWs, marker: &str) -> Result<Vec<String>> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let done = t.contains(marker);
                    got.push(t.to_string());
                    if done {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("{e}; got {got:?}"),
                None => bail!("closed; got {got:?}"),
            }
        }
    })
    .await
    .with_context(|| format!("waiting for {marker:?}; got {got:?}"))??;
    Ok(got)
}

#[tokio::test]
async fn bad_framing_ends_that_stream_with_the_stream_error_and_others_go_on() -> Result<()> {
    let server = Server::start_default().await?;

    // Without the subprotocol: refused before upgrading.
    let plain = tokio_tungstenite::connect_async(xmpp_ws_url(&server)).await;
    match plain {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            ensure!(r.status() == 400, "{r:?}")
        }
        other => bail!("expected a 400 without the xmpp subprotocol, got {other:?}"),
    }

    let mut good = raw(&server).await?;
    good.send(Message::text(OPEN)).await?;
    let opened = read_until(&mut good, "</stream:features>").await?;
    ensure!(
        opened[0].starts_with("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'")
            && opened[0].contains("from='localhost'")
            && opened[0].contains("version='1.0'"),
        "{opened:?}"
    );
    let features = opened.last().context("features")?;
    ensure!(
        features.contains("SCRAM-SHA-256") && !features.contains("PLAIN"),
        "SCRAM only: this stream is not known to be encrypted: {features}"
    );
    ensure!(
        !features.contains("starttls"),
        "no STARTTLS over WebSocket: {features}"
    );

    for (bad, condition) in [
        (
            Message::text("<iq xmlns='jabber:client' type='get'"),
            "not-well-formed",
        ),
        (
            Message::text("<!DOCTYPE x [<!ENTITY a 'b'>]><x/>"),
            "restricted-xml",
        ),
        (
            Message::binary(b"<iq/>".to_vec()),
            "unsupported-stanza-type",
        ),
        (
            Message::text("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>"),
            "unsupported-stanza-type",
        ),
    ] {
        let mut ws = raw(&server).await?;
        ws.send(Message::text(OPEN)).await?;
        read_until(&mut ws, "</stream:features>").await?;
        ws.send(bad.clone()).await?;
        let got = read_until(
            &mut ws,
            "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
        )
        .await
        .with_context(|| format!("after {bad:?}"))?;
        let error = got
            .iter()
            .find(|m| m.contains("<stream:error"))
            .with_context(|| format!("a stream error after {bad:?}: {got:?}"))?;
        ensure!(
            error.contains("urn:ietf:params:xml:ns:xmpp-streams") && error.contains(condition),
            "{bad:?} -> {error}"
        );
    }

    // The first stream is unaffected: SASL goes on (a SCRAM client-first message
    // "n,,n=alice,r=fyko+d2lbbFgONRv9qkxdawL" gets a challenge).
    good.send(Message::text(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>\
         biwsbj1hbGljZSxyPWZ5a28rZDJsYmJGZ09OUnY5cWt4ZGF3TA==</auth>",
    ))
    .await?;
    let answer = read_until(&mut good, "<challenge").await?;
    ensure!(
        answer
            .last()
            .is_some_and(|a| a.contains("urn:ietf:params:xml:ns:xmpp-sasl")),
        "{answer:?}"
    );
    Ok(())
}
