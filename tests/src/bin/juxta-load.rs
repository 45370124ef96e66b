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
//! - `xmpp` (module `xmpp`): `--subscribers` XMPP clients log in over c2s (STARTTLS, SASL
//!   PLAIN, bind, presence), subscribe to one XEP-0060 node and receive `--items` items
//!   published over XMPP (or REST), against juxta or, for comparison, a Prosody started here
//!   (module `prosody`); reports deliveries/s, latency, loss, duplicates and the server's
//!   RSS per idle authenticated session.
//!
//! Everything is bounded: subscriber and publisher counts are fixed, there are no unbounded
//! queues, and every phase ends by item count or timeout.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use juxta_tests::{
    Api, RECV_TIMEOUT, Server, ServerOptions, cpu_seconds_of, encode_path_segment,
    raise_nofile_limit, rss_kib_of, unix_nanos,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Response, generate_request};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control as WsControl, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

// The crate root's modules live beside it; these two are in `juxta-load/` so that cargo does
// not take them for binaries of their own.
#[path = "juxta-load/prosody.rs"]
mod prosody;
#[path = "juxta-load/xmpp.rs"]
mod xmpp;

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
    /// XMPP pubsub fan-out: c2s subscribers on one XEP-0060 node.
    Xmpp,
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
    /// More instances of the same gateway (sharing one engine) for fan-out: subscribers and
    /// publishers are spread round-robin over --url and these (repeatable).
    #[arg(long = "also-url", value_name = "URL")]
    also_urls: Vec<String>,
    /// The pid of the server given by --url or --xmpp, to read its RSS and CPU from /proc.
    #[arg(long, alias = "server-pid")]
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
    /// Subscribers: WebSocket (fanout) or XMPP (xmpp).
    #[arg(long, short = 's', default_value_t = 100)]
    subscribers: usize,
    /// Items to publish (fanout default 10000, xmpp 1000; durable-publish: a cap besides
    /// --duration).
    #[arg(long, short = 'm')]
    items: Option<u64>,
    /// Target publish rate in items/s across all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Concurrent publishers: HTTP clients (default 4 for fanout, 16 for durable-publish, 4
    /// for xmpp with --publisher rest) or XMPP connections (default 1).
    #[arg(long, short = 'p')]
    publishers: Option<usize>,
    /// Items per request: 1 = `POST /nodes/{node}/items`, N > 1 = `POST /api/v1/publish`.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Payload size in bytes (the JSON payload is padded to about this size).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// WebSocket or XMPP connections opened (and XMPP subscriptions made) in parallel per
    /// batch.
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
    /// xmpp: which server to measure. `prosody` starts Debian's `prosody` (see --prosody) with
    /// a generated configuration unless --xmpp names a running one.
    #[arg(long, value_enum, default_value_t = xmpp::ServerKind::Juxta)]
    server: xmpp::ServerKind,
    /// xmpp: the c2s address of an already running server (default: the one spawned here).
    #[arg(long, value_name = "HOST:PORT")]
    xmpp: Option<String>,
    /// xmpp: the XMPP domain; the pubsub service is `pubsub.<domain>`.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// xmpp: how items are published: over an XMPP c2s stream (both servers) or over juxta's
    /// REST API.
    #[arg(long, value_enum, default_value_t = xmpp::PublisherKind::Xmpp)]
    publisher: xmpp::PublisherKind,
    /// xmpp: subscriber accounts are `<prefix>0` … `<prefix>S-1` (created unless the server
    /// was given with --xmpp and no --url).
    #[arg(long, default_value = "u")]
    accounts_prefix: String,
    /// xmpp: the password of every account.
    #[arg(long, default_value = "pw")]
    password: String,
    /// xmpp: the publishing account; it creates the node over XMPP and owns it (a Prosody
    /// started here lists it in `admins`, which its pubsub needs to create nodes).
    #[arg(long, default_value = "bench")]
    publisher_account: String,
    /// xmpp: publishes an XMPP publisher may have sent and not yet had answered.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// xmpp: only log the subscribers in and measure the server's RSS per idle authenticated
    /// session; no subscribing or publishing.
    #[arg(long)]
    idle_rss: bool,
    /// xmpp with --idle-rss: how far the subscribers negotiate before idling (stream, tls,
    /// authenticated, bound), to see what each step costs the server in memory.
    #[arg(long, value_enum, default_value_t = xmpp::Stage::Bound)]
    login_stage: xmpp::Stage,
    /// xmpp: the Prosody executable for --server prosody.
    #[arg(long, default_value = "prosody")]
    prosody: PathBuf,
    /// fanout: a shell command run once every subscriber is connected, just before the first
    /// publish (e.g. resetting Redis's command statistics, so they count publishes only).
    #[arg(long, value_name = "COMMAND")]
    before_publish: Option<String>,
}

fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// The server under test: spawned by us, or given by --url.
struct Target {
    base_url: String,
    /// Further instances (--also-url).
    also: Vec<String>,
    token: String,
    pid: Option<u32>,
    /// The c2s listener of a spawned server.
    xmpp_addr: Option<std::net::SocketAddr>,
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

    /// Every instance's base URL, --url first.
    fn urls(&self) -> Vec<String> {
        std::iter::once(self.base_url.clone())
            .chain(self.also.iter().cloned())
            .collect()
    }
}

/// `http://host:port` → `ws://host:port/api/v1/ws`.
fn ws_url_of(base_url: &str) -> String {
    let rest = base_url
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| {
            base_url
                .strip_prefix("https://")
                .map(|r| format!("wss://{r}"))
        })
        .unwrap_or_else(|| base_url.to_owned());
    format!("{}/api/v1/ws", rest.trim_end_matches('/'))
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
    if args.mode == Mode::Xmpp {
        let report = xmpp::run(&args).await?;
        if args.json {
            println!("{report}");
        } else {
            xmpp::print_human(&report);
        }
        return Ok(());
    }
    let target = connect_target(&args, &[]).await?;
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
        Mode::Xmpp => unreachable!("handled above"),
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

/// The server given by --url, or a spawned one with `defaults` (then --env) in its
/// environment.
async fn connect_target(args: &Args, defaults: &[(&str, &str)]) -> Result<Target> {
    if let Some(url) = &args.url {
        let token = args
            .token
            .clone()
            .context("--url needs --token (or JUXTA_TOKEN)")?;
        return Ok(Target {
            base_url: url.trim_end_matches('/').to_owned(),
            also: args
                .also_urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            token,
            pid: args.pid,
            xmpp_addr: None,
            _server: None,
        });
    }
    let mut options = ServerOptions::new();
    for (k, v) in defaults {
        options = options.env(k, v);
    }
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
        also: Vec::new(),
        token: server.admin_key().to_owned(),
        pid: Some(server.pid()),
        xmpp_addr: server.xmpp_addr(),
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

    /// Adds `other`'s tally; kinds beyond the bound count only in the total.
    fn merge(&mut self, other: Errors) {
        self.total += other.total;
        for (what, n) in other.kinds {
            if self.kinds.len() < MAX_ERROR_KINDS || self.kinds.contains_key(&what) {
                *self.kinds.entry(what).or_default() += n;
            }
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

/// The first `byte` in `hay`, eight bytes at a time: in `x = word ^ (byte × 0x01…01)` a
/// matching byte is zero, and `(x − 0x01…01) & !x & 0x80…80` flags the lowest zero byte
/// exactly (borrows only make false flags above it).
fn find_byte(hay: &[u8], byte: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(byte);
    let mut chunks = hay.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ pattern;
        let flags = x.wrapping_sub(LO) & !x & HI;
        if flags != 0 {
            return Some(base + (flags.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    let tail = chunks.remainder();
    tail.iter().position(|&b| b == byte).map(|i| base + i)
}

/// Where the first `key` in `text` ends: a scan for the key's last byte (`:` for the keys used
/// here, much rarer in JSON than `"`), then a compare of the bytes before it.
fn find_key(text: &[u8], key: &[u8]) -> Option<usize> {
    let (&last, before) = key.split_last()?;
    let mut from = before.len();
    while from < text.len() {
        let at = from + find_byte(&text[from..], last)?;
        if text[at - before.len()..at].iter().eq(before) {
            return Some(at + 1);
        }
        from = at + 1;
    }
    None
}

/// The unsigned integer after the first `key` (e.g. `"offset":`) in `text`, and where it ends.
fn find_u64_at(text: &[u8], key: &[u8]) -> Option<(u64, usize)> {
    let after = find_key(text, key)?;
    let rest = text[after..].trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let n = rest[..digits].iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    Some((n, text.len() - rest.len() + digits))
}

/// The unsigned integer after the first `key` (e.g. `"offset":`) in `text`.
fn find_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    find_u64_at(text, key).map(|(n, _)| n)
}

/// The string after the first `key` (e.g. `"type":`) in `text` (no escapes expected).
fn find_str<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let rest = text[find_key(text, key)?..]
        .trim_ascii_start()
        .strip_prefix(b"\"")?;
    Some(&rest[..find_byte(rest, b'"')?])
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
    let mut conn = match RawWs::connect(&ws_url, &token).await {
        Ok(Ok(conn)) => conn,
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
    let subscribed = match conn.subscribed(&node).await {
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

    // The receive time, taken once per `read` rather than per message: every message that
    // arrived in one read is recorded with the same receive time (latency and last delivery).
    // They were all waiting in the socket by then, so this errs by at most the time it takes to
    // account for one read's worth of messages. (Frames left over from the subscribe exchange
    // get the time of the first pass.)
    let (mut now_ns, mut now) = (unix_nanos(), Instant::now());
    // One pending "control changed" future at a time, re-armed only when it fires: a fresh
    // `changed()` per message would make every subscriber contend on the watch's lock.
    let mut target = control.borrow_and_update().target;
    let mut changed = Box::pin(control_changed(control.clone()));
    'run: loop {
        // Every complete frame in the buffer, checking the target before each as a
        // message-at-a-time loop would.
        loop {
            if target.is_some_and(|t| stats.last_offset >= t) {
                break 'run;
            }
            match conn.next_frame() {
                Ok(Some(ServerFrame::Text(text))) => stats.handle(text, now_ns, now),
                Ok(Some(ServerFrame::Ping(data))) => {
                    // Keepalive pings are rare: answering with a copy is fine.
                    let data = data.to_vec();
                    if let Err(e) = conn.pong(data).await {
                        stats.error = Some(format!("write error: {e:#}"));
                        break 'run;
                    }
                }
                Ok(Some(ServerFrame::Pong)) => {}
                Ok(Some(ServerFrame::Close(data))) => {
                    stats.error = Some(format!("closed by the server: {}", close_reason(data)));
                    break 'run;
                }
                Ok(None) => break,
                Err(e) => {
                    stats.error = Some(format!("read error: {e}"));
                    break 'run;
                }
            }
        }
        tokio::select! {
            read = conn.fill() => match read {
                Ok(0) => {
                    stats.error = Some("connection ended".to_owned());
                    break;
                }
                Ok(_) => (now_ns, now) = (unix_nanos(), Instant::now()),
                Err(e) => {
                    stats.error = Some(format!("read error: {e}"));
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

// ---------------------------------------------------------------------------------------------
// the subscribers' WebSocket client

/// Read buffer per subscriber. It is allocated, not zeroed, and reads start at its front again
/// whenever no partial frame is left over, so an idle subscriber touches only a page or two.
const READ_BUFFER: usize = 64 * 1024;
/// Largest server frame accepted (the buffer grows to hold one frame when it must).
const MAX_FRAME: usize = 64 << 20;
/// Largest handshake response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A complete server→client frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
enum ServerFrame<'a> {
    /// An unfragmented text message.
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The close payload (status code and reason), possibly empty.
    Close(&'a [u8]),
}

/// What [`parse_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Parsed<'a> {
    /// A frame and the bytes it took.
    Frame(ServerFrame<'a>, usize),
    /// An incomplete frame needing this many bytes in all (0: its header is incomplete).
    Partial(usize),
}

/// Parses one server→client frame (RFC 6455 §5.2): byte 0 is FIN, three reserved bits and the
/// opcode; byte 1 is the MASK bit (never set by a server) and a 7-bit length, where 126 means
/// a 16-bit and 127 a 64-bit big-endian length follows; then the payload. juxta sends each
/// message as one unfragmented frame, so fragments, binary and unknown opcodes are errors.
fn parse_frame(b: &[u8]) -> std::result::Result<Parsed<'_>, String> {
    let [b0, b1, ..] = *b else {
        return Ok(Parsed::Partial(0));
    };
    if b1 & 0x80 != 0 {
        return Err("a masked frame from the server".to_owned());
    }
    if b0 & 0x70 != 0 {
        return Err(format!("reserved bits set in a frame (byte 0 = {b0:#04x})"));
    }
    let (head, len) = match b1 & 0x7f {
        126 => match b {
            [_, _, l0, l1, ..] => (4, usize::from(u16::from_be_bytes([*l0, *l1]))),
            _ => return Ok(Parsed::Partial(0)),
        },
        127 => match b.get(2..10) {
            Some(l) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(l);
                (
                    10,
                    usize::try_from(u64::from_be_bytes(be)).unwrap_or(usize::MAX),
                )
            }
            None => return Ok(Parsed::Partial(0)),
        },
        n => (2, usize::from(n)),
    };
    if len > MAX_FRAME {
        return Err(format!("a frame of {len} bytes (limit {MAX_FRAME})"));
    }
    let total = head + len;
    let Some(payload) = b.get(head..total) else {
        return Ok(Parsed::Partial(total));
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if opcode >= 8 && (!fin || len > 125) {
        return Err(format!(
            "an invalid control frame (opcode {opcode}, {len} bytes)"
        ));
    }
    let frame = match opcode {
        1 if fin => ServerFrame::Text(payload),
        0 | 1 => return Err("a fragmented message".to_owned()),
        2 => return Err(format!("a binary frame of {len} bytes")),
        8 => ServerFrame::Close(payload),
        9 => ServerFrame::Ping(payload),
        10 => ServerFrame::Pong,
        _ => return Err(format!("a frame with unknown opcode {opcode}")),
    };
    Ok(Parsed::Frame(frame, total))
}

/// A close payload for a report: `code 1001 "reason"`.
fn close_reason(payload: &[u8]) -> String {
    match payload {
        [c0, c1, reason @ ..] => format!(
            "code {} {:?}",
            u16::from_be_bytes([*c0, *c1]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no close code".to_owned(),
    }
}

/// A client frame mask. RFC 6455 wants it unpredictable; std's randomly keyed SipHash over the
/// clock will do for a load tool.
fn random_mask() -> [u8; 4] {
    let [a, b, c, d, ..] = RandomState::new().hash_one(unix_nanos()).to_le_bytes();
    [a, b, c, d]
}

/// A WebSocket client over a plain `TcpStream` that parses the server's frames in place from
/// one reusable read buffer: one `read` takes everything the socket has, and the frames in it
/// are handled without allocating or copying.
///
/// The handshake request is tungstenite's own (`generate_request`), and its response is parsed
/// and checked like tungstenite does; it is done here rather than by tokio-tungstenite because
/// `WebSocketStream` does not give back bytes it has read past the last message it returned,
/// and the events right after the `subscribed` answer must not be lost.
#[derive(Debug)]
struct RawWs {
    sock: TcpStream,
    /// Received bytes; `buf[start..]` are not consumed yet.
    buf: Vec<u8>,
    start: usize,
    /// Bytes the incomplete frame at `start` needs in all, when its header is in.
    need: usize,
}

impl RawWs {
    /// Connects to `ws_url` (`ws://HOST:PORT/api/v1/ws`) with `?token=` and upgrades:
    /// `Ok(Err(status))` when the server answers with another HTTP status than 101.
    async fn connect(ws_url: &str, token: &str) -> Result<std::result::Result<Self, u16>> {
        let url = format!("{ws_url}?token={}", encode_path_segment(token));
        let request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("building a WebSocket request for {ws_url}"))?;
        if request.uri().scheme_str() != Some("ws") {
            bail!("{ws_url}: the load tool speaks ws:// only");
        }
        let host = request
            .uri()
            .host()
            .with_context(|| format!("{ws_url} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let (head, key) = generate_request(request).context("building the handshake")?;
        let sock = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {ws_url}"))?;
        sock.set_nodelay(true).context("setting TCP_NODELAY")?;
        let mut conn = Self {
            sock,
            buf: Vec::with_capacity(READ_BUFFER),
            start: 0,
            need: 0,
        };
        conn.sock
            .write_all(&head)
            .await
            .context("sending the handshake")?;
        let (used, response) = tokio::time::timeout(CONNECT_BATCH_TIMEOUT, async {
            loop {
                if let Some(parsed) =
                    Response::try_parse(&conn.buf).context("parsing the handshake response")?
                {
                    return anyhow::Ok(parsed);
                }
                if conn.buf.len() >= MAX_RESPONSE_HEAD {
                    bail!("a handshake response head over {MAX_RESPONSE_HEAD} bytes");
                }
                if conn
                    .fill()
                    .await
                    .context("reading the handshake response")?
                    == 0
                {
                    bail!("the connection closed during the handshake");
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no handshake response within {CONNECT_BATCH_TIMEOUT:?}"))??;
        let status = response.status().as_u16();
        if status != 101 {
            return Ok(Err(status));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        if !header("upgrade").eq_ignore_ascii_case("websocket")
            || !header("connection")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        {
            bail!("the 101 response does not upgrade to websocket");
        }
        if header("sec-websocket-accept") != derive_accept_key(key.as_bytes()) {
            bail!("the 101 response has a wrong Sec-WebSocket-Accept");
        }
        // Anything after the head (nothing, until we subscribe) stays for the frame parser.
        conn.start = used;
        Ok(Ok(conn))
    }

    /// Sends `{"op":"subscribe",...}` as `WsClient::subscribed` does and returns the answer,
    /// which must be `subscribed` with our `ref`. Frames after it stay in the buffer.
    async fn subscribed(&mut self, node: &str) -> Result<Value> {
        let reference = format!("sub-{node}");
        let op = json!({ "op": "subscribe", "node": node, "ref": reference });
        self.send(OpCode::Data(Data::Text), op.to_string().into_bytes())
            .await
            .context("sending a text frame")?;
        let answer = tokio::time::timeout(RECV_TIMEOUT, self.next_json())
            .await
            .map_err(|_| anyhow!("no WebSocket message within {RECV_TIMEOUT:?}"))??;
        if answer["type"] != "subscribed" {
            bail!("subscribe to {node} answered {answer}");
        }
        if answer["ref"] != reference.as_str() {
            bail!("subscribed without our ref: {answer}");
        }
        Ok(answer)
    }

    /// The next text message as JSON (for the setup exchange; pings are answered).
    async fn next_json(&mut self) -> Result<Value> {
        loop {
            match self
                .next_frame()
                .map_err(|e| anyhow!("reading the WebSocket: {e}"))?
            {
                Some(ServerFrame::Text(text)) => {
                    return serde_json::from_slice(text).with_context(|| {
                        format!(
                            "server sent non-JSON text: {}",
                            String::from_utf8_lossy(text)
                        )
                    });
                }
                Some(ServerFrame::Ping(data)) => {
                    let data = data.to_vec();
                    self.pong(data).await?;
                }
                Some(ServerFrame::Pong) => {}
                Some(ServerFrame::Close(data)) => {
                    bail!("the server closed the WebSocket: {}", close_reason(data))
                }
                None => {
                    if self.fill().await.context("reading the WebSocket")? == 0 {
                        bail!("the WebSocket stream ended");
                    }
                }
            }
        }
    }

    /// The next complete frame in the buffer (consumed), or `None` when more must be read.
    fn next_frame(&mut self) -> std::result::Result<Option<ServerFrame<'_>>, String> {
        match parse_frame(&self.buf[self.start..])? {
            Parsed::Frame(frame, used) => {
                self.start += used;
                Ok(Some(frame))
            }
            Parsed::Partial(need) => {
                self.need = need;
                Ok(None)
            }
        }
    }

    /// One `read` of whatever the socket has into the buffer, after moving an incomplete frame
    /// (if any) to its front and growing it if that frame is larger than the buffer. `Ok(0)`
    /// at the end of the stream. Cancel-safe: nothing is lost if the read is dropped.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start > 0 {
            // Usually everything was consumed and this is a plain reset.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let want = self.need.max(self.buf.len() + 1);
        if want > self.buf.capacity() {
            self.buf.reserve(want - self.buf.len());
        }
        self.sock.read_buf(&mut self.buf).await
    }

    /// Answers a ping.
    async fn pong(&mut self, data: Vec<u8>) -> Result<()> {
        self.send(OpCode::Control(WsControl::Pong), data)
            .await
            .context("sending a pong")
    }

    /// Sends one masked frame (formatted by tungstenite).
    async fn send(&mut self, opcode: OpCode, payload: Vec<u8>) -> Result<()> {
        let header = FrameHeader {
            is_final: true,
            opcode,
            mask: Some(random_mask()),
            ..FrameHeader::default()
        };
        let mut out = Vec::with_capacity(payload.len() + 14);
        Frame::from_payload(header, payload.into())
            .format(&mut out)
            .context("formatting a frame")?;
        self.sock.write_all(&out).await?;
        Ok(())
    }
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

    /// Accounts for one text message received at `now_ns` (unix nanos) / `now`, with a cheap
    /// byte scan instead of a full JSON parse. The server only sends valid UTF-8, so the bytes
    /// are not validated.
    fn handle(&mut self, text: &[u8], now_ns: u64, now: Instant) {
        match find_str(text, b"\"type\":") {
            Some(b"event") => {
                let Some((offset, end)) = find_u64_at(text, b"\"offset\":") else {
                    return;
                };
                if offset <= self.last_offset {
                    self.duplicates += 1;
                    return;
                }
                self.lost += offset - self.last_offset - 1;
                self.last_offset = offset;
                self.received += 1;
                self.last_delivery = Some(now);
                // The send time is in the payload, after the event's offset: no need to scan
                // the envelope again.
                if let Some(sent_ns) = find_u64(&text[end..], b"\"t\":") {
                    let us = now_ns.saturating_sub(sent_ns) / 1000;
                    self.latency_us
                        .saturating_record(us.clamp(1, MAX_LATENCY_US));
                }
            }
            Some(b"error") => {
                if find_str(text, b"\"code\":") == Some(b"events_lost") {
                    self.lost_notices += 1;
                } else if self.error.is_none() {
                    let head = &text[..text.len().min(200)];
                    self.error = Some(String::from_utf8_lossy(head).into_owned());
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

/// `{"t":<now ns>,"i":<seq>,"pad":"…"}` padded to about `size` bytes. `seq` numbers the
/// items of a run from 0, so that a subscriber can tell which ones it got (xmpp mode).
fn payload(size: usize, pad: &str, seq: u64) -> String {
    let t = unix_nanos();
    let head = format!("{{\"t\":{t},\"i\":{seq},\"pad\":\"");
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
    let bases = target.urls();
    for p in 0..publishers {
        let next = next.clone();
        let totals = totals.clone();
        let http = http.clone();
        let pad = pad.clone();
        let token = target.token.clone();
        let node = node.to_owned();
        let base = &bases[p % bases.len()];
        let single_url = format!("{}/api/v1/nodes/{}/items", base, encode_path_segment(&node));
        let batch_url = format!("{base}/api/v1/publish");
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
                        format!("{{\"payload\":{}}}", payload(size, &pad, k)),
                    )
                } else {
                    let list: Vec<String> = (0..in_this)
                        .map(|j| {
                            format!(
                                "{{\"node\":{},\"payload\":{}}}",
                                Value::from(node.as_str()),
                                payload(size, &pad, k * batch + j)
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
    let ws_urls: Vec<String> = target.urls().iter().map(|u| ws_url_of(u)).collect();
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
            let ws_url = ws_urls[handles.len() % ws_urls.len()].clone();
            handles.push(tokio::spawn(subscriber(
                ws_url,
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
    if let Some(cmd) = &args.before_publish {
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .await
            .context("running --before-publish")?;
        ensure!(status.success(), "--before-publish {cmd:?}: {status}");
    }
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
            loop {
                let first = claimed.fetch_add(batch as u64, Ordering::Relaxed);
                if deadline.is_some_and(|d| Instant::now() >= d) || first >= cap {
                    break;
                }
                let body = if batch > 1 {
                    // POST /api/v1/publish: `batch` items, one durable commit.
                    let items: Vec<String> = (0..batch as u64)
                        .map(|j| {
                            format!(
                                "{{\"node\":{node_json},\"payload\":{}}}",
                                payload(size, &pad, first + j)
                            )
                        })
                        .collect();
                    format!("{{\"items\":[{}]}}", items.join(","))
                } else {
                    format!("{{\"payload\":{}}}", payload(size, &pad, first))
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
        let text = br#"{"type":"event","node":"n","offset":42,"epoch":"00","kind":"published","item":{"id":"a","offset":42,"payload":{"t": 1700000000000000000,"pad":"xx"}}}"#;
        assert_eq!(find_str(text, b"\"type\":"), Some(&b"event"[..]));
        assert_eq!(find_u64(text, b"\"offset\":"), Some(42));
        assert_eq!(find_u64(text, b"\"t\":"), Some(1_700_000_000_000_000_000));
        assert_eq!(find_u64(text, b"\"missing\":"), None);
        assert_eq!(find_u64(br#"{"a":"x:","t":"#, b"\"t\":"), None);
        assert_eq!(find_u64(br#"{"t":99999999999999999999}"#, b"\"t\":"), None);
        assert_eq!(find_str(br#""type":"x"#, b"\"type\":"), None);
        assert_eq!(
            find_u64_at(b"{\"offset\": 7,", b"\"offset\":"),
            Some((7, 12))
        );
    }

    #[test]
    fn given_any_position_when_a_byte_is_searched_then_the_first_one_is_found() {
        for len in 0..40 {
            for at in 0..len {
                let mut hay = vec![b'a'; len];
                hay[at] = b':';
                if at + 3 < len {
                    hay[at + 3] = b':';
                }
                // 0x3b = b':' + 1: borrows must not turn it into a false match.
                hay.iter_mut()
                    .skip(at + 1)
                    .step_by(2)
                    .for_each(|b| *b = 0x3b);
                assert_eq!(find_byte(&hay, b':'), Some(at), "{len} {at}");
            }
            assert_eq!(find_byte(&vec![b'a'; len], b':'), None);
        }
    }

    #[test]
    fn given_a_gap_and_a_repeat_when_handled_then_lost_and_duplicates_are_counted() {
        let mut stats = SubStats::new(new_histogram().expect("valid bounds"));
        let now = Instant::now();
        for offset in [1, 2, 5, 5, 3, 6] {
            let text =
                format!(r#"{{"type":"event","offset":{offset},"item":{{"payload":{{"t":1}}}}}}"#);
            stats.handle(text.as_bytes(), 2_000_001, now);
        }
        stats.handle(
            br#"{"type":"error","code":"events_lost","from":3,"to":4}"#,
            0,
            now,
        );
        assert_eq!(
            (
                stats.received,
                stats.lost,
                stats.duplicates,
                stats.lost_notices
            ),
            (4, 2, 2, 1)
        );
        assert_eq!(stats.latency_us.len(), 4);
        // (2 000 001 ns − 1 ns) / 1000 = 2000 µs, within the histogram's resolution.
        assert!(stats.latency_us.equivalent(stats.latency_us.max(), 2000));
        assert_eq!(stats.last_delivery, Some(now));
        stats.handle(br#"{"type":"error","code":"forbidden"}"#, 0, now);
        assert_eq!(
            stats.error.as_deref(),
            Some(r#"{"type":"error","code":"forbidden"}"#)
        );
    }

    /// A server→client frame as a server writes it (unmasked).
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(u8::try_from(n).expect("small")),
            n if n <= 0xffff => {
                out.push(126);
                out.extend(u16::try_from(n).expect("16 bits").to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend(u64::try_from(n).expect("64 bits").to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn given_frames_of_each_length_form_when_parsed_then_payloads_and_sizes_are_found() {
        for len in [0, 1, 125, 126, 300, 0xffff, 0x1_0000, 70_000] {
            let payload = vec![b'x'; len];
            let wire = server_frame(0x81, &payload);
            assert_eq!(
                parse_frame(&wire),
                Ok(Parsed::Frame(ServerFrame::Text(&payload), wire.len())),
                "{len} bytes"
            );
            // Every proper prefix is incomplete; once the header is in, the size is known.
            let head = wire.len() - len;
            for cut in [0, 1, head - 1, head, wire.len() - 1] {
                if cut >= wire.len() {
                    continue;
                }
                let expect = if cut < head { 0 } else { wire.len() };
                assert_eq!(
                    parse_frame(&wire[..cut]),
                    Ok(Parsed::Partial(expect)),
                    "{len} bytes cut at {cut}"
                );
            }
        }
        assert_eq!(
            parse_frame(&server_frame(0x89, b"hi")),
            Ok(Parsed::Frame(ServerFrame::Ping(b"hi"), 4))
        );
        assert_eq!(
            parse_frame(&server_frame(0x8a, b"")),
            Ok(Parsed::Frame(ServerFrame::Pong, 2))
        );
        assert_eq!(
            parse_frame(&server_frame(0x88, b"\x03\xe9bye")),
            Ok(Parsed::Frame(ServerFrame::Close(b"\x03\xe9bye"), 7))
        );
        assert_eq!(close_reason(b"\x03\xe9bye"), r#"code 1001 "bye""#);
    }

    #[test]
    fn given_frames_a_server_must_not_send_when_parsed_then_they_are_errors() {
        let masked = [0x81, 0x81, 1, 2, 3, 4, b'x'];
        assert!(parse_frame(&masked).is_err());
        assert!(parse_frame(&server_frame(0x01, b"part")).is_err()); // text, not FIN
        assert!(parse_frame(&server_frame(0x80, b"rest")).is_err()); // continuation
        assert!(parse_frame(&server_frame(0x82, b"bin")).is_err());
        assert!(parse_frame(&server_frame(0xc1, b"rsv1")).is_err());
        assert!(parse_frame(&server_frame(0x83, b"")).is_err());
        assert!(parse_frame(&server_frame(0x09, b"")).is_err()); // fragmented ping
        assert!(parse_frame(&server_frame(0x89, &[0; 126])).is_err());
        let mut huge = vec![0x81, 127];
        huge.extend(u64::MAX.to_be_bytes());
        assert!(parse_frame(&huge).is_err());
    }

    /// A tokio-tungstenite server that answers the subscribe op with `subscribed`, a ping and
    /// `events` events (flushed together, so they reach the client in one segment), then a
    /// big event and a close.
    async fn fake_server(listener: tokio::net::TcpListener, events: u64) -> Result<Value> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let (tcp, _) = listener.accept().await?;
        let mut ws = tokio_tungstenite::accept_async(tcp).await?;
        let op = match ws.next().await.context("no op")?? {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str())?,
            other => bail!("expected the subscribe op, got {other:?}"),
        };
        let reference = op["ref"].clone();
        let subscribed = json!({"type": "subscribed", "ref": reference, "last_offset": 10});
        ws.feed(Message::text(subscribed.to_string())).await?;
        ws.feed(Message::Ping(b"keep".to_vec().into())).await?;
        for offset in 11..11 + events {
            let event = format!(
                r#"{{"type":"event","offset":{offset},"item":{{"payload":{{"t":{}}}}}}}"#,
                unix_nanos()
            );
            ws.feed(Message::text(event)).await?;
        }
        ws.flush().await?;
        let big = format!(
            r#"{{"type":"event","offset":{},"item":{{"payload":{{"t":1,"pad":"{}"}}}}}}"#,
            11 + events,
            "x".repeat(3 * READ_BUFFER)
        );
        ws.send(Message::text(big)).await?;
        // The client answers the ping.
        let pong = loop {
            match ws.next().await.context("no pong")?? {
                Message::Pong(p) => break p,
                Message::Text(_) => {}
                other => bail!("expected a pong, got {other:?}"),
            }
        };
        if pong.as_ref() != b"keep" {
            bail!("pong payload {pong:?}");
        }
        ws.send(Message::Close(None)).await?;
        Ok(op)
    }

    #[tokio::test]
    async fn given_events_right_after_subscribed_when_received_raw_then_none_is_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(fake_server(listener, 500));
        let mut conn = RawWs::connect(&format!("ws://{addr}/api/v1/ws"), "k/y")
            .await
            .expect("connect")
            .expect("upgraded");
        let answer = conn.subscribed("n1").await.expect("subscribed");
        assert_eq!(answer["last_offset"], 10);
        let mut stats = SubStats::new(new_histogram().expect("valid bounds"));
        stats.last_offset = 10;
        let (mut pings, mut closed) = (0, false);
        while !closed {
            let now = (unix_nanos(), Instant::now());
            while let Some(frame) = conn.next_frame().expect("valid frames") {
                match frame {
                    ServerFrame::Text(text) => stats.handle(text, now.0, now.1),
                    ServerFrame::Ping(data) => {
                        let data = data.to_vec();
                        pings += 1;
                        conn.pong(data).await.expect("pong");
                    }
                    ServerFrame::Pong => {}
                    ServerFrame::Close(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !closed {
                assert!(conn.fill().await.expect("read") > 0, "ended before close");
            }
        }
        let op = server.await.expect("server task").expect("server");
        assert_eq!(
            op,
            json!({"op": "subscribe", "node": "n1", "ref": "sub-n1"})
        );
        assert_eq!((stats.received, stats.lost, stats.duplicates), (501, 0, 0));
        assert_eq!(stats.last_offset, 511);
        assert_eq!(pings, 1);
        assert!(conn.buf.capacity() > 3 * READ_BUFFER);
    }

    #[tokio::test]
    async fn given_a_refused_upgrade_when_connecting_raw_then_the_status_is_returned() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let mut head = vec![0u8; 4096];
            let n = tcp.read(&mut head).await?;
            head.truncate(n);
            tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                .await?;
            anyhow::Ok(String::from_utf8(head)?)
        });
        let refused = RawWs::connect(&format!("ws://{addr}/api/v1/ws"), "secret")
            .await
            .expect("transport ok");
        assert_eq!(refused.err(), Some(401));
        let head = server.await.expect("server task").expect("server");
        assert!(
            head.starts_with("GET /api/v1/ws?token=secret HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("Sec-WebSocket-Key: "), "{head}");
    }

    #[test]
    fn given_a_size_when_a_payload_is_built_then_it_is_json_of_about_that_size() {
        let pad = "x".repeat(1000);
        let p = payload(256, &pad, 7);
        let v: Value = serde_json::from_str(&p).expect("payload is JSON");
        assert!(v["t"].is_u64());
        assert_eq!(v["i"], 7);
        assert!((250..=258).contains(&p.len()), "{} bytes", p.len());
    }
}
