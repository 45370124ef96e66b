//! The behaviour every store backend must show, run against each of them.

use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Append, CommitSink, Op, Store};
use crate::error::Error;
use crate::membership::{Affiliation, NodeSubscription, SubscriptionState};
use crate::model::{Change, Event, ItemId, NodeConfig, NodeName, Origin, Payload};

/// A sink that remembers what it was given.
#[derive(Debug, Default)]
pub(crate) struct Collect(pub(crate) Mutex<Vec<Arc<Event>>>);

impl Collect {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    fn offsets(&self, node: &NodeName) -> Vec<u64> {
        self.0
            .lock()
            .iter()
            .filter(|e| &e.node == node)
            .map(|e| e.offset)
            .collect()
    }
    fn last(&self) -> Arc<Event> {
        self.0.lock().last().cloned().expect("an event")
    }
}

impl CommitSink for Collect {
    fn committed(&self, event: Arc<Event>) {
        self.0.lock().push(event);
    }
}

pub(crate) fn publish(node: &NodeName, id: &str, v: &str) -> Append {
    Append {
        node: node.clone(),
        op: Op::Publish {
            id: ItemId::new(id).expect("id"),
            payload: Payload::json(format!("\"{v}\"")).expect("json"),
            publisher: "t".into(),
        },
        idempotency_key: None,
        origin: Origin::Http,
    }
}

fn config(max_items: u64, persist: bool) -> NodeConfig {
    NodeConfig {
        max_items,
        persist,
        ..NodeConfig::default()
    }
}

pub(crate) async fn run<F, Fut>(make: F)
where
    F: Fn(Arc<dyn CommitSink>) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Store>, Error>>,
{
    let sink = Collect::new();
    let s = make(sink.clone()).await.expect("store opens");
    let n = NodeName::new("n").expect("name");

    // Creating, then reconfiguring.
    let (meta, created) = s
        .put_node(n.clone(), config(100, true))
        .await
        .expect("create");
    assert!(created);
    assert_eq!((meta.last_offset, meta.first_offset), (0, 1));
    let (again, created) = s
        .put_node(n.clone(), config(100, true))
        .await
        .expect("reconfigure");
    assert!(!created);
    assert_eq!(again.epoch, meta.epoch, "reconfiguring keeps the epoch");

    // Offsets count up from 1 and events come out in order.
    let r = s
        .append(vec![
            publish(&n, "a", "1"),
            publish(&n, "b", "2"),
            publish(&n, "a", "3"),
        ])
        .await;
    let offsets: Vec<u64> = r.iter().map(|r| r.as_ref().expect("ok").offset).collect();
    assert_eq!(offsets, vec![1, 2, 3]);
    assert_eq!(sink.offsets(&n), vec![1, 2, 3]);

    // Overwriting keeps one current version per id.
    let items = s.items(&n, 0, 10).await.expect("items");
    let ids: Vec<(u64, &str)> = items
        .items
        .iter()
        .map(|(o, i)| (*o, i.id.as_str()))
        .collect();
    assert_eq!(ids, vec![(2, "b"), (3, "a")]);
    assert_eq!(items.meta.item_count, 2);
    let (o, item) = s
        .item(&n, &ItemId::new("a").expect("id"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!((o, &item.payload.bytes[..]), (3, &b"\"3\""[..]));
    let page = s.read(&n, 1, 10).await.expect("read");
    assert_eq!(
        page.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![2, 3]
    );

    // Retraction.
    let mut retract = publish(&n, "b", "");
    retract.op = Op::Retract(ItemId::new("b").expect("id"));
    let r = s
        .append(vec![retract.clone()])
        .await
        .remove(0)
        .expect("retract");
    assert_eq!(r.offset, 4);
    assert!(matches!(sink.last().change, Change::Retracted(_)));
    assert!(matches!(
        s.append(vec![retract]).await.remove(0),
        Err(Error::ItemNotFound(_))
    ));
    assert_eq!(s.items(&n, 0, 10).await.expect("items").items.len(), 1);

    // Refusals change nothing.
    let missing = NodeName::new("missing").expect("name");
    assert!(matches!(
        s.append(vec![publish(&missing, "x", "1")]).await.remove(0),
        Err(Error::NodeNotFound(_))
    ));
    assert_eq!(
        s.node(&n).await.expect("read").expect("exists").last_offset,
        4
    );

    // Idempotency: the same key returns the first result and emits nothing.
    let mut keyed = publish(&n, "k", "1");
    keyed.idempotency_key = Some("key-1".into());
    let first = s.append(vec![keyed.clone()]).await.remove(0).expect("ok");
    let events = sink.0.lock().len();
    let second = s.append(vec![keyed]).await.remove(0).expect("ok");
    assert!(second.duplicate && !first.duplicate);
    assert_eq!(second.offset, first.offset);
    assert_eq!(sink.0.lock().len(), events);

    // Retention: only the newest max_items records stay.
    s.put_node(n.clone(), config(3, true))
        .await
        .expect("reconfigure");
    let meta = s.node(&n).await.expect("read").expect("exists");
    assert_eq!((meta.first_offset, meta.last_offset), (3, 5));
    for i in 0..4 {
        s.append(vec![publish(&n, &format!("t{i}"), "x")])
            .await
            .remove(0)
            .expect("ok");
    }
    let page = s.read(&n, 0, 100).await.expect("read");
    assert_eq!(
        page.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    assert_eq!(page.meta.first_offset, 7);
    assert_eq!(page.meta.item_count, 3);

    // Purge.
    let mut purge = publish(&n, "x", "");
    purge.op = Op::Purge;
    let p = s.append(vec![purge]).await.remove(0).expect("purge");
    assert_eq!(p.offset, 10);
    let page = s.read(&n, 0, 100).await.expect("read");
    assert_eq!(page.records.len(), 1);
    assert!(matches!(page.records[0].change, Change::Purged));
    assert_eq!(s.items(&n, 0, 10).await.expect("items").items.len(), 0);
    assert_eq!(page.meta.item_count, 0);

    // Transient nodes count offsets but keep nothing.
    let t = NodeName::new("transient").expect("name");
    s.put_node(t.clone(), config(10, false))
        .await
        .expect("create");
    s.append(vec![publish(&t, "a", "1")])
        .await
        .remove(0)
        .expect("ok");
    let page = s.read(&t, 0, 10).await.expect("read");
    assert!(page.records.is_empty());
    assert_eq!((page.meta.first_offset, page.meta.last_offset), (2, 1));

    // Listing and deletion.
    let names: Vec<String> = s
        .nodes()
        .await
        .expect("list")
        .iter()
        .map(|m| m.name.to_string())
        .collect();
    assert_eq!(names, vec!["n".to_string(), "transient".to_string()]);
    s.delete_node(&n, Origin::Http).await.expect("delete");
    let last = sink.last();
    assert!(matches!(last.change, Change::Deleted));
    assert_eq!(last.offset, 11);
    assert!(s.node(&n).await.expect("read").is_none());
    assert!(matches!(
        s.delete_node(&n, Origin::Http).await,
        Err(Error::NodeNotFound(_))
    ));
    let (fresh, created) = s
        .put_node(n.clone(), config(10, true))
        .await
        .expect("recreate");
    assert!(created);
    assert_ne!(fresh.epoch, meta.epoch, "a recreated node has a new epoch");
    assert_eq!(fresh.last_offset, 0);
    assert!(s.read(&n, 0, 10).await.expect("read").records.is_empty());
    // Accounts.
    let alice = crate::account::Username::new("Alice").expect("username");
    let keys = crate::account::ScramKeys {
        salt: vec![1, 2, 3],
        iterations: 4096,
        stored_key: vec![4; 32],
        server_key: vec![5; 32],
    };
    let account = crate::account::Account {
        username: alice.clone(),
        scram_sha1: keys.clone(),
        scram_sha256: keys,
        updated_at: 1,
    };
    assert!(s.put_account(account.clone()).await.expect("create"));
    assert!(!s.put_account(account.clone()).await.expect("replace"));
    assert_eq!(s.account(&alice).await.expect("read"), Some(account));
    assert_eq!(s.accounts().await.expect("list"), vec![alice.clone()]);
    s.delete_account(&alice).await.expect("delete");
    assert!(s.account(&alice).await.expect("read").is_none());
    assert!(matches!(
        s.delete_account(&alice).await,
        Err(Error::AccountNotFound(_))
    ));

    membership(&*s).await;

    s.ready().expect("ready");
    s.close().await;
}

pub(crate) fn subscription(
    jid: &str,
    subid: &str,
    state: SubscriptionState,
    created_at: u64,
) -> NodeSubscription {
    NodeSubscription {
        jid: jid.into(),
        subid: subid.into(),
        state,
        created_at,
    }
}

/// Affiliations and XMPP subscriptions: kept with their node, listed sorted, gone with it.
async fn membership(s: &dyn Store) {
    use Affiliation::{Member, Outcast, Owner, Publisher};
    use SubscriptionState::{Pending, Subscribed};

    let m = NodeName::new("m").expect("name");
    // A node whose name extends `m`'s: nothing of one may show up in the other.
    let m2 = NodeName::new("m/2").expect("name");
    let missing = NodeName::new("nowhere").expect("name");
    s.put_node(m.clone(), NodeConfig::default())
        .await
        .expect("create");
    s.put_node(m2.clone(), NodeConfig::default())
        .await
        .expect("create");
    assert!(s.affiliations(&m).await.expect("list").is_empty());
    assert!(s.subscriptions(&m).await.expect("list").is_empty());

    // Affiliations: set, listed by JID, replaced, removed.
    s.set_affiliation(&m, "owner@x", Some(Owner))
        .await
        .expect("set");
    s.set_affiliation(&m, "b@x", Some(Member))
        .await
        .expect("set");
    s.set_affiliation(&m, "a@x", Some(Publisher))
        .await
        .expect("set");
    s.set_affiliation(&m2, "a@x", Some(Outcast))
        .await
        .expect("set");
    let list = |v: Vec<(Arc<str>, Affiliation)>| {
        v.into_iter()
            .map(|(j, a)| (j.to_string(), a))
            .collect::<Vec<_>>()
    };
    let expect = |v: &[(&str, Affiliation)]| {
        v.iter()
            .map(|(j, a)| (j.to_string(), *a))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(s.affiliations(&m).await.expect("list")),
        expect(&[("a@x", Publisher), ("b@x", Member), ("owner@x", Owner)])
    );
    s.set_affiliation(&m, "b@x", Some(Outcast))
        .await
        .expect("replace");
    s.set_affiliation(&m, "a@x", None).await.expect("remove");
    s.set_affiliation(&m, "never@x", None)
        .await
        .expect("removing what is not there is fine");
    assert_eq!(
        list(s.affiliations(&m).await.expect("list")),
        expect(&[("b@x", Outcast), ("owner@x", Owner)])
    );
    assert_eq!(
        list(s.affiliations(&m2).await.expect("list")),
        expect(&[("a@x", Outcast)])
    );

    // Unknown nodes.
    assert!(matches!(
        s.set_affiliation(&missing, "a@x", Some(Owner)).await,
        Err(Error::NodeNotFound(_))
    ));
    assert!(matches!(
        s.affiliations(&missing).await,
        Err(Error::NodeNotFound(_))
    ));
    assert!(matches!(
        s.put_subscription(&missing, subscription("a@x", "1", Subscribed, 1))
            .await,
        Err(Error::NodeNotFound(_))
    ));
    assert!(matches!(
        s.subscriptions(&missing).await,
        Err(Error::NodeNotFound(_))
    ));
    assert!(
        !s.delete_subscription(&missing, "a@x", "1")
            .await
            .expect("unknown nodes have no subscriptions")
    );

    // Subscriptions: several per JID, listed by (JID, subid), replaced by (JID, subid).
    // A long resource checks that listings have no length-limited upper bound.
    let long = format!("a@x/{}", "z".repeat(2000));
    for sub in [
        subscription("b@x", "s2", Subscribed, 1),
        subscription(&long, "s1", Pending, 2),
        subscription("b@x", "s1", Pending, 3),
        subscription("a@x", "s9", Subscribed, 4),
        subscription("b@x", "s10", Subscribed, 5),
    ] {
        s.put_subscription(&m, sub).await.expect("put");
    }
    s.put_subscription(&m2, subscription("b@x", "other", Subscribed, 6))
        .await
        .expect("put");
    s.put_subscription(&m, subscription("b@x", "s1", Subscribed, 7))
        .await
        .expect("replace");
    let expected = vec![
        subscription("a@x", "s9", Subscribed, 4),
        subscription(&long, "s1", Pending, 2),
        subscription("b@x", "s1", Subscribed, 7),
        subscription("b@x", "s10", Subscribed, 5),
        subscription("b@x", "s2", Subscribed, 1),
    ];
    assert_eq!(s.subscriptions(&m).await.expect("list"), expected);
    assert!(
        s.delete_subscription(&m, "b@x", "s2")
            .await
            .expect("delete")
    );
    assert!(
        !s.delete_subscription(&m, "b@x", "s2")
            .await
            .expect("delete again")
    );
    assert!(
        !s.delete_subscription(&m, "b@x", "other")
            .await
            .expect("another node's subid")
    );
    assert_eq!(
        s.subscriptions(&m).await.expect("list"),
        expected[..4].to_vec()
    );
    assert_eq!(
        s.subscriptions(&m2).await.expect("list"),
        vec![subscription("b@x", "other", Subscribed, 6)]
    );

    // Reconfiguring keeps them.
    s.put_node(m.clone(), config(5, false))
        .await
        .expect("reconfigure");
    assert_eq!(s.affiliations(&m).await.expect("list").len(), 2);
    assert_eq!(
        s.subscriptions(&m).await.expect("list"),
        expected[..4].to_vec()
    );

    // Deleting drops them; a node created again under the name starts with none, and the
    // node next to it keeps its own.
    s.delete_node(&m, Origin::Http).await.expect("delete");
    assert!(matches!(
        s.affiliations(&m).await,
        Err(Error::NodeNotFound(_))
    ));
    assert!(matches!(
        s.subscriptions(&m).await,
        Err(Error::NodeNotFound(_))
    ));
    assert!(
        !s.delete_subscription(&m, "a@x", "s9")
            .await
            .expect("deleted nodes have no subscriptions")
    );
    s.put_node(m.clone(), NodeConfig::default())
        .await
        .expect("recreate");
    assert!(s.affiliations(&m).await.expect("list").is_empty());
    assert!(s.subscriptions(&m).await.expect("list").is_empty());
    assert_eq!(s.affiliations(&m2).await.expect("list").len(), 1);
    assert_eq!(s.subscriptions(&m2).await.expect("list").len(), 1);
}
