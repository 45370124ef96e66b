//! Overlay benchmark: N edge peers (in this process, each its own libp2p node) follow one
//! node of a running gateway; items are published over REST at a fixed rate; every peer
//! records publish → receipt latency, and gossipsub's own counters give the duplicate
//! copies each peer received per delivery.
//!
//! ```text
//! juxta-overlay-bench --url http://127.0.0.1:8080 --admin-key KEY \
//!     --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW… --peers 20 --rate 1000 --seconds 10
//! ```
//!
//! Prints one JSON report. Latency is measured from just before the REST request is sent
//! to the moment a peer hands the event out, so it includes the gateway's durable commit.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use hdrhistogram::Histogram;
use juxta_bridge_p2p::peer::{EdgePeer, PeerConfig, PeerEvent};
use libp2p::identity;
use serde_json::{Value, json};

/// The gateway's allocator: twenty libp2p nodes in one process allocate and free a lot.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "publish → receipt latency and duplicates for edge peers of one pipe")]
struct Args {
    /// The gateway's HTTP base URL.
    #[arg(long)]
    url: String,
    /// An admin key (or a token that may create nodes and publish).
    #[arg(long)]
    admin_key: String,
    /// The gateway's overlay address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    bootstrap: String,
    /// Edge peers.
    #[arg(long, default_value_t = 20)]
    peers: usize,
    /// Items published per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to publish.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Payload padding, bytes.
    #[arg(long, default_value_t = 64)]
    pad: usize,
    /// Where peers listen (default: nowhere; they dial out).
    #[arg(long)]
    listen: Vec<String>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Gossipsub's received-message counters in `registry`: (with duplicates, without).
fn gossip_counts(registry: &prometheus_client::registry::Registry) -> (f64, f64) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return (0.0, 0.0);
    }
    let mut unfiltered = 0.0;
    let mut filtered = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = value.parse().unwrap_or(0.0);
        if name.starts_with("topic_msg_recv_counts_unfiltered") {
            unfiltered += v;
        } else if name.starts_with("topic_msg_recv_counts_total")
            || name.starts_with("topic_msg_recv_counts{")
        {
            filtered += v;
        }
    }
    (unfiltered, filtered)
}

struct PeerResult {
    latencies: Histogram<u64>,
    received: u64,
    first_offset: Option<u64>,
    last_offset: u64,
    out_of_order: u64,
    other: Vec<String>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // The peers' logs, on stderr: JUXTA_LOG__LEVEL=warn (or a tracing filter) shows them.
    if let Ok(level) = std::env::var("JUXTA_LOG__LEVEL") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_writer(std::io::stderr)
            .init();
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let node = format!("overlay-bench-{}", std::process::id());
    let auth = format!("Bearer {}", args.admin_key);
    let r = http
        .put(format!("{}/api/v1/nodes/{node}", args.url))
        .header("authorization", &auth)
        .json(&json!({"publish_model": "open", "max_items": 100_000}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "creating the node: {}", r.status());

    // The peers, each with its own gossipsub metrics.
    let bootstrap: libp2p::Multiaddr = args.bootstrap.parse().context("--bootstrap")?;
    let listen: Vec<libp2p::Multiaddr> = args
        .listen
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let mut registries = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..args.peers {
        let registry = Arc::new(parking_lot::Mutex::new(
            prometheus_client::registry::Registry::default(),
        ));
        let mut config = PeerConfig::new(vec![bootstrap.clone()]);
        config.subscribe = vec![juxta_core::NodeName::new(&node)?];
        config.listen = listen.clone();
        config.gossip_metrics = Some(registry.clone());
        peers.push(EdgePeer::join(identity::Keypair::generate_ed25519(), config).await?);
        registries.push(registry);
    }
    // Let every peer join the pipe (and the mesh form) before measuring.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let total = args.rate * args.seconds;
    let mut tasks = Vec::new();
    for mut peer in peers {
        tasks.push(tokio::spawn(async move {
            let mut result = PeerResult {
                latencies: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                received: 0,
                first_offset: None,
                last_offset: 0,
                out_of_order: 0,
                other: Vec::new(),
            };
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs(args_seconds_limit(total));
            while result.received < total {
                let Ok(Some(event)) = tokio::time::timeout_at(deadline, peer.next()).await else {
                    break;
                };
                let at = now_us();
                if let PeerEvent::Event(_) = &event {
                    let v: Value = serde_json::from_str(&event.json_line()).unwrap_or_default();
                    let offset = v["offset"].as_u64().unwrap_or(0);
                    if offset <= result.last_offset {
                        result.out_of_order += 1;
                    }
                    result.last_offset = offset;
                    result.first_offset.get_or_insert(offset);
                    if let Some(t) = v["item"]["payload"]["t"].as_u64() {
                        let _ = result.latencies.record(at.saturating_sub(t).max(1));
                    }
                    result.received += 1;
                } else if result.other.len() < 5 {
                    result.other.push(event.json_line());
                }
            }
            (result, peer)
        }));
    }

    // Publish at the rate: each item on its own task at its due time.
    let start = Instant::now();
    let pad = "x".repeat(args.pad);
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut publishes = Vec::new();
    for seq in 0..total {
        let due = start + Duration::from_micros(seq * 1_000_000 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        let http = http.clone();
        let url = format!("{}/api/v1/nodes/{node}/items", args.url);
        let auth = auth.clone();
        let pad = pad.clone();
        let errors = errors.clone();
        publishes.push(tokio::spawn(async move {
            let t = now_us();
            let r = http
                .post(url)
                .header("authorization", auth)
                .json(&json!({"payload": {"t": t, "seq": seq, "pad": pad}}))
                .send()
                .await;
            if !r.is_ok_and(|r| r.status().as_u16() == 201) {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for p in publishes {
        p.await?;
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut received = 0;
    let mut complete = 0;
    let mut out_of_order = 0;
    let mut kept = Vec::new();
    let mut incomplete = Vec::new();
    for t in tasks {
        let (r, peer) = t.await?;
        if r.received != total {
            let connected = peer.overlay().connected_peers().await.map(|p| p.len()).ok();
            let in_pipe = peer
                .overlay()
                .pipe_members("public", &node)
                .await
                .map(|p| p.len())
                .ok();
            incomplete.push(json!({"peer": peer.peer_id().to_string(), "connected_peers": connected, "pipe_members": in_pipe, "received": r.received, "first_offset": r.first_offset, "last_offset": r.last_offset, "other_events": r.other}));
        }
        all.add(&r.latencies)?;
        received += r.received;
        out_of_order += r.out_of_order;
        if r.received == total && r.first_offset == Some(1) && r.last_offset == total {
            complete += 1;
        }
        kept.push(peer);
    }
    let (mut unfiltered, mut filtered) = (0.0, 0.0);
    let mut per_peer = Vec::new();
    for r in &registries {
        let (u, f) = gossip_counts(&r.lock());
        unfiltered += u;
        filtered += f;
        per_peer.push(f);
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "peers": args.peers,
        "rate": args.rate,
        "items": total,
        "publish_seconds": (publish_secs * 100.0).round() / 100.0,
        "publish_errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "deliveries": received,
        "expected_deliveries": total * args.peers as u64,
        "peers_with_every_item_in_order": complete,
        "incomplete_peers": incomplete,
        "out_of_order": out_of_order,
        "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": all.max() as f64 / 1000.0},
        "gossip_copies_received": unfiltered,
        "gossip_messages_delivered": filtered,
        "gossip_messages_delivered_per_peer": per_peer,
        // Per gossip message (a message may carry a batch of items).
        "duplicates_per_delivery": if filtered > 0.0 { ((unfiltered - filtered) / filtered * 100.0).round() / 100.0 } else { 0.0 },
        // Per item delivered to a peer: what the peers received beyond what they needed.
        "duplicate_copies_per_item": if received > 0 { ((unfiltered - filtered) / received as f64 * 1000.0).round() / 1000.0 } else { 0.0 },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop(kept);
    Ok(())
}

/// How long peers wait for every item: the publishing time plus a margin.
fn args_seconds_limit(total: u64) -> u64 {
    30 + total / 500
}
