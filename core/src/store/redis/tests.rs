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

    /// A plain connection, for looking at what the store did.
    async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
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

/// A gap makes the engine read the node's Stream; events committed after that read ran can
/// reach the instance (and be delivered) before the read's answer does. The answer then shows
/// less than the instance has delivered, which is no sign that Redis lost anything: the node
/// keeps its epoch. (Seen under load with three instances: a false "Redis lost acknowledged
/// events" gave the node a new epoch and ended every subscription with `epoch_changed`.)
#[tokio::test]
async fn events_delivered_while_a_gap_read_is_on_its_way_do_not_change_the_epoch() {
    let Some(server) = Server::start().await else {
        return;
    };
    let (bus, s) = instance(&server.url()).await;
    let n = NodeName::new("racing").expect("name");
    bus.put_node(&Principal::Admin, n.clone(), NodeConfig::default())
        .await
        .expect("create");
    let mut sub = bus
        .subscribe(&Principal::Admin, &n, Resume::default())
        .await
        .expect("subscribe");
    for i in 1..=3 {
        bus.publish(&Principal::Admin, item(&n, i), Origin::Http)
            .await
            .expect("publish");
    }
    for want in 1..=3 {
        assert_eq!(next_offset(&mut sub).await, want);
    }
    let epoch = s.node(&n).await.expect("read").expect("node").epoch;
    // Events 4 and 5 as if committed by another instance just after the read below ran.
    let event = |offset| {
        let record = Record {
            offset,
            change: Change::Retracted(ItemId::new("gone").expect("id")),
            at: 0,
        };
        Arc::new(Event::new(n.clone(), epoch, record, Origin::Http))
    };
    // Hold every command in Redis for a while: the engine's read of the gap waits there.
    let mut c = server.client().await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(500)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .expect("CLIENT PAUSE");
    s.engine.deliver(&n, epoch, vec![event(5)]);
    // Past the engine's grace for gaps: its read of offsets after 3 is in Redis now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.engine.deliver(&n, epoch, vec![event(4)]);
    assert_eq!(next_offset(&mut sub).await, 4);
    assert_eq!(next_offset(&mut sub).await, 5);
    // The read is answered (the Stream ends at 3) once the pause is over.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = s.node(&n).await.expect("read").expect("node").epoch;
    assert_eq!(after, epoch, "the node keeps its epoch");
    // The commits behind events 4 and 5, then one more: the subscription goes on.
    for i in 4..=6 {
        bus.publish(&Principal::Admin, item(&n, i), Origin::Http)
            .await
            .expect("publish after the race");
    }
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(Ok(Delivery::Event(e)))) => assert_eq!((e.epoch, e.offset), (epoch, 6)),
        other => panic!("the subscription goes on in its epoch, got {other:?}"),
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

fn settings(max_items: u64) -> NodeConfig {
    NodeConfig {
        max_items,
        ..NodeConfig::default()
    }
}

/// Calls per command since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
async fn command_calls(c: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("info");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .collect()
}

#[tokio::test]
async fn a_publish_is_three_commands_and_the_item_index_catches_up_when_read() {
    let Some(server) = Server::start().await else {
        return;
    };
    let s = store(&server.url(), conformance::Collect::new()).await;
    let n = NodeName::new("lazy").expect("name");
    s.put_node(n.clone(), settings(5000)).await.expect("create");
    s.append(vec![conformance::publish(&n, "first", "0")])
        .await
        .remove(0)
        .expect("first publish");

    // A lone publish once the writer knows the node: the script call, XADD and SPUBLISH.
    let mut c = server.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut c)
        .await
        .expect("resetstat");
    let r = s
        .append(vec![conformance::publish(&n, "second", "1")])
        .await
        .remove(0)
        .expect("publish");
    assert_eq!(r.offset, 2);
    let calls = command_calls(&mut c).await;
    let want: HashMap<String, u64> = [("evalsha", 1), ("xadd", 1), ("spublish", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(calls, want, "commands of one publish");

    // Far more publishes than one call indexes, then reads and a retract that need the index.
    for batch in 0..6 {
        let appends = (0..250)
            .map(|i| conformance::publish(&n, &format!("i{}", batch * 250 + i), "x"))
            .collect();
        for r in s.append(appends).await {
            r.expect("publish");
        }
    }
    // The retract of an early item waits for the index (several calls), then finds it.
    let mut retract = conformance::publish(&n, "i3", "");
    retract.op = Op::Retract(ItemId::new("i3").expect("id"));
    let r = s
        .append(vec![retract.clone()])
        .await
        .remove(0)
        .expect("retract");
    assert_eq!(r.offset, 1503);
    assert!(matches!(
        s.append(vec![retract]).await.remove(0),
        Err(Error::ItemNotFound(_))
    ));
    let meta = s.node(&n).await.expect("read").expect("exists");
    assert_eq!((meta.last_offset, meta.item_count), (1503, 1501));
    // Overwrites and retracts made after the index caught up are followed on read too.
    s.append(vec![
        conformance::publish(&n, "i10", "again"),
        conformance::publish(&n, "new", "y"),
    ])
    .await
    .into_iter()
    .for_each(|r| {
        r.expect("publish");
    });
    let (o, item) = s
        .item(&n, &ItemId::new("i10").expect("id"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!((o, &item.payload.bytes[..]), (1504, &b"\"again\""[..]));
    assert!(
        s.item(&n, &ItemId::new("i3").expect("id"))
            .await
            .expect("read")
            .is_none()
    );
    let page = s.items(&n, 1500, 10).await.expect("items");
    let ids: Vec<(u64, &str)> = page
        .items
        .iter()
        .map(|(o, i)| (*o, i.id.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            (1501, "i1498"),
            (1502, "i1499"),
            (1504, "i10"),
            (1505, "new")
        ]
    );
    assert_eq!(page.meta.item_count, 1502);
}

#[tokio::test]
async fn a_writer_that_knew_older_settings_writes_as_the_node_is_now() {
    let Some(server) = Server::start().await else {
        return;
    };
    let a = store(&server.url(), conformance::Collect::new()).await;
    let b = store(&server.url(), conformance::Collect::new()).await;
    let n = NodeName::new("moving").expect("name");
    let publish = |s: &Arc<RedisStore>, id: &str| {
        let (s, n, id) = (s.clone(), n.clone(), id.to_owned());
        async move {
            s.append(vec![conformance::publish(&n, &id, "v")])
                .await
                .remove(0)
        }
    };
    a.put_node(n.clone(), settings(10)).await.expect("create");
    for i in 0..3 {
        publish(&a, &format!("a{i}")).await.expect("publish");
    }
    // b shortens the history: a's next publish is trimmed to the new length.
    b.put_node(n.clone(), settings(2))
        .await
        .expect("reconfigure");
    assert_eq!(publish(&a, "a3").await.expect("publish").offset, 4);
    let page = a.read(&n, 0, 100).await.expect("read");
    let offsets: Vec<u64> = page.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![3, 4]);
    // b deletes the node: a's publish finds no node and changes nothing.
    b.delete_node(&n, Origin::Http).await.expect("delete");
    assert!(matches!(
        publish(&a, "gone").await,
        Err(Error::NodeNotFound(_))
    ));
    // b creates it again: a's publish starts the new history, in the new epoch.
    let (meta, created) = b.put_node(n.clone(), settings(10)).await.expect("create");
    assert!(created);
    publish(&a, "warm").await.expect("publish");
    b.delete_node(&n, Origin::Http).await.expect("delete");
    let (meta2, _) = b.put_node(n.clone(), settings(10)).await.expect("create");
    assert_ne!(meta.epoch, meta2.epoch);
    let r = publish(&a, "fresh").await.expect("publish");
    assert_eq!((r.offset, r.epoch), (1, meta2.epoch));
    let page = b.read(&n, 0, 100).await.expect("read");
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.meta.item_count, 1);
}

#[tokio::test]
async fn a_node_stored_in_the_earlier_layout_is_read_and_written() {
    let Some(server) = Server::start().await else {
        return;
    };
    let s = store(&server.url(), conformance::Collect::new()).await;
    let mut c = server.client().await;
    // As builds before the log generations wrote it: the log under the bare name, every
    // item in the index, no generation and no index position in meta.
    let k = Keys::of(&RedisConfig::new(server.url()).prefix, "old");
    let rec = encode_record(&Record {
        offset: 0,
        change: Change::Published(Item {
            id: ItemId::new("before").expect("id"),
            payload: Payload::json("1").expect("json"),
            publisher: "t".into(),
            published_at: 1,
        }),
        at: 1,
    });
    redis::pipe()
        .cmd("HSET")
        .arg(&k.meta)
        .arg("config")
        .arg(serde_json::to_vec(&settings(10)).expect("json"))
        .arg("epoch")
        .arg(Epoch::random().to_string())
        .arg("created")
        .arg(1)
        .arg("persist")
        .arg(1)
        .arg("max_items")
        .arg(10)
        .arg("last")
        .arg(0)
        .cmd("XADD")
        .arg(&k.log)
        .arg("0-1")
        .arg("r")
        .arg(rec)
        .cmd("ZADD")
        .arg(&k.items)
        .arg(1)
        .arg("before")
        .exec_async(&mut c)
        .await
        .expect("old layout");
    let n = NodeName::new("old").expect("name");
    for (id, want) in [("after", 2), ("later", 3)] {
        let r = s
            .append(vec![conformance::publish(&n, id, "2")])
            .await
            .remove(0)
            .expect("publish");
        assert_eq!(r.offset, want);
    }
    let page = s.items(&n, 0, 10).await.expect("items");
    let ids: Vec<(u64, &str)> = page
        .items
        .iter()
        .map(|(o, i)| (*o, i.id.as_str()))
        .collect();
    assert_eq!(ids, vec![(1, "before"), (2, "after"), (3, "later")]);
    assert_eq!(page.meta.item_count, 3);
}
