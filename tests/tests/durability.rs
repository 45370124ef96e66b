//! An acknowledged publish is never lost: not on SIGKILL, not on SIGTERM (DESIGN.md guarantee 1).

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use juxta_tests::{Api, Server, SseClient, unique};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Publishes items `0..count` with ids `{prefix}-{k}` from `tasks` concurrent publishers and
/// returns what the 201s said: id → (offset, epoch).
async fn publish_all(
    api: &Api,
    node: &str,
    prefix: &str,
    count: u64,
    tasks: u64,
) -> Result<BTreeMap<String, (u64, String)>> {
    let mut set = JoinSet::new();
    for t in 0..tasks {
        let api = api.clone();
        let node = node.to_owned();
        let prefix = prefix.to_owned();
        set.spawn(async move {
            let mut acks = Vec::new();
            for k in (t..count).step_by(usize::try_from(tasks)?) {
                let id = format!("{prefix}-{k}");
                let ack = api
                    .publish_payload(&node, Some(&id), json!({ "k": k, "by": t }))
                    .await
                    .with_context(|| format!("publishing {id}"))?;
                let offset = ack["offset"].as_u64().context("201 without offset")?;
                let epoch = ack["epoch"]
                    .as_str()
                    .context("201 without epoch")?
                    .to_owned();
                acks.push((id, offset, epoch));
            }
            anyhow::Ok(acks)
        });
    }
    let mut acked = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        for (id, offset, epoch) in joined.context("publisher task panicked")?? {
            acked.insert(id, (offset, epoch));
        }
    }
    Ok(acked)
}

/// Checks that `items` (from GET items) hold exactly the acknowledged ids at their offsets.
fn check_items(items: &[Value], acked: &BTreeMap<String, (u64, String)>) -> Result<()> {
    ensure!(
        items.len() == acked.len(),
        "{} items stored, {} acknowledged",
        items.len(),
        acked.len()
    );
    for item in items {
        let id = item["id"]
            .as_str()
            .with_context(|| format!("item without id: {item}"))?;
        let (offset, _) = acked
            .get(id)
            .with_context(|| format!("stored item {id} was never acknowledged"))?;
        ensure!(
            item["offset"].as_u64() == Some(*offset),
            "item {id} acknowledged at offset {offset}, stored as {item}"
        );
        let k: u64 = id
            .rsplit('-')
            .next()
            .and_then(|k| k.parse().ok())
            .context("id suffix")?;
        ensure!(
            item["payload"]["k"].as_u64() == Some(k),
            "payload of {id} changed: {item}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_500_concurrently_acknowledged_publishes_when_the_server_is_killed_with_sigkill_then_all_are_stored_at_their_offsets_after_restart()
-> Result<()> {
    let mut server = Server::start_default().await?;
    let api = server.api();
    let node = unique("durable");
    api.create_node(&node, Some(&json!({ "max_items": 1000, "persist": true })))
        .await?;

    let acked = publish_all(&api, &node, "d", 500, 16).await?;
    // Right after the last 201: no graceful anything.
    server.kill9().await?;

    let offsets: Vec<u64> = acked.values().map(|(o, _)| *o).collect();
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    sorted.dedup();
    ensure!(sorted.len() == 500, "the 201s returned duplicate offsets");
    ensure!(
        sorted.iter().copied().eq(1..=500),
        "offsets are not 1..=500"
    );
    let epochs: Vec<&String> = acked.values().map(|(_, e)| e).collect();
    ensure!(
        epochs.windows(2).all(|w| w[0] == w[1]),
        "epoch changed mid-run"
    );

    server.restart().await?;
    let api = server.api();
    let node_json = api.get_node(&node).await?.expect(200)?;
    ensure!(
        node_json["epoch"] == epochs[0].as_str(),
        "epoch changed across the restart: {node_json}"
    );
    ensure!(
        node_json["last_offset"].as_u64() == Some(500),
        "last_offset: {node_json}"
    );
    let items = api.all_items(&node).await?;
    check_items(&items, &acked)?;

    // And the node goes on from where it was.
    let next = api
        .publish_payload(&node, Some("after-restart"), json!({ "k": 500 }))
        .await?;
    ensure!(
        next["offset"].as_u64() == Some(501),
        "offset after restart: {next}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_open_streams_and_acknowledged_items_when_the_server_gets_sigterm_then_it_exits_0_and_keeps_them()
-> Result<()> {
    let mut server = Server::start_default().await?;
    let api = server.api();
    let node = unique("graceful");
    api.create_node(&node, None).await?;
    let acked = publish_all(&api, &node, "g", 40, 4).await?;

    // Long-lived connections must not hold the shutdown up.
    let mut ws = server.ws().await?;
    ws.subscribed(&node, None, None).await?;
    let mut sse = SseClient::open(&api, &node, &[], None).await?;
    sse.next_json("subscribed").await?;

    let status = server
        .terminate_within(std::time::Duration::from_secs(10))
        .await?;
    ensure!(status.success(), "juxta exited with {status} on SIGTERM");

    server.restart().await?;
    let items = server.api().all_items(&node).await?;
    check_items(&items, &acked)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_publishers_in_flight_when_the_server_is_killed_with_sigkill_then_every_acknowledged_item_survives()
-> Result<()> {
    let mut server = Server::start_default().await?;
    let api = server.api();
    let node = unique("crash");
    api.create_node(&node, Some(&json!({ "max_items": 100000 })))
        .await?;

    // 16 publishers go on until the kill; each remembers what was acknowledged.
    let mut set = JoinSet::new();
    for t in 0..16u64 {
        let api = api.clone();
        let node = node.clone();
        set.spawn(async move {
            let mut acked = Vec::new();
            for k in 0..100_000u64 {
                let id = format!("c-{t}-{k}");
                match api
                    .publish_payload(&node, Some(&id), json!({ "k": k }))
                    .await
                {
                    Ok(ack) => acked.push((id, ack["offset"].as_u64().unwrap_or(0))),
                    // The server died under us: the request's fate is unknown, so it is not
                    // counted as acknowledged.
                    Err(_) => break,
                }
            }
            acked
        });
    }
    // Kill once a few hundred items are in.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let last = api.get_node(&node).await?.expect(200)?["last_offset"]
            .as_u64()
            .unwrap_or(0);
        if last >= 300 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.kill9().await?;
    let mut acked = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        for (id, offset) in joined.context("publisher task panicked")? {
            acked.insert(id, offset);
        }
    }
    ensure!(
        acked.len() >= 300,
        "only {} items acknowledged before the kill",
        acked.len()
    );

    server.restart().await?;
    let items = server.api().all_items(&node).await?;
    let stored: BTreeMap<&str, u64> = items
        .iter()
        .filter_map(|i| Some((i["id"].as_str()?, i["offset"].as_u64()?)))
        .collect();
    ensure!(
        stored.len() == items.len(),
        "stored items without id or offset"
    );
    for (id, offset) in &acked {
        ensure!(
            stored.get(id.as_str()) == Some(offset),
            "acknowledged {id} at offset {offset}, after the crash: {:?}",
            stored.get(id.as_str())
        );
    }
    let offsets: Vec<u64> = items.iter().filter_map(|i| i["offset"].as_u64()).collect();
    ensure!(
        offsets.iter().copied().eq(1..=offsets.len() as u64),
        "stored offsets are not contiguous from 1"
    );
    Ok(())
}
