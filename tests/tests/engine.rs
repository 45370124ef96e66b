//! Several `juxta serve` instances on one Redis (and on a Redis Cluster) behave as one gateway:
//! subscribers on any instance, by any protocol, receive what is published on any other, in
//! order, once; an instance or Redis can die without losing acknowledged items.
//!
//! Each test starts its own `redis-server` processes on free ports and stops them afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use juxta_tests::interop::Slixmpp;
use juxta_tests::peer::{Peer, peer_id};
use juxta_tests::{Server, ServerOptions, SseClient, WsClient, unique};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `true` when redis-server is here; otherwise says so (and fails under CI=true).
fn have_redis() -> bool {
    let ok = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server is required in CI (tests/run.sh installs it)"
        );
        eprintln!("SKIPPED: redis-server is not installed (tests/run.sh installs it as root)");
    }
    ok
}

/// One `redis-server` on a free port with its own directory.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Redis {
    async fn start(extra: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut r = Self {
            child: None,
            port: free_port()?,
            dir: tmp.path().to_owned(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp,
        };
        r.spawn().await?;
        Ok(r)
    }

    /// A Redis that speaks only TLS on its port, with a certificate for 127.0.0.1 signed by
    /// a CA of its own; returns it and the CA's PEM file.
    async fn start_tls() -> Result<(Self, PathBuf)> {
        let tmp = tempfile::tempdir()?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "juxta test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let dir = tmp.path();
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        std::fs::write(dir.join("redis.pem"), cert.pem())?;
        std::fs::write(dir.join("redis.key"), key.serialize_pem())?;
        let port = free_port()?;
        let mut r = Self {
            child: None,
            port,
            dir: dir.to_owned(),
            args: [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &dir.join("redis.pem").display().to_string(),
                "--tls-key-file",
                &dir.join("redis.key").display().to_string(),
                "--tls-ca-cert-file",
                &dir.join("ca.pem").display().to_string(),
                "--tls-auth-clients",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            _tmp: tmp,
        };
        r.spawn().await?;
        let ca = r.dir.join("ca.pem");
        Ok((r, ca))
    }

    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        wait_port(self.port).await
    }

    async fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
            c.wait().await?;
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the server process.
    async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("redis-server is not running")?;
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .await?;
        ensure!(status.success(), "kill -s {signal} {pid}: {status}");
        Ok(())
    }

    async fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.port, args).await
    }
}

async fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .context("redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn wait_port(port: u16) -> Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {port}")
}

/// A 3-master Redis Cluster, each master with `replicas` replicas.
struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    async fn start(replicas: usize) -> Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            let tmp = tempfile::tempdir()?;
            let conf = tmp.path().join("nodes.conf");
            let mut r = Redis {
                child: None,
                port: free_port()?,
                dir: tmp.path().to_owned(),
                args: vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf.display().to_string(),
                ],
                _tmp: tmp,
            };
            r.spawn().await?;
            nodes.push(r);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            let deadline = tokio::time::Instant::now() + WAIT;
            while !n
                .cli(&["cluster", "info"])
                .await?
                .contains("cluster_state:ok")
            {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "cluster never got ok"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(Self { nodes })
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of the master serving `slot` and of one of its replicas, from `CLUSTER NODES`
    /// (`<id> <ip:port@cport> <flags> <master id|-> … <slot ranges>`).
    /// Asks until the view has both (gossip spreads it after `cluster create`).
    async fn master_and_replica(&self, slot: u16) -> Result<(u16, u16)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.try_master_and_replica(slot).await {
                Ok(found) => return Ok(found),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn try_master_and_replica(&self, slot: u16) -> Result<(u16, u16)> {
        let text = self.nodes[0].cli(&["cluster", "nodes"]).await?;
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        let port = |f: &[&str]| -> Result<u16> {
            let addr = f.get(1).context("address")?;
            let hostport = addr.split('@').next().unwrap_or_default();
            Ok(hostport.rsplit(':').next().unwrap_or_default().parse()?)
        };
        let serves = |f: &[&str]| {
            f.iter().skip(8).any(|r| {
                let mut ends = r.splitn(2, '-').map(|x| x.parse::<u16>().ok());
                match (ends.next().flatten(), ends.next().flatten()) {
                    (Some(a), Some(b)) => (a..=b).contains(&slot),
                    (Some(a), None) => a == slot,
                    _ => false,
                }
            })
        };
        let master = lines
            .iter()
            .find(|f| f.get(2).is_some_and(|x| x.contains("master")) && serves(f))
            .with_context(|| format!("no master serves slot {slot}: {text}"))?;
        let replica = lines
            .iter()
            .find(|f| f.get(3) == master.first())
            .with_context(|| format!("the master of slot {slot} has no replica: {text}"))?;
        Ok((port(master)?, port(replica)?))
    }
}

const ADMIN: &str = "engine-test-admin-key-0123456789abcdef";

fn options(url: &str, cluster: bool, data: Option<&Path>) -> ServerOptions {
    let mut o = ServerOptions::new()
        .admin_key(ADMIN)
        .env("JUXTA_STORE__BACKEND", "redis")
        .env("JUXTA_STORE__URL", url)
        .env("JUXTA_P2P__ENABLED", "false");
    if cluster {
        o = o.env("JUXTA_STORE__CLUSTER", "true");
    }
    if let Some(d) = data {
        o = o.data_dir(d);
    }
    o
}

async fn instances(url: &str, cluster: bool, n: usize) -> Result<Vec<Server>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let s = Server::start(options(url, cluster, None)).await?;
        wait_ready(&s, true).await?;
        out.push(s);
    }
    Ok(out)
}

/// The Redis key of `node`'s log (its name changes with the node's settings).
async fn log_key(redis: &Redis, node: &str) -> Result<String> {
    let generation = redis
        .cli(&["hget", &format!("juxta:{{{node}}}:meta"), "g"])
        .await?;
    ensure!(!generation.is_empty(), "{node} has no log generation");
    Ok(format!("juxta:{{{node}}}:log:{generation}"))
}

async fn ready(s: &Server) -> Result<bool> {
    let r = s.api().get("/readyz").await?;
    Ok(r.status == 200)
}

async fn wait_ready(s: &Server, want: bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready(s).await? != want {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "readyz never became {want}: {}",
            s.output_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits a moment for the engine to try, then checks `s` is not ready and returns why
/// (`/readyz`'s store check, lower case).
async fn not_ready_because(s: &Server) -> Result<String> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = s.api().get("/readyz").await?;
    ensure!(r.status == 503, "ready: {}", r.body);
    Ok(r.body["checks"]["store"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase())
}

/// Reads `n` events and checks they are offsets `from..from+n` with the given ids.
async fn ws_expect(ws: &mut WsClient, from: u64, ids: &[String]) -> Result<()> {
    for (i, id) in ids.iter().enumerate() {
        let e = ws.next_event().await?;
        ensure!(
            e["offset"] == from + i as u64 && e["item"]["id"] == id.as_str(),
            "expected offset {} id {id}, got {e}",
            from + i as u64
        );
    }
    Ok(())
}

async fn sse_expect(sse: &mut SseClient, from: u64, ids: &[String]) -> Result<()> {
    for (i, id) in ids.iter().enumerate() {
        let (_, e) = sse.next_json("published").await?;
        ensure!(
            e["offset"] == from + i as u64 && e["item"]["id"] == id.as_str(),
            "SSE: expected offset {} id {id}, got {e}",
            from + i as u64
        );
    }
    Ok(())
}

async fn add_account(s: &Server, user: &str, password: &str) -> Result<()> {
    s.api()
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/accounts/{user}"),
            Some(&json!({ "password": password })),
        )
        .await?
        .expect(201)?;
    Ok(())
}

async fn sse_open(s: &Server, node: &str) -> Result<SseClient> {
    let mut sse = SseClient::open(&s.api(), node, &[], None).await?;
    sse.next_json("subscribed").await?;
    Ok(sse)
}

async fn publish_n(s: &Server, node: &str, n: usize, tag: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = s
            .api()
            .publish(
                node,
                &json!({"id": format!("{tag}{i}"), "payload": {"i": i}}),
            )
            .await?
            .expect(201)?;
        ids.push(r["id"].as_str().context("id")?.to_owned());
    }
    Ok(ids)
}

#[tokio::test]
async fn three_instances_on_one_redis_behave_as_one_gateway() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let redis = Redis::start(&[]).await?;
    let g = instances(&redis.url(), false, 3).await?;
    let (a, b, c) = (&g[0], &g[1], &g[2]);
    let node = unique("scale");
    a.api().create_node(&node, None).await?;
    // A node created on a exists on b; an account created on b logs in on a.
    b.api().get_node(&node).await?.expect(200)?;
    add_account(b, "bob", "bob pass").await?;

    let mut ws = WsClient::connect(&a.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;
    let mut sse = sse_open(b, &node).await?;
    let n = 100;
    let client = Slixmpp::start(
        a.xmpp_addr().context("a's XMPP address")?,
        "bob@localhost",
        "bob pass",
        &a.data_dir().join("xmpp-localhost.crt"),
        &json!([
            {"op": "subscribe", "to": "pubsub.localhost", "node": node},
            {"op": "wait_events", "node": node, "count": n, "timeout": 50},
        ]),
    )?;
    juxta_tests::interop::wait_for_subscribers(a, &node, 2, "bob").await?;

    let ids = publish_n(c, &node, n, "c").await?;
    ws_expect(&mut ws, 1, &ids).await?;
    sse_expect(&mut sse, 1, &ids).await?;
    let (ok, report) = client.finish(WAIT).await?;
    ensure!(ok, "XMPP client on a: {report}");
    let got: Vec<&str> = report["steps"][1]["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    ensure!(
        got == ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "XMPP client on a got {got:?}"
    );
    // Nothing more: no duplicates anywhere.
    ensure!(
        ws.recv_within(Duration::from_millis(500)).await.is_err(),
        "a duplicate reached the WebSocket subscriber"
    );
    Ok(())
}

#[tokio::test]
async fn presence_based_delivery_follows_presence_on_the_subscribers_instance() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let redis = Redis::start(&[]).await?;
    let g = instances(&redis.url(), false, 2).await?;
    let (a, b) = (&g[0], &g[1]);
    let node = unique("presence");
    a.api()
        .create_node(
            &node,
            Some(&json!({"presence_based_delivery": true, "send_last_published_item": "never"})),
        )
        .await?;
    add_account(a, "carol", "carol pass").await?;
    // Carol is on a; publishes happen on b. She gets what is published while she is
    // available, and nothing once she has said she is unavailable.
    let client = Slixmpp::start(
        a.xmpp_addr().context("a's XMPP address")?,
        "carol@localhost",
        "carol pass",
        &a.data_dir().join("xmpp-localhost.crt"),
        &json!([
            {"op": "subscribe", "to": "pubsub.localhost", "node": node},
            {"op": "wait_events", "node": node, "count": 1, "timeout": 40},
            {"op": "presence", "type": "unavailable"},
            {"op": "sleep", "seconds": 4},
            {"op": "events", "node": node},
        ]),
    )?;
    juxta_tests::interop::wait_for_subscribers(a, &node, 1, "carol").await?;
    b.api()
        .publish(&node, &json!({"id": "while-available", "payload": 1}))
        .await?
        .expect(201)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.api()
        .publish(&node, &json!({"id": "while-unavailable", "payload": 2}))
        .await?
        .expect(201)?;
    let (ok, report) = client.finish(WAIT).await?;
    ensure!(ok, "XMPP client on a: {report}");
    let got: Vec<&str> = report["steps"][4]["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    ensure!(got == ["while-available"], "carol got {got:?}: {report}");
    Ok(())
}

/// XMPP subscriptions belong to the gateway, not to an instance: bob subscribes through a,
/// then his client connects to b only. b learns of the subscription from the store's log of
/// membership changes within seconds (its full reread is once a minute), starts feeding the
/// node, and notifies him of an item published on c.
#[tokio::test]
async fn an_xmpp_subscription_made_through_one_instance_is_served_by_another() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let redis = Redis::start(&[]).await?;
    let g = instances(&redis.url(), false, 3).await?;
    let (a, b, c) = (&g[0], &g[1], &g[2]);
    let node = unique("shared-sub");
    a.api()
        .create_node(&node, Some(&json!({"send_last_published_item": "never"})))
        .await?;
    add_account(a, "bob", "bob pass").await?;
    let subscribe = Slixmpp::start(
        a.xmpp_addr().context("a's XMPP address")?,
        "bob@localhost",
        "bob pass",
        &a.data_dir().join("xmpp-localhost.crt"),
        &json!([{"op": "subscribe", "to": "pubsub.localhost", "node": node}]),
    )?;
    let (ok, report) = subscribe.finish(WAIT).await?;
    ensure!(ok, "subscribing through a: {report}");
    // Bob comes online on b: a ping answered after his available presence shows b has it
    // (notifications go to available resources only), then the client says so.
    let dir = tempfile::tempdir()?;
    let online = dir.path().join("online");
    let client = Slixmpp::start(
        b.xmpp_addr().context("b's XMPP address")?,
        "bob@localhost",
        "bob pass",
        &b.data_dir().join("xmpp-localhost.crt"),
        &json!([
            {"op": "ping", "to": "localhost"},
            {"op": "touch", "path": online},
            {"op": "wait_events", "node": node, "count": 1, "timeout": 50},
        ]),
    )?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !online.exists() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "bob never came online on b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Well within the minute of the full reread.
    juxta_tests::interop::wait_for_subscribers(b, &node, 1, "b's feeder for bob").await?;
    let ids = publish_n(c, &node, 1, "c").await?;
    let (ok, report) = client.finish(WAIT).await?;
    ensure!(ok, "bob on b: {report}\nb: {}", b.output_tail());
    ensure!(
        report["steps"][2]["events"][0]["id"] == ids[0].as_str(),
        "bob on b: {report}"
    );
    Ok(())
}

/// Overlay bridging with three instances on one Redis: each carries the node's pipe, so a
/// REST item published on c reaches an edge peer joined through b once (the three feeders'
/// copies share one message id), and a member peer's publication through a, which gossip
/// takes to every gateway, is stored once (the shared idempotency key) and reaches a
/// WebSocket subscriber on c and the follower once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_bridge_one_pipe_once() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let redis = Redis::start(&[]).await?;
    let a =
        Server::start(options(&redis.url(), false, None).env("JUXTA_P2P__ENABLED", "true")).await?;
    let a_addr = a.p2p_addr().context("a's p2p address")?.to_owned();
    let mut g = vec![a];
    for _ in 0..2 {
        let s = Server::start(
            options(&redis.url(), false, None)
                .env("JUXTA_P2P__ENABLED", "true")
                .env("JUXTA_P2P__BOOTSTRAP", format!("[\"{a_addr}\"]")),
        )
        .await?;
        g.push(s);
    }
    for s in &g {
        wait_ready(s, true).await?;
    }
    let (a, b, c) = (&g[0], &g[1], &g[2]);
    let node = unique("bridged");
    a.api()
        .create_node(&node, Some(&json!({"publish_model": "open"})))
        .await?;
    let first = publish_n(c, &node, 1, "c").await?;

    let dir = tempfile::tempdir()?;
    let mut follower = Peer::start(b, &["--subscribe", &node], &dir.path().join("follower"))?;
    drop(follower.stdin()?);
    // History by catch-up from a gateway, then live items from whichever pipe copy is first.
    let e = follower.next().await?;
    ensure!(
        e["type"] == "event" && e["offset"] == 1 && e["item"]["id"] == first[0].as_str(),
        "{e}"
    );
    let mut ws = WsClient::connect(&c.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;
    let live = publish_n(c, &node, 3, "live").await?;
    for (i, id) in live.iter().enumerate() {
        let e = follower.next().await?;
        ensure!(
            e["offset"] == 2 + i as u64 && e["item"]["id"] == id.as_str(),
            "follower: expected offset {} id {id}, got {e}",
            2 + i
        );
    }
    ws_expect(&mut ws, 2, &live).await?;

    let publisher_dir = dir.path().join("publisher");
    let publisher_id = peer_id(a, &publisher_dir)?;
    let mut publisher = Peer::start(a, &["--publish", &node], &publisher_dir)?;
    let mut stdin = publisher.stdin()?;
    stdin.write_all(b"{\"from\":\"peer\"}\n").await?;
    drop(stdin);
    let status = publisher.exit(WAIT).await?;
    ensure!(status.success(), "juxta peer --publish: {status}");
    let e = ws.next_event().await?;
    ensure!(
        e["offset"] == 5
            && e["item"]["payload"]["from"] == "peer"
            && e["item"]["publisher"] == publisher_id.as_str(),
        "WebSocket on c: {e}"
    );
    let e = follower.next().await?;
    ensure!(
        e["offset"] == 5 && e["item"]["publisher"] == publisher_id.as_str(),
        "follower: {e}"
    );
    // Once: the other gateways' copies of the peer's publication were not stored again, and
    // no copy of any event reaches the follower twice.
    follower.silent_for(Duration::from_secs(3)).await?;
    let quiet = tokio::time::timeout(Duration::from_secs(1), ws.next_event()).await;
    ensure!(quiet.is_err(), "c delivered more: {quiet:?}");
    for s in [a, b, c] {
        let items = s.api().all_items(&node).await?;
        ensure!(items.len() == 5, "{} items: {items:?}", items.len());
    }
    follower.kill().await;
    Ok(())
}

#[tokio::test]
async fn a_killed_instance_loses_nothing_its_subscribers_resume_elsewhere() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let redis = Redis::start(&[]).await?;
    let mut g = instances(&redis.url(), false, 3).await?;
    let node = unique("kill");
    g[0].api().create_node(&node, None).await?;
    let mut on_a = WsClient::connect(&g[0].ws_url(), ADMIN).await?;
    let sub = on_a.subscribed(&node, None, None).await?;
    let epoch = sub["epoch"].as_str().context("epoch")?.to_owned();
    let mut sse_on_a = sse_open(&g[0], &node).await?;
    let mut on_c = WsClient::connect(&g[2].ws_url(), ADMIN).await?;
    on_c.subscribed(&node, None, None).await?;

    // A stream of publishes on b; a dies in the middle of it.
    let stream = publish_stream(g[1].api(), node.clone(), 200, "s");
    let mut last = 0;
    while last < 30 {
        let e = on_a.next_event().await?;
        ensure!(e["offset"] == last + 1, "{e}");
        last += 1;
    }
    // The SSE subscriber of a has read a few events too; it keeps the last one's id.
    let mut last_event_id = String::new();
    for offset in 1..=20u64 {
        let (frame, e) = sse_on_a.next_json("published").await?;
        ensure!(e["offset"] == offset, "SSE on a: {e}");
        last_event_id = frame.id.context("SSE event without id")?;
    }
    ensure!(last_event_id == format!("{epoch}:20"), "{last_event_id}");
    g[0].kill9().await?;
    let (acked, refused) = tokio::time::timeout(WAIT, stream).await???;
    ensure!(refused == 0 && acked.len() == 200, "{refused} refused");
    let stored = check_history(&g[1], &node, &acked).await?;
    // The subscriber of the dead instance resumes on b from its last offset.
    let mut again = WsClient::connect(&g[1].ws_url(), ADMIN).await?;
    let sub = again.subscribed(&node, Some(last), Some(&epoch)).await?;
    ensure!(sub["recovered"] == true, "{sub}");
    ws_expect(&mut again, last + 1, &stored[last as usize..]).await?;
    // The SSE subscriber resumes on c with Last-Event-ID.
    let mut sse = SseClient::open(&g[2].api(), &node, &[], Some(&last_event_id)).await?;
    let (_, sub) = sse.next_json("subscribed").await?;
    ensure!(sub["recovered"] == true, "SSE: {sub}");
    sse_expect(&mut sse, 21, &stored[20..]).await?;
    ws_expect(&mut on_c, 1, &stored).await?;
    Ok(())
}

/// Publishes `n` items to `node` one after another (ids `<tag><i>`, no retries), counting
/// what was acknowledged and what was refused with 503 `engine_unavailable`.
fn publish_stream(
    api: juxta_tests::Api,
    node: String,
    n: usize,
    tag: &'static str,
) -> tokio::task::JoinHandle<Result<(Vec<String>, usize)>> {
    tokio::spawn(async move {
        let (mut acked, mut refused) = (Vec::new(), 0);
        for i in 0..n {
            let id = format!("{tag}{i}");
            let r = api
                .publish(&node, &json!({"id": id, "payload": {"i": i}}))
                .await?;
            match r.status {
                201 => acked.push(id),
                503 => {
                    r.expect_problem(503, "engine_unavailable")?;
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => bail!("publish {id}: {} {}", r.status, r.body),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((acked, refused))
    })
}

/// History holds every acknowledged id, in acknowledgement order, each once; returns the
/// history's ids (it may also hold items whose acknowledgement was lost with the connection).
async fn check_history(s: &Server, node: &str, acked: &[String]) -> Result<Vec<String>> {
    let items = s.api().all_items(node).await?;
    let stored: Vec<String> = items
        .iter()
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect();
    let mut seen = std::collections::HashSet::new();
    ensure!(
        stored.iter().all(|id| seen.insert(id)),
        "duplicates: {stored:?}"
    );
    let in_history: Vec<&String> = stored.iter().filter(|id| acked.contains(id)).collect();
    ensure!(
        in_history.len() == acked.len() && in_history.iter().zip(acked).all(|(a, b)| *a == b),
        "acknowledged {acked:?}, history {stored:?}"
    );
    Ok(stored)
}

/// Publishes items to `node` one after another, each with its own `Idempotency-Key`,
/// retrying an item refused with 503 `engine_unavailable` until it is stored, until at least
/// `n` are stored and `done` is set. Returns the ids in acknowledgement order and the
/// refusals' details.
fn publish_stream_retrying(
    api: juxta_tests::Api,
    node: String,
    n: usize,
    tag: &'static str,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<(Vec<String>, Vec<String>)>> {
    tokio::spawn(async move {
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let path = format!(
            "/api/v1/nodes/{}/items",
            juxta_tests::encode_path_segment(&node)
        );
        let mut i = 0;
        while i < n || !done.load(Ordering::Acquire) {
            let id = format!("{tag}{i}");
            i += 1;
            let mut attempts = 0;
            loop {
                attempts += 1;
                ensure!(
                    attempts <= 600,
                    "publish {id}: still refused after {attempts} tries"
                );
                let rb = api
                    .request(reqwest::Method::POST, &path)
                    .header("Idempotency-Key", format!("key-{id}"))
                    .json(&json!({"id": id, "payload": {"i": i - 1}}));
                let r = api.send(rb).await?;
                match r.status {
                    // 200: a retry whose first attempt was stored after all.
                    200 | 201 => {
                        ensure!(r.body["id"] == id.as_str(), "{}", r.body);
                        acked.push(id);
                        break;
                    }
                    503 => {
                        let detail = r.body["detail"].as_str().unwrap_or_default().to_owned();
                        r.expect_problem(503, "engine_unavailable")?;
                        refused.push(detail);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ => bail!("publish {id}: {} {}", r.status, r.body),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((acked, refused))
    })
}

/// A slow Redis: its process stalls (SIGSTOP) for longer than `store.timeout_secs`. Publishes
/// answer 503 `engine_unavailable` instead of hanging and `/readyz` fails; once Redis goes on,
/// the instances recover by themselves. Commands that timed out may still be carried out
/// when Redis wakes up, so a publisher retries with its Idempotency-Key, and ends with every
/// item stored once, in its order; a subscriber on another instance gets them in order, once.
#[tokio::test]
async fn a_stalled_redis_refuses_publishes_then_recovers_and_retries_store_each_item_once()
-> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let redis = Redis::start(&[]).await?;
    let mut g = Vec::new();
    for _ in 0..2 {
        let s =
            Server::start(options(&redis.url(), false, None).env("JUXTA_STORE__TIMEOUT_SECS", "1"))
                .await?;
        wait_ready(&s, true).await?;
        g.push(s);
    }
    let (a, b) = (&g[0], &g[1]);
    let node = unique("stall");
    a.api().create_node(&node, None).await?;
    let mut ws = WsClient::connect(&a.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;

    let n = 120;
    let stream = publish_stream_retrying(
        b.api(),
        node.clone(),
        n,
        "s",
        Arc::new(AtomicBool::new(true)),
    );
    for offset in 1..=20u64 {
        let e = ws.next_event().await?;
        ensure!(e["offset"] == offset, "{e}");
    }
    redis.signal("STOP").await?;
    let stalled = async {
        // Both notice within a few pings (however slow this machine is today).
        wait_ready(b, false).await?;
        wait_ready(a, false).await?;
        b.api()
            .publish(&node, &json!({"id": "during", "payload": 0}))
            .await?
            .expect_problem(503, "engine_unavailable")?;
        anyhow::Ok(())
    }
    .await;
    redis.signal("CONT").await?;
    stalled?;

    let (acked, refused) = tokio::time::timeout(WAIT, stream).await???;
    ensure!(!refused.is_empty(), "the stream never met the stall");
    // The publish Redis did not answer says its outcome is unknown.
    ensure!(
        refused.iter().any(|d| d.contains("Idempotency-Key")),
        "{refused:?}"
    );
    ensure!(acked.len() == n, "{} of {n} acknowledged", acked.len());
    for s in [a, b] {
        wait_ready(s, true).await?;
    }
    // The refused "during" may have been carried out late too; every other item is there once.
    let stored: Vec<String> = check_history(b, &node, &acked)
        .await?
        .into_iter()
        .filter(|id| id != "during")
        .collect();
    ensure!(
        stored == acked,
        "acknowledged {acked:?}, history {stored:?}"
    );
    let history = b.api().all_items(&node).await?;
    let mut expected = Vec::new();
    for item in &history[20..] {
        expected.push((
            item["offset"].as_u64().context("offset")?,
            item["id"].as_str().context("id")?.to_owned(),
        ));
    }
    for (offset, id) in expected {
        let e = ws.next_event().await?;
        ensure!(
            e["offset"] == offset && e["item"]["id"] == id.as_str(),
            "expected offset {offset} id {id}, got {e}"
        );
    }
    let quiet = tokio::time::timeout(Duration::from_secs(1), ws.next_event()).await;
    ensure!(quiet.is_err(), "a delivered more: {quiet:?}");
    Ok(())
}

#[tokio::test]
async fn a_redis_restart_during_a_publish_stream_loses_no_acknowledged_item() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let mut redis = Redis::start(&["--appendonly", "yes", "--appendfsync", "always"]).await?;
    let g = instances(&redis.url(), false, 2).await?;
    let (a, b) = (&g[0], &g[1]);
    let node = unique("aof");
    a.api().create_node(&node, None).await?;
    let mut ws = WsClient::connect(&a.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;
    let mut sse = sse_open(b, &node).await?;

    let stream = publish_stream(a.api(), node.clone(), 300, "s");
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.kill9().await?;
    wait_ready(a, false).await?;
    wait_ready(b, false).await?;
    // While Redis is down a publish is refused, never acknowledged.
    b.api()
        .publish(&node, &json!({"id": "down", "payload": 0}))
        .await?
        .expect_problem(503, "engine_unavailable")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.spawn().await?;
    wait_ready(a, true).await?;
    wait_ready(b, true).await?;
    let (acked, refused) = tokio::time::timeout(WAIT, stream).await???;
    ensure!(refused > 0, "the publisher never saw the outage");
    ensure!(acked.len() > 100, "only {} acknowledged", acked.len());

    // Every acknowledged item is in history, once, in order; subscribers on both instances
    // got the whole history exactly once, without a gap.
    let stored = check_history(a, &node, &acked).await?;
    ws_expect(&mut ws, 1, &stored).await?;
    sse_expect(&mut sse, 1, &stored).await?;
    Ok(())
}

#[tokio::test]
async fn a_three_master_redis_cluster_serves_several_instances() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let cluster = Cluster::start(0).await?;
    let g = instances(&cluster.urls(), true, 3).await?;
    // Several nodes, so that they live on different masters.
    for k in 0..4 {
        let node = format!("{}-{k}", unique("cl"));
        g[0].api().create_node(&node, None).await?;
        let mut ws = WsClient::connect(&g[0].ws_url(), ADMIN).await?;
        ws.subscribed(&node, None, None).await?;
        let mut sse = sse_open(&g[1], &node).await?;
        let ids = publish_n(&g[2], &node, 20, "c").await?;
        ws_expect(&mut ws, 1, &ids).await?;
        sse_expect(&mut sse, 1, &ids).await?;
    }
    Ok(())
}

/// Redis comes back with less than it acknowledged (restarted from an older snapshot here; an
/// unplanned failover to a replica that lagged does the same): the offsets it lost will be
/// assigned again, to other items. Nothing may be skipped silently: the instance that sees
/// its subscribers ahead of the Stream gives the node a new epoch; live subscribers get an
/// `epoch_changed` error instead of silently dropping "old" offsets, and a subscriber that
/// resumes with its last position is told it was not recovered and gets the new history,
/// including the items published after the loss.
#[tokio::test]
async fn redis_losing_acknowledged_events_changes_the_epoch_instead_of_reusing_offsets()
-> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let mut redis = Redis::start(&["--appendonly", "no"]).await?;
    let g = instances(&redis.url(), false, 2).await?;
    let (a, b) = (&g[0], &g[1]);
    let node = unique("rollback");
    a.api().create_node(&node, None).await?;
    let mut ws = WsClient::connect(&a.ws_url(), ADMIN).await?;
    let sub = ws.subscribed(&node, None, None).await?;
    let epoch = sub["epoch"].as_str().context("epoch")?.to_owned();
    let kept = publish_n(b, &node, 10, "kept").await?;
    ensure!(redis.cli(&["save"]).await? == "OK", "SAVE");
    let lost = publish_n(b, &node, 10, "lost").await?;
    ws_expect(&mut ws, 1, &kept).await?;
    ws_expect(&mut ws, 11, &lost).await?;

    // Redis dies and starts again from the snapshot: offsets 11..=20 are gone.
    redis.kill9().await?;
    redis.spawn().await?;
    for s in [a, b] {
        wait_ready(s, true).await?;
    }
    let after = publish_n(b, &node, 5, "after").await?;
    let e = ws.recv().await?;
    ensure!(
        e["type"] == "error" && e["code"] == "epoch_changed" && e["node"] == node.as_str(),
        "the live subscriber is told: {e}"
    );
    let meta = b.api().get_node(&node).await?.expect(200)?;
    let new_epoch = meta["epoch"].as_str().context("epoch")?.to_owned();
    ensure!(new_epoch != epoch, "the epoch is still {epoch}");
    // Resuming where it was: not recovered, and the new history from its start.
    let mut again = WsClient::connect(&b.ws_url(), ADMIN).await?;
    let sub = again.subscribed(&node, Some(20), Some(&epoch)).await?;
    ensure!(
        sub["recovered"] == false && sub["epoch"] == new_epoch.as_str(),
        "{sub}"
    );
    let history: Vec<String> = kept.iter().chain(&after).cloned().collect();
    ws_expect(&mut again, 1, &history).await?;
    Ok(())
}

/// `store.min_replicas = 1`: a publish is acknowledged, and fanned out, only once a replica
/// has it (`WAIT`), so a failover to that replica cannot lose an acknowledged item. With the
/// replica stalled, a publish answers 503 within `store.timeout_secs` and reaches nobody; once
/// the replica is back and confirms it, it is delivered, once, and a retry with the same
/// Idempotency-Key answers with it instead of storing it again.
#[tokio::test]
async fn with_min_replicas_a_publish_is_acknowledged_only_once_a_replica_has_it() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let primary = Redis::start(&[]).await?;
    let replica = Redis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !replica
        .cli(&["info", "replication"])
        .await?
        .contains("master_link_status:up")
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the replica never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = Server::start(
        options(&primary.url(), false, None)
            .env("JUXTA_STORE__MIN_REPLICAS", "1")
            .env("JUXTA_STORE__TIMEOUT_SECS", "2"),
    )
    .await?;
    wait_ready(&s, true).await?;
    let node = unique("replicated");
    s.api().create_node(&node, None).await?;
    let mut ws = WsClient::connect(&s.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;
    let ids = publish_n(&s, &node, 5, "r").await?;
    ws_expect(&mut ws, 1, &ids).await?;
    let log = log_key(&primary, &node).await?;
    ensure!(
        replica.cli(&["xlen", &log]).await? == "5",
        "the replica does not hold the acknowledged items"
    );

    let path = format!(
        "/api/v1/nodes/{}/items",
        juxta_tests::encode_path_segment(&node)
    );
    let api = s.api();
    let publish = || {
        api.send(
            api.request(reqwest::Method::POST, &path)
                .header("Idempotency-Key", "while-stalled")
                .json(&json!({"id": "w", "payload": 1})),
        )
    };
    replica.signal("STOP").await?;
    let stalled = async {
        let refused = publish().await?;
        refused.expect_problem(503, "engine_unavailable")?;
        ensure!(
            refused.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("replicas") && d.contains("Idempotency-Key")),
            "{}",
            refused.body
        );
        let quiet = tokio::time::timeout(Duration::from_millis(500), ws.next_event()).await;
        ensure!(
            quiet.is_err(),
            "an unreplicated item was fanned out: {quiet:?}"
        );
        Ok(())
    }
    .await;
    replica.signal("CONT").await?;
    stalled?;
    // Confirmed by the replica now: delivered once.
    let e = ws.next_event().await?;
    ensure!(e["offset"] == 6 && e["item"]["id"] == "w", "{e}");
    let retried = publish().await?;
    ensure!(
        retried.status == 200 && retried.body["offset"] == 6,
        "{} {}",
        retried.status,
        retried.body
    );
    let quiet = tokio::time::timeout(Duration::from_secs(1), ws.next_event()).await;
    ensure!(quiet.is_err(), "delivered twice: {quiet:?}");
    ensure!(s.api().all_items(&node).await?.len() == 6, "stored twice");
    Ok(())
}

/// Redis over TLS (`rediss://`), as managed Redis services require: two instances verify
/// Redis's certificate against the CA in `store.tls_ca_file` and behave as one gateway (their
/// own pub/sub connections speak TLS too). Without that CA (the system's roots) or without
/// TLS, an instance is not ready and says why.
#[tokio::test]
async fn redis_over_tls_verifies_the_certificate_and_serves_several_instances() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    let (redis, ca) = Redis::start_tls().await?;
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let mut g = Vec::new();
    for _ in 0..2 {
        let s =
            Server::start(options(&url, false, None).env("JUXTA_STORE__TLS_CA_FILE", &ca)).await?;
        wait_ready(&s, true).await?;
        g.push(s);
    }
    let (a, b) = (&g[0], &g[1]);
    let node = unique("tls");
    a.api().create_node(&node, None).await?;
    let mut ws = WsClient::connect(&a.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;
    let mut sse = sse_open(b, &node).await?;
    let ids = publish_n(b, &node, 5, "b").await?;
    ws_expect(&mut ws, 1, &ids).await?;
    sse_expect(&mut sse, 1, &ids).await?;

    // The system's roots do not know this CA: not ready, and readyz says it is the certificate.
    let s = Server::start(options(&url, false, None)).await?;
    let why = not_ready_because(&s).await?;
    ensure!(why.contains("certificate"), "readyz: {why}");
    s.api()
        .publish(&node, &json!({"payload": 1}))
        .await?
        .expect_problem(503, "engine_unavailable")?;
    drop(s);
    // Plain redis:// to the TLS port: not ready either.
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    let s = Server::start(options(&plain, false, None)).await?;
    not_ready_because(&s).await?;
    Ok(())
}

/// Engine failover: in a Redis Cluster with a replica per master (and `store.min_replicas =
/// 1`), the replica of the node's shard takes over (`CLUSTER FAILOVER`) in the middle of a
/// publish stream. The instances
/// follow the shard to its new master (commands by redirection, the sharded subscription
/// because the old master ends it); the publisher, retrying with its Idempotency-Key, gets
/// every item stored once, and subscribers on two instances receive all of them in order,
/// once, with nothing silently skipped.
#[tokio::test]
async fn a_cluster_failover_during_a_publish_stream_loses_nothing_and_skips_nothing() -> Result<()>
{
    if !have_redis() {
        return Ok(());
    }
    let cluster = Cluster::start(1).await?;
    // Acknowledged only once the shard's replica has it (WAIT routed to the shard's primary).
    let mut g = Vec::new();
    for _ in 0..2 {
        let s = Server::start(
            options(&cluster.urls(), true, None).env("JUXTA_STORE__MIN_REPLICAS", "1"),
        )
        .await?;
        wait_ready(&s, true).await?;
        g.push(s);
    }
    let (a, b) = (&g[0], &g[1]);
    let node = unique("failover");
    // History holds the whole stream, however long the failover takes.
    a.api()
        .create_node(&node, Some(&json!({"max_items": 1_000_000})))
        .await?;
    let slot: u16 = cluster.nodes[0]
        .cli(&["cluster", "keyslot", &format!("juxta:{{{node}}}:meta")])
        .await?
        .parse()?;
    let (master, replica) = cluster.master_and_replica(slot).await?;
    let mut ws = WsClient::connect(&a.ws_url(), ADMIN).await?;
    ws.subscribed(&node, None, None).await?;
    let mut sse = sse_open(b, &node).await?;

    // The stream goes on until the failover is over and 30 more items went through.
    let done = Arc::new(AtomicBool::new(false));
    let stream = publish_stream_retrying(b.api(), node.clone(), 0, "f", done.clone());
    for offset in 1..=20u64 {
        let e = ws.next_event().await?;
        ensure!(e["offset"] == offset, "{e}");
    }
    // The replica is in sync before it is asked to take over.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !redis_cli(replica, &["info", "replication"])
        .await?
        .contains("master_link_status:up")
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{replica} never synced with {master}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A manual failover that cannot finish in time (a busy machine) is abandoned by Redis:
    // ask again then.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut asked = tokio::time::Instant::now() - Duration::from_secs(60);
    while !(redis_cli(replica, &["role"]).await?.starts_with("master")
        && redis_cli(master, &["role"]).await?.starts_with("slave"))
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{replica} never took over from {master}: {}",
            redis_cli(replica, &["cluster", "nodes"]).await?
        );
        if asked.elapsed() >= Duration::from_secs(10) {
            let out = redis_cli(replica, &["cluster", "failover"]).await?;
            ensure!(out == "OK", "CLUSTER FAILOVER on {replica}: {out}");
            asked = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut received = Vec::new();
    let after = b.api().get_node(&node).await?.body["last_offset"]
        .as_u64()
        .context("last_offset")?;
    while received.len() < (after + 30 - 20) as usize {
        received.push(ws.next_event().await?);
    }
    done.store(true, Ordering::Release);

    let (acked, _refused) = tokio::time::timeout(WAIT, stream).await???;
    let stored = check_history(b, &node, &acked).await?;
    ensure!(
        stored == acked,
        "acknowledged {acked:?}, history {stored:?}"
    );
    for (i, e) in received.iter().enumerate() {
        ensure!(
            e["offset"] == 21 + i as u64 && e["item"]["id"] == stored[20 + i].as_str(),
            "expected offset {} id {}, got {e}",
            21 + i,
            stored[20 + i]
        );
    }
    ws_expect(
        &mut ws,
        21 + received.len() as u64,
        &stored[20 + received.len()..],
    )
    .await?;
    sse_expect(&mut sse, 1, &stored).await?;
    let quiet = tokio::time::timeout(Duration::from_secs(1), ws.next_event()).await;
    ensure!(quiet.is_err(), "a delivered more: {quiet:?}");
    Ok(())
}

#[tokio::test]
async fn engine_faults_are_clear_errors_and_the_process_stays_up() -> Result<()> {
    if !have_redis() {
        return Ok(());
    }
    // Unreachable at start: serving, alive, not ready, publishes refused.
    let port = free_port()?;
    let s = Server::start(options(&format!("redis://127.0.0.1:{port}"), false, None)).await?;
    ensure!(s.api().healthy().await?, "healthz");
    ensure!(!ready(&s).await?, "ready without Redis");
    s.api()
        .publish("n", &json!({"payload": 1}))
        .await?
        .expect_problem(503, "engine_unavailable")?;
    let body = s.api().get("/readyz").await?.body;
    ensure!(
        body["checks"]["store"]
            .as_str()
            .is_some_and(|t| t.contains("Redis")),
        "{body}"
    );
    drop(s);

    // Wrong password: not ready, and /readyz says why.
    let redis = Redis::start(&["--requirepass", "right-password"]).await?;
    let url = format!("redis://:wrong-password@127.0.0.1:{}", redis.port);
    let s = Server::start(options(&url, false, None)).await?;
    let why = not_ready_because(&s).await?;
    ensure!(
        why.contains("refuses our credentials") && why.contains("auth"),
        "readyz does not say the password is wrong: {why}"
    );
    drop(s);

    // A key of the wrong type under a node: that node fails with a clear 500, the rest works.
    let redis = Redis::start(&[]).await?;
    let g = instances(&redis.url(), false, 1).await?;
    let s = &g[0];
    let (bad, good) = (unique("bad"), unique("good"));
    s.api().create_node(&bad, None).await?;
    s.api().create_node(&good, None).await?;
    publish_n(s, &bad, 3, "b").await?;
    let log = log_key(&redis, &bad).await?;
    redis.cli(&["del", &log]).await?;
    redis.cli(&["set", &log, "garbage"]).await?;
    s.api()
        .publish(&bad, &json!({"payload": 1}))
        .await?
        .expect_problem(500, "storage_error")?;
    let ids = publish_n(s, &good, 3, "g").await?;
    let stored: Vec<Value> = s.api().all_items(&good).await?;
    ensure!(stored.len() == ids.len(), "{stored:?}");
    ensure!(s.api().healthy().await?, "healthz after the bad key");
    ensure!(ready(s).await?, "readyz after the bad key");

    // A full Redis (maxmemory, noeviction): publishes are refused with 503, stored items stay.
    redis
        .cli(&["config", "set", "maxmemory-policy", "noeviction"])
        .await?;
    let used: u64 = redis
        .cli(&["info", "memory"])
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("used_memory")?;
    redis
        .cli(&[
            "config",
            "set",
            "maxmemory",
            &(used + 64 * 1024).to_string(),
        ])
        .await?;
    let big = "x".repeat(16 * 1024);
    let mut full = None;
    for i in 0..64 {
        let r = s
            .api()
            .publish(&good, &json!({"id": format!("big{i}"), "payload": big}))
            .await?;
        if r.status != 201 {
            full = Some(r);
            break;
        }
    }
    full.context("Redis never filled up")?
        .expect_problem(503, "engine_unavailable")?;
    ensure!(s.api().healthy().await?, "healthz with a full Redis");
    ensure!(
        s.api().all_items(&good).await?.len() >= ids.len(),
        "stored items are still readable"
    );
    Ok(())
}
