//! Interop of the overlay pipes with js-libp2p: a js-libp2p peer from npm (TCP + Noise + Yamux,
//! identify, gossipsub with signed messages, configured as the README's "Joining a pipe from
//! js-libp2p" shows) subscribes to a gateway's pipe and receives the items published over REST,
//! decoding the CBOR envelope itself. Driven through `tests/interop/libp2p_subscriber.mjs`
//! (packages pinned by `tests/interop/package-lock.json`; `tests/run.sh` runs `npm ci`).

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use juxta_tests::{Server, unique};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::Instant;

/// How long the peer may take to join the pipe, and the pipe to start carrying items.
const JOIN_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for any one expected line once items flow.
const LINE_WAIT: Duration = Duration::from_secs(15);
/// Time between warm-up publications while waiting for the first item to come through.
const WARM_UP_INTERVAL: Duration = Duration::from_millis(300);
/// Items published once the pipe carries items.
const ITEMS: usize = 20;
/// Items published in one batch publish after those.
const BATCHED: usize = 10;
/// Size of the last item's text: a few hundred KiB, well under the gateway's 1 MiB payload
/// limit.
const LARGE_PAYLOAD_BYTES: usize = 300 * 1024;
/// The script's own time limit (seconds), well above what the test needs.
const SCRIPT_TIMEOUT_SECS: &str = "120";

/// `node` with the js-libp2p packages installed next to the script, or why not.
fn node_with_libp2p(dir: &str) -> Result<String> {
    let node = std::env::var("JUXTA_INTEROP_NODE").unwrap_or_else(|_| "node".into());
    let out = std::process::Command::new(&node)
        .current_dir(dir)
        .args([
            "--input-type=module",
            "-e",
            "await import('libp2p'); await import('@chainsafe/libp2p-gossipsub'); \
             await import('cborg')",
        ])
        .output();
    let ok = out.as_ref().is_ok_and(|o| o.status.success());
    ensure!(
        ok,
        "{node} cannot load js-libp2p from {dir}: run `bash tests/run.sh` (it runs `npm ci` \
         there), or `npm ci` in {dir}. {}",
        match &out {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        }
    );
    Ok(node)
}

/// A running `libp2p_subscriber.mjs` and its JSON lines.
struct JsPeer {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl JsPeer {
    fn start(gateway: &str, topic: &str) -> Result<Self> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/interop");
        let mut child = Command::new(node_with_libp2p(dir)?)
            .current_dir(dir)
            .arg("libp2p_subscriber.mjs")
            .arg(gateway)
            .arg(topic)
            .arg(SCRIPT_TIMEOUT_SECS)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting libp2p_subscriber.mjs")?;
        let stdout = child.stdout.take().context("stdout")?;
        Ok(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next JSON line within `limit`: `None` when none came in time. An `error` line or
    /// the end of the output fails.
    async fn next_within(&mut self, limit: Duration) -> Result<Option<Value>> {
        // `Lines::next_line` is cancel-safe: a timeout loses no partly read line.
        let Ok(line) = tokio::time::timeout(limit, self.lines.next_line()).await else {
            return Ok(None);
        };
        let line = line?.context("the js-libp2p peer ended (its stderr is above)")?;
        let event: Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(
            event["event"] != "error",
            "the js-libp2p peer failed: {}",
            brief(&event)
        );
        Ok(Some(event))
    }

    /// The next JSON line; fails when none comes within `limit`.
    async fn next(&mut self, limit: Duration, waiting_for: &str) -> Result<Value> {
        self.next_within(limit)
            .await?
            .with_context(|| format!("the js-libp2p peer printed no {waiting_for} in {limit:?}"))
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn stop(mut self) -> Result<()> {
        let pid = self
            .child
            .id()
            .context("the js-libp2p peer already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -TERM {pid}: {status}");
        let status = tokio::time::timeout(LINE_WAIT, self.child.wait())
            .await
            .context("the js-libp2p peer did not exit after SIGTERM")??;
        ensure!(
            status.success(),
            "the js-libp2p peer exited with {status} on SIGTERM"
        );
        Ok(())
    }
}

/// `v` as JSON, shortened to a few hundred characters for error messages (one item is large).
fn brief(v: &Value) -> String {
    const MAX_CHARS: usize = 400;
    let s = v.to_string();
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
        None => s,
    }
}

/// A number, or a decimal string (the script prints integers above 2^53 as strings).
fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// Checks what every item line must say: signed by the gateway, on `topic`, a published
/// JSON item of `node`, with an offset. Returns the offset.
fn check_item(event: &Value, gateway: &str, topic: &str, node: &str) -> Result<u64> {
    ensure!(
        event["event"] == "item",
        "expected an item, got {}",
        brief(event)
    );
    ensure!(
        event["from"] == gateway,
        "the message is not signed by the gateway {gateway}: {}",
        brief(event)
    );
    ensure!(
        event["topic"] == topic && event["node"] == node,
        "wrong topic or node: {}",
        brief(event)
    );
    ensure!(
        event["kind"] == "published" && event["content_type"] == "json",
        "expected a published JSON item: {}",
        brief(event)
    );
    ensure!(
        event["seq"].is_null(),
        "a stored event carries no seq: {}",
        brief(event)
    );
    as_u64(&event["offset"]).with_context(|| format!("an item without an offset: {}", brief(event)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_js_libp2p_peer_in_a_pipe_when_items_are_published_then_it_receives_each_once_in_offset_order()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let addr = server
        .p2p_addr()
        .context("the gateway printed no p2p address")?
        .to_owned();
    let gateway = addr
        .rsplit_once("/p2p/")
        .map(|(_, id)| id.to_owned())
        .with_context(|| format!("{addr} does not end in /p2p/<peer id>"))?;
    let node = unique("js");
    api.create_node(&node, None).await?;
    let topic = format!("juxta/public/{node}");

    // The peer joins the pipe: it sees the gateway among the topic's subscribers.
    let mut js = JsPeer::start(&addr, &topic)?;
    let deadline = Instant::now() + JOIN_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = js.next_within(left).await?.with_context(|| {
            format!(
                "the js-libp2p peer never saw the gateway in {topic}: {}",
                server.output_tail()
            )
        })?;
        match event["event"].as_str() {
            Some("ready") => break,
            Some("started" | "connected") => {}
            _ => bail!("unexpected before ready: {}", brief(&event)),
        }
    }

    // The gateway's pipe carries items once it has seen the peer's subscription, which may
    // come a moment after the peer saw the gateway's: publish until the first one arrives.
    let deadline = Instant::now() + JOIN_WAIT;
    let mut warm_ups = 0;
    let mut last_offset = loop {
        ensure!(
            Instant::now() < deadline,
            "no item reached the js-libp2p peer after {warm_ups} publications: {}",
            server.output_tail()
        );
        let id = format!("warm-up-{warm_ups}");
        api.publish(&node, &json!({"id": id, "payload": {"warm_up": warm_ups}}))
            .await?
            .expect(201)?;
        warm_ups += 1;
        if let Some(event) = js.next_within(WARM_UP_INTERVAL).await? {
            break check_item(&event, &gateway, &topic, &node)?;
        }
    };

    // Twenty items, each with the offset and epoch the store gave it.
    let mut expected = HashMap::new();
    let mut order = Vec::new();
    let mut epoch = None;
    for i in 0..ITEMS {
        let id = format!("item-{i}");
        // The last one is large: beyond rust-libp2p gossipsub's default 64 KiB transmit size,
        // which the gateway raises; js-libp2p takes up to 4 MiB.
        let text = if i + 1 == ITEMS {
            "large ".repeat(LARGE_PAYLOAD_BYTES / 6)
        } else {
            format!("héllo {i}")
        };
        let payload = json!({"i": i, "text": text, "nested": {"ok": true}});
        let reply = api
            .publish(&node, &json!({"id": id, "payload": payload}))
            .await?
            .expect(201)?;
        let offset = as_u64(&reply["offset"]).with_context(|| format!("{reply}"))?;
        epoch = Some(reply["epoch"].clone());
        order.push(id.clone());
        expected.insert(id, (offset, payload));
    }
    let epoch = epoch.context("no item published")?;
    ensure!(epoch.is_string(), "the REST reply has no epoch: {epoch}");

    // Every one arrives once, in offset order, exactly as published. Warm-up items still in
    // flight may come first.
    let mut received = Vec::new();
    while received.len() < ITEMS {
        let event = js.next(LINE_WAIT, "further item").await.with_context(|| {
            format!(
                "received {} of {ITEMS} items ({received:?}): {}",
                received.len(),
                server.output_tail()
            )
        })?;
        let offset = check_item(&event, &gateway, &topic, &node)?;
        ensure!(
            offset > last_offset,
            "offset {offset} after {last_offset}: out of order or a duplicate: {}",
            brief(&event)
        );
        last_offset = offset;
        let id = event["id"].as_str().context("an item without an id")?;
        if id.starts_with("warm-up-") {
            ensure!(
                received.is_empty(),
                "a warm-up item after the items: {}",
                brief(&event)
            );
            continue;
        }
        let (want_offset, want_payload) = expected
            .get(id)
            .with_context(|| format!("an item nobody published: {}", brief(&event)))?;
        ensure!(
            offset == *want_offset && event["payload"] == *want_payload,
            "expected offset {want_offset} and payload {}: {}",
            brief(want_payload),
            brief(&event)
        );
        ensure!(
            event["epoch"] == epoch,
            "expected epoch {epoch}: {}",
            brief(&event)
        );
        ensure!(
            event["publisher"].as_str().is_some_and(|p| !p.is_empty())
                && event["time"].as_u64().is_some_and(|t| t > 0),
            "an item without its publisher or time: {}",
            brief(&event)
        );
        received.push(id.to_owned());
    }
    ensure!(
        received == order,
        "items arrived as {received:?}, published as {order:?}"
    );

    // Items stored together (one batch publish, one commit) leave in one pipe message, a
    // batch of envelopes, which the js peer decodes too.
    let batch: Vec<Value> = (0..BATCHED)
        .map(|i| json!({"node": node, "id": format!("batched-{i}"), "payload": {"b": i}}))
        .collect();
    let reply = api.publish_batch(&json!(batch)).await?.expect(200)?;
    let results = reply["results"].as_array().context("no results")?;
    let mut largest_message = 0;
    for (i, result) in results.iter().enumerate() {
        let want = as_u64(&result["offset"]).with_context(|| format!("{reply}"))?;
        let event = js.next(LINE_WAIT, "batched item").await?;
        let offset = check_item(&event, &gateway, &topic, &node)?;
        ensure!(
            offset == want && event["id"] == format!("batched-{i}") && event["payload"]["b"] == i,
            "expected batched-{i} at offset {want}: {}",
            brief(&event)
        );
        largest_message = largest_message.max(event["in_message_of"].as_u64().unwrap_or(0));
    }
    ensure!(
        largest_message > 1,
        "the batch publish's items came one per message"
    );

    // Once each: nothing more arrives.
    let more = js.next_within(Duration::from_secs(2)).await?;
    ensure!(
        more.is_none(),
        "unexpected output: {}",
        brief(&more.unwrap_or_default())
    );
    js.stop().await
}
