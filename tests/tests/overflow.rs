//! A slow consumer cannot make the gateway's memory grow without bound, and it learns what it
//! lost instead of silently missing it (DESIGN.md guarantees 2 and 4).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use juxta_tests::{Server, ServerOptions, WsClient, unique};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Items in the burst.
const ITEMS: u64 = 3000;
/// Payload padding per item: 3000 × 32 KiB ≈ 94 MiB, so a server that buffered the stalled
/// subscriber's events instead of bounding them would grow by about that much.
const PAD_BYTES: usize = 32 * 1024;
/// Allowed RSS growth over the burst: half of what unbounded buffering would need.
const RSS_GROWTH_LIMIT_KIB: u64 = 48 * 1024;
/// The server's per-subscriber queue and the node's history.
const QUEUE_CAPACITY: &str = "16";
const MAX_ITEMS: u64 = 50;
/// How far the publishers may run ahead of the reading client. Well inside queue + history, so
/// that the well-behaved reader never legitimately falls behind history; only the stalled
/// client does.
const READER_WINDOW: u64 = 32;
const PUBLISHERS: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_stalled_and_a_reading_subscriber_when_a_burst_is_published_then_memory_stays_bounded_and_the_stalled_one_is_told_what_it_lost()
-> Result<()> {
    let server = Server::start(
        ServerOptions::new()
            .env("JUXTA_FANOUT__QUEUE_CAPACITY", QUEUE_CAPACITY)
            .env("JUXTA_STORE__BACKEND", "memory")
            // A write blocked this long disconnects the client (30 s by default). This test is
            // about the catch-up path, not that policy: keep a slow machine from reaching it.
            .env("JUXTA_HTTP__WRITE_TIMEOUT_SECS", "600"),
    )
    .await?;
    let api = server.api();
    let node = unique("burst");
    api.create_node(&node, Some(&json!({ "max_items": MAX_ITEMS })))
        .await?;

    // Subscribes, then is never polled until the burst is over: its socket fills up and the
    // server must stop writing to it.
    let mut stalled = server.ws().await?;
    stalled.subscribed(&node, None, None).await?;
    let mut reader = server.ws().await?;
    reader.subscribed(&node, None, None).await?;

    let rss_before = server.rss_kib()?;

    let (progress_tx, progress_rx) = watch::channel(0u64);
    let reading = tokio::spawn(read_in_order(reader, ITEMS, progress_tx));

    let next_item = Arc::new(AtomicU64::new(1));
    let mut publishers = JoinSet::new();
    for _ in 0..PUBLISHERS {
        let api = api.clone();
        let node = node.clone();
        let next_item = next_item.clone();
        let mut progress = progress_rx.clone();
        publishers.spawn(async move {
            let pad = "x".repeat(PAD_BYTES);
            loop {
                let k = next_item.fetch_add(1, Ordering::Relaxed);
                if k > ITEMS {
                    return anyhow::Ok(());
                }
                // Flow control for the reader only: wait until it is within the window.
                progress
                    .wait_for(|&read| read + READER_WINDOW >= k)
                    .await
                    .context("the reader stopped")?;
                api.publish_payload(
                    &node,
                    Some(&format!("k-{k}")),
                    json!({ "k": k, "pad": pad }),
                )
                .await
                .with_context(|| format!("publishing item {k}"))?;
            }
        });
    }
    let mut published = Ok(());
    while let Some(joined) = publishers.join_next().await {
        if let Err(e) = joined.context("publisher panicked").and_then(|r| r) {
            published = Err(e);
            break;
        }
    }
    let read = reading.await.context("reader panicked").and_then(|r| r);
    let mut reader = match (published, read) {
        (Ok(()), Ok(reader)) => reader,
        (Err(p), Err(r)) => bail!("publishing failed: {p:#}; reading failed: {r:#}"),
        (Err(e), Ok(_)) | (Ok(()), Err(e)) => return Err(e),
    };
    let rss_after = server.rss_kib()?;
    let growth = rss_after.saturating_sub(rss_before);
    ensure!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "server RSS grew by {growth} KiB ({rss_before} -> {rss_after}) while one of two \
         subscribers was stalled; limit {RSS_GROWTH_LIMIT_KIB} KiB"
    );

    // Now the stalled client reads: what its socket and queue held, then an events_lost notice
    // (history holds only the last 50), then the rest in order, with no duplicates.
    let mut last = 0u64;
    let mut notices = Vec::new();
    let mut pending_notice: Option<(u64, u64)> = None;
    while last < ITEMS {
        let msg = stalled
            .recv()
            .await
            .with_context(|| format!("stalled client after offset {last}"))?;
        match msg["type"].as_str() {
            Some("event") => {
                let offset = msg["offset"].as_u64().context("event without offset")?;
                ensure!(
                    offset > last,
                    "offset {offset} after {last}: out of order or duplicate"
                );
                if offset != last + 1 {
                    let (from, to) = pending_notice.with_context(|| {
                        format!("silent gap: offset {offset} after {last} without events_lost")
                    })?;
                    ensure!(
                        from <= last + 1 && to >= offset - 1,
                        "events_lost {from}..={to} does not cover the gap {}..={}",
                        last + 1,
                        offset - 1
                    );
                }
                ensure!(
                    msg["item"]["payload"]["k"].is_u64(),
                    "event at offset {offset} lost its payload"
                );
                pending_notice = None;
                last = offset;
            }
            Some("error") if msg["code"] == "events_lost" => {
                ensure!(
                    msg["node"] == node.as_str(),
                    "events_lost for another node: {msg}"
                );
                let from = msg["from"].as_u64().context("events_lost without from")?;
                let to = msg["to"].as_u64().context("events_lost without to")?;
                ensure!(
                    from <= to && from > last,
                    "events_lost {from}..={to} after offset {last}"
                );
                notices.push((from, to));
                pending_notice = Some((from, to));
            }
            _ => bail!("unexpected message on the stalled client: {msg}"),
        }
    }
    eprintln!(
        "server RSS {rss_before} -> {rss_after} KiB (+{growth}); stalled client got \
         events_lost {notices:?}"
    );
    ensure!(
        !notices.is_empty(),
        "the stalled client missed more than history holds but got no events_lost"
    );

    // Both go on with live events.
    for k in ITEMS + 1..=ITEMS + 3 {
        api.publish_payload(&node, Some(&format!("k-{k}")), json!({ "k": k }))
            .await?;
    }
    for client in [&mut stalled, &mut reader] {
        for k in ITEMS + 1..=ITEMS + 3 {
            let event = client.next_event().await?;
            ensure!(
                event["offset"].as_u64() == Some(k),
                "expected live {k}, got {event}"
            );
        }
    }
    Ok(())
}

/// Reads `count` events, checking they are offsets 1..=count in order, and reports progress.
async fn read_in_order(
    mut client: WsClient,
    count: u64,
    progress: watch::Sender<u64>,
) -> Result<WsClient> {
    for expected in 1..=count {
        let event: Value = client
            .next_event()
            .await
            .with_context(|| format!("reading client waiting for offset {expected}"))?;
        ensure!(
            event["offset"].as_u64() == Some(expected),
            "reading client expected offset {expected}, got {}",
            event["offset"]
        );
        ensure!(
            event["item"]["payload"]["pad"].as_str().map(str::len) == Some(PAD_BYTES),
            "payload of {expected} truncated"
        );
        progress.send_replace(expected);
    }
    Ok(client)
}
