//! `juxta-load`: drives a juxta server with many WebSocket subscribers and REST publishers and
//! reports delivery throughput, end-to-end latency, loss, duplicates and server memory.
//!
//! Two modes:
//! - `fanout` (default): create a node, connect `--subscribers` WebSocket clients (measuring the
//!   server's RSS per idle connection), publish `--items` items at `--rate` items/s from
//!   `--publishers` concurrent HTTP clients (or `--batch N` items per `POST /api/v1/publish`),
//!   and measure what the subscribers receive. Each payload is
//!   `{"t": <send time, unix nanos>, "pad": "<padding to --size bytes>"}`; latency is receive
//!   time minus `t` (client and server share this machine's clock).
//! - `durable-publish`: `--publishers` clients each do back-to-back single-item POSTs for
//!   `--duration` seconds (or until `--items`), reporting acknowledged items/s and latency.
//!
//! Everything is bounded: subscriber and publisher counts are fixed, there are no unbounded
//! queues, and every phase ends by item count or timeout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use juxta_tests::{
    Api, Server, ServerOptions, WsClient, cpu_seconds_of, encode_path_segment, raise_nofile_limit,
    rss_kib_of, unix_nanos,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Highest latency the histograms hold, in microseconds (larger samples are clamped).
const MAX_LATENCY_US: u64 = 120_000_000;
/// Significant figures of the latency histograms: 1 % resolution keeps one per-subscriber
/// histogram at about 10 KiB, which matters with 10 000 subscribers.
const HISTOGRAM_SIGFIG: u8 = 2;
/// Per-request timeout for publishes and node management.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one batch of WebSocket connections may take to be subscribed.
const CONNECT_BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Distinct error messages kept for the report (bounded).
const MAX_ERROR_KINDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// WebSocket fan-out: many subscribers, publishers at a target rate.
    Fanout,
    /// Durable publish throughput: back-to-back single-item POSTs.
    DurablePublish,
}

#[derive(Debug, Parser)]
#[command(
    name = "juxta-load",
    version,
    about = "Load generator for the juxta gateway"
)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Fanout)]
    mode: Mode,
    /// The juxta binary to spawn (default: `juxta` next to this tool, or `$JUXTA_BIN`).
    #[arg(long)]
    juxta: Option<PathBuf>,
    /// Target an already running server at this base URL instead of spawning one.
    #[arg(long)]
    url: Option<String>,
    /// The pid of the server given by --url, to read its RSS from /proc.
    #[arg(long, requires = "url")]
    pid: Option<u32>,
    /// Token for --url (admin key, or a JWT allowed to create, publish and subscribe).
    #[arg(long, env = "JUXTA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Extra environment for the spawned server, KEY=VALUE (repeatable), e.g.
    /// JUXTA_STORE__BACKEND=memory.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Extra argument for `juxta serve` (repeatable).
    #[arg(long = "serve-arg", value_name = "ARG", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Data dir for the spawned server (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node to use (default: `load-` and a random suffix); it is created (or reconfigured) first.
    #[arg(long)]
    node: Option<String>,
    /// The node's max_items (history size).
    #[arg(long, default_value_t = 1000)]
    max_items: u64,
    /// WebSocket subscribers (fanout).
    #[arg(long, short = 's', default_value_t = 100)]
    subscribers: usize,
    /// Items to publish (fanout default 10000; durable-publish: a cap besides --duration).
    #[arg(long, short = 'm')]
    items: Option<u64>,
    /// Target publish rate in items/s across all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Concurrent HTTP publishers (default 4 for fanout, 16 for durable-publish).
    #[arg(long, short = 'p')]
    publishers: Option<usize>,
    /// Items per request: 1 = `POST /nodes/{node}/items`, N > 1 = `POST /api/v1/publish`.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Payload size in bytes (the JSON payload is padded to about this size).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// WebSocket connections opened in parallel per batch.
    #[arg(long, default_value_t = 200)]
    connect_batch: usize,
    /// durable-publish: run for this many seconds (default 10 unless --items is given).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds to wait after the last publish for subscribers to receive everything.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Seconds to let the server settle before reading its RSS.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 900.0)]
    timeout: f64,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    json: bool,
}

fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// The server under test: spawned by us, or given by --url.
struct Target {
    base_url: String,
    token: String,
    pid: Option<u32>,
    /// Keeps a spawned server alive (and kills it on drop).
    _server: Option<Server>,
}

impl Target {
    fn rss_kib(&self) -> Option<u64> {
        self.pid.and_then(|pid| rss_kib_of(pid).ok())
    }

    /// CPU seconds used so far by the server and by this tool (to tell which one was the
    /// bottleneck: they share the machine).
    fn cpu(&self) -> (Option<f64>, Option<f64>) {
        (
            self.pid.and_then(|pid| cpu_seconds_of(pid).ok()),
            cpu_seconds_of(std::process::id()).ok(),
        )
    }

    fn ws_url(&self) -> String {
        let rest = self
            .base_url
            .strip_prefix("http://")
            .map(|r| format!("ws://{r}"))
            .or_else(|| {
                self.base_url
                    .strip_prefix("https://")
                    .map(|r| format!("wss://{r}"))
            })
            .unwrap_or_else(|| self.base_url.clone());
        format!("{}/api/v1/ws", rest.trim_end_matches('/'))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let limit = Duration::from_secs_f64(args.timeout.max(1.0));
    match tokio::time::timeout(limit, run(args)).await {
        Ok(result) => result,
        Err(_) => bail!("the run exceeded --timeout {limit:?}"),
    }
}

async fn run(args: Args) -> Result<()> {
    let nofile = raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    // Each process (this one, and a spawned server, which inherits the raised limit) holds
    // one descriptor per subscriber plus some slack.
    let needed = u64::try_from(args.subscribers).unwrap_or(u64::MAX) + 256;
    if nofile.now < needed {
        eprintln!(
            "warning: the open-files limit is {} (the hard limit); {} subscribers need about {needed}",
            nofile.now, args.subscribers
        );
    }
    let target = connect_target(&args).await?;
    let node = args
        .node
        .clone()
        .unwrap_or_else(|| juxta_tests::unique("load"));
    let api = Api::new(&target.base_url, Some(&target.token));
    let created = api
        .put_node(&node, Some(&json!({ "max_items": args.max_items })))
        .await?;
    if created.status != 200 && created.status != 201 {
        bail!("creating node {node}: {} {}", created.status, created.body);
    }
    let report = match args.mode {
        Mode::Fanout => fanout(&args, &target, &node).await?,
        Mode::DurablePublish => durable_publish(&args, &target, &node).await?,
    };
    if args.node.is_none() {
        // Our own node: leave no trace on a shared server.
        let _ = api.delete_node(&node).await;
    }
    if args.json {
        println!("{report}");
    } else {
        print_human(&report);
    }
    Ok(())
}

async fn connect_target(args: &Args) -> Result<Target> {
    if let Some(url) = &args.url {
        let token = args
            .token
            .clone()
            .context("--url needs --token (or JUXTA_TOKEN)")?;
        return Ok(Target {
            base_url: url.trim_end_matches('/').to_owned(),
            token,
            pid: args.pid,
            _server: None,
        });
    }
    let mut options = ServerOptions::new();
    if let Some(path) = &args.juxta {
        options = options.binary(path);
    }
    if let Some(dir) = &args.data_dir {
        options = options.data_dir(dir);
    }
    for (k, v) in &args.env {
        options = options.env(k, v);
    }
    for a in &args.serve_args {
        options = options.arg(a);
    }
    let server = Server::start(options).await?;
    Ok(Target {
        base_url: server.base_url(),
        token: server.admin_key().to_owned(),
        pid: Some(server.pid()),
        _server: Some(server),
    })
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, HISTOGRAM_SIGFIG).context("histogram bounds")
}

fn millis(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

/// A small bounded tally of error messages.
#[derive(Debug, Default)]
struct Errors {
    total: u64,
    kinds: BTreeMap<String, u64>,
}

impl Errors {
    fn add(&mut self, what: String) {
        self.total += 1;
        if self.kinds.len() < MAX_ERROR_KINDS || self.kinds.contains_key(&what) {
            *self.kinds.entry(what).or_default() += 1;
        }
    }

    fn json(&self) -> Value {
        json!({ "total": self.total, "kinds": self.kinds })
    }
}

// ---------------------------------------------------------------------------------------------
// fanout

/// What the main task tells subscribers: the last offset to expect, or stop now.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    target: Option<u64>,
    stop: bool,
}

/// What one subscriber saw.
#[derive(Debug)]
struct SubStats {
    received: u64,
    lost: u64,
    duplicates: u64,
    lost_notices: u64,
    last_offset: u64,
    last_delivery: Option<Instant>,
    latency_us: Histogram<u64>,
    error: Option<String>,
}

/// The unsigned integer after the first `key` (e.g. `"offset":`) in `text`.
fn find_u64(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

/// The string after the first `key` (e.g. `"type":`) in `text` (no escapes expected).
fn find_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start().strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

async fn subscriber(
    ws_url: String,
    token: String,
    node: String,
    mut control: watch::Receiver<Control>,
    ready: oneshot::Sender<std::result::Result<Duration, String>>,
    latency_us: Histogram<u64>,
) -> SubStats {
    let mut stats = SubStats::new(latency_us);
    let started = Instant::now();
    // Small buffers: thousands of these connections live in one process.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let client = match WsClient::try_connect(&ws_url, Some(&token), false, Some(config)).await {
        Ok(Ok(client)) => client,
        Ok(Err(status)) => {
            let e = format!("WebSocket upgrade refused: HTTP {status}");
            let _ = ready.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
        Err(e) => {
            let e = format!("{e:#}");
            let _ = ready.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
    };
    let mut client = client;
    let subscribed = match client.subscribed(&node, None, None).await {
        Ok(answer) => answer,
        Err(e) => {
            let e = format!("{e:#}");
            let _ = ready.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
    };
    stats.last_offset = subscribed["last_offset"].as_u64().unwrap_or(0);
    let _ = ready.send(Ok(started.elapsed()));
    let mut stream = client.into_inner();

    // One pending "control changed" future at a time, re-armed only when it fires: a fresh
    // `changed()` per message would make every subscriber contend on the watch's lock.
    let mut target = control.borrow_and_update().target;
    let mut changed = Box::pin(control_changed(control.clone()));
    loop {
        if target.is_some_and(|t| stats.last_offset >= t) {
            break;
        }
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => stats.handle(text.as_str()),
                Some(Ok(Message::Close(frame))) => {
                    stats.error = Some(format!("closed by the server: {frame:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    stats.error = Some(format!("read error: {e}"));
                    break;
                }
                None => {
                    stats.error = Some("connection ended".to_owned());
                    break;
                }
            },
            c = &mut changed => match c {
                Some(c) if !c.stop => {
                    target = c.target;
                    changed = Box::pin(control_changed(control.clone()));
                }
                _ => break,
            },
        }
    }
    if let Some(target) = control.borrow().target
        && stats.last_offset < target
    {
        stats.lost += target - stats.last_offset;
    }
    stats
}

/// The next control value, or `None` when the controller is gone.
async fn control_changed(mut rx: watch::Receiver<Control>) -> Option<Control> {
    rx.changed().await.ok()?;
    Some(*rx.borrow_and_update())
}

impl SubStats {
    fn new(latency_us: Histogram<u64>) -> Self {
        Self {
            received: 0,
            lost: 0,
            duplicates: 0,
            lost_notices: 0,
            last_offset: 0,
            last_delivery: None,
            latency_us,
            error: None,
        }
    }

    /// Accounts for one text message with a cheap scan instead of a full JSON parse.
    fn handle(&mut self, text: &str) {
        let now_ns = unix_nanos();
        match find_str(text, "\"type\":") {
            Some("event") => {
                let Some(offset) = find_u64(text, "\"offset\":") else {
                    return;
                };
                if offset <= self.last_offset {
                    self.duplicates += 1;
                    return;
                }
                self.lost += offset - self.last_offset - 1;
                self.last_offset = offset;
                self.received += 1;
                self.last_delivery = Some(Instant::now());
                if let Some(sent_ns) = find_u64(text, "\"t\":") {
                    let us = now_ns.saturating_sub(sent_ns) / 1000;
                    self.latency_us
                        .saturating_record(us.clamp(1, MAX_LATENCY_US));
                }
            }
            Some("error") => {
                if find_str(text, "\"code\":") == Some("events_lost") {
                    self.lost_notices += 1;
                } else if self.error.is_none() {
                    self.error = Some(text.chars().take(200).collect());
                }
            }
            _ => {}
        }
    }
}

/// Publisher-side totals.
#[derive(Debug)]
struct PublishStats {
    acked: u64,
    max_offset: u64,
    latency_us: Histogram<u64>,
    errors: Errors,
}

/// `{"t":<now ns>,"pad":"…"}` padded to about `size` bytes.
fn payload(size: usize, pad: &str) -> String {
    let t = unix_nanos();
    let head = format!("{{\"t\":{t},\"pad\":\"");
    let room = size.saturating_sub(head.len() + 2).min(pad.len());
    format!("{head}{}\"}}", &pad[..room])
}

/// Runs `publishers` tasks that publish `items` items (in requests of `batch`), pacing request
/// k at `start + k × batch / rate`.
async fn publish_paced(
    args: &Args,
    target: &Target,
    node: &str,
    items: u64,
    publishers: usize,
) -> Result<PublishStats> {
    let batch = u64::try_from(args.batch.max(1))?;
    let requests = items.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(PublishStats {
        acked: 0,
        max_offset: 0,
        latency_us: new_histogram()?,
        errors: Errors::default(),
    }));
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(HTTP_TIMEOUT)
        .pool_max_idle_per_host(publishers)
        .build()
        .context("building the HTTP client")?;
    let pad = Arc::new("x".repeat(args.size));
    let start = Instant::now();
    let rate = args.rate;
    let mut tasks = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        let next = next.clone();
        let totals = totals.clone();
        let http = http.clone();
        let pad = pad.clone();
        let token = target.token.clone();
        let node = node.to_owned();
        let single_url = format!(
            "{}/api/v1/nodes/{}/items",
            target.base_url,
            encode_path_segment(&node)
        );
        let batch_url = format!("{}/api/v1/publish", target.base_url);
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            let mut latency = new_histogram()?;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= requests {
                    break;
                }
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64((k * batch) as f64 / rate);
                    tokio::time::sleep_until(due).await;
                }
                let in_this = batch.min(items - k * batch);
                let (url, body) = if batch == 1 {
                    (
                        &single_url,
                        format!("{{\"payload\":{}}}", payload(size, &pad)),
                    )
                } else {
                    let list: Vec<String> = (0..in_this)
                        .map(|_| {
                            format!(
                                "{{\"node\":{},\"payload\":{}}}",
                                Value::from(node.as_str()),
                                payload(size, &pad)
                            )
                        })
                        .collect();
                    (&batch_url, format!("{{\"items\":[{}]}}", list.join(",")))
                };
                let sent = Instant::now();
                let result = http
                    .post(url)
                    .bearer_auth(&token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await;
                let took = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                latency.saturating_record(took.clamp(1, MAX_LATENCY_US));
                let outcome = match result {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.json::<Value>().await {
                            Ok(body) => Ok((status, body)),
                            Err(e) => Err(format!("HTTP {status}, unreadable body: {e}")),
                        }
                    }
                    Err(e) => Err(format!("request failed: {e}")),
                };
                let mut t = totals.lock();
                match outcome {
                    Ok((201, ack)) if batch == 1 => {
                        t.acked += 1;
                        t.max_offset = t.max_offset.max(ack["offset"].as_u64().unwrap_or(0));
                    }
                    Ok((200, reply)) if batch > 1 => {
                        for r in reply["results"].as_array().into_iter().flatten() {
                            if let Some(offset) = r["offset"].as_u64() {
                                t.acked += 1;
                                t.max_offset = t.max_offset.max(offset);
                            } else {
                                t.errors.add(format!("batch item: {}", r["error"]["code"]));
                            }
                        }
                    }
                    Ok((status, body)) => t.errors.add(format!(
                        "HTTP {status} {}",
                        body["code"].as_str().unwrap_or("")
                    )),
                    Err(e) => t.errors.add(e),
                }
            }
            totals
                .lock()
                .latency_us
                .add(&latency)
                .context("merging histograms")?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("publisher panicked")??;
    }
    let mut totals = totals.lock();
    Ok(PublishStats {
        acked: totals.acked,
        max_offset: totals.max_offset,
        latency_us: std::mem::replace(&mut totals.latency_us, new_histogram()?),
        errors: std::mem::take(&mut totals.errors),
    })
}

async fn fanout(args: &Args, target: &Target, node: &str) -> Result<Value> {
    let items = args.items.unwrap_or(10_000);
    let publishers = args.publishers.unwrap_or(4).max(1);
    let settle = Duration::from_secs_f64(args.settle.max(0.0));
    tokio::time::sleep(settle).await;
    let rss_idle = target.rss_kib();

    // Connect subscribers in parallel batches; each reports once it is subscribed.
    let (control_tx, control_rx) = watch::channel(Control::default());
    let ws_url = target.ws_url();
    let mut handles: Vec<JoinHandle<SubStats>> = Vec::with_capacity(args.subscribers);
    let mut connect_errors = Errors::default();
    // Connect + upgrade + subscribe time per subscriber: a tail near 1 s or 3 s means SYNs
    // were dropped (listen backlog full) and retransmitted.
    let mut connect_latency = new_histogram()?;
    let connect_start = Instant::now();
    let batch = args.connect_batch.max(1);
    while handles.len() < args.subscribers {
        let n = batch.min(args.subscribers - handles.len());
        let mut ready = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = oneshot::channel();
            ready.push(rx);
            handles.push(tokio::spawn(subscriber(
                ws_url.clone(),
                target.token.clone(),
                node.to_owned(),
                control_rx.clone(),
                tx,
                new_histogram()?,
            )));
        }
        for rx in ready {
            match tokio::time::timeout(CONNECT_BATCH_TIMEOUT, rx).await {
                Ok(Ok(Ok(took))) => {
                    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                    connect_latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
                }
                Ok(Ok(Err(e))) => connect_errors.add(e),
                Ok(Err(_)) => connect_errors.add("subscriber task ended early".to_owned()),
                Err(_) => connect_errors.add("not subscribed within 60 s".to_owned()),
            }
        }
    }
    let connected = u64::try_from(args.subscribers)? - connect_errors.total;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let rss_connected = target.rss_kib();
    let kib_per_connection = match (rss_idle, rss_connected) {
        (Some(a), Some(b)) if connected > 0 => Some(b.saturating_sub(a) as f64 / connected as f64),
        _ => None,
    };

    // Publish.
    let cpu_before = target.cpu();
    let publish_start = Instant::now();
    let published = publish_paced(args, target, node, items, publishers).await?;
    let publish_secs = publish_start.elapsed().as_secs_f64();

    // Tell subscribers where to stop, give them --drain-timeout, then stop them.
    control_tx.send_replace(Control {
        target: Some(published.max_offset),
        stop: false,
    });
    let drain = Duration::from_secs_f64(args.drain_timeout.max(0.0));
    let stopper = {
        let control_tx = control_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            control_tx.send_modify(|c| c.stop = true);
        })
    };
    let mut latency = new_histogram()?;
    let (mut received, mut lost, mut duplicates, mut notices) = (0u64, 0u64, 0u64, 0u64);
    let mut subscribers_with_loss = 0u64;
    let mut last_delivery: Option<Instant> = None;
    let mut sub_errors = Errors::default();
    for handle in handles {
        let stats = handle.await.context("subscriber panicked")?;
        received += stats.received;
        duplicates += stats.duplicates;
        notices += stats.lost_notices;
        if stats.error.is_none() || stats.received > 0 {
            lost += stats.lost;
            if stats.lost > 0 {
                subscribers_with_loss += 1;
            }
        }
        if let Some(e) = stats.error {
            sub_errors.add(e);
        }
        latency
            .add(&stats.latency_us)
            .context("merging histograms")?;
        last_delivery = last_delivery.max(stats.last_delivery);
    }
    stopper.abort();
    let cpu_after = target.cpu();
    let delivery_secs = last_delivery
        .map(|t| t.saturating_duration_since(publish_start).as_secs_f64())
        .unwrap_or(0.0);
    let rss_after = target.rss_kib();
    let expected = connected * published.acked;

    Ok(json!({
        "mode": "fanout",
        "url": target.base_url,
        "node": node,
        "subscribers": args.subscribers,
        "connected": connected,
        "connect_seconds": connect_secs,
        "connect_errors": connect_errors.json(),
        "connect_latency_ms": latency_json(&connect_latency),
        "items": items,
        "size_bytes": args.size,
        "batch": args.batch,
        "publishers": publishers,
        "target_rate": args.rate,
        "published": published.acked,
        "publish_seconds": publish_secs,
        "publish_rate": published.acked as f64 / publish_secs.max(1e-9),
        "publish_errors": published.errors.json(),
        "publish_latency_ms": latency_json(&published.latency_us),
        "deliveries": received,
        "expected_deliveries": expected,
        "delivery_seconds": delivery_secs,
        "deliveries_per_second": if delivery_secs > 0.0 { received as f64 / delivery_secs } else { 0.0 },
        "latency_ms": latency_json(&latency),
        "lost": lost,
        "duplicates": duplicates,
        "events_lost_notices": notices,
        "subscribers_with_loss": subscribers_with_loss,
        "subscriber_errors": sub_errors.json(),
        "server_cpu_seconds": cpu_delta(cpu_before.0, cpu_after.0),
        "load_tool_cpu_seconds": cpu_delta(cpu_before.1, cpu_after.1),
        "server_rss_kib_idle": rss_idle,
        "server_rss_kib_connected": rss_connected,
        "server_rss_kib_per_idle_connection": kib_per_connection,
        "server_rss_kib_after": rss_after,
    }))
}

fn cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

fn latency_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50": millis(h, 0.5),
        "p99": millis(h, 0.99),
        "p999": millis(h, 0.999),
        "max": if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
    })
}

// ---------------------------------------------------------------------------------------------
// durable-publish

async fn durable_publish(args: &Args, target: &Target, node: &str) -> Result<Value> {
    let publishers = args.publishers.unwrap_or(16).max(1);
    let cap = args.items.unwrap_or(u64::MAX);
    let duration = match (args.duration, args.items) {
        (Some(d), _) => Some(Duration::from_secs_f64(d.max(0.0))),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(HTTP_TIMEOUT)
        .pool_max_idle_per_host(publishers)
        .build()
        .context("building the HTTP client")?;
    let batch = args.batch.max(1);
    let url = if batch > 1 {
        format!("{}/api/v1/publish", target.base_url)
    } else {
        format!(
            "{}/api/v1/nodes/{}/items",
            target.base_url,
            encode_path_segment(node)
        )
    };
    let node_json = Arc::new(serde_json::to_string(node).context("node name")?);
    let pad = Arc::new("x".repeat(args.size));
    let claimed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let cpu_before = target.cpu();
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let mut tasks = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        let (http, url, pad, claimed, errors, node_json) = (
            http.clone(),
            url.clone(),
            pad.clone(),
            claimed.clone(),
            errors.clone(),
            node_json.clone(),
        );
        let token = target.token.clone();
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            let mut latency = new_histogram()?;
            let mut acked = 0u64;
            while deadline.is_none_or(|d| Instant::now() < d)
                && claimed.fetch_add(batch as u64, Ordering::Relaxed) < cap
            {
                let body = if batch > 1 {
                    // POST /api/v1/publish: `batch` items, one durable commit.
                    let items: Vec<String> = (0..batch)
                        .map(|_| {
                            format!(
                                "{{\"node\":{node_json},\"payload\":{}}}",
                                payload(size, &pad)
                            )
                        })
                        .collect();
                    format!("{{\"items\":[{}]}}", items.join(","))
                } else {
                    format!("{{\"payload\":{}}}", payload(size, &pad))
                };
                let sent = Instant::now();
                let result = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await;
                match result {
                    Ok(resp) if batch > 1 && resp.status().as_u16() == 200 => {
                        let body = resp.bytes().await.unwrap_or_default();
                        let took = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                        latency.saturating_record(took.clamp(1, MAX_LATENCY_US));
                        let stored = serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| {
                                v["results"]
                                    .as_array()
                                    .map(|r| r.iter().filter(|x| x["offset"].is_u64()).count())
                            })
                            .unwrap_or(0);
                        if stored < batch {
                            errors
                                .lock()
                                .add(format!("{} of {batch} batch items refused", batch - stored));
                        }
                        acked += stored as u64;
                    }
                    Ok(resp) if resp.status().as_u16() == 201 => {
                        // Read the body so the connection goes back to the pool.
                        let _ = resp.bytes().await;
                        let took = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                        latency.saturating_record(took.clamp(1, MAX_LATENCY_US));
                        acked += 1;
                    }
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let code = resp
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|b| b["code"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        errors.lock().add(format!("HTTP {status} {code}"));
                    }
                    Err(e) => errors.lock().add(format!("request failed: {e}")),
                }
            }
            anyhow::Ok((acked, latency))
        }));
    }
    let mut latency = new_histogram()?;
    let mut acked = 0;
    for task in tasks {
        let (n, h) = task.await.context("publisher panicked")??;
        acked += n;
        latency.add(&h).context("merging histograms")?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_after = target.cpu();
    let errors = std::mem::take(&mut *errors.lock());
    Ok(json!({
        "mode": "durable-publish",
        "url": target.base_url,
        "node": node,
        "publishers": publishers,
        "batch": batch,
        "size_bytes": args.size,
        "published": acked,
        "seconds": secs,
        "items_per_second": acked as f64 / secs.max(1e-9),
        "latency_ms": latency_json(&latency),
        "errors": errors.json(),
        "server_cpu_seconds": cpu_delta(cpu_before.0, cpu_after.0),
        "load_tool_cpu_seconds": cpu_delta(cpu_before.1, cpu_after.1),
        "server_rss_kib_after": target.rss_kib(),
    }))
}

// ---------------------------------------------------------------------------------------------
// report

fn print_human(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let kib = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "n/a".to_owned(), |k| format!("{k} KiB"))
    };
    let lat = |v: &Value| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            f(&v["p50"]),
            f(&v["p99"]),
            f(&v["p999"]),
            f(&v["max"])
        )
    };
    let errs = |v: &Value| {
        let total = v["total"].as_u64().unwrap_or(0);
        if total == 0 {
            "0".to_owned()
        } else {
            format!("{total} {}", v["kinds"])
        }
    };
    if r["mode"] == "fanout" {
        println!(
            "juxta-load fanout against {} (node {})",
            r["url"].as_str().unwrap_or(""),
            r["node"]
        );
        println!(
            "  subscribers  {} of {} connected in {:.2} s, errors {}",
            r["connected"],
            r["subscribers"],
            f(&r["connect_seconds"]),
            errs(&r["connect_errors"])
        );
        println!("  connect      {}", lat(&r["connect_latency_ms"]));
        println!(
            "  server RSS   {} idle -> {} with subscribers = {} per idle connection",
            kib(&r["server_rss_kib_idle"]),
            kib(&r["server_rss_kib_connected"]),
            r["server_rss_kib_per_idle_connection"]
                .as_f64()
                .map_or_else(|| "n/a".to_owned(), |k| format!("{k:.1} KiB"))
        );
        println!(
            "  published    {} of {} items x {} B (batch {}, {} publishers) in {:.2} s = {:.0} items/s (target {}), errors {}",
            r["published"],
            r["items"],
            r["size_bytes"],
            r["batch"],
            r["publishers"],
            f(&r["publish_seconds"]),
            f(&r["publish_rate"]),
            r["target_rate"],
            errs(&r["publish_errors"])
        );
        println!("  publish RTT  {}", lat(&r["publish_latency_ms"]));
        println!(
            "  delivered    {} of {} in {:.2} s = {:.0} deliveries/s",
            r["deliveries"],
            r["expected_deliveries"],
            f(&r["delivery_seconds"]),
            f(&r["deliveries_per_second"])
        );
        println!("  latency      {}", lat(&r["latency_ms"]));
        println!(
            "  lost {}, duplicates {}, events_lost notices {}, subscribers with loss {}, subscriber errors {}",
            r["lost"],
            r["duplicates"],
            r["events_lost_notices"],
            r["subscribers_with_loss"],
            errs(&r["subscriber_errors"])
        );
        println!("  server RSS after run {}", kib(&r["server_rss_kib_after"]));
        println!("  CPU          {}", cpu(r));
    } else {
        println!(
            "juxta-load durable-publish against {} (node {})",
            r["url"].as_str().unwrap_or(""),
            r["node"]
        );
        println!(
            "  {} publishers, {} item(s) per request, {} B payloads: {} items in {:.2} s = {:.0} items/s, errors {}",
            r["publishers"],
            r["batch"],
            r["size_bytes"],
            r["published"],
            f(&r["seconds"]),
            f(&r["items_per_second"]),
            errs(&r["errors"])
        );
        println!("  latency      {}", lat(&r["latency_ms"]));
        println!("  server RSS after run {}", kib(&r["server_rss_kib_after"]));
        println!("  CPU          {}", cpu(r));
    }
}

fn cpu(r: &Value) -> String {
    let s = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "n/a".to_owned(), |s| format!("{s:.1} s"))
    };
    format!(
        "server {}, juxta-load {} (while publishing and delivering; the machine has {} cores)",
        s(&r["server_cpu_seconds"]),
        s(&r["load_tool_cpu_seconds"]),
        std::thread::available_parallelism().map_or(0, usize::from)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_an_event_text_when_scanned_then_offset_and_send_time_are_found() {
        let text = r#"{"type":"event","node":"n","offset":42,"epoch":"00","kind":"published","item":{"id":"a","offset":42,"payload":{"t": 1700000000000000000,"pad":"xx"}}}"#;
        assert_eq!(find_str(text, "\"type\":"), Some("event"));
        assert_eq!(find_u64(text, "\"offset\":"), Some(42));
        assert_eq!(find_u64(text, "\"t\":"), Some(1_700_000_000_000_000_000));
        assert_eq!(find_u64(text, "\"missing\":"), None);
    }

    #[test]
    fn given_a_gap_and_a_repeat_when_handled_then_lost_and_duplicates_are_counted() {
        let mut stats = SubStats::new(new_histogram().expect("valid bounds"));
        for offset in [1, 2, 5, 5, 3, 6] {
            stats.handle(&format!(
                r#"{{"type":"event","offset":{offset},"item":{{"payload":{{"t":1}}}}}}"#
            ));
        }
        stats.handle(r#"{"type":"error","code":"events_lost","from":3,"to":4}"#);
        assert_eq!(
            (
                stats.received,
                stats.lost,
                stats.duplicates,
                stats.lost_notices
            ),
            (4, 2, 2, 1)
        );
    }

    #[test]
    fn given_a_size_when_a_payload_is_built_then_it_is_json_of_about_that_size() {
        let pad = "x".repeat(1000);
        let p = payload(256, &pad);
        let v: Value = serde_json::from_str(&p).expect("payload is JSON");
        assert!(v["t"].is_u64());
        assert!((250..=258).contains(&p.len()), "{} bytes", p.len());
    }
}
