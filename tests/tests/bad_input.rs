//! Bad input gets a clear error with a stable code, never takes the process down and never
//! corrupts stored data (DESIGN.md guarantee 3).

use anyhow::{Context, Result, bail, ensure};
use juxta_tests::{Api, Server, ServerOptions, SseClient, unique};
use reqwest::Method;
use serde_json::{Value, json};

/// The body limit the server is started with (env override of `http.max_body_bytes`).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// A node with three items; returns them as stored.
async fn seed(api: &Api, node: &str) -> Result<Vec<Value>> {
    api.create_node(node, None).await?;
    for n in 1..=3 {
        api.publish_payload(node, Some(&format!("seed-{n}")), json!({ "n": n }))
            .await?;
    }
    let items = api.all_items(node).await?;
    ensure!(items.len() == 3, "seeded {items:?}");
    Ok(items)
}

/// The server still answers and the seeded items are unchanged.
async fn intact(api: &Api, node: &str, seeded: &[Value], after: &str) -> Result<()> {
    ensure!(api.healthy().await?, "not healthy after {after}");
    let items = api
        .all_items(node)
        .await
        .with_context(|| format!("after {after}"))?;
    ensure!(items == seeded, "items changed after {after}: {items:?}");
    Ok(())
}

#[tokio::test]
async fn given_malformed_rest_requests_when_sent_then_each_gets_its_problem_code_and_stored_items_stay_intact()
-> Result<()> {
    let server = Server::start(
        ServerOptions::new().env("JUXTA_HTTP__MAX_BODY_BYTES", MAX_BODY_BYTES.to_string()),
    )
    .await?;
    let api = server.api();
    let node = unique("solid");
    let seeded = seed(&api, &node).await?;
    let items_path = format!("/api/v1/nodes/{node}/items");
    let node_json = api.get_node(&node).await?.expect(200)?;
    let epoch = node_json["epoch"]
        .as_str()
        .context("node without epoch")?
        .to_owned();

    let json_ct = "application/json";
    let cases: Vec<Case> = vec![
        Case(
            "invalid JSON item",
            400,
            "invalid_json",
            Method::POST,
            items_path.clone(),
            Some("{\"payload\": ".into()),
        ),
        Case(
            "invalid JSON node config",
            400,
            "invalid_json",
            Method::PUT,
            format!("/api/v1/nodes/{node}"),
            Some("{not json".into()),
        ),
        Case(
            "invalid node config value",
            400,
            "invalid_config",
            Method::PUT,
            format!("/api/v1/nodes/{node}"),
            Some("{\"max_items\": 0}".into()),
        ),
        Case(
            "empty item id",
            400,
            "invalid_item_id",
            Method::POST,
            items_path.clone(),
            Some(json!({ "id": "", "payload": 1 }).to_string()),
        ),
        Case(
            "item id with a control character",
            400,
            "invalid_item_id",
            Method::POST,
            items_path.clone(),
            Some(json!({ "id": "a\u{1}b", "payload": 1 }).to_string()),
        ),
        Case(
            "malformed XML payload",
            400,
            "invalid_payload",
            Method::POST,
            items_path.clone(),
            Some(json!({ "xml": "<unclosed xmlns='urn:x'>" }).to_string()),
        ),
        Case(
            "body over the limit",
            413,
            "body_too_large",
            Method::POST,
            items_path.clone(),
            Some(json!({ "payload": { "pad": "x".repeat(2 * MAX_BODY_BYTES) } }).to_string()),
        ),
        Case(
            "publish to an unknown node",
            404,
            "node_not_found",
            Method::POST,
            "/api/v1/nodes/no-such-node/items".into(),
            Some("{\"payload\": 1}".into()),
        ),
        Case(
            "items of an unknown node",
            404,
            "node_not_found",
            Method::GET,
            "/api/v1/nodes/no-such-node/items".into(),
            None,
        ),
        Case(
            "unknown item",
            404,
            "item_not_found",
            Method::GET,
            format!("{items_path}/no-such-item"),
            None,
        ),
        Case(
            "node name with a space",
            400,
            "invalid_node_name",
            Method::PUT,
            "/api/v1/nodes/bad%20name".into(),
            Some("{}".into()),
        ),
        Case(
            "node name with a double slash",
            400,
            "invalid_node_name",
            Method::PUT,
            "/api/v1/nodes/a%2F%2Fb".into(),
            Some("{}".into()),
        ),
        Case(
            "after beyond the last offset",
            400,
            "offset_out_of_range",
            Method::GET,
            format!("{items_path}?after=100"),
            None,
        ),
        Case(
            "after with a wrong epoch",
            409,
            "epoch_mismatch",
            Method::GET,
            format!("{items_path}?after=1&epoch={}", other_epoch(&epoch)),
            None,
        ),
        Case(
            "malformed epoch",
            400,
            "invalid_epoch",
            Method::GET,
            format!("{items_path}?after=1&epoch=xyz"),
            None,
        ),
    ];
    for Case(what, status, code, method, path, body) in cases {
        let reply = match body {
            Some(body) => api.call_raw(method, &path, json_ct, body).await?,
            None => api.call(method, &path, None).await?,
        };
        reply
            .expect_problem(status, code)
            .with_context(|| format!("case: {what}"))?;
        intact(&api, &node, &seeded, what).await?;
    }

    // A resume point that is not `<epoch>:<offset>`.
    match SseClient::try_open(&api, &node, &[], Some("garbage")).await? {
        Err(reply) => reply.expect_problem(400, "invalid_last_event_id")?,
        Ok(_) => bail!("SSE accepted Last-Event-ID: garbage"),
    }
    intact(&api, &node, &seeded, "a malformed Last-Event-ID").await?;

    // A body just under the limit is fine (the limit is the limit, not a guess).
    let fits = json!({ "id": "fits", "payload": { "pad": "y".repeat(MAX_BODY_BYTES / 2) } });
    api.publish(&node, &fits).await?.expect(201)?;
    ensure!(
        api.all_items(&node).await?.len() == 4,
        "the fitting item was not stored"
    );
    Ok(())
}

#[tokio::test]
async fn given_malformed_websocket_frames_when_sent_then_each_gets_an_error_and_the_connection_stays_usable()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("solid");
    let seeded = seed(&api, &node).await?;
    let mut ws = server.ws().await?;

    ws.send_text("this is not JSON {").await?;
    expect_ws_error(ws.recv().await?, "invalid_json", None)?;
    ws.ping("after-garbage").await?;

    ws.send_binary(b"\x00\x01binary".to_vec()).await?;
    expect_ws_error(ws.recv().await?, "unsupported_frame", None)?;
    ws.ping("after-binary").await?;

    ws.send_json(&json!({ "op": "dance", "ref": "r-dance" }))
        .await?;
    expect_ws_error(ws.recv().await?, "invalid_request", Some("r-dance"))?;

    ws.send_json(&json!({ "op": "subscribe", "ref": "r-nonode" }))
        .await?;
    expect_ws_error(ws.recv().await?, "invalid_request", Some("r-nonode"))?;

    ws.send_json(&json!({ "node": node })).await?;
    expect_ws_error(ws.recv().await?, "invalid_request", None)?;

    expect_ws_error(
        ws.subscribe("no-such-node", None, None).await?,
        "node_not_found",
        None,
    )?;
    expect_ws_error(
        ws.subscribe("bad name", None, None).await?,
        "invalid_node_name",
        None,
    )?;
    expect_ws_error(
        ws.subscribe(&node, Some(100), None).await?,
        "offset_out_of_range",
        None,
    )?;
    ws.send_json(&json!({ "op": "publish", "node": "no-such-node", "payload": 1, "ref": "r-pub" }))
        .await?;
    expect_ws_error(ws.recv().await?, "node_not_found", Some("r-pub"))?;

    ws.ping("after-all").await?;
    intact(&api, &node, &seeded, "bad WebSocket frames").await?;

    // The same connection still subscribes and receives.
    let subscribed = ws.subscribed(&node, Some(3), None).await?;
    ensure!(
        subscribed["last_offset"].as_u64() == Some(3),
        "{subscribed}"
    );
    api.publish_payload(&node, Some("live"), json!("live"))
        .await?;
    let event = ws.next_event().await?;
    ensure!(event["offset"].as_u64() == Some(4), "live event: {event}");
    Ok(())
}

/// Checks `{"type":"error","code":code,"message":…}` with `ref` echoed when one was sent.
fn expect_ws_error(msg: Value, code: &str, reference: Option<&str>) -> Result<()> {
    ensure!(
        msg["type"] == "error" && msg["code"] == code,
        "expected WS error {code}, got {msg}"
    );
    ensure!(
        msg["message"].is_string(),
        "error {code} without message: {msg}"
    );
    if let Some(reference) = reference {
        ensure!(
            msg["ref"] == reference,
            "error {code} without ref {reference}: {msg}"
        );
    }
    Ok(())
}

/// One malformed request: description, expected status and code, method, path, raw body.
struct Case(
    &'static str,
    u16,
    &'static str,
    Method,
    String,
    Option<String>,
);

/// A well-formed epoch that differs from `epoch` in every character.
fn other_epoch(epoch: &str) -> String {
    epoch
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect()
}
