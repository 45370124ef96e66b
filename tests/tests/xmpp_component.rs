//! The external component transport (XEP-0114) against a real Prosody installed from Debian:
//! `component::run` attaches a small test service to Prosody as `pubsub.prosody.test`, and
//! slixmpp (a client library we did not write), logged into Prosody as an ordinary user,
//! queries it through Prosody. A wrong secret is refused by Prosody and retried without end;
//! a restarted Prosody is reconnected to.
//!
//! Without Prosody (and without root to install it) these tests say they are skipped; under
//! CI they fail instead.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use juxta_bridge_xmpp::component::{self, ComponentConfig};
use juxta_bridge_xmpp::link::HandlerFuture;
use juxta_bridge_xmpp::metrics::Metrics;
use juxta_bridge_xmpp::{Element, Iq, IqType, Jid, Link, Stanza, StanzaError, StanzaHandler, ns};
use juxta_tests::prosody::{Prosody, ProsodyOptions, require_prosody};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "prosody.test";
const COMPONENT: &str = "pubsub.prosody.test";
const SECRET: &str = "c0mp0nent s3cret";
const USER: (&str, &str) = ("alice", "wonder land");
/// The name the test service gives in disco#info.
const NAME: &str = "juxta component test";
/// How long anything in these tests may take before it counts as broken.
const WAIT: Duration = Duration::from_secs(30);

/// A stand-in for the pubsub service: answers disco#info with an identity, pings with a
/// result, and other requests with `service-unavailable`; counts attaches and detaches.
struct TestService {
    attached: watch::Sender<u32>,
    detached: watch::Sender<u32>,
}

impl TestService {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            attached: watch::Sender::new(0),
            detached: watch::Sender::new(0),
        })
    }

    fn answer(iq: &Iq) -> Iq {
        let payload = iq.payload.as_ref();
        if payload.is_some_and(|p| p.is("ping", ns::PING)) {
            iq.result()
        } else if payload.is_some_and(|p| p.is("query", ns::DISCO_INFO)) {
            let mut features = vec![ns::DISCO_INFO, ns::PING];
            features.sort_unstable();
            let query = Element::builder("query", ns::DISCO_INFO)
                .append(
                    Element::builder("identity", ns::DISCO_INFO)
                        .attr("category", "pubsub")
                        .attr("type", "service")
                        .attr("name", NAME),
                )
                .append_all(
                    features
                        .into_iter()
                        .map(|var| Element::builder("feature", ns::DISCO_INFO).attr("var", var)),
                )
                .build();
            Iq {
                payload: Some(query),
                ..iq.result()
            }
        } else {
            iq.error_reply(StanzaError::service_unavailable())
        }
    }
}

impl StanzaHandler for TestService {
    fn handle<'a>(&'a self, stanza: Stanza, link: &'a Link) -> HandlerFuture<'a> {
        Box::pin(async move {
            if let Stanza::Iq(iq) = stanza
                && matches!(iq.kind, IqType::Get | IqType::Set)
            {
                link.send_element(&Element::from(Self::answer(&iq)));
            }
        })
    }

    fn attached(&self, _link: Link) {
        self.attached.send_modify(|n| *n += 1);
    }

    fn detached(&self, _link: &Link) {
        self.detached.send_modify(|n| *n += 1);
    }
}

/// Starts Prosody with the component and one user.
async fn prosody(secret: &str) -> Result<Prosody> {
    Prosody::start(ProsodyOptions {
        domain: DOMAIN,
        component: Some((COMPONENT, secret)),
        users: &[USER],
    })
    .await
}

/// The running component driver.
struct Driver {
    service: Arc<TestService>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Driver {
    fn start(prosody: &Prosody, secret: &str) -> Result<Self> {
        let addr = prosody
            .component_addr()
            .context("Prosody has no component port")?;
        let config = ComponentConfig {
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            ..ComponentConfig::new(addr.to_string(), COMPONENT.parse::<Jid>()?, secret)
        };
        config.validate()?;
        let service = TestService::new();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(component::run(
            config,
            service.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        Ok(Self {
            service,
            metrics,
            shutdown,
            task,
        })
    }

    /// Waits until the service has been attached `n` times in all.
    async fn attached(&self, n: u32, prosody: &Prosody) -> Result<()> {
        let mut rx = self.service.attached.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|count| *count >= n))
            .await
            .with_context(|| {
                format!(
                    "the component was not attached {n} time(s) within {WAIT:?}; Prosody's log:\n{}",
                    prosody.log()
                )
            })??;
        Ok(())
    }

    /// Cancels the driver and checks that it returns.
    async fn stop(self) -> Result<Arc<TestService>> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("component::run did not return after shutdown")??;
        Ok(self.service)
    }
}

#[tokio::test]
async fn given_prosody_with_the_component_when_a_user_asks_it_then_the_component_answers_through_prosody()
-> Result<()> {
    if !require_prosody("xmpp_component: a user asks the component through Prosody")? {
        return Ok(());
    }
    let prosody = prosody(SECRET).await?;
    let driver = Driver::start(&prosody, SECRET)?;
    driver.attached(1, &prosody).await?;
    ensure!(
        prosody.log_contains("External component successfully authenticated"),
        "{}",
        prosody.log()
    );
    ensure!(driver.metrics.component_up.get() == 1);

    let steps = json!([
        {"op": "disco_info", "to": COMPONENT},
        {"op": "ping", "to": COMPONENT},
        {"op": "iq", "type": "get", "to": COMPONENT,
         "payload": "<query xmlns='jabber:iq:version'/>", "expect_error": "service-unavailable"},
        {"op": "disco_items", "to": DOMAIN},
    ]);
    let (ok, report) = prosody.client_steps(USER.0, USER.1, &steps).await?;
    ensure!(ok, "the client's steps failed: {report}\n{}", prosody.log());
    let steps = &report["steps"];
    ensure!(
        steps[0]["identities"] == json!([["pubsub", "service", NAME]]),
        "the component's identity came back through Prosody: {report}"
    );
    ensure!(
        steps[0]["features"] == json!([ns::DISCO_INFO, ns::PING]),
        "{report}"
    );
    ensure!(
        steps[3]["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["jid"] == COMPONENT)),
        "Prosody lists the component among its items: {report}"
    );
    ensure!(driver.metrics.component_connects.get() == 1);
    ensure!(driver.metrics.component_rejected.get() == 0);

    let service = driver.stop().await?;
    ensure!(*service.detached.borrow() == 1, "detached once on shutdown");
    prosody
        .wait_for_log("component disconnected: pubsub.prosody.test", WAIT)
        .await?;
    Ok(())
}

#[tokio::test]
async fn given_a_wrong_secret_then_prosody_refuses_and_the_component_keeps_retrying_without_attaching()
-> Result<()> {
    if !require_prosody("xmpp_component: a wrong secret is refused and retried")? {
        return Ok(());
    }
    let prosody = prosody(SECRET).await?;
    let driver = Driver::start(&prosody, "not the secret")?;

    let metrics = driver.metrics.clone();
    tokio::time::timeout(WAIT, async {
        while metrics.component_handshake_failures.get() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .with_context(|| {
        format!(
            "three refused handshakes within {WAIT:?} (got {}); Prosody's log:\n{}",
            metrics.component_handshake_failures.get(),
            prosody.log()
        )
    })?;
    ensure!(
        prosody.log_contains("Component authentication failed for pubsub.prosody.test"),
        "Prosody refused the handshake itself:\n{}",
        prosody.log()
    );
    ensure!(*driver.service.attached.borrow() == 0, "never attached");
    ensure!(metrics.component_connects.get() == 0);
    ensure!(metrics.component_up.get() == 0);
    ensure!(!driver.task.is_finished(), "run keeps retrying");

    // Meanwhile Prosody answers for the absent component.
    let steps = json!([
        {"op": "ping", "to": COMPONENT, "expect_error": "remote-server-timeout"},
    ]);
    let (ok, report) = prosody.client_steps(USER.0, USER.1, &steps).await?;
    ensure!(ok, "{report}");

    driver.stop().await?;
    Ok(())
}

#[tokio::test]
async fn given_an_attached_component_when_prosody_restarts_then_the_component_attaches_again()
-> Result<()> {
    if !require_prosody("xmpp_component: the component reattaches after a Prosody restart")? {
        return Ok(());
    }
    let mut prosody = prosody(SECRET).await?;
    let driver = Driver::start(&prosody, SECRET)?;
    driver.attached(1, &prosody).await?;

    prosody.restart().await?;
    driver.attached(2, &prosody).await?;
    ensure!(
        *driver.service.detached.borrow() >= 1,
        "detached when the stream broke"
    );
    ensure!(driver.metrics.component_connects.get() == 2);

    let steps = json!([{"op": "ping", "to": COMPONENT}]);
    let (ok, report) = prosody.client_steps(USER.0, USER.1, &steps).await?;
    ensure!(
        ok,
        "the reattached component answers: {report}\n{}",
        prosody.log()
    );

    driver.stop().await?;
    Ok(())
}

/// The real gateway attached to Prosody: `juxta serve` with `[xmpp.component]` pointing at
/// Prosody's component port. A user of Prosody discovers juxta's pubsub service there,
/// subscribes to a node created over REST, receives an item published over REST with the same
/// id and payload, and publishes into a node it created itself, which a WebSocket subscriber
/// of juxta receives.
#[tokio::test]
async fn given_juxta_attached_to_prosody_then_a_prosody_user_subscribes_to_and_publishes_into_juxta_nodes()
-> Result<()> {
    if !require_prosody("xmpp_component: a Prosody user uses juxta's nodes")? {
        return Ok(());
    }
    let prosody = prosody(SECRET).await?;
    let server_addr = prosody.component_addr().context("no component port")?;
    let server = juxta_tests::Server::start(
        juxta_tests::ServerOptions::new()
            .env("JUXTA_XMPP__COMPONENT__SERVER", server_addr.to_string())
            .env("JUXTA_XMPP__COMPONENT__JID", COMPONENT)
            .env("JUXTA_XMPP__COMPONENT__SECRET", SECRET)
            // The overlay off: its pipe would count as the node's first subscriber, and the
            // count below is how this test learns that the Prosody user has subscribed.
            .env("JUXTA_P2P__ENABLED", "false"),
    )
    .await?;
    let api = server.api();
    let node = juxta_tests::unique("shared");
    api.create_node(&node, Some(&json!({"send_last_published_item": "never"})))
        .await?;
    // The component is attached once juxta says so.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = api
            .http()
            .get(format!("{}/metrics", server.base_url()))
            .send()
            .await?
            .text()
            .await?;
        if metrics
            .lines()
            .any(|l| l.starts_with("juxta_xmpp_component_up") && l.ends_with(" 1"))
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "juxta never attached to Prosody: {}\n{}",
            server.output_tail(),
            prosody.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let own = juxta_tests::unique("alices");
    let steps = json!([
        {"op": "disco_items", "to": DOMAIN},
        {"op": "disco_info", "to": COMPONENT},
        {"op": "subscribe", "to": COMPONENT, "node": node},
        {"op": "wait_events", "node": node, "count": 1, "timeout": 30},
        {"op": "create", "to": COMPONENT, "node": own},
        {"op": "publish", "to": COMPONENT, "node": own, "id": "p1",
         "payload": "<entry xmlns='urn:example:entry'>from prosody</entry>"},
    ]);
    let jid = format!("{}@{DOMAIN}", USER.0);
    let client = juxta_tests::interop::Slixmpp::start(
        prosody.c2s_addr(),
        &jid,
        USER.1,
        prosody.ca_file(),
        &steps,
    )?;
    // Once the Prosody user's subscription feeds the node, REST publishes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.subscriber_count(&node).await? < 1 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the Prosody user never subscribed: {}\n{}",
            server.output_tail(),
            prosody.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.publish(&node, &json!({"id": "r1", "payload": {"hello": "prosody"}}))
        .await?
        .expect(201)?;
    // The user receives that item, then creates a node and publishes into it. Its report
    // (every step, with errors) and both servers' logs are in any failure below.
    let (ok, report) = client.finish(Duration::from_secs(120)).await?;
    ensure!(
        ok,
        "slixmpp via Prosody failed: {report}\njuxta: {}\nProsody: {}",
        server.output_tail(),
        prosody.log()
    );
    ensure!(
        api.get_node(&own).await?.status == 200,
        "the Prosody user's node {own} exists in juxta: {report}"
    );
    // A WebSocket subscriber from offset 0 gets what the user published.
    let mut ws = juxta_tests::WsClient::connect(&server.ws_url(), server.admin_key()).await?;
    ws.subscribed(&own, Some(0), None).await?;
    let event = ws.next_event().await?;
    ensure!(
        event["item"]["id"] == "p1"
            && event["item"]["publisher"] == jid.as_str()
            && event["item"]["xml"]
                .as_str()
                .is_some_and(|x| x.contains("from prosody")),
        "{event}"
    );
    let steps = report["steps"].as_array().context("steps")?;
    ensure!(
        steps[0]["items"].to_string().contains(COMPONENT),
        "Prosody lists juxta's service: {report}"
    );
    ensure!(
        steps[1]["identities"].to_string().contains("pubsub")
            && steps[1]["features"]
                .to_string()
                .contains("http://jabber.org/protocol/pubsub#subscribe"),
        "{report}"
    );
    let event = &steps[3]["events"][0];
    ensure!(
        event["id"] == "r1"
            && event["from"] == COMPONENT
            && event["payload"]
                .as_str()
                .is_some_and(|p| p.contains("urn:xmpp:json:0") && p.contains("prosody")),
        "the REST item reaches the Prosody user: {report}"
    );
    Ok(())
}
