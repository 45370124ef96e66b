//! The XEP-0060 use cases: entity (§5), subscriber (§6), publisher (§7) and owner (§8).

use std::collections::VecDeque;
use std::sync::Arc;

use juxta_core::{
    Affiliation, Error, ItemId, NodeConfig, NodeName, NodeSubscription, Origin, Publish,
    PublishModel, SendLastPublished, SubscriptionState, time,
};

use super::{
    FEATURES, Inner, MAX_ITEMS_PER_REQUEST, NodeState, Reply, form, from_core, invalid_jid,
    node_attr, node_not_found, payload, principal, published, pubsub_error, pubsub_reply,
    random_subid, unsupported,
};
use crate::element::Element;
use crate::jid::Jid;
use crate::link::Link;
use crate::ns;
use crate::stanza::{
    DefinedCondition, ErrorType, Iq, Message, MessageType, Presence, PresenceType, StanzaError,
};

fn item_required() -> StanzaError {
    pubsub_error(
        ErrorType::Modify,
        DefinedCondition::BadRequest,
        Some("item-required"),
    )
}

fn invalid_payload(text: &str) -> StanzaError {
    pubsub_error(
        ErrorType::Modify,
        DefinedCondition::BadRequest,
        Some("invalid-payload"),
    )
    .with_text(text)
}

fn subscription_element(node: &str, s: &NodeSubscription, element_ns: &str) -> Element {
    Element::builder("subscription", element_ns)
        .attr("node", node)
        .attr("jid", &*s.jid)
        .attr("subid", &*s.subid)
        .attr("subscription", s.state.as_str())
        .build()
}

fn item_element(id: &ItemId, publisher: &str, payload: Option<Element>) -> Element {
    let mut el = Element::builder("item", ns::PUBSUB)
        .attr("id", id.as_str())
        .attr("publisher", publisher)
        .build();
    if let Some(p) = payload {
        el.append_child(p);
    }
    el
}

impl Inner {
    // ----- §5 entity use cases -----

    pub(super) async fn disco_info(self: &Arc<Self>, node: Option<&str>) -> Reply {
        let mut query = Element::new("query", ns::DISCO_INFO);
        let feature = |var: &str| {
            Element::builder("feature", ns::DISCO_INFO)
                .attr("var", var)
                .build()
        };
        match node {
            None => {
                query.append_child(
                    Element::builder("identity", ns::DISCO_INFO)
                        .attr("category", "pubsub")
                        .attr("type", "service")
                        .attr("name", "juxta publish-subscribe")
                        .build(),
                );
                for var in [ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PUBSUB, ns::PING] {
                    query.append_child(feature(var));
                }
                for f in FEATURES {
                    query.append_child(feature(&format!("{}#{f}", ns::PUBSUB)));
                }
            }
            Some(node) => {
                query.set_attr("node", node);
                let name = NodeName::new(node).map_err(|_| node_not_found())?;
                let (meta, state) = self.node(&name).await?;
                query.append_child(
                    Element::builder("identity", ns::DISCO_INFO)
                        .attr("category", "pubsub")
                        .attr("type", "leaf")
                        .build(),
                );
                for var in [ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PUBSUB] {
                    query.append_child(feature(var));
                }
                let owners: Vec<String> = state
                    .members
                    .read()
                    .owners()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                query.append_child(form::meta_data(
                    &meta.config,
                    &owners,
                    self.bus.limits().max_payload_bytes,
                ));
            }
        }
        Ok(Some(query))
    }

    pub(super) async fn disco_items(self: &Arc<Self>, from: &Jid, node: Option<&str>) -> Reply {
        let mut query = Element::new("query", ns::DISCO_ITEMS);
        let service = self.config.jid.to_string();
        match node {
            None => {
                let nodes = self.bus.store().nodes().await.map_err(|e| from_core(&e))?;
                for meta in nodes {
                    let mut item = Element::builder("item", ns::DISCO_ITEMS)
                        .attr("jid", &service)
                        .attr("node", meta.name.as_str())
                        .build();
                    if let Some(t) = &meta.config.title {
                        item.set_attr("name", t);
                    }
                    query.append_child(item);
                }
            }
            Some(node) => {
                query.set_attr("node", node);
                let name = NodeName::new(node).map_err(|_| node_not_found())?;
                let (meta, state) = self.node(&name).await?;
                let bare = from.bare().to_string();
                self.retrieve_allowed(&meta.config, &state, &bare)?;
                for (_, item) in self.newest(&name, MAX_ITEMS_PER_REQUEST).await? {
                    query.append_child(
                        Element::builder("item", ns::DISCO_ITEMS)
                            .attr("jid", &service)
                            .attr("name", item.id.as_str())
                            .build(),
                    );
                }
            }
        }
        Ok(Some(query))
    }

    /// The newest `n` current items, oldest first.
    async fn newest(
        &self,
        node: &NodeName,
        n: usize,
    ) -> Result<Vec<(u64, juxta_core::Item)>, StanzaError> {
        let store = self.bus.store();
        let mut kept: VecDeque<(u64, juxta_core::Item)> = VecDeque::with_capacity(n.min(1024));
        let mut after = 0;
        loop {
            let page = store
                .items(node, after, juxta_core::bus::MAX_PAGE)
                .await
                .map_err(|e| from_core(&e))?;
            let Some(last) = page.items.last().map(|(o, _)| *o) else {
                break;
            };
            after = last;
            for entry in page.items {
                if kept.len() == n {
                    kept.pop_front();
                }
                kept.push_back(entry);
            }
        }
        Ok(kept.into())
    }

    /// Retrieval rules (XEP-0060 §6.5.9): like subscribing, except that under `authorize`
    /// the requester must already be subscribed.
    fn retrieve_allowed(
        &self,
        config: &NodeConfig,
        state: &NodeState,
        bare: &str,
    ) -> Result<(), StanzaError> {
        if self.access(config, state, bare)? {
            let members = state.members.read();
            let mut subs = members
                .subscriptions
                .iter()
                .filter(|s| &*s.jid == bare || s.jid.split('/').next() == Some(bare));
            let first = subs.clone().next().map(|s| s.state);
            if subs.any(|s| s.state == SubscriptionState::Subscribed) {
                return Ok(());
            }
            return Err(match first {
                Some(SubscriptionState::Pending) => pubsub_error(
                    ErrorType::Auth,
                    DefinedCondition::NotAuthorized,
                    Some("pending-subscription"),
                ),
                _ => pubsub_error(
                    ErrorType::Auth,
                    DefinedCondition::NotAuthorized,
                    Some("not-subscribed"),
                ),
            });
        }
        Ok(())
    }

    // ----- the pubsub namespace -----

    pub(super) async fn pubsub(
        self: &Arc<Self>,
        from: &Jid,
        get: bool,
        set: bool,
        payload: &Element,
        link: &Link,
    ) -> Reply {
        let mut children = payload.children();
        let Some(first) = children.next() else {
            return Err(StanzaError::bad_request());
        };
        let second = children.next();
        match (first.name(), get, set) {
            ("create", _, true) => self.create(from, first, second).await,
            ("subscribe", _, true) => self.subscribe(from, first, link).await,
            ("unsubscribe", _, true) => self.unsubscribe(from, first).await,
            ("publish", _, true) => self.publish(from, first, second).await,
            ("retract", _, true) => self.retract(from, first).await,
            ("items", true, _) => self.items(from, first).await,
            ("subscriptions", true, _) => self.my_subscriptions(from, first).await,
            ("affiliations", true, _) => self.my_affiliations(from, first).await,
            ("options", _, _) => Err(unsupported("subscription-options")),
            ("default", true, _) => Err(unsupported("subscription-options")),
            _ => Err(StanzaError::feature_not_implemented()),
        }
    }

    fn may_create(&self, bare: &Jid) -> bool {
        let b = bare.to_string();
        match self.config.create {
            super::CreatePolicy::Local => {
                self.is_admin(&b) || self.config.local_domains.iter().any(|d| d == bare.domain())
            }
            super::CreatePolicy::Admins => self.is_admin(&b),
        }
    }

    /// §8.1: create a node, possibly instant (no name given) and configured in one go.
    async fn create(
        self: &Arc<Self>,
        from: &Jid,
        create: &Element,
        configure: Option<&Element>,
    ) -> Reply {
        let bare = from.bare();
        if !self.may_create(&bare) {
            return Err(StanzaError::forbidden());
        }
        let mut config = NodeConfig::default();
        if let Some(c) = configure {
            if !c.is("configure", ns::PUBSUB) {
                return Err(StanzaError::bad_request());
            }
            if let Some(x) = c.get_child("x", ns::DATA_FORMS) {
                let submitted = form::Submitted::parse(x).ok_or_else(StanzaError::bad_request)?;
                form::apply(&submitted, &mut config)
                    .map_err(|e| StanzaError::not_acceptable().with_text(e))?;
            }
        }
        let (name, instant) = match create.attr("node") {
            Some(n) => (
                NodeName::new(n)
                    .map_err(|e| StanzaError::not_acceptable().with_text(e.to_string()))?,
                false,
            ),
            None => (
                NodeName::new(&ItemId::generate().as_str().to_ascii_lowercase())
                    .map_err(|e| from_core(&e))?,
                true,
            ),
        };
        let store = self.bus.store();
        if store
            .node(&name)
            .await
            .map_err(|e| from_core(&e))?
            .is_some()
        {
            return Err(StanzaError::conflict());
        }
        let who = principal(&bare.to_string());
        self.bus
            .put_node(&who, name.clone(), config)
            .await
            .map_err(|e| from_core(&e))?;
        store
            .set_affiliation(&name, &bare.to_string(), Some(Affiliation::Owner))
            .await
            .map_err(|e| from_core(&e))?;
        let meta = self.meta(&name).await?;
        // Whatever was cached under this name belongs to an older incarnation.
        self.state(&meta).await.map_err(|e| from_core(&e))?;
        if instant {
            pubsub_reply(
                Element::builder("create", ns::PUBSUB)
                    .attr("node", name.as_str())
                    .build(),
            )
        } else {
            Ok(None)
        }
    }

    /// §6.1: subscribe.
    async fn subscribe(self: &Arc<Self>, from: &Jid, el: &Element, link: &Link) -> Reply {
        let name = node_attr(el)?;
        let jid: Jid = el
            .attr("jid")
            .ok_or_else(invalid_jid)?
            .parse()
            .map_err(|_| invalid_jid())?;
        if jid.bare() != from.bare() {
            return Err(invalid_jid());
        }
        let (meta, state) = self.node(&name).await?;
        let bare = from.bare().to_string();
        let jid_text: Arc<str> = jid.to_string().into();
        let existing = state.members.read().of(&jid_text).next().cloned();
        let sub = match existing {
            Some(s) => s,
            None => {
                if self.affiliation(&state, &bare) == Some(Affiliation::PublishOnly) {
                    return Err(StanzaError::forbidden());
                }
                let pending = self.access(&meta.config, &state, &bare)?;
                let sub = NodeSubscription {
                    jid: jid_text.clone(),
                    subid: random_subid(),
                    state: if pending {
                        SubscriptionState::Pending
                    } else {
                        SubscriptionState::Subscribed
                    },
                    created_at: time::now_ms(),
                };
                self.save_subscription(&state, sub.clone()).await?;
                if pending {
                    self.ask_owners(&state, &sub, link);
                }
                sub
            }
        };
        if sub.state == SubscriptionState::Subscribed
            && meta.config.send_last_published_item != SendLastPublished::Never
        {
            // After the reply: the caller writes the reply first, and this task queues the
            // item behind it on the same link.
            let (inner, state, to) = (self.clone(), state.clone(), jid.clone());
            let link = link.clone();
            tokio::spawn(async move { inner.send_last(&state, &to, Some(&link)).await });
        }
        pubsub_reply(subscription_element(name.as_str(), &sub, ns::PUBSUB))
    }

    async fn save_subscription(
        self: &Arc<Self>,
        state: &Arc<NodeState>,
        sub: NodeSubscription,
    ) -> Result<(), StanzaError> {
        self.bus
            .store()
            .put_subscription(&state.name, sub.clone())
            .await
            .map_err(|e| from_core(&e))?;
        {
            let mut m = state.members.write();
            m.subscriptions
                .retain(|s| !(s.jid == sub.jid && s.subid == sub.subid));
            m.subscriptions.push(sub);
            m.rebuild();
        }
        let any = !state.members.read().recipients.is_empty();
        if any {
            self.ensure_feeder(state).await;
        }
        Ok(())
    }

    async fn remove_subscription(
        &self,
        state: &NodeState,
        jid: &str,
        subid: &str,
    ) -> Result<(), StanzaError> {
        self.bus
            .store()
            .delete_subscription(&state.name, jid, subid)
            .await
            .map_err(|e| from_core(&e))?;
        {
            let mut m = state.members.write();
            m.subscriptions
                .retain(|s| !(&*s.jid == jid && &*s.subid == subid));
            m.rebuild();
        }
        self.stop_feeder_if_idle(state);
        Ok(())
    }

    /// §8.6: asks each owner to approve a pending subscription with a data form.
    fn ask_owners(&self, state: &NodeState, sub: &NodeSubscription, link: &Link) {
        let form = form::authorization_request(state.name.as_str(), &sub.jid, &sub.subid);
        let owners = state.members.read().owners();
        for owner in owners {
            let Ok(to) = owner.parse::<Jid>() else {
                continue;
            };
            let message = Element::builder("message", ns::JABBER_CLIENT)
                .attr("from", self.config.jid.to_string())
                .attr("id", random_subid().to_string())
                .append(form.clone())
                .build();
            let hint = (to.domain() != self.config.c2s_domain).then_some(link);
            self.send_to(&to, message, hint);
        }
    }

    /// Sends the node's newest item to `to`, as a notification (§6.1.7).
    async fn send_last(&self, state: &NodeState, to: &Jid, link: Option<&Link>) {
        let Ok(Some(meta)) = self.bus.store().node(&state.name).await else {
            return;
        };
        let Ok(mut newest) = self.newest(&state.name, 1).await else {
            return;
        };
        let Some((offset, item)) = newest.pop() else {
            return;
        };
        let mut el = Element::builder("item", ns::PUBSUB_EVENT)
            .attr("id", item.id.as_str())
            .attr("publisher", &*item.publisher)
            .build();
        if meta.config.deliver_payloads
            && let Some(p) = payload::to_element(&item.payload)
        {
            el.append_child(p);
        }
        let content = Element::builder("items", ns::PUBSUB_EVENT)
            .attr("node", state.name.as_str())
            .append(el)
            .build();
        let mut message = self.notification(format!("{}-{offset}", meta.epoch), content);
        message.append_child(
            Element::builder("delay", ns::DELAY)
                .attr("stamp", time::rfc3339(item.published_at))
                .build(),
        );
        let hint = link.filter(|_| to.domain() != self.config.c2s_domain);
        self.send_to(to, message, hint);
    }

    /// On a local session's first available presence: the last item of every node it
    /// subscribes to with `on_sub_and_presence`.
    pub(super) async fn send_last_on_presence(self: &Arc<Self>, jid: &Jid) {
        let bare = jid.bare().to_string();
        let full = jid.to_string();
        let states: Vec<Arc<NodeState>> = self
            .nodes
            .lock()
            .values()
            .filter(|s| {
                s.config.read().0.send_last_published_item == SendLastPublished::OnSubAndPresence
                    && s.members
                        .read()
                        .recipients
                        .iter()
                        .any(|r| **r == *bare || **r == *full)
            })
            .cloned()
            .collect();
        for state in states {
            self.send_last(&state, jid, None).await;
        }
    }

    /// §6.2: unsubscribe.
    async fn unsubscribe(self: &Arc<Self>, from: &Jid, el: &Element) -> Reply {
        let name = node_attr(el)?;
        let jid: Jid = el
            .attr("jid")
            .ok_or_else(invalid_jid)?
            .parse()
            .map_err(|_| invalid_jid())?;
        let (_, state) = self.node(&name).await?;
        let bare = from.bare().to_string();
        if jid.bare() != from.bare() && self.affiliation(&state, &bare) != Some(Affiliation::Owner)
        {
            return Err(StanzaError::forbidden());
        }
        let jid_text = jid.to_string();
        let subs: Vec<NodeSubscription> = state.members.read().of(&jid_text).cloned().collect();
        let target = match (el.attr("subid"), subs.as_slice()) {
            (_, []) => {
                return Err(pubsub_error(
                    ErrorType::Cancel,
                    DefinedCondition::UnexpectedRequest,
                    Some("not-subscribed"),
                ));
            }
            (Some(id), subs) => subs.iter().find(|s| &*s.subid == id).ok_or_else(|| {
                pubsub_error(
                    ErrorType::Modify,
                    DefinedCondition::NotAcceptable,
                    Some("invalid-subid"),
                )
            })?,
            (None, [one]) => one,
            (None, _) => {
                return Err(pubsub_error(
                    ErrorType::Modify,
                    DefinedCondition::BadRequest,
                    Some("subid-required"),
                ));
            }
        };
        self.remove_subscription(&state, &target.jid, &target.subid)
            .await?;
        Ok(None)
    }

    /// §7.1: publish, with optional publish-options preconditions.
    async fn publish(
        self: &Arc<Self>,
        from: &Jid,
        el: &Element,
        options: Option<&Element>,
    ) -> Reply {
        let publish = self.prepare_publish(from, el, options).await?;
        let appended = self
            .bus
            .publish(&principal(&from.bare().to_string()), publish, Origin::Xmpp)
            .await
            .map_err(|e| from_core(&e))?;
        published(&appended)
    }

    /// Several publish requests from one sender, in order, as one commit: the answers are
    /// sent in order, as if each had been handled alone. A stream whose client pipelines
    /// publishes gets one store commit per batch instead of one per item, so a slow commit
    /// does not make every request behind it wait its own turn.
    pub(super) async fn publish_batch(
        self: &Arc<Self>,
        from: &Jid,
        requests: Vec<(Iq, Publish)>,
        link: &Link,
    ) {
        let (iqs, publishes): (Vec<Iq>, Vec<Publish>) = requests.into_iter().unzip();
        let results = self
            .bus
            .publish_batch(
                &principal(&from.bare().to_string()),
                publishes,
                Origin::Xmpp,
            )
            .await;
        for (iq, result) in iqs.into_iter().zip(results) {
            let reply = result
                .map_err(|e| from_core(&e))
                .and_then(|appended| published(&appended));
            self.answer(&iq, reply, link);
        }
    }

    /// Checks a publish request and makes the bus publish it stands for.
    pub(super) async fn prepare_publish(
        self: &Arc<Self>,
        from: &Jid,
        el: &Element,
        options: Option<&Element>,
    ) -> Result<Publish, StanzaError> {
        let name = node_attr(el)?;
        let mut items = el.children().filter(|c| c.is("item", ns::PUBSUB));
        let Some(item) = items.next() else {
            return Err(item_required());
        };
        if items.next().is_some() {
            return Err(invalid_payload("one item per publish"));
        }
        let mut payloads = item.children();
        let Some(body) = payloads.next() else {
            return Err(pubsub_error(
                ErrorType::Modify,
                DefinedCondition::BadRequest,
                Some("payload-required"),
            ));
        };
        if payloads.next().is_some() {
            return Err(invalid_payload(
                "an item carries exactly one payload element",
            ));
        }
        let (meta, state) = self.node(&name).await?;
        let bare = from.bare().to_string();
        let allowed = match self.affiliation(&state, &bare) {
            Some(Affiliation::Outcast) => false,
            Some(Affiliation::Owner | Affiliation::Publisher | Affiliation::PublishOnly) => true,
            _ => match meta.config.publish_model {
                PublishModel::Open => true,
                PublishModel::Subscribers => {
                    let m = state.members.read();
                    m.subscriptions.iter().any(|s| {
                        s.state == SubscriptionState::Subscribed
                            && s.jid.split('/').next() == Some(bare.as_str())
                    })
                }
                PublishModel::Publishers => false,
            },
        };
        if !allowed {
            return Err(StanzaError::forbidden());
        }
        if let Some(opts) = options {
            if !opts.is("publish-options", ns::PUBSUB) {
                return Err(StanzaError::bad_request());
            }
            if let Some(x) = opts.get_child("x", ns::DATA_FORMS) {
                let submitted = form::Submitted::parse(x).ok_or_else(StanzaError::bad_request)?;
                if submitted
                    .form_type
                    .as_deref()
                    .is_some_and(|t| t != form::PUBLISH_OPTIONS)
                {
                    return Err(
                        StanzaError::bad_request().with_text("FORM_TYPE must be publish-options")
                    );
                }
                if let Some(var) = form::precondition_failure(
                    &submitted,
                    &meta.config,
                    self.bus.limits().max_payload_bytes,
                ) {
                    return Err(pubsub_error(
                        ErrorType::Cancel,
                        DefinedCondition::Conflict,
                        Some("precondition-not-met"),
                    )
                    .with_text(format!("{var} does not match the node's configuration")));
                }
            }
        }
        let id = match item.attr("id") {
            Some(id) => Some(ItemId::new(id).map_err(|e| from_core(&e))?),
            None => None,
        };
        let payload = payload::from_element(body).map_err(|e| invalid_payload(&e))?;
        Ok(Publish {
            node: name,
            id,
            payload,
            idempotency_key: None,
        })
    }

    /// §7.2: retract.
    async fn retract(self: &Arc<Self>, from: &Jid, el: &Element) -> Reply {
        let name = node_attr(el)?;
        let id = el
            .get_child("item", ns::PUBSUB)
            .and_then(|i| i.attr("id"))
            .ok_or_else(item_required)?;
        let id = ItemId::new(id).map_err(|_| StanzaError::item_not_found())?;
        let (meta, state) = self.node(&name).await?;
        if !meta.config.persist {
            return Err(unsupported("persistent-items"));
        }
        let bare = from.bare().to_string();
        match self.affiliation(&state, &bare) {
            Some(Affiliation::Owner | Affiliation::Publisher) => {}
            Some(Affiliation::PublishOnly) => {
                let own = self
                    .bus
                    .store()
                    .item(&name, &id)
                    .await
                    .map_err(|e| from_core(&e))?
                    .is_some_and(|(_, item)| *item.publisher == *bare);
                if !own {
                    return Err(StanzaError::forbidden());
                }
            }
            _ => return Err(StanzaError::forbidden()),
        }
        self.bus
            .retract(&principal(&bare), &name, id, Origin::Xmpp)
            .await
            .map_err(|e| from_core(&e))?;
        Ok(None)
    }

    /// §6.5: retrieve items — all (newest [`MAX_ITEMS_PER_REQUEST`]), the newest
    /// `max_items`, or by id.
    async fn items(self: &Arc<Self>, from: &Jid, el: &Element) -> Reply {
        let name = node_attr(el)?;
        let (meta, state) = self.node(&name).await?;
        let bare = from.bare().to_string();
        self.retrieve_allowed(&meta.config, &state, &bare)?;
        if !meta.config.persist {
            return Err(unsupported("persistent-items"));
        }
        let mut out = Element::builder("items", ns::PUBSUB)
            .attr("node", name.as_str())
            .build();
        let ids: Vec<&str> = el
            .children()
            .filter(|c| c.is("item", ns::PUBSUB))
            .filter_map(|c| c.attr("id"))
            .collect();
        let with_payload = |item: &juxta_core::Item| payload::to_element(&item.payload);
        if ids.is_empty() {
            let n = match el.attr("max_items") {
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        StanzaError::bad_request().with_text("max_items must be a positive integer")
                    })?
                    .min(MAX_ITEMS_PER_REQUEST),
                None => MAX_ITEMS_PER_REQUEST,
            };
            for (_, item) in self.newest(&name, n).await? {
                out.append_child(item_element(&item.id, &item.publisher, with_payload(&item)));
            }
        } else {
            let mut found = 0;
            for id in ids {
                let Ok(id) = ItemId::new(id) else { continue };
                if let Some((_, item)) = self
                    .bus
                    .store()
                    .item(&name, &id)
                    .await
                    .map_err(|e| from_core(&e))?
                {
                    found += 1;
                    out.append_child(item_element(&item.id, &item.publisher, with_payload(&item)));
                }
            }
            if found == 0 {
                return Err(StanzaError::item_not_found());
            }
        }
        pubsub_reply(out)
    }

    /// Loads every node's state (for requests across nodes).
    async fn all_states(self: &Arc<Self>) -> Result<Vec<Arc<NodeState>>, StanzaError> {
        let metas = self.bus.store().nodes().await.map_err(|e| from_core(&e))?;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            out.push(self.state(&meta).await.map_err(|e| from_core(&e))?);
        }
        Ok(out)
    }

    async fn some_states(
        self: &Arc<Self>,
        el: &Element,
    ) -> Result<Vec<Arc<NodeState>>, StanzaError> {
        match el.attr("node") {
            Some(_) => Ok(vec![self.node(&node_attr(el)?).await?.1]),
            None => self.all_states().await,
        }
    }

    /// §5.6: the requester's subscriptions, on one node or all.
    async fn my_subscriptions(self: &Arc<Self>, from: &Jid, el: &Element) -> Reply {
        let bare = from.bare().to_string();
        let mut out = Element::new("subscriptions", ns::PUBSUB);
        if let Some(n) = el.attr("node") {
            out.set_attr("node", n);
        }
        for state in self.some_states(el).await? {
            let m = state.members.read();
            for s in m
                .subscriptions
                .iter()
                .filter(|s| s.jid.split('/').next() == Some(bare.as_str()))
            {
                out.append_child(subscription_element(state.name.as_str(), s, ns::PUBSUB));
            }
        }
        pubsub_reply(out)
    }

    /// §5.7: the requester's affiliations, on one node or all.
    async fn my_affiliations(self: &Arc<Self>, from: &Jid, el: &Element) -> Reply {
        let bare = from.bare().to_string();
        let mut out = Element::new("affiliations", ns::PUBSUB);
        if let Some(n) = el.attr("node") {
            out.set_attr("node", n);
        }
        for state in self.some_states(el).await? {
            if let Some(a) = self.affiliation(&state, &bare) {
                out.append_child(
                    Element::builder("affiliation", ns::PUBSUB)
                        .attr("node", state.name.as_str())
                        .attr("affiliation", a.as_str())
                        .build(),
                );
            }
        }
        pubsub_reply(out)
    }

    // ----- §8 owner use cases -----

    pub(super) async fn owner(
        self: &Arc<Self>,
        from: &Jid,
        get: bool,
        set: bool,
        payload: &Element,
    ) -> Reply {
        let Some(el) = payload.children().next() else {
            return Err(StanzaError::bad_request());
        };
        let bare = from.bare().to_string();
        let owner_reply = |child: Element| -> Reply {
            Ok(Some(
                Element::builder("pubsub", ns::PUBSUB_OWNER)
                    .append(child)
                    .build(),
            ))
        };
        if el.name() == "default" && get {
            let mut d = Element::new("default", ns::PUBSUB_OWNER);
            d.append_child(form::config_form(
                &NodeConfig::default(),
                self.bus.limits().max_payload_bytes,
            ));
            return owner_reply(d);
        }
        let name = node_attr(el)?;
        let (meta, state) = self.node(&name).await?;
        self.require_owner(&state, &bare)?;
        let who = principal(&bare);
        match (el.name(), get, set) {
            ("configure", true, _) => {
                let mut c = Element::builder("configure", ns::PUBSUB_OWNER)
                    .attr("node", name.as_str())
                    .build();
                c.append_child(form::config_form(
                    &meta.config,
                    self.bus.limits().max_payload_bytes,
                ));
                owner_reply(c)
            }
            ("configure", _, true) => {
                let x = el
                    .get_child("x", ns::DATA_FORMS)
                    .ok_or_else(StanzaError::bad_request)?;
                if x.attr("type") == Some("cancel") {
                    return Ok(None);
                }
                let submitted = form::Submitted::parse(x).ok_or_else(StanzaError::bad_request)?;
                let mut config = meta.config.clone();
                form::apply(&submitted, &mut config)
                    .map_err(|e| StanzaError::not_acceptable().with_text(e))?;
                self.bus
                    .put_node(&who, name.clone(), config.clone())
                    .await
                    .map_err(|e| from_core(&e))?;
                *state.config.write() = (config, std::time::Instant::now());
                Ok(None)
            }
            ("delete", _, true) => {
                self.bus
                    .delete_node(&who, &name, Origin::Xmpp)
                    .await
                    .map_err(|e| from_core(&e))?;
                Ok(None)
            }
            ("purge", _, true) => {
                if !meta.config.persist {
                    return Err(unsupported("persistent-items"));
                }
                self.bus
                    .purge(&who, &name, Origin::Xmpp)
                    .await
                    .map_err(|e| from_core(&e))?;
                Ok(None)
            }
            ("subscriptions", true, _) => {
                let mut out = Element::builder("subscriptions", ns::PUBSUB_OWNER)
                    .attr("node", name.as_str())
                    .build();
                for s in &state.members.read().subscriptions {
                    let mut e = subscription_element(name.as_str(), s, ns::PUBSUB_OWNER);
                    e.remove_attr("node");
                    out.append_child(e);
                }
                owner_reply(out)
            }
            ("subscriptions", _, true) => self.set_subscriptions(&state, el).await,
            ("affiliations", true, _) => {
                let mut out = Element::builder("affiliations", ns::PUBSUB_OWNER)
                    .attr("node", name.as_str())
                    .build();
                let mut list: Vec<(Arc<str>, Affiliation)> = state
                    .members
                    .read()
                    .affiliations
                    .iter()
                    .map(|(j, a)| (j.clone(), *a))
                    .collect();
                list.sort_by(|a, b| a.0.cmp(&b.0));
                for (jid, a) in list {
                    out.append_child(
                        Element::builder("affiliation", ns::PUBSUB_OWNER)
                            .attr("jid", &*jid)
                            .attr("affiliation", a.as_str())
                            .build(),
                    );
                }
                owner_reply(out)
            }
            ("affiliations", _, true) => self.set_affiliations(&state, &bare, el).await,
            _ => Err(StanzaError::feature_not_implemented()),
        }
    }

    /// §8.8.2: an owner changes subscriptions; all entries are checked before any applies.
    async fn set_subscriptions(self: &Arc<Self>, state: &Arc<NodeState>, el: &Element) -> Reply {
        let mut changes = Vec::new();
        for e in el
            .children()
            .filter(|c| c.is("subscription", ns::PUBSUB_OWNER))
        {
            let jid: Jid = e
                .attr("jid")
                .and_then(|j| j.parse().ok())
                .ok_or_else(|| StanzaError::not_acceptable().with_text("bad jid"))?;
            let to = match e.attr("subscription") {
                Some("none") => None,
                Some("subscribed") => Some(SubscriptionState::Subscribed),
                Some("pending") => Some(SubscriptionState::Pending),
                _ => return Err(StanzaError::not_acceptable().with_text("bad subscription state")),
            };
            changes.push((jid, e.attr("subid").map(str::to_owned), to));
        }
        for (jid, subid, to) in changes {
            let text = jid.to_string();
            let current: Vec<NodeSubscription> = state
                .members
                .read()
                .of(&text)
                .filter(|s| subid.as_deref().is_none_or(|id| &*s.subid == id))
                .cloned()
                .collect();
            match to {
                None => {
                    for s in &current {
                        self.remove_subscription(state, &s.jid, &s.subid).await?;
                    }
                    if !current.is_empty() {
                        self.tell_subscriber(state, &jid, "none", None);
                    }
                }
                Some(new_state) => {
                    let base = current.into_iter().next();
                    let was = base.as_ref().map(|s| s.state);
                    let sub = NodeSubscription {
                        jid: text.into(),
                        subid: base.as_ref().map_or_else(random_subid, |s| s.subid.clone()),
                        state: new_state,
                        created_at: base.map_or_else(time::now_ms, |s| s.created_at),
                    };
                    let subid = sub.subid.clone();
                    self.save_subscription(state, sub).await?;
                    if was != Some(new_state) {
                        self.tell_subscriber(state, &jid, new_state.as_str(), Some(&subid));
                    }
                }
            }
        }
        Ok(None)
    }

    /// §8.9.2: an owner changes affiliations. An owner cannot leave the node without one.
    async fn set_affiliations(
        self: &Arc<Self>,
        state: &Arc<NodeState>,
        requester: &str,
        el: &Element,
    ) -> Reply {
        let mut changes = Vec::new();
        for e in el
            .children()
            .filter(|c| c.is("affiliation", ns::PUBSUB_OWNER))
        {
            let jid: Jid = e
                .attr("jid")
                .and_then(|j| j.parse().ok())
                .ok_or_else(|| StanzaError::not_acceptable().with_text("bad jid"))?;
            let aff =
                match e.attr("affiliation") {
                    Some("none") => None,
                    Some(a) => Some(Affiliation::parse(a).ok_or_else(|| {
                        StanzaError::not_acceptable().with_text("bad affiliation")
                    })?),
                    None => return Err(StanzaError::not_acceptable().with_text("no affiliation")),
                };
            changes.push((jid.bare().to_string(), aff));
        }
        let mut after = state.members.read().affiliations.clone();
        for (jid, aff) in &changes {
            match aff {
                Some(a) => after.insert(jid.as_str().into(), *a),
                None => after.remove(jid.as_str()),
            };
        }
        if !after.values().any(|a| *a == Affiliation::Owner) && !self.is_admin(requester) {
            return Err(StanzaError::not_acceptable().with_text("a node needs an owner"));
        }
        for (jid, aff) in changes {
            self.bus
                .store()
                .set_affiliation(&state.name, &jid, aff)
                .await
                .map_err(|e| from_core(&e))?;
            let mut m = state.members.write();
            match aff {
                Some(a) => m.affiliations.insert(jid.as_str().into(), a),
                None => m.affiliations.remove(jid.as_str()),
            };
        }
        Ok(None)
    }

    /// Tells a subscriber its subscription changed (§8.8.4, subscription-notifications).
    fn tell_subscriber(&self, state: &NodeState, jid: &Jid, what: &str, subid: Option<&str>) {
        let mut sub = Element::builder("subscription", ns::PUBSUB_EVENT)
            .attr("node", state.name.as_str())
            .attr("jid", jid.to_string())
            .attr("subscription", what)
            .build();
        if let Some(id) = subid {
            sub.set_attr("subid", id);
        }
        let message = Element::builder("message", ns::JABBER_CLIENT)
            .attr("from", self.config.jid.to_string())
            .append(Element::builder("event", ns::PUBSUB_EVENT).append(sub))
            .build();
        self.send_to(jid, message, None);
    }

    // ----- messages and presence -----

    /// A message to the service: an owner's answer to a subscription authorization
    /// request (§8.6); anything else is ignored.
    pub(super) async fn message(self: &Arc<Self>, m: Message) {
        if m.kind == MessageType::Error {
            return;
        }
        let Some(from) = m.from.as_ref() else { return };
        let Some(form) = m
            .payloads
            .iter()
            .find(|p| p.is("x", ns::DATA_FORMS))
            .and_then(form::Submitted::parse)
        else {
            return;
        };
        if form.form_type.as_deref() != Some(form::SUBSCRIBE_AUTHORIZATION) {
            return;
        }
        let (Some(node), Some(subscriber), Some(allow)) = (
            form.get("pubsub#node"),
            form.get("pubsub#subscriber_jid"),
            form::allows(&form),
        ) else {
            return;
        };
        let Ok(name) = NodeName::new(node) else {
            return;
        };
        let Ok((_, state)) = self.node(&name).await else {
            return;
        };
        if self
            .require_owner(&state, &from.bare().to_string())
            .is_err()
        {
            return;
        }
        let Ok(jid) = subscriber.parse::<Jid>() else {
            return;
        };
        let text = jid.to_string();
        let pending: Vec<NodeSubscription> = state
            .members
            .read()
            .of(&text)
            .filter(|s| s.state == SubscriptionState::Pending)
            .filter(|s| form.get("pubsub#subid").is_none_or(|id| *s.subid == *id))
            .cloned()
            .collect();
        for mut s in pending {
            let result = if allow {
                s.state = SubscriptionState::Subscribed;
                let subid = s.subid.clone();
                self.save_subscription(&state, s)
                    .await
                    .map(|()| ("subscribed", Some(subid)))
            } else {
                self.remove_subscription(&state, &s.jid, &s.subid)
                    .await
                    .map(|()| ("none", None))
            };
            if let Ok((what, subid)) = result {
                self.tell_subscriber(&state, &jid, what, subid.as_deref());
            }
        }
    }

    /// Presence sent to the service itself (e.g. by a remote user through the component):
    /// an available presence counts like a local session's first one.
    pub(super) async fn directed_presence(self: &Arc<Self>, p: &Presence, _link: &Link) {
        if p.kind == PresenceType::Available
            && let Some(from) = &p.from
        {
            self.send_last_on_presence(from).await;
        }
    }
}

impl From<Error> for StanzaError {
    fn from(e: Error) -> Self {
        from_core(&e)
    }
}
