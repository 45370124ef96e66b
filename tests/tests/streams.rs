//! REST publishes reach WebSocket and SSE subscribers in offset order, and subscribers that
//! reconnect with their last position get exactly what they missed (DESIGN.md guarantee 2).

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use juxta_tests::{Api, Server, SseClient, WsClient, unique};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// What a 201 told us about one published item.
#[derive(Debug, Clone)]
struct Published {
    id: String,
    body: Value,
}

/// Checks one event (WS message or SSE data) against what was published at `offset`.
fn check_event(
    event: &Value,
    node: &str,
    epoch: &str,
    offset: u64,
    want: &Published,
) -> Result<()> {
    let ctx = || format!("event {event} at offset {offset}");
    ensure!(event["type"] == "event", "not an event: {}", ctx());
    ensure!(event["node"] == node, "wrong node: {}", ctx());
    ensure!(event["epoch"] == epoch, "wrong epoch: {}", ctx());
    ensure!(event["kind"] == "published", "wrong kind: {}", ctx());
    ensure!(
        event["offset"].as_u64() == Some(offset),
        "wrong offset: {}",
        ctx()
    );
    let item = &event["item"];
    ensure!(item["id"] == want.id.as_str(), "wrong id: {}", ctx());
    ensure!(
        item["offset"].as_u64() == Some(offset),
        "wrong item offset: {}",
        ctx()
    );
    if let Some(payload) = want.body.get("payload") {
        ensure!(&item["payload"] == payload, "wrong payload: {}", ctx());
    }
    if want.body.get("xml").is_some() {
        let xml = item["xml"].as_str().with_context(ctx)?;
        ensure!(
            xml.contains("urn:example:entry") && xml.contains("hello"),
            "xml item lost its content: {}",
            ctx()
        );
    }
    Ok(())
}

/// Publishes `bodies` from `tasks` concurrent publishers and returns them by offset.
async fn publish_concurrently(
    api: &Api,
    node: &str,
    bodies: Vec<Value>,
    tasks: usize,
) -> Result<BTreeMap<u64, Published>> {
    let mut set = JoinSet::new();
    for t in 0..tasks {
        let api = api.clone();
        let node = node.to_owned();
        let mine: Vec<Value> = bodies.iter().skip(t).step_by(tasks).cloned().collect();
        set.spawn(async move {
            let mut acks = Vec::new();
            for body in mine {
                let ack = api.publish(&node, &body).await?.expect(201)?;
                acks.push((ack, body));
            }
            anyhow::Ok(acks)
        });
    }
    let mut by_offset = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        for (ack, body) in joined.context("publisher task panicked")?? {
            let offset = ack["offset"].as_u64().context("201 without offset")?;
            let id = ack["id"].as_str().context("201 without id")?.to_owned();
            ensure!(
                body.get("id").is_none_or(|want| want == id.as_str()),
                "201 returned id {id} for {body}"
            );
            let previous = by_offset.insert(offset, Published { id, body });
            ensure!(previous.is_none(), "offset {offset} acknowledged twice");
        }
    }
    Ok(by_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_ws_and_sse_subscribers_when_items_are_published_over_rest_then_both_receive_every_item_in_offset_order()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    // A name with a slash: it must survive percent-encoding in every path.
    let node = format!("sensors/{}", unique("temp"));
    api.create_node(&node, None).await?;

    let mut ws = server.ws().await?;
    let subscribed = ws.subscribed(&node, None, None).await?;
    let epoch = subscribed["epoch"]
        .as_str()
        .context("subscribed without epoch")?
        .to_owned();
    ensure!(
        epoch.len() == 16 && epoch.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
        "epoch {epoch:?} is not 16 lowercase hex characters"
    );
    let mut sse = SseClient::open(&api, &node, &[], None).await?;
    let (frame, sse_subscribed) = sse.next_json("subscribed").await?;
    ensure!(
        frame.id.is_none(),
        "the subscribed frame carries an id: {frame:?}"
    );
    ensure!(
        sse_subscribed["epoch"] == epoch.as_str(),
        "SSE epoch differs: {sse_subscribed}"
    );

    let mut bodies: Vec<Value> = (0..60)
        .map(|n| json!({ "id": format!("item-{n}"), "payload": { "n": n, "text": format!("héllo {n}"), "nested": [n, {"x": null}] } }))
        .collect();
    bodies.push(json!({ "id": "xml-1", "xml": "<entry xmlns='urn:example:entry'>hello</entry>" }));
    bodies.push(json!({ "payload": "no id: the server assigns one" }));
    let total = bodies.len() as u64;
    let published = publish_concurrently(&api, &node, bodies, 4).await?;
    ensure!(
        published.keys().copied().eq(1..=total),
        "offsets are not 1..={total}: {:?}",
        published.keys().collect::<Vec<_>>()
    );

    for (&offset, want) in &published {
        let event = ws
            .next_event()
            .await
            .with_context(|| format!("WS offset {offset}"))?;
        check_event(&event, &node, &epoch, offset, want)?;
    }
    for (&offset, want) in &published {
        let (frame, event) = sse
            .next_json("published")
            .await
            .with_context(|| format!("SSE offset {offset}"))?;
        ensure!(
            frame.id.as_deref() == Some(format!("{epoch}:{offset}").as_str()),
            "SSE id {:?} for offset {offset}",
            frame.id
        );
        check_event(&event, &node, &epoch, offset, want)?;
    }
    Ok(())
}

#[tokio::test]
async fn given_a_ws_subscriber_that_disconnected_when_it_resubscribes_after_its_last_offset_then_it_receives_exactly_the_missed_items()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("resume-ws");
    api.create_node(&node, None).await?;

    let mut first = server.ws().await?;
    let epoch = first.subscribed(&node, None, None).await?["epoch"]
        .as_str()
        .context("no epoch")?
        .to_owned();
    for n in 1..=5 {
        api.publish_payload(&node, Some(&format!("a-{n}")), json!({ "n": n }))
            .await?;
    }
    let seen = first.events(5).await?;
    let last = seen
        .last()
        .and_then(|e| e["offset"].as_u64())
        .context("no last offset")?;
    ensure!(last == 5, "first connection ended at offset {last}");
    first.close().await?;

    for n in 6..=10 {
        api.publish_payload(&node, Some(&format!("b-{n}")), json!({ "n": n }))
            .await?;
    }

    let mut second = server.ws().await?;
    let subscribed = second.subscribed(&node, Some(last), Some(&epoch)).await?;
    ensure!(
        subscribed["recovered"] == true,
        "not recovered: {subscribed}"
    );
    ensure!(
        subscribed["epoch"] == epoch.as_str(),
        "epoch changed: {subscribed}"
    );
    ensure!(
        subscribed["last_offset"].as_u64() == Some(10),
        "last_offset: {subscribed}"
    );
    for (offset, event) in (6..=10).zip(second.events(5).await?) {
        ensure!(
            event["offset"].as_u64() == Some(offset),
            "expected {offset}, got {event}"
        );
        ensure!(
            event["item"]["id"] == format!("b-{offset}").as_str(),
            "wrong item: {event}"
        );
        ensure!(
            event["item"]["payload"]["n"].as_u64() == Some(offset),
            "wrong payload: {event}"
        );
    }

    // The next event is live: nothing from history is delivered twice.
    api.publish_payload(&node, Some("live"), json!({ "n": 11 }))
        .await?;
    let live = second.next_event().await?;
    ensure!(
        live["offset"].as_u64() == Some(11),
        "expected live offset 11, got {live}"
    );
    ensure!(live["item"]["id"] == "live", "wrong live item: {live}");
    second.ping("after-live").await?;
    Ok(())
}

#[tokio::test]
async fn given_an_sse_subscriber_that_disconnected_when_it_reconnects_with_last_event_id_then_it_receives_exactly_the_missed_items()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("resume-sse");
    api.create_node(&node, None).await?;

    let mut first = SseClient::open(&api, &node, &[], None).await?;
    let (_, subscribed) = first.next_json("subscribed").await?;
    let epoch = subscribed["epoch"].as_str().context("no epoch")?.to_owned();
    for n in 1..=5 {
        api.publish_payload(&node, Some(&format!("a-{n}")), json!({ "n": n }))
            .await?;
    }
    let mut last_id = String::new();
    for offset in 1..=5u64 {
        let (frame, event) = first.next_json("published").await?;
        ensure!(
            event["offset"].as_u64() == Some(offset),
            "expected {offset}: {event}"
        );
        last_id = frame.id.context("event without id")?;
    }
    ensure!(last_id == format!("{epoch}:5"), "last event id {last_id:?}");
    drop(first);

    for n in 6..=10 {
        api.publish_payload(&node, Some(&format!("b-{n}")), json!({ "n": n }))
            .await?;
    }

    let mut second = SseClient::open(&api, &node, &[], Some(&last_id)).await?;
    let (_, subscribed) = second.next_json("subscribed").await?;
    ensure!(
        subscribed["recovered"] == true,
        "not recovered: {subscribed}"
    );
    for offset in 6..=10u64 {
        let (frame, event) = second.next_json("published").await?;
        ensure!(
            frame.id == Some(format!("{epoch}:{offset}")),
            "id {:?}",
            frame.id
        );
        ensure!(
            event["item"]["id"] == format!("b-{offset}").as_str(),
            "wrong item: {event}"
        );
    }
    api.publish_payload(&node, Some("live"), json!({ "n": 11 }))
        .await?;
    let (frame, event) = second.next_json("published").await?;
    ensure!(
        frame.id == Some(format!("{epoch}:11")),
        "expected live 11, got {event}"
    );

    // The same resume point given as query parameters instead of the header.
    let mut third = SseClient::open(
        &api,
        &node,
        &[("after", "8".to_owned()), ("epoch", epoch.clone())],
        None,
    )
    .await?;
    let (_, subscribed) = third.next_json("subscribed").await?;
    ensure!(
        subscribed["recovered"] == true,
        "not recovered via ?after: {subscribed}"
    );
    for offset in 9..=11u64 {
        let (_, event) = third.next_json("published").await?;
        ensure!(
            event["offset"].as_u64() == Some(offset),
            "expected {offset}: {event}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn given_a_subscriber_with_a_stale_epoch_when_it_resubscribes_then_it_is_told_it_was_not_recovered()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("stale");
    api.create_node(&node, None).await?;
    let ack = api.publish_payload(&node, Some("one"), json!(1)).await?;
    let epoch = ack["epoch"].as_str().context("no epoch")?;
    // A well-formed epoch that is not this node's.
    let stale: String = epoch
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();

    let mut ws: WsClient = server.ws().await?;
    let subscribed = ws.subscribed(&node, Some(1), Some(&stale)).await?;
    ensure!(
        subscribed["recovered"] == false,
        "recovered with a stale epoch: {subscribed}"
    );
    ensure!(
        subscribed["epoch"] == epoch,
        "server epoch not reported: {subscribed}"
    );
    ensure!(
        subscribed["reason"] == "epoch_changed",
        "reason for the stale epoch: {subscribed}"
    );
    Ok(())
}

#[tokio::test]
async fn given_a_resume_point_older_than_history_when_a_subscriber_resubscribes_then_it_is_told_history_was_trimmed()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("trimmed");
    api.create_node(&node, Some(&json!({ "max_items": 5 })))
        .await?;
    let mut epoch = String::new();
    for n in 1..=20u64 {
        let ack = api.publish_payload(&node, None, json!({ "n": n })).await?;
        epoch = ack["epoch"].as_str().context("no epoch")?.to_owned();
    }

    let mut ws = server.ws().await?;
    let subscribed = ws.subscribed(&node, Some(2), Some(&epoch)).await?;
    ensure!(
        subscribed["recovered"] == false,
        "recovered past trimmed history: {subscribed}"
    );
    ensure!(
        subscribed["reason"] == "history_trimmed",
        "reason: {subscribed}"
    );

    let mut sse = SseClient::open(&api, &node, &[], Some(&format!("{epoch}:2"))).await?;
    let (_, subscribed) = sse.next_json("subscribed").await?;
    ensure!(
        subscribed["recovered"] == false,
        "SSE recovered past trimmed history: {subscribed}"
    );
    ensure!(
        subscribed["reason"] == "history_trimmed",
        "SSE reason: {subscribed}"
    );
    Ok(())
}
