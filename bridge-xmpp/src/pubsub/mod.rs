//! XEP-0060: Publish-Subscribe — the service at `pubsub.<domain>`, mapped onto the core
//! [`Bus`].
//!
//! # How it works
//!
//! - **Requests**: a stream driver (c2s or component) hands every stanza addressed to the
//!   service to [`PubSub`] through [`StanzaHandler::handle`]. An iq is parsed into one of the
//!   entity, subscriber, publisher or owner use cases (XEP-0060 §§5–8), checked against the
//!   requester's affiliation and the node's access and publish models, carried out on the
//!   bus and the store, and answered on the same link. Every refusal is the stanza error
//!   XEP-0060 names, with its `pubsub#errors` child.
//! - **State**: affiliations and subscriptions live in the store (they outlive sessions);
//!   each node's are cached here once read, with the recipient list precomputed.
//! - **Notifications**: a node with at least one XMPP subscription has a *feeder*: one
//!   bus subscription whose events become one notification each, serialized once
//!   ([`SharedStanza`]) and queued, addressed, on the link of every recipient — local
//!   sessions through the [`Router`], remote addresses through the component link. A
//!   recipient whose queue is full is counted and its stream closed by its driver; the
//!   feeder never waits for a slow client.
//! - **Payloads**: JSON as XEP-0335 `<json/>`, XML as itself (see `payload`).

#![allow(
    clippy::result_large_err,
    reason = "a StanzaError is built on the cold path of a refused request, once, and moved \
              into the reply; boxing it would only add an allocation"
)]

mod form;
mod payload;
mod requests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use juxta_core::fanout::Delivery;
use juxta_core::{
    AccessModel, Affiliation, Bus, Change, Error, Event, Grants, NodeConfig, NodeMeta, NodeName,
    NodeSubscription, Principal, Resume, SubscriptionState,
};
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::element::Element;
use crate::jid::Jid;
use crate::link::{HandlerFuture, Link, Outbound, StanzaHandler};
use crate::metrics::{KindLabels, Metrics};
use crate::ns;
use crate::router::{Reach, Router};
use crate::stanza::{DefinedCondition, ErrorType, Iq, IqType, Stanza, StanzaError};
use crate::writer::{SharedStanza, WriteContext};

/// Most items one items request returns (the newest ones); XEP-0060 §6.5.7 lets a service
/// truncate.
pub const MAX_ITEMS_PER_REQUEST: usize = 1000;

/// How long a feeder trusts its copy of a node's configuration.
const CONFIG_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Who may create nodes over XMPP (`xmpp.pubsub.create`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CreatePolicy {
    /// Any account of a local domain; the creator becomes the owner (as ejabberd does).
    #[default]
    Local,
    /// Only the configured admins.
    Admins,
}

/// How the service is set up.
#[derive(Clone, Debug)]
pub struct PubSubConfig {
    /// The service's address, `pubsub.<domain>`.
    pub jid: Jid,
    /// The domains whose accounts count as local for [`CreatePolicy::Local`]: the c2s
    /// domain, and the domain of the server a component attaches to.
    pub local_domains: Vec<String>,
    /// The c2s domain: addresses there are reached through the [`Router`], others through
    /// the component link.
    pub c2s_domain: String,
    /// Who may create nodes.
    pub create: CreatePolicy,
    /// Bare JIDs that own every node.
    pub admins: Vec<String>,
}

/// The XEP-0060 features implemented, as disco#info lists them (§10: exactly these).
const FEATURES: &[&str] = &[
    "access-authorize",
    "access-open",
    "access-presence",
    "access-whitelist",
    "config-node",
    "create-and-configure",
    "create-nodes",
    "delete-items",
    "delete-nodes",
    "instant-nodes",
    "item-ids",
    "last-published",
    "manage-subscriptions",
    "member-affiliation",
    "meta-data",
    "modify-affiliations",
    "outcast-affiliation",
    "persistent-items",
    "presence-notifications",
    "publish",
    "publish-only-affiliation",
    "publish-options",
    "publisher-affiliation",
    "purge-nodes",
    "retract-items",
    "retrieve-affiliations",
    "retrieve-default",
    "retrieve-items",
    "retrieve-subscriptions",
    "subscribe",
    "subscription-notifications",
];

/// A node's XMPP memberships, as cached.
#[derive(Debug, Default)]
struct Members {
    affiliations: HashMap<Arc<str>, Affiliation>,
    subscriptions: Vec<NodeSubscription>,
    /// The distinct JIDs with a `subscribed` subscription, rebuilt on every change so that
    /// a notification takes one reference count instead of a lock held while fanning out.
    recipients: Arc<Vec<Arc<str>>>,
}

impl Members {
    fn rebuild(&mut self) {
        let mut r: Vec<Arc<str>> = self
            .subscriptions
            .iter()
            .filter(|s| s.state == SubscriptionState::Subscribed)
            .map(|s| s.jid.clone())
            .collect();
        r.sort();
        r.dedup();
        self.recipients = Arc::new(r);
    }

    fn of(&self, jid: &str) -> impl Iterator<Item = &NodeSubscription> {
        self.subscriptions.iter().filter(move |s| &*s.jid == jid)
    }

    fn owners(&self) -> Vec<Arc<str>> {
        let mut o: Vec<Arc<str>> = self
            .affiliations
            .iter()
            .filter(|(_, a)| **a == Affiliation::Owner)
            .map(|(j, _)| j.clone())
            .collect();
        o.sort();
        o
    }
}

/// One node's cached state.
#[derive(Debug)]
struct NodeState {
    name: NodeName,
    /// Identifies the node's incarnation: a node deleted and created again is another.
    created_at: u64,
    members: RwLock<Members>,
    /// The configuration and when it was read.
    config: RwLock<(NodeConfig, Instant)>,
    /// Cancels the feeder, when one runs.
    feeder: Mutex<Option<CancellationToken>>,
}

/// The pubsub service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PubSub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PubSubConfig,
    bus: Bus,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    nodes: Mutex<HashMap<NodeName, Arc<NodeState>>>,
    remote: RwLock<Option<Link>>,
    shutdown: CancellationToken,
}

/// A XEP-0060 error: `condition` of `kind`, with the `pubsub#errors` child `app`.
fn pubsub_error(kind: ErrorType, condition: DefinedCondition, app: Option<&str>) -> StanzaError {
    let e = StanzaError::new(kind, condition);
    match app {
        Some(app) => e.with_app(Element::new(app, ns::PUBSUB_ERRORS)),
        None => e,
    }
}

fn unsupported(feature: &str) -> StanzaError {
    StanzaError::new(ErrorType::Cancel, DefinedCondition::FeatureNotImplemented).with_app(
        Element::builder("unsupported", ns::PUBSUB_ERRORS)
            .attr("feature", feature)
            .build(),
    )
}

fn nodeid_required() -> StanzaError {
    pubsub_error(
        ErrorType::Modify,
        DefinedCondition::BadRequest,
        Some("nodeid-required"),
    )
}

fn invalid_jid() -> StanzaError {
    pubsub_error(
        ErrorType::Modify,
        DefinedCondition::BadRequest,
        Some("invalid-jid"),
    )
}

fn node_not_found() -> StanzaError {
    StanzaError::item_not_found()
}

/// The stanza error for a core error.
fn from_core(e: &Error) -> StanzaError {
    match e {
        Error::NodeNotFound(_) | Error::ItemNotFound(_) => StanzaError::item_not_found(),
        Error::PayloadTooLarge { .. } => pubsub_error(
            ErrorType::Modify,
            DefinedCondition::NotAcceptable,
            Some("payload-too-big"),
        )
        .with_text(e.to_string()),
        Error::InvalidPayload(_) => pubsub_error(
            ErrorType::Modify,
            DefinedCondition::BadRequest,
            Some("invalid-payload"),
        )
        .with_text(e.to_string()),
        Error::InvalidConfig(_) => StanzaError::not_acceptable().with_text(e.to_string()),
        Error::InvalidNodeName(_) | Error::InvalidItemId(_) => {
            StanzaError::bad_request().with_text(e.to_string())
        }
        Error::Forbidden(_) => StanzaError::forbidden(),
        _ => {
            tracing::warn!(error = %e, "pubsub: request failed");
            StanzaError::internal_server_error()
        }
    }
}

type Reply = Result<Option<Element>, StanzaError>;

fn pubsub_reply(child: Element) -> Reply {
    Ok(Some(
        Element::builder("pubsub", ns::PUBSUB).append(child).build(),
    ))
}

/// The answer to a publish: the node and the item id (assigned by the service when the
/// request had none).
fn published(appended: &juxta_core::Appended) -> Reply {
    let id = appended
        .item_id
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_default();
    pubsub_reply(
        Element::builder("publish", ns::PUBSUB)
            .attr("node", appended.node.as_str())
            .append(Element::builder("item", ns::PUBSUB).attr("id", id))
            .build(),
    )
}

/// The `<publish/>` and optional `<publish-options/>` of a publish request.
fn publish_request(iq: &Iq) -> Option<(&Element, Option<&Element>)> {
    if iq.kind != IqType::Set {
        return None;
    }
    let pubsub = iq.payload.as_ref().filter(|p| p.is("pubsub", ns::PUBSUB))?;
    let mut children = pubsub.children();
    let first = children.next().filter(|c| c.name() == "publish")?;
    Some((first, children.next()))
}

fn node_attr(el: &Element) -> Result<NodeName, StanzaError> {
    let name = el.attr("node").ok_or_else(nodeid_required)?;
    NodeName::new(name).map_err(|_| node_not_found())
}

/// The requester as the bus sees it: the service has already applied XEP-0060's rules, so
/// the bus is asked on behalf of a principal allowed everything, named by the bare JID
/// (which becomes the items' publisher).
fn principal(bare: &str) -> Principal {
    Principal::Subject {
        name: bare.into(),
        grants: Arc::new(Grants {
            admin: true,
            ..Grants::default()
        }),
    }
}

fn random_subid() -> Arc<str> {
    format!("{:016x}", rand::random::<u64>()).into()
}

impl PubSub {
    /// The service over `bus`, reaching local sessions through `router`.
    pub fn new(config: PubSubConfig, bus: Bus, router: Arc<Router>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                bus,
                router,
                metrics,
                nodes: Mutex::new(HashMap::new()),
                remote: RwLock::new(None),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The service's address.
    pub fn jid(&self) -> &Jid {
        &self.inner.config.jid
    }

    /// The session registry.
    pub fn router(&self) -> &Arc<Router> {
        &self.inner.router
    }

    /// Loads every node with XMPP subscriptions and starts its feeder, so that
    /// subscriptions made before a restart get notifications again.
    pub async fn start(&self) -> Result<(), Error> {
        for meta in self.inner.bus.store().nodes().await? {
            let state = self.inner.state(&meta).await?;
            if !state.members.read().recipients.is_empty() {
                self.inner.ensure_feeder(&state).await;
            }
        }
        Ok(())
    }

    /// Re-reads every node's affiliations and subscriptions from the store and starts or
    /// stops feeders to match: with a store shared by several instances, the others change
    /// them too, and a subscriber may be connected to any instance.
    pub async fn refresh(&self) -> Result<(), Error> {
        for meta in self.inner.bus.store().nodes().await? {
            self.refresh_node(&meta).await?;
        }
        Ok(())
    }

    /// [`PubSub::refresh`] for the nodes named (those a shared store's change log lists).
    pub async fn refresh_nodes(&self, nodes: &[NodeName]) -> Result<(), Error> {
        for name in nodes {
            // A deleted node's feeder ends with its `deleted` event.
            if let Some(meta) = self.inner.bus.store().node(name).await? {
                self.refresh_node(&meta).await?;
            }
        }
        Ok(())
    }

    async fn refresh_node(&self, meta: &NodeMeta) -> Result<(), Error> {
        let store = self.inner.bus.store();
        let state = self.inner.state(meta).await?;
        let affiliations = store.affiliations(&meta.name).await?;
        let subscriptions = store.subscriptions(&meta.name).await?;
        let any = {
            let mut m = state.members.write();
            m.affiliations = affiliations.into_iter().collect();
            m.subscriptions = subscriptions;
            m.rebuild();
            !m.recipients.is_empty()
        };
        if any {
            self.inner.ensure_feeder(&state).await;
        } else {
            self.inner.stop_feeder_if_idle(&state);
        }
        Ok(())
    }

    /// Stops every feeder.
    pub fn stop(&self) {
        self.inner.shutdown.cancel();
    }

    /// Handles one stanza from `link` and waits until it is answered.
    pub async fn handle_stanza(&self, stanza: Stanza, link: &Link) {
        match stanza {
            Stanza::Iq(iq) => self.inner.iq(iq, link).await,
            Stanza::Message(m) => self.inner.message(m).await,
            Stanza::Presence(p) => self.inner.directed_presence(&p, link).await,
        }
    }

    /// A local session's availability changed (a presence broadcast); when it became
    /// available, nodes configured `on_sub_and_presence` send it their last item.
    pub async fn presence_changed(&self, jid: &Jid, became_available: bool) {
        if became_available {
            self.inner.send_last_on_presence(jid).await;
        }
    }
}

impl StanzaHandler for PubSub {
    fn handle<'a>(&'a self, stanza: Stanza, link: &'a Link) -> HandlerFuture<'a> {
        Box::pin(self.handle_stanza(stanza, link))
    }

    fn handle_batch<'a>(&'a self, stanzas: Vec<Stanza>, link: &'a Link) -> HandlerFuture<'a> {
        Box::pin(self.inner.batch(stanzas, link))
    }

    fn attached(&self, link: Link) {
        *self.inner.remote.write() = Some(link);
    }

    fn detached(&self, link: &Link) {
        let mut remote = self.inner.remote.write();
        if remote.as_ref().is_some_and(|l| l.same(link)) {
            *remote = None;
        }
    }

    fn presence_changed<'a>(&'a self, jid: &'a Jid, became_available: bool) -> HandlerFuture<'a> {
        Box::pin(PubSub::presence_changed(self, jid, became_available))
    }
}

impl Inner {
    fn count_out(&self, kind: &'static str, n: u64) {
        self.metrics
            .stanzas_out
            .get_or_create(&KindLabels { kind })
            .inc_by(n);
    }

    /// Sends `stanza` (built in `jabber:client`) to `to` by the route its domain takes.
    fn send_to(&self, to: &Jid, stanza: Element, link_hint: Option<&Link>) {
        if to.domain() == self.config.c2s_domain {
            let mut sent = 0;
            self.router
                .for_each(&to.to_string(), Reach::Bound, |link, full| {
                    let mut copy = stanza.clone();
                    copy.set_attr("to", &**full);
                    sent += u64::from(link.send_element(&copy));
                });
            self.count_out(stanza.name_static(), sent);
        } else if let Some(link) = link_hint.cloned().or_else(|| self.remote.read().clone()) {
            let mut copy = stanza;
            copy.set_attr("to", to.to_string());
            if link.send_element(&copy) {
                self.count_out(copy.name_static(), 1);
            }
        }
    }

    async fn iq(self: &Arc<Self>, iq: Iq, link: &Link) {
        if !matches!(iq.kind, IqType::Get | IqType::Set) {
            return;
        }
        let Some(from) = iq.from.clone() else {
            return;
        };
        let reply = match &iq.payload {
            Some(payload) => self.request(&from, iq.kind, payload, link).await,
            None => Err(StanzaError::bad_request()),
        };
        self.answer(&iq, reply, link);
    }

    /// Sends the result or error answering `iq`.
    fn answer(&self, iq: &Iq, reply: Reply, link: &Link) {
        let answer = match reply {
            Ok(payload) => {
                let mut r = iq.result();
                r.payload = payload;
                r
            }
            Err(e) => iq.error_reply(e),
        };
        if link.send_element(&answer.into()) {
            self.count_out("iq", 1);
        }
    }

    /// Stanzas one stream received together, handled in order; runs of publish requests
    /// from the same sender become one commit ([`Inner::publish_batch`]).
    async fn batch(self: &Arc<Self>, stanzas: Vec<Stanza>, link: &Link) {
        let mut run: Vec<(Iq, juxta_core::Publish)> = Vec::new();
        let mut run_from: Option<Jid> = None;
        for stanza in stanzas {
            if let Stanza::Iq(iq) = &stanza
                && let Some(from) = &iq.from
                && let Some((publish, options)) = publish_request(iq)
            {
                if run_from.as_ref().is_some_and(|f| f != from) {
                    self.flush(&mut run, &mut run_from, link).await;
                }
                match self.prepare_publish(from, publish, options).await {
                    Ok(p) => {
                        run_from = Some(from.clone());
                        let Stanza::Iq(iq) = stanza else {
                            unreachable!("matched above")
                        };
                        run.push((iq, p));
                    }
                    Err(e) => {
                        // Answers go out in request order.
                        self.flush(&mut run, &mut run_from, link).await;
                        self.answer(iq, Err(e), link);
                    }
                }
                continue;
            }
            self.flush(&mut run, &mut run_from, link).await;
            match stanza {
                Stanza::Iq(iq) => self.iq(iq, link).await,
                Stanza::Message(m) => self.message(m).await,
                Stanza::Presence(p) => self.directed_presence(&p, link).await,
            }
        }
        self.flush(&mut run, &mut run_from, link).await;
    }

    async fn flush(
        self: &Arc<Self>,
        run: &mut Vec<(Iq, juxta_core::Publish)>,
        run_from: &mut Option<Jid>,
        link: &Link,
    ) {
        if let Some(from) = run_from.take()
            && !run.is_empty()
        {
            self.publish_batch(&from, std::mem::take(run), link).await;
        }
    }

    async fn request(
        self: &Arc<Self>,
        from: &Jid,
        kind: IqType,
        payload: &Element,
        link: &Link,
    ) -> Reply {
        let get = kind == IqType::Get;
        let set = kind == IqType::Set;
        match (payload.name(), payload.ns()) {
            ("query", ns::DISCO_INFO) if get => self.disco_info(payload.attr("node")).await,
            ("query", ns::DISCO_ITEMS) if get => self.disco_items(from, payload.attr("node")).await,
            ("ping", ns::PING) if get => Ok(None),
            ("pubsub", ns::PUBSUB) => self.pubsub(from, get, set, payload, link).await,
            ("pubsub", ns::PUBSUB_OWNER) => self.owner(from, get, set, payload).await,
            _ => Err(StanzaError::service_unavailable()),
        }
    }

    // ----- state -----

    /// The cached state of `meta`'s node, loaded from the store on first use or when the
    /// node was re-created since.
    async fn state(self: &Arc<Self>, meta: &NodeMeta) -> Result<Arc<NodeState>, Error> {
        if let Some(s) = self.nodes.lock().get(&meta.name)
            && s.created_at == meta.created_at
        {
            *s.config.write() = (meta.config.clone(), Instant::now());
            return Ok(s.clone());
        }
        let store = self.bus.store();
        let affiliations = store.affiliations(&meta.name).await?;
        let subscriptions = store.subscriptions(&meta.name).await?;
        let mut members = Members {
            affiliations: affiliations.into_iter().collect(),
            subscriptions,
            recipients: Arc::default(),
        };
        members.rebuild();
        let fresh = Arc::new(NodeState {
            name: meta.name.clone(),
            created_at: meta.created_at,
            members: RwLock::new(members),
            config: RwLock::new((meta.config.clone(), Instant::now())),
            feeder: Mutex::new(None),
        });
        let mut nodes = self.nodes.lock();
        match nodes.get(&meta.name) {
            Some(s) if s.created_at == meta.created_at => Ok(s.clone()),
            old => {
                if let Some(old) = old
                    && let Some(t) = old.feeder.lock().take()
                {
                    t.cancel();
                }
                nodes.insert(meta.name.clone(), fresh.clone());
                Ok(fresh)
            }
        }
    }

    async fn meta(&self, node: &NodeName) -> Result<NodeMeta, StanzaError> {
        match self.bus.store().node(node).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(node_not_found()),
            Err(e) => Err(from_core(&e)),
        }
    }

    async fn node(
        self: &Arc<Self>,
        node: &NodeName,
    ) -> Result<(NodeMeta, Arc<NodeState>), StanzaError> {
        let meta = self.meta(node).await?;
        let state = self.state(&meta).await.map_err(|e| from_core(&e))?;
        Ok((meta, state))
    }

    fn is_admin(&self, bare: &str) -> bool {
        self.config.admins.iter().any(|a| a == bare)
    }

    /// `bare`'s affiliation with the node; admins own every node.
    fn affiliation(&self, state: &NodeState, bare: &str) -> Option<Affiliation> {
        if self.is_admin(bare) {
            return Some(Affiliation::Owner);
        }
        state.members.read().affiliations.get(bare).copied()
    }

    fn require_owner(&self, state: &NodeState, bare: &str) -> Result<(), StanzaError> {
        match self.affiliation(state, bare) {
            Some(Affiliation::Owner) => Ok(()),
            _ => Err(StanzaError::forbidden()),
        }
    }

    /// XEP-0060 §6.1.3 and §6.5.9: may `bare` subscribe to or retrieve items of the node?
    /// `Ok(true)` means only with an owner's approval (access model `authorize`).
    fn access(
        &self,
        config: &NodeConfig,
        state: &NodeState,
        bare: &str,
    ) -> Result<bool, StanzaError> {
        match self.affiliation(state, bare) {
            Some(Affiliation::Outcast) => return Err(StanzaError::forbidden()),
            Some(Affiliation::Owner | Affiliation::Publisher | Affiliation::Member) => {
                return Ok(false);
            }
            Some(Affiliation::PublishOnly) | None => {}
        }
        match config.access_model {
            AccessModel::Open => Ok(false),
            AccessModel::Authorize => Ok(true),
            // There is no roster here: only affiliated entities pass.
            AccessModel::Presence => Err(pubsub_error(
                ErrorType::Auth,
                DefinedCondition::NotAuthorized,
                Some("presence-subscription-required"),
            )),
            AccessModel::Whitelist => Err(pubsub_error(
                ErrorType::Cancel,
                DefinedCondition::NotAllowed,
                Some("closed-node"),
            )),
        }
    }

    // ----- feeders and notifications -----

    /// Starts the node's feeder unless one runs. Returns once its bus subscription is
    /// open, so that an event published after a subscribe's reply is never missed.
    async fn ensure_feeder(self: &Arc<Self>, state: &Arc<NodeState>) {
        if state.feeder.lock().is_some() {
            return;
        }
        let sub = match self
            .bus
            .subscribe(&Principal::Admin, &state.name, Resume::default())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node = %state.name, error = %e, "pubsub: cannot start the feeder");
                return;
            }
        };
        let token = {
            let mut feeder = state.feeder.lock();
            if feeder.is_some() {
                return;
            }
            let token = self.shutdown.child_token();
            *feeder = Some(token.clone());
            token
        };
        let (inner, state) = (self.clone(), state.clone());
        tokio::spawn(async move { inner.feed(state, token, sub).await });
    }

    fn stop_feeder_if_idle(&self, state: &NodeState) {
        if state.members.read().recipients.is_empty()
            && let Some(t) = state.feeder.lock().take()
        {
            t.cancel();
        }
    }

    async fn feed(
        self: Arc<Self>,
        state: Arc<NodeState>,
        token: CancellationToken,
        first: juxta_core::Subscription,
    ) {
        let admin = Principal::Admin;
        let mut next_sub = Some(first);
        let mut resume = Resume::default();
        loop {
            let sub = match next_sub.take() {
                Some(s) => Ok(s),
                None => self.bus.subscribe(&admin, &state.name, resume).await,
            };
            let mut sub = match sub {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(node = %state.name, error = %e, "pubsub feeder stops");
                    return;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = token.cancelled() => return,
                    n = sub.next() => n,
                };
                match next {
                    Some(Ok(Delivery::Event(event))) => {
                        let deleted = matches!(event.change, Change::Deleted);
                        // Deletion takes the stored configuration with it: the cached one
                        // applies.
                        if !deleted {
                            self.fresh_config(&state).await;
                        }
                        self.notify(&state, &event);
                        if deleted {
                            self.forget(&state);
                            return;
                        }
                    }
                    Some(Ok(Delivery::Lost { from, to })) => {
                        tracing::warn!(node = %state.name, from, to, "pubsub feeder lost events");
                    }
                    Some(Err(e)) => {
                        tracing::warn!(node = %state.name, error = %e, "pubsub feeder resubscribes");
                        resume = Resume {
                            after: Some(sub.position()),
                            epoch: Some(sub.epoch()),
                        };
                        break;
                    }
                    None => {
                        self.forget(&state);
                        return;
                    }
                }
            }
        }
    }

    fn forget(&self, state: &Arc<NodeState>) {
        let mut nodes = self.nodes.lock();
        if nodes
            .get(&state.name)
            .is_some_and(|s| Arc::ptr_eq(s, state))
        {
            nodes.remove(&state.name);
        }
        if let Some(t) = state.feeder.lock().take() {
            t.cancel();
        }
    }

    /// The `<event/>` content of a notification, or `None` if the node's configuration
    /// says not to notify this kind of event.
    fn event_payload(config: &NodeConfig, event: &Event) -> Option<Element> {
        let node = event.node.as_str();
        Some(match &event.change {
            Change::Published(item) => {
                let mut el = Element::builder("item", ns::PUBSUB_EVENT)
                    .attr("id", item.id.as_str())
                    .attr("publisher", &*item.publisher)
                    .build();
                if config.deliver_payloads
                    && let Some(p) = payload::to_element(&item.payload)
                {
                    el.append_child(p);
                }
                Element::builder("items", ns::PUBSUB_EVENT)
                    .attr("node", node)
                    .append(el)
                    .build()
            }
            Change::Retracted(id) if config.notify_retract => {
                Element::builder("items", ns::PUBSUB_EVENT)
                    .attr("node", node)
                    .append(
                        Element::builder("retract", ns::PUBSUB_EVENT)
                            .attr("id", id.as_str())
                            .build(),
                    )
                    .build()
            }
            Change::Retracted(_) => return None,
            Change::Purged => Element::builder("purge", ns::PUBSUB_EVENT)
                .attr("node", node)
                .build(),
            Change::Deleted if config.notify_delete => Element::builder("delete", ns::PUBSUB_EVENT)
                .attr("node", node)
                .build(),
            Change::Deleted => return None,
        })
    }

    fn notification(&self, id: String, content: Element) -> Element {
        Element::builder("message", ns::JABBER_CLIENT)
            .attr("from", self.config.jid.to_string())
            .attr("type", "headline")
            .attr("id", id)
            .append(Element::builder("event", ns::PUBSUB_EVENT).append(content))
            .build()
    }

    /// Fans one event out to the node's subscribers.
    fn notify(&self, state: &NodeState, event: &Event) {
        let started = Instant::now();
        let config = state.config.read().0.clone();
        let Some(content) = Self::event_payload(&config, event) else {
            return;
        };
        let recipients = state.members.read().recipients.clone();
        if recipients.is_empty() {
            return;
        }
        let message = self.notification(format!("{}-{}", event.epoch, event.offset), content);
        let local = Arc::new(SharedStanza::new(
            &message,
            WriteContext::stream(ns::JABBER_CLIENT),
        ));
        let reach = if config.presence_based_delivery {
            Reach::Available
        } else {
            Reach::Bound
        };
        let remote_link = self.remote.read().clone();
        let mut remote: Option<Arc<SharedStanza>> = None;
        let (mut sent, mut refused) = (0u64, 0u64);
        let c2s_domain = self.config.c2s_domain.as_str();
        for to in recipients.iter() {
            let domain = to
                .split_once('/')
                .map_or(&**to, |(bare, _)| bare)
                .rsplit_once('@')
                .map_or_else(|| to.split('/').next().unwrap_or(""), |(_, d)| d);
            if domain == c2s_domain {
                let (ok, full) = self.router.deliver(to, &local, reach);
                sent += ok as u64;
                refused += full as u64;
            } else if let Some(link) = &remote_link {
                let shared = remote.get_or_insert_with(|| {
                    let mut m = message.clone();
                    m.rename_ns(ns::JABBER_CLIENT, link.content_ns());
                    Arc::new(SharedStanza::new(
                        &m,
                        WriteContext::stream(link.content_ns()),
                    ))
                });
                if link.send(Outbound::Shared {
                    stanza: shared.clone(),
                    to: to.clone(),
                }) {
                    sent += 1;
                } else {
                    refused += 1;
                }
            }
        }
        self.count_out("message", sent);
        self.metrics.notifications.inc_by(sent);
        self.metrics.notifications_refused.inc_by(refused);
        self.metrics
            .notification_fanout_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// The node's configuration for notifications: cached, and read again from the store
    /// when older than [`CONFIG_TTL`], so that a change made over REST applies within it.
    async fn fresh_config(&self, state: &NodeState) -> Option<NodeConfig> {
        {
            let c = state.config.read();
            if c.1.elapsed() < CONFIG_TTL {
                return Some(c.0.clone());
            }
        }
        match self.bus.store().node(&state.name).await {
            Ok(Some(meta)) => {
                *state.config.write() = (meta.config.clone(), Instant::now());
                Some(meta.config)
            }
            _ => None,
        }
    }
}

trait StaticName {
    fn name_static(&self) -> &'static str;
}

impl StaticName for Element {
    fn name_static(&self) -> &'static str {
        match self.name() {
            "iq" => "iq",
            "presence" => "presence",
            _ => "message",
        }
    }
}
