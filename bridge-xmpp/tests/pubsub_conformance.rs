//! XEP-0060 conformance: the pubsub service driven through its stanza interface, with
//! clients as links in the router, over the core bus and an in-memory store.
//!
//! Each table row is one request from one entity, and the reply it must get: a result, or
//! the error condition, type and `pubsub#errors` child that XEP-0060 §§5–8 name.

use std::sync::Arc;
use std::time::Duration;

use juxta_bridge_xmpp::metrics::Metrics as XmppMetrics;
use juxta_bridge_xmpp::pubsub::{CreatePolicy, PubSub, PubSubConfig};
use juxta_bridge_xmpp::router::Router;
use juxta_bridge_xmpp::{
    Decoder, Element, Frame, Jid, Limits, Link, LinkQueue, Outbound, Stanza, ns,
};
use juxta_core::{Bus, FanOut, Limits as BusLimits, MemoryStore, Metrics};

const DOMAIN: &str = "example.org";
const SERVICE: &str = "pubsub.example.org";

/// Parses stanzas from text the way a stream would.
fn parse_all(xml: &str) -> Vec<Element> {
    let mut d = Decoder::new(Limits::default());
    d.feed(
        format!(
            "<stream:stream xmlns='jabber:client' xmlns:stream='{}' to='{DOMAIN}' version='1.0'>{xml}",
            ns::STREAM
        )
        .as_bytes(),
    );
    let mut out = Vec::new();
    while let Some(frame) = d.next().expect("well-formed") {
        if let Frame::Stanza(el) = frame {
            out.push(el);
        }
    }
    out
}

struct Client {
    jid: Jid,
    link: Link,
    rx: LinkQueue,
}

impl Client {
    /// Everything queued for this client, as stanzas.
    fn drain(&mut self) -> Vec<Element> {
        let mut text = String::new();
        while let Ok(out) = self.rx.try_recv() {
            let bytes = match out {
                Outbound::Bytes(b) => b.to_vec(),
                Outbound::Shared { stanza, to } => stanza.addressed_to(&to).to_vec(),
            };
            text.push_str(std::str::from_utf8(&bytes).expect("utf-8"));
        }
        parse_all(&text)
    }

    /// Waits a little for something to arrive (the feeder runs in a task), then drains.
    async fn wait(&mut self, n: usize) -> Vec<Element> {
        let mut got = Vec::new();
        for _ in 0..200 {
            got.extend(self.drain());
            if got.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        got
    }
}

struct World {
    pubsub: PubSub,
    router: Arc<Router>,
    bus: Bus,
    next_id: u64,
}

impl World {
    fn new() -> Self {
        let fanout = Arc::new(FanOut::new(1024, Arc::new(Metrics::default())));
        let store = Arc::new(MemoryStore::new(fanout.clone()));
        let bus = Bus::new(
            store,
            fanout,
            BusLimits {
                max_payload_bytes: 1024,
            },
        );
        let router = Arc::new(Router::new());
        let pubsub = PubSub::new(
            PubSubConfig {
                jid: Jid::domain_jid(SERVICE).expect("jid"),
                local_domains: vec![DOMAIN.into()],
                c2s_domain: DOMAIN.into(),
                create: CreatePolicy::Local,
                admins: vec!["root@example.org".into()],
            },
            bus.clone(),
            router.clone(),
            Arc::new(XmppMetrics::default()),
        );
        Self {
            pubsub,
            router,
            bus,
            next_id: 0,
        }
    }

    fn client(&self, full: &str) -> Client {
        let jid: Jid = full.parse().expect("jid");
        let (link, rx) = Link::new(256, ns::JABBER_CLIENT);
        self.router.register(&jid, link.clone());
        self.router.set_presence(&jid, true, 0);
        Client { jid, link, rx }
    }

    /// Sends an iq with `payload` from `c` and returns the reply.
    async fn iq(&mut self, c: &mut Client, kind: &str, payload: &str) -> Element {
        self.next_id += 1;
        let id = format!("q{}", self.next_id);
        let xml = format!(
            "<iq type='{kind}' id='{id}' from='{}' to='{SERVICE}'>{payload}</iq>",
            c.jid
        );
        let el = parse_all(&xml).pop().expect("one stanza");
        let stanza = Stanza::try_from(&el).expect("a valid iq");
        self.pubsub.handle_stanza(stanza, &c.link).await;
        let mut replies: Vec<Element> = c
            .drain()
            .into_iter()
            .filter(|s| s.name() == "iq" && s.attr("id") == Some(&id))
            .collect();
        assert_eq!(replies.len(), 1, "exactly one reply to {xml}");
        replies.pop().expect("reply")
    }

    async fn ok(&mut self, c: &mut Client, kind: &str, payload: &str) -> Element {
        let r = self.iq(c, kind, payload).await;
        assert_eq!(r.attr("type"), Some("result"), "{payload} → {r:?}");
        r
    }
}

fn pubsub(inner: &str) -> String {
    format!("<pubsub xmlns='{}'>{inner}</pubsub>", ns::PUBSUB)
}

fn owner(inner: &str) -> String {
    format!("<pubsub xmlns='{}'>{inner}</pubsub>", ns::PUBSUB_OWNER)
}

fn config_form(fields: &[(&str, &str)]) -> String {
    let mut x = String::from(
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field>",
    );
    for (k, v) in fields {
        x.push_str(&format!("<field var='{k}'><value>{v}</value></field>"));
    }
    x.push_str("</x>");
    x
}

fn create(node: &str, fields: &[(&str, &str)]) -> String {
    pubsub(&format!(
        "<create node='{node}'/><configure>{}</configure>",
        config_form(fields)
    ))
}

fn json_item(id: &str, json: &str) -> String {
    format!("<item id='{id}'><json xmlns='urn:xmpp:json:0'>{json}</json></item>")
}

/// (condition, type, pubsub#errors child) of an error reply.
fn error_of(reply: &Element) -> (String, String, Option<String>) {
    assert_eq!(reply.attr("type"), Some("error"), "{reply:?}");
    let error = reply
        .get_child("error", ns::JABBER_CLIENT)
        .expect("an error child");
    let condition = error
        .children()
        .find(|c| c.ns() == ns::STANZAS && c.name() != "text")
        .expect("a defined condition")
        .name()
        .to_owned();
    let app = error
        .children()
        .find(|c| c.ns() == ns::PUBSUB_ERRORS)
        .map(|c| c.name().to_owned());
    (condition, error.attr("type").unwrap_or("").to_owned(), app)
}

#[tokio::test]
async fn every_use_case_answers_with_the_result_or_the_error_xep_0060_names() {
    let mut w = World::new();
    let mut alice = w.client("alice@example.org/desk");
    let mut bob = w.client("bob@example.org/phone");
    let mut eve = w.client("eve@example.org/x");
    let mut remote = w.client("mallory@elsewhere.net/x");

    // Alice creates the nodes the table uses.
    w.ok(&mut alice, "set", &create("open", &[])).await;
    w.ok(
        &mut alice,
        "set",
        &create("wl", &[("pubsub#access_model", "whitelist")]),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &create("pres", &[("pubsub#access_model", "presence")]),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &create("auth", &[("pubsub#access_model", "authorize")]),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &create("subs", &[("pubsub#publish_model", "subscribers")]),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &create("transient", &[("pubsub#persist_items", "0")]),
    )
    .await;
    // Eve is banned from `open`.
    w.ok(
        &mut alice,
        "set",
        &owner("<affiliations node='open'><affiliation jid='eve@example.org' affiliation='outcast'/></affiliations>"),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &pubsub(&format!(
            "<publish node='open'>{}</publish>",
            json_item("one", "{\"n\":1}")
        )),
    )
    .await;

    struct Row {
        what: &'static str,
        who: &'static str,
        kind: &'static str,
        payload: String,
        expect: Option<(&'static str, &'static str, Option<&'static str>)>,
    }
    let row = |what, who, kind, payload: String, expect| Row {
        what,
        who,
        kind,
        payload,
        expect,
    };
    let table = vec![
        // §5 entity use cases
        row(
            "disco#info of the service",
            "bob",
            "get",
            format!("<query xmlns='{}'/>", ns::DISCO_INFO),
            None,
        ),
        row(
            "disco#info of a node",
            "bob",
            "get",
            format!("<query xmlns='{}' node='open'/>", ns::DISCO_INFO),
            None,
        ),
        row(
            "disco#info of a missing node",
            "bob",
            "get",
            format!("<query xmlns='{}' node='nope'/>", ns::DISCO_INFO),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "disco#items of the service",
            "bob",
            "get",
            format!("<query xmlns='{}'/>", ns::DISCO_ITEMS),
            None,
        ),
        row(
            "disco#items of a node",
            "bob",
            "get",
            format!("<query xmlns='{}' node='open'/>", ns::DISCO_ITEMS),
            None,
        ),
        row(
            "an unknown namespace",
            "bob",
            "get",
            "<query xmlns='urn:nope'/>".into(),
            Some(("service-unavailable", "cancel", None)),
        ),
        row(
            "subscriptions of an entity",
            "bob",
            "get",
            pubsub("<subscriptions/>"),
            None,
        ),
        row(
            "affiliations of an entity",
            "alice",
            "get",
            pubsub("<affiliations/>"),
            None,
        ),
        // §6.1 subscribe
        row(
            "subscribe to an open node",
            "bob",
            "set",
            pubsub("<subscribe node='open' jid='bob@example.org'/>"),
            None,
        ),
        row(
            "subscribe with another's JID",
            "bob",
            "set",
            pubsub("<subscribe node='open' jid='alice@example.org'/>"),
            Some(("bad-request", "modify", Some("invalid-jid"))),
        ),
        row(
            "subscribe without a node",
            "bob",
            "set",
            pubsub("<subscribe jid='bob@example.org'/>"),
            Some(("bad-request", "modify", Some("nodeid-required"))),
        ),
        row(
            "subscribe to a presence node",
            "bob",
            "set",
            pubsub("<subscribe node='pres' jid='bob@example.org'/>"),
            Some((
                "not-authorized",
                "auth",
                Some("presence-subscription-required"),
            )),
        ),
        row(
            "subscribe to a whitelist node",
            "bob",
            "set",
            pubsub("<subscribe node='wl' jid='bob@example.org'/>"),
            Some(("not-allowed", "cancel", Some("closed-node"))),
        ),
        row(
            "subscribe while banned",
            "eve",
            "set",
            pubsub("<subscribe node='open' jid='eve@example.org'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "subscribe to a missing node",
            "bob",
            "set",
            pubsub("<subscribe node='nope' jid='bob@example.org'/>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "subscription options",
            "bob",
            "get",
            pubsub("<options node='open' jid='bob@example.org'/>"),
            Some(("feature-not-implemented", "cancel", Some("unsupported"))),
        ),
        // §6.2 unsubscribe
        row(
            "unsubscribe when not subscribed",
            "bob",
            "set",
            pubsub("<unsubscribe node='wl' jid='bob@example.org'/>"),
            Some(("unexpected-request", "cancel", Some("not-subscribed"))),
        ),
        row(
            "unsubscribe another entity",
            "eve",
            "set",
            pubsub("<unsubscribe node='open' jid='bob@example.org'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "unsubscribe with a bad subid",
            "bob",
            "set",
            pubsub("<unsubscribe node='open' jid='bob@example.org' subid='zzz'/>"),
            Some(("not-acceptable", "modify", Some("invalid-subid"))),
        ),
        row(
            "unsubscribe from a missing node",
            "bob",
            "set",
            pubsub("<unsubscribe node='nope' jid='bob@example.org'/>"),
            Some(("item-not-found", "cancel", None)),
        ),
        // §6.5 retrieve items
        row(
            "items of an open node",
            "bob",
            "get",
            pubsub("<items node='open'/>"),
            None,
        ),
        row(
            "the newest item",
            "bob",
            "get",
            pubsub("<items node='open' max_items='1'/>"),
            None,
        ),
        row(
            "an item by id",
            "bob",
            "get",
            pubsub("<items node='open'><item id='one'/></items>"),
            None,
        ),
        row(
            "an item that is not there",
            "bob",
            "get",
            pubsub("<items node='open'><item id='zzz'/></items>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "a bad max_items",
            "bob",
            "get",
            pubsub("<items node='open' max_items='x'/>"),
            Some(("bad-request", "modify", None)),
        ),
        row(
            "items while banned",
            "eve",
            "get",
            pubsub("<items node='open'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "items of a whitelist node",
            "bob",
            "get",
            pubsub("<items node='wl'/>"),
            Some(("not-allowed", "cancel", Some("closed-node"))),
        ),
        row(
            "items of an authorize node unsubscribed",
            "bob",
            "get",
            pubsub("<items node='auth'/>"),
            Some(("not-authorized", "auth", Some("not-subscribed"))),
        ),
        row(
            "items of a transient node",
            "alice",
            "get",
            pubsub("<items node='transient'/>"),
            Some(("feature-not-implemented", "cancel", Some("unsupported"))),
        ),
        row(
            "items of a missing node",
            "bob",
            "get",
            pubsub("<items node='nope'/>"),
            Some(("item-not-found", "cancel", None)),
        ),
        // §7.1 publish
        row(
            "publish as owner with an id",
            "alice",
            "set",
            pubsub(&format!(
                "<publish node='open'>{}</publish>",
                json_item("two", "{\"n\":2}")
            )),
            None,
        ),
        row(
            "publish without an id",
            "alice",
            "set",
            pubsub(
                "<publish node='open'><item><entry xmlns='urn:example'>x</entry></item></publish>",
            ),
            None,
        ),
        row(
            "publish without permission",
            "bob",
            "set",
            pubsub(&format!(
                "<publish node='open'>{}</publish>",
                json_item("b", "1")
            )),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "publish to a missing node",
            "alice",
            "set",
            pubsub(&format!(
                "<publish node='nope'>{}</publish>",
                json_item("x", "1")
            )),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "publish without a node",
            "alice",
            "set",
            pubsub(&format!("<publish>{}</publish>", json_item("x", "1"))),
            Some(("bad-request", "modify", Some("nodeid-required"))),
        ),
        row(
            "publish without an item",
            "alice",
            "set",
            pubsub("<publish node='open'/>"),
            Some(("bad-request", "modify", Some("item-required"))),
        ),
        row(
            "publish an item without payload",
            "alice",
            "set",
            pubsub("<publish node='open'><item id='e'/></publish>"),
            Some(("bad-request", "modify", Some("payload-required"))),
        ),
        row(
            "publish two payloads",
            "alice",
            "set",
            pubsub(
                "<publish node='open'><item><a xmlns='urn:a'/><b xmlns='urn:b'/></item></publish>",
            ),
            Some(("bad-request", "modify", Some("invalid-payload"))),
        ),
        row(
            "publish invalid JSON",
            "alice",
            "set",
            pubsub(
                "<publish node='open'><item><json xmlns='urn:xmpp:json:0'>{</json></item></publish>",
            ),
            Some(("bad-request", "modify", Some("invalid-payload"))),
        ),
        row(
            "publish a payload over the limit",
            "alice",
            "set",
            pubsub(&format!(
                "<publish node='open'><item><json xmlns='urn:xmpp:json:0'>\"{}\"</json></item></publish>",
                "x".repeat(2000)
            )),
            Some(("not-acceptable", "modify", Some("payload-too-big"))),
        ),
        row(
            "publish with a met precondition",
            "alice",
            "set",
            format!(
                "<pubsub xmlns='{}'><publish node='open'>{}</publish><publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='pubsub#access_model'><value>open</value></field></x></publish-options></pubsub>",
                ns::PUBSUB,
                json_item("p", "1")
            ),
            None,
        ),
        row(
            "publish with an unmet precondition",
            "alice",
            "set",
            format!(
                "<pubsub xmlns='{}'><publish node='open'>{}</publish><publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='pubsub#access_model'><value>whitelist</value></field></x></publish-options></pubsub>",
                ns::PUBSUB,
                json_item("p", "1")
            ),
            Some(("conflict", "cancel", Some("precondition-not-met"))),
        ),
        row(
            "publish to a subscribers node unsubscribed",
            "bob",
            "set",
            pubsub(&format!(
                "<publish node='subs'>{}</publish>",
                json_item("s", "1")
            )),
            Some(("forbidden", "auth", None)),
        ),
        // §7.2 retract
        row(
            "retract without permission",
            "bob",
            "set",
            pubsub("<retract node='open'><item id='one'/></retract>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "retract without an item",
            "alice",
            "set",
            pubsub("<retract node='open'/>"),
            Some(("bad-request", "modify", Some("item-required"))),
        ),
        row(
            "retract without a node",
            "alice",
            "set",
            pubsub("<retract><item id='one'/></retract>"),
            Some(("bad-request", "modify", Some("nodeid-required"))),
        ),
        row(
            "retract a missing item",
            "alice",
            "set",
            pubsub("<retract node='open'><item id='zzz'/></retract>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "retract from a transient node",
            "alice",
            "set",
            pubsub("<retract node='transient'><item id='a'/></retract>"),
            Some(("feature-not-implemented", "cancel", Some("unsupported"))),
        ),
        row(
            "retract from a missing node",
            "alice",
            "set",
            pubsub("<retract node='nope'><item id='a'/></retract>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "retract as owner",
            "alice",
            "set",
            pubsub("<retract node='open' notify='true'><item id='two'/></retract>"),
            None,
        ),
        // §8.1 create
        row(
            "create an existing node",
            "bob",
            "set",
            pubsub("<create node='open'/>"),
            Some(("conflict", "cancel", None)),
        ),
        row(
            "create an instant node",
            "bob",
            "set",
            pubsub("<create/>"),
            None,
        ),
        row(
            "create as a remote entity",
            "mallory",
            "set",
            pubsub("<create node='m'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "create with a bad config",
            "bob",
            "set",
            create("bad", &[("pubsub#access_model", "roster")]),
            Some(("not-acceptable", "modify", None)),
        ),
        row(
            "create with an unknown field",
            "bob",
            "set",
            create("bad", &[("pubsub#nope", "1")]),
            Some(("not-acceptable", "modify", None)),
        ),
        // §8.2–8.3 configure, default
        row(
            "configure form as owner",
            "alice",
            "get",
            owner("<configure node='open'/>"),
            None,
        ),
        row(
            "configure form as non-owner",
            "bob",
            "get",
            owner("<configure node='open'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "configure a missing node",
            "alice",
            "get",
            owner("<configure node='nope'/>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "configure without a node",
            "alice",
            "get",
            owner("<configure/>"),
            Some(("bad-request", "modify", Some("nodeid-required"))),
        ),
        row(
            "submit a config",
            "alice",
            "set",
            owner(&format!(
                "<configure node='open'>{}</configure>",
                config_form(&[("pubsub#title", "Open"), ("pubsub#max_items", "10")])
            )),
            None,
        ),
        row(
            "submit a bad config",
            "alice",
            "set",
            owner(&format!(
                "<configure node='open'>{}</configure>",
                config_form(&[("pubsub#max_items", "-1")])
            )),
            Some(("not-acceptable", "modify", None)),
        ),
        row("default config", "bob", "get", owner("<default/>"), None),
        // §8.8–8.9 subscriptions and affiliations
        row(
            "subscriptions as owner",
            "alice",
            "get",
            owner("<subscriptions node='open'/>"),
            None,
        ),
        row(
            "subscriptions as non-owner",
            "bob",
            "get",
            owner("<subscriptions node='open'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "affiliations as owner",
            "alice",
            "get",
            owner("<affiliations node='open'/>"),
            None,
        ),
        row(
            "affiliations as non-owner",
            "bob",
            "set",
            owner(
                "<affiliations node='open'><affiliation jid='bob@example.org' affiliation='owner'/></affiliations>",
            ),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "the last owner leaves",
            "alice",
            "set",
            owner(
                "<affiliations node='open'><affiliation jid='alice@example.org' affiliation='none'/></affiliations>",
            ),
            Some(("not-acceptable", "modify", None)),
        ),
        row(
            "a bad affiliation",
            "alice",
            "set",
            owner(
                "<affiliations node='open'><affiliation jid='bob@example.org' affiliation='king'/></affiliations>",
            ),
            Some(("not-acceptable", "modify", None)),
        ),
        // §8.4–8.5 delete, purge
        row(
            "purge as non-owner",
            "bob",
            "set",
            owner("<purge node='open'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "purge a transient node",
            "alice",
            "set",
            owner("<purge node='transient'/>"),
            Some(("feature-not-implemented", "cancel", Some("unsupported"))),
        ),
        row(
            "purge a missing node",
            "alice",
            "set",
            owner("<purge node='nope'/>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "delete as non-owner",
            "bob",
            "set",
            owner("<delete node='wl'/>"),
            Some(("forbidden", "auth", None)),
        ),
        row(
            "delete a missing node",
            "alice",
            "set",
            owner("<delete node='nope'/>"),
            Some(("item-not-found", "cancel", None)),
        ),
        row(
            "delete as owner",
            "alice",
            "set",
            owner("<delete node='wl'/>"),
            None,
        ),
        row(
            "delete as admin",
            "root",
            "set",
            owner("<delete node='pres'/>"),
            None,
        ),
    ];
    let mut root = w.client("root@example.org/r");
    let mut failures = Vec::new();
    for r in table {
        let c = match r.who {
            "alice" => &mut alice,
            "bob" => &mut bob,
            "eve" => &mut eve,
            "mallory" => &mut remote,
            _ => &mut root,
        };
        let reply = w.iq(c, r.kind, &r.payload).await;
        let got = if reply.attr("type") == Some("result") {
            None
        } else {
            Some(error_of(&reply))
        };
        let want = r
            .expect
            .map(|(c, t, a)| (c.to_owned(), t.to_owned(), a.map(str::to_owned)));
        if got != want {
            failures.push(format!("{}: want {want:?}, got {got:?}", r.what));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test]
async fn subscribers_get_items_retractions_and_purges_published_from_both_sides() {
    let mut w = World::new();
    let mut alice = w.client("alice@example.org/desk");
    let mut bob = w.client("bob@example.org/phone");
    w.ok(
        &mut alice,
        "set",
        &create("news", &[("pubsub#send_last_published_item", "never")]),
    )
    .await;
    let sub = w
        .ok(
            &mut bob,
            "set",
            &pubsub("<subscribe node='news' jid='bob@example.org'/>"),
        )
        .await;
    let s = sub
        .get_child("pubsub", ns::PUBSUB)
        .and_then(|p| p.get_child("subscription", ns::PUBSUB))
        .expect("subscription");
    assert_eq!(s.attr("subscription"), Some("subscribed"));
    assert!(s.attr("subid").is_some());

    // Published on the bus (as REST would): the XMPP subscriber gets the JSON container.
    w.bus
        .publish(
            &juxta_core::Principal::Admin,
            juxta_core::Publish {
                node: juxta_core::NodeName::new("news").expect("name"),
                id: Some(juxta_core::ItemId::new("r1").expect("id")),
                payload: juxta_core::Payload::json(&b"{\"t\":1}"[..]).expect("json"),
                idempotency_key: None,
            },
            juxta_core::Origin::Http,
        )
        .await
        .expect("published");
    let got = bob.wait(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let item = got[0]
        .get_child("event", ns::PUBSUB_EVENT)
        .and_then(|e| e.get_child("items", ns::PUBSUB_EVENT))
        .and_then(|i| i.get_child("item", ns::PUBSUB_EVENT))
        .expect("an item notification");
    assert_eq!(item.attr("id"), Some("r1"));
    assert_eq!(
        item.get_child("json", ns::JSON)
            .map(Element::text)
            .as_deref(),
        Some("{\"t\":1}")
    );
    assert_eq!(got[0].attr("from"), Some(SERVICE));
    assert_eq!(got[0].attr("to"), Some("bob@example.org"));

    // Published over XMPP with an XML payload, then retracted, then purged.
    w.ok(
        &mut alice,
        "set",
        &pubsub("<publish node='news'><item id='x1'><entry xmlns='urn:example'>hi</entry></item></publish>"),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &pubsub("<retract node='news'><item id='x1'/></retract>"),
    )
    .await;
    w.ok(&mut alice, "set", &owner("<purge node='news'/>"))
        .await;
    let got = bob.wait(3).await;
    let kinds: Vec<String> = got
        .iter()
        .filter_map(|m| m.get_child("event", ns::PUBSUB_EVENT))
        .map(|e| {
            let first = e.children().next().expect("content");
            match first.children().next() {
                Some(c) => format!("{}/{}", first.name(), c.name()),
                None => first.name().to_owned(),
            }
        })
        .collect();
    assert_eq!(kinds, ["items/item", "items/retract", "purge"], "{got:?}");
    let entry = got[0]
        .get_child("event", ns::PUBSUB_EVENT)
        .and_then(|e| e.get_child("items", ns::PUBSUB_EVENT))
        .and_then(|i| i.get_child("item", ns::PUBSUB_EVENT))
        .and_then(|i| i.get_child("entry", "urn:example"))
        .expect("the XML payload passes through");
    assert_eq!(entry.text(), "hi");

    // Unsubscribed: nothing more; deletion is not notified to former subscribers.
    w.ok(
        &mut bob,
        "set",
        &pubsub("<unsubscribe node='news' jid='bob@example.org'/>"),
    )
    .await;
    w.ok(
        &mut alice,
        "set",
        &pubsub(&format!(
            "<publish node='news'>{}</publish>",
            json_item("late", "2")
        )),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(bob.drain().is_empty());
}

#[tokio::test]
async fn a_new_subscriber_gets_the_last_item_and_deletion_is_notified() {
    let mut w = World::new();
    let mut alice = w.client("alice@example.org/desk");
    let mut bob = w.client("bob@example.org/phone");
    w.ok(&mut alice, "set", &create("last", &[])).await;
    for id in ["a", "b"] {
        w.ok(
            &mut alice,
            "set",
            &pubsub(&format!(
                "<publish node='last'>{}</publish>",
                json_item(id, "1")
            )),
        )
        .await;
    }
    w.ok(
        &mut bob,
        "set",
        &pubsub("<subscribe node='last' jid='bob@example.org/phone'/>"),
    )
    .await;
    let got = bob.wait(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let item = got[0]
        .get_child("event", ns::PUBSUB_EVENT)
        .and_then(|e| e.get_child("items", ns::PUBSUB_EVENT))
        .and_then(|i| i.get_child("item", ns::PUBSUB_EVENT))
        .expect("the last item");
    assert_eq!(item.attr("id"), Some("b"));
    assert!(got[0].has_child("delay", ns::DELAY));

    w.ok(&mut alice, "set", &owner("<delete node='last'/>"))
        .await;
    let got = bob.wait(1).await;
    assert!(
        got.iter().any(|m| m
            .get_child("event", ns::PUBSUB_EVENT)
            .is_some_and(|e| e.has_child("delete", ns::PUBSUB_EVENT))),
        "{got:?}"
    );
}

#[tokio::test]
async fn an_authorize_node_holds_subscriptions_until_an_owner_approves() {
    let mut w = World::new();
    let mut alice = w.client("alice@example.org/desk");
    let mut bob = w.client("bob@example.org/phone");
    w.ok(
        &mut alice,
        "set",
        &create("club", &[("pubsub#access_model", "authorize")]),
    )
    .await;
    alice.drain();
    let r = w
        .ok(
            &mut bob,
            "set",
            &pubsub("<subscribe node='club' jid='bob@example.org'/>"),
        )
        .await;
    assert!(format!("{r:?}").contains("pending"), "{r:?}");
    let asks = alice.wait(1).await;
    let form = asks
        .iter()
        .find_map(|m| m.get_child("x", "jabber:x:data"))
        .expect("an authorization form to the owner");
    assert!(format!("{form:?}").contains("bob@example.org"));
    let r = w.iq(&mut bob, "get", &pubsub("<items node='club'/>")).await;
    assert_eq!(
        error_of(&r),
        (
            "not-authorized".into(),
            "auth".into(),
            Some("pending-subscription".into())
        )
    );

    // Alice approves by answering the form.
    let answer = format!(
        "<message from='alice@example.org/desk' to='{SERVICE}'><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#subscribe_authorization</value></field>\
         <field var='pubsub#node'><value>club</value></field>\
         <field var='pubsub#subscriber_jid'><value>bob@example.org</value></field>\
         <field var='pubsub#allow'><value>true</value></field></x></message>"
    );
    let el = parse_all(&answer).pop().expect("message");
    w.pubsub
        .handle_stanza(Stanza::try_from(&el).expect("stanza"), &alice.link)
        .await;
    let told = bob.wait(1).await;
    assert!(format!("{told:?}").contains("subscribed"), "{told:?}");
    w.ok(&mut bob, "get", &pubsub("<items node='club'/>")).await;
}

#[tokio::test]
async fn presence_based_delivery_skips_unavailable_subscribers() {
    let mut w = World::new();
    let mut alice = w.client("alice@example.org/desk");
    let mut bob = w.client("bob@example.org/phone");
    w.ok(
        &mut alice,
        "set",
        &create(
            "live",
            &[
                ("pubsub#presence_based_delivery", "1"),
                ("pubsub#send_last_published_item", "never"),
            ],
        ),
    )
    .await;
    w.ok(
        &mut bob,
        "set",
        &pubsub("<subscribe node='live' jid='bob@example.org'/>"),
    )
    .await;
    w.router.set_presence(&bob.jid, false, 0);
    w.ok(
        &mut alice,
        "set",
        &pubsub(&format!(
            "<publish node='live'>{}</publish>",
            json_item("gone", "1")
        )),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(bob.drain().is_empty(), "unavailable: nothing delivered");
    w.router.set_presence(&bob.jid, true, 0);
    w.ok(
        &mut alice,
        "set",
        &pubsub(&format!(
            "<publish node='live'>{}</publish>",
            json_item("here", "1")
        )),
    )
    .await;
    let got = bob.wait(1).await;
    assert!(format!("{got:?}").contains("here"), "{got:?}");
}

#[tokio::test]
async fn publishes_received_together_commit_in_order_and_each_gets_its_own_answer() {
    use juxta_bridge_xmpp::StanzaHandler as _;
    let mut w = World::new();
    let mut alice = w.client("alice@example.org/desk");
    let mut bob = w.client("bob@example.org/desk");
    w.ok(&mut alice, "set", &create("b1", &[])).await;
    w.ok(&mut alice, "set", &create("b2", &[])).await;
    // In one batch: two publishes to b1, one bob may not make (b2 is alice's), a ping, and
    // two more publishes (one with a service-assigned id).
    let xml = [
        (
            "a1",
            format!("<publish node='b1'>{}</publish>", json_item("i1", "1")),
        ),
        (
            "a2",
            format!("<publish node='b1'>{}</publish>", json_item("i2", "2")),
        ),
        ("a3", "<ping xmlns='urn:xmpp:ping'/>".to_owned()),
        (
            "a4",
            format!("<publish node='b2'>{}</publish>", json_item("i3", "3")),
        ),
        (
            "a5",
            format!("<publish node='b1'>{}</publish>", json_item("i4", "4")),
        ),
        (
            "a6",
            "<publish node='b1'><item><json xmlns='urn:xmpp:json:0'>5</json></item></publish>"
                .to_owned(),
        ),
    ];
    let mut batch = Vec::new();
    for (id, inner) in &xml {
        let (from, payload) = match *id {
            "a3" => (&bob.jid, inner.clone()),
            "a4" => (&bob.jid, pubsub(inner)),
            _ => (&alice.jid, pubsub(inner)),
        };
        let kind = if *id == "a3" { "get" } else { "set" };
        let el = parse_all(&format!(
            "<iq type='{kind}' id='{id}' from='{from}' to='{SERVICE}'>{payload}</iq>"
        ))
        .pop()
        .expect("one stanza");
        batch.push((from.clone(), Stanza::try_from(&el).expect("a valid iq")));
    }
    // Alice's stanzas go on alice's link, bob's on bob's: split the batch per sender, as
    // two streams would, keeping each one's order.
    let (alice_batch, bob_batch): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|(from, _)| *from == alice.jid);
    w.pubsub
        .handle_batch(
            alice_batch.into_iter().map(|(_, s)| s).collect(),
            &alice.link,
        )
        .await;
    w.pubsub
        .handle_batch(bob_batch.into_iter().map(|(_, s)| s).collect(), &bob.link)
        .await;

    let answers: Vec<(String, String)> = alice
        .drain()
        .into_iter()
        .filter(|s| s.name() == "iq")
        .map(|s| {
            let item = s
                .get_child("pubsub", ns::PUBSUB)
                .and_then(|p| p.get_child("publish", ns::PUBSUB))
                .and_then(|p| p.get_child("item", ns::PUBSUB))
                .and_then(|i| i.attr("id"))
                .unwrap_or("")
                .to_owned();
            (s.attr("id").unwrap_or("").to_owned(), item)
        })
        .collect();
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert_eq!(answers[0], ("a1".to_owned(), "i1".to_owned()));
    assert_eq!(answers[1], ("a2".to_owned(), "i2".to_owned()));
    assert_eq!(answers[2], ("a5".to_owned(), "i4".to_owned()));
    assert_eq!(answers[3].0, "a6");
    assert!(!answers[3].1.is_empty(), "the service assigned an id");

    let bob_answers: Vec<Element> = bob
        .drain()
        .into_iter()
        .filter(|s| s.name() == "iq")
        .collect();
    assert_eq!(bob_answers.len(), 2, "{bob_answers:?}");
    assert_eq!(bob_answers[0].attr("id"), Some("a3"));
    assert_eq!(bob_answers[0].attr("type"), Some("result"));
    assert_eq!(bob_answers[1].attr("id"), Some("a4"));
    assert_eq!(error_of(&bob_answers[1]).0, "forbidden");

    // Stored in request order, at consecutive offsets.
    let page = w
        .bus
        .store()
        .read(&juxta_core::NodeName::new("b1").expect("name"), 0, 10)
        .await
        .expect("read");
    let ids: Vec<String> = page
        .records
        .iter()
        .filter_map(|r| match &r.change {
            juxta_core::Change::Published(item) => Some(item.id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(ids[..3], ["i1", "i2", "i4"]);
    assert_eq!(ids.len(), 4);
    assert_eq!(answers[3].1, ids[3]);
}
