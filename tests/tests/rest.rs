//! The rest of the REST contract end to end: batch publish, idempotency keys, overwrite,
//! retract, purge and delete, and the events each change produces on WebSocket and SSE.

use anyhow::{Context, Result, ensure};
use juxta_tests::{Api, Server, SseClient, unique};
use reqwest::Method;
use serde_json::{Value, json};

async fn publish_with_key(api: &Api, node: &str, key: &str, body: &Value) -> Result<(u16, Value)> {
    let rb = api
        .request(Method::POST, &format!("/api/v1/nodes/{node}/items"))
        .header("idempotency-key", key)
        .json(body);
    let reply = api.send(rb).await?;
    Ok((reply.status, reply.body))
}

#[tokio::test]
async fn given_a_batch_with_a_bad_item_when_published_then_the_good_items_are_stored_and_the_bad_one_reports_its_error()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let (a, b) = (unique("batch-a"), unique("batch-b"));
    api.create_node(&a, None).await?;
    api.create_node(&b, None).await?;

    let reply = api
        .publish_batch(&json!([
            { "node": a, "id": "x1", "payload": { "v": 1 } },
            { "node": "no-such-node", "payload": 2 },
            { "node": b, "payload": [3] },
            { "node": a, "xml": "<e xmlns='urn:example'/>" },
        ]))
        .await?
        .expect(200)?;
    let results = reply["results"].as_array().context("no results")?;
    ensure!(results.len() == 4, "one result per item: {reply}");
    ensure!(
        results[0]["node"] == a.as_str()
            && results[0]["id"] == "x1"
            && results[0]["offset"].as_u64() == Some(1)
            && results[0]["epoch"].is_string(),
        "first result: {}",
        results[0]
    );
    ensure!(
        results[1]["error"]["code"] == "node_not_found"
            && results[1]["error"]["message"].is_string(),
        "second result: {}",
        results[1]
    );
    ensure!(
        results[2]["node"] == b.as_str() && results[2]["offset"].as_u64() == Some(1),
        "third result: {}",
        results[2]
    );
    ensure!(
        results[3]["offset"].as_u64() == Some(2),
        "fourth result: {}",
        results[3]
    );

    let stored = api.all_items(&a).await?;
    ensure!(stored.len() == 2, "items of {a}: {stored:?}");
    ensure!(
        stored[0]["payload"] == json!({ "v": 1 }),
        "payload: {}",
        stored[0]
    );
    ensure!(
        stored[1]["xml"]
            .as_str()
            .is_some_and(|x| x.contains("urn:example")),
        "xml item: {}",
        stored[1]
    );
    ensure!(api.all_items(&b).await?.len() == 1, "items of {b}");
    Ok(())
}

#[tokio::test]
async fn given_a_publish_with_an_idempotency_key_when_it_is_retried_then_the_first_result_is_returned_and_nothing_new_is_stored()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("idem");
    api.create_node(&node, None).await?;
    let mut ws = server.ws().await?;
    ws.subscribed(&node, None, None).await?;

    let body = json!({ "payload": { "order": 17 } });
    let (status, first) = publish_with_key(&api, &node, "order-17", &body).await?;
    ensure!(status == 201, "first publish: {status} {first}");
    let (status, again) = publish_with_key(&api, &node, "order-17", &body).await?;
    ensure!(status == 200, "replayed key: {status} {again}");
    ensure!(
        again["offset"] == first["offset"]
            && again["id"] == first["id"]
            && again["epoch"] == first["epoch"],
        "replay returned {again}, first was {first}"
    );
    let (status, other) = publish_with_key(&api, &node, "order-18", &body).await?;
    ensure!(
        status == 201 && other["offset"].as_u64() == Some(2),
        "new key: {status} {other}"
    );

    ensure!(
        api.all_items(&node).await?.len() == 2,
        "the replay stored an item"
    );
    // Exactly two notifications: the replay emitted nothing.
    let events = ws.events(2).await?;
    ensure!(
        events
            .iter()
            .map(|e| e["offset"].as_u64())
            .eq([Some(1), Some(2)]),
        "events: {events:?}"
    );
    ws.ping("no-third-event").await?;
    Ok(())
}

#[tokio::test]
async fn given_subscribers_when_an_item_is_overwritten_retracted_purged_and_the_node_deleted_then_each_change_arrives_as_an_event()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("lifecycle");
    api.create_node(&node, Some(&json!({ "title": "lifecycle" })))
        .await?;
    let mut ws = server.ws().await?;
    ws.subscribed(&node, None, None).await?;
    let mut sse = SseClient::open(&api, &node, &[], None).await?;
    sse.next_json("subscribed").await?;

    // Overwrite: same id, new offset, new notification; history shows the item once.
    api.publish_payload(&node, Some("a"), json!("v1")).await?;
    api.publish_payload(&node, Some("a"), json!("v2")).await?;
    let items = api.all_items(&node).await?;
    ensure!(
        items.len() == 1 && items[0]["offset"].as_u64() == Some(2) && items[0]["payload"] == "v2",
        "after overwrite: {items:?}"
    );
    let item = api.item(&node, "a").await?.expect(200)?;
    ensure!(item["payload"] == "v2", "GET item: {item}");

    let retracted = api.retract(&node, "a").await?.expect(200)?;
    ensure!(
        retracted["id"] == "a" && retracted["offset"].as_u64() == Some(3),
        "retract: {retracted}"
    );
    api.item(&node, "a")
        .await?
        .expect_problem(404, "item_not_found")?;

    api.publish_payload(&node, Some("b"), json!("b")).await?;
    let purged = api.purge(&node).await?.expect(200)?;
    ensure!(purged["offset"].as_u64() == Some(5), "purge: {purged}");
    ensure!(api.all_items(&node).await?.is_empty(), "items after purge");

    let deleted = api.delete_node(&node).await?;
    ensure!(
        deleted.status == 204,
        "delete: {} {}",
        deleted.status,
        deleted.body
    );
    api.get_node(&node)
        .await?
        .expect_problem(404, "node_not_found")?;

    let expected = [
        ("published", Some("a")),
        ("published", Some("a")),
        ("retracted", Some("a")),
        ("published", Some("b")),
        ("purged", None),
        ("deleted", None),
    ];
    for (i, (kind, id)) in expected.iter().enumerate() {
        let event = ws
            .next_event()
            .await
            .with_context(|| format!("WS event {i}"))?;
        check_kind(&event, kind, *id)?;
        if *kind != "deleted" {
            ensure!(
                event["offset"].as_u64() == Some(i as u64 + 1),
                "offset: {event}"
            );
        }
        let (frame, data) = sse.next_frame().await.map(|f| {
            let data = f.json();
            (f, data)
        })?;
        ensure!(
            frame.event.as_deref() == Some(*kind),
            "SSE event name: {frame:?}"
        );
        check_kind(&data?, kind, *id)?;
    }
    Ok(())
}

fn check_kind(event: &Value, kind: &str, id: Option<&str>) -> Result<()> {
    ensure!(
        event["type"] == "event" && event["kind"] == kind,
        "expected {kind}: {event}"
    );
    match (kind, id) {
        ("retracted", Some(id)) => {
            ensure!(event["item"]["id"] == id, "retracted item id: {event}");
            ensure!(
                event["item"].get("payload").is_none(),
                "retraction carries a payload: {event}"
            );
        }
        ("published", Some(id)) => ensure!(event["item"]["id"] == id, "item id: {event}"),
        _ => ensure!(
            event.get("item").is_none_or(Value::is_null),
            "{kind} with an item: {event}"
        ),
    }
    Ok(())
}
