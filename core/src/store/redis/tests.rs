//! The Redis store against a real `redis-server` started on a free port per test.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::fanout::{Delivery, FanOut, Resume};
use crate::model::Payload;
use crate::store::conformance;
use crate::{Bus, Limits, Principal, Publish};

struct Server {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `None` (with a note) when there is no `redis-server` and this is not CI.
    async fn start() -> Option<Self> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is required in CI"
            );
            eprintln!("SKIPPED: redis-server is not installed (tests/run.sh installs it)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--bind",
                "127.0.0.1",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(Self {
                    child,
                    port,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

async fn store(url: &str, sink: Arc<dyn CommitSink>) -> Arc<RedisStore> {
    let s = RedisStore::start(
        RedisConfig::new(url),
        sink,
        Arc::new(Metrics::default()),
        Arc::new(EngineMetrics::default()),
    )
    .expect("starts");
    s.wait_ready(Duration::from_secs(10)).await.expect("ready");
    Arc::new(s)
}

#[tokio::test]
async fn redis_store_passes_the_store_conformance_suite() {
    let Some(server) = Server::start().await else {
        return;
    };
    let url = server.url();
    conformance::run(|sink| {
        let url = url.clone();
        async move { Ok(store(&url, sink).await as Arc<dyn Store>) }
    })
    .await;
}

/// One gateway instance: a store on the shared Redis, its fan-out and bus.
async fn instance(url: &str) -> (Bus, Arc<RedisStore>) {
    let metrics = Arc::new(Metrics::default());
    let fanout = Arc::new(FanOut::new(64, metrics.clone()));
    let s = store(url, fanout.clone()).await;
    fanout.set_interest(s.engine());
    let bus = Bus::new(s.clone(), fanout, Limits::default());
    (bus, s)
}

fn item(node: &NodeName, i: usize) -> Publish {
    Publish {
        node: node.clone(),
        id: Some(ItemId::new(&format!("i{i}")).expect("id")),
        payload: Payload::json(format!("{i}")).expect("json"),
        idempotency_key: None,
    }
}

async fn next_offset(sub: &mut crate::Subscription) -> Offset {
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(Ok(Delivery::Event(e)))) => e.offset,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn instances_on_one_redis_see_each_others_events_in_order_once() {
    let Some(server) = Server::start().await else {
        return;
    };
    let (a, _sa) = instance(&server.url()).await;
    let (b, _sb) = instance(&server.url()).await;
    let n = NodeName::new("shared").expect("name");
    a.put_node(&Principal::Admin, n.clone(), NodeConfig::default())
        .await
        .expect("create");
    let mut on_b = b
        .subscribe(&Principal::Admin, &n, Resume::default())
        .await
        .expect("subscribe on b");
    let mut on_a = a
        .subscribe(&Principal::Admin, &n, Resume::default())
        .await
        .expect("subscribe on a");
    // Both instances publish, interleaved and concurrently.
    let pubs = (0..200).map(|i| {
        let bus = if i % 2 == 0 { a.clone() } else { b.clone() };
        let n = n.clone();
        async move {
            bus.publish(&Principal::Admin, item(&n, i), Origin::Http)
                .await
                .expect("publish")
        }
    });
    futures_util::future::join_all(pubs).await;
    for sub in [&mut on_a, &mut on_b] {
        for want in 1..=200 {
            assert_eq!(next_offset(sub).await, want);
        }
        assert!(sub.try_next().is_none(), "no duplicates");
    }
}

#[tokio::test]
async fn a_restarted_redis_is_caught_up_from_the_stream_and_writes_wait_for_it() {
    let Some(mut server) = Server::start().await else {
        return;
    };
    let (a, sa) = instance(&server.url()).await;
    let (b, sb) = instance(&server.url()).await;
    let n = NodeName::new("restart").expect("name");
    a.put_node(&Principal::Admin, n.clone(), NodeConfig::default())
        .await
        .expect("create");
    let mut on_b = b
        .subscribe(&Principal::Admin, &n, Resume::default())
        .await
        .expect("subscribe");
    a.publish(&Principal::Admin, item(&n, 1), Origin::Http)
        .await
        .expect("publish");
    assert_eq!(next_offset(&mut on_b).await, 1);

    // Redis goes away: both instances notice and refuse writes.
    server.child.kill().await.expect("kill");
    let _ = server.child.wait().await;
    for s in [&sa, &sb] {
        let mut down = false;
        for _ in 0..100 {
            if s.ready().is_err() {
                down = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(down, "the store reports not ready while Redis is down");
    }
    let r = a
        .publish(&Principal::Admin, item(&n, 2), Origin::Http)
        .await;
    assert!(matches!(r, Err(Error::EngineUnavailable(_))), "{r:?}");

    // Redis comes back (empty: this one keeps nothing), the node is recreated by a,
    // and b, which missed the notifications, follows the new history.
    let port = server.port;
    let _child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--bind",
            "127.0.0.1",
        ])
        .arg("--dir")
        .arg(server._dir.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server restarts");
    sa.wait_ready(Duration::from_secs(15))
        .await
        .expect("a ready again");
    sb.wait_ready(Duration::from_secs(15))
        .await
        .expect("b ready again");
    a.put_node(&Principal::Admin, n.clone(), NodeConfig::default())
        .await
        .expect("recreate");
    // The old history's subscription ends with a deletion (its epoch is gone) ...
    let end = tokio::time::timeout(Duration::from_secs(10), on_b.next())
        .await
        .expect("in time");
    assert!(
        matches!(&end, Some(Ok(Delivery::Event(e))) if matches!(e.change, Change::Deleted))
            || matches!(&end, Some(Ok(Delivery::Lost { .. }))),
        "{end:?}"
    );
    // ... and a new one follows the new history.
    let mut again = b
        .subscribe(&Principal::Admin, &n, Resume::default())
        .await
        .expect("subscribe again");
    for i in 0..5 {
        a.publish(&Principal::Admin, item(&n, i), Origin::Http)
            .await
            .expect("publish after restart");
    }
    for want in 1..=5 {
        assert_eq!(next_offset(&mut again).await, want);
    }
}
