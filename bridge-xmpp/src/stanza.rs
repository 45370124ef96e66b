//! RFC 6120 §8: stanzas (iq, message, presence) and stanza errors
//!
//! Typed views of the three stanza kinds, converted from an [`Element`] with `TryFrom`
//! (which refuses elements that are not a valid stanza of that kind with a
//! [`StanzaParseError`]) and back with `From` (into [`ns::JABBER_CLIENT`]) or `into_element`
//! (into another content namespace, e.g. [`ns::JABBER_COMPONENT_ACCEPT`]).
//!
//! Both `jabber:client` and `jabber:component:accept` stanzas are accepted; children in the
//! stanza's own namespace (`<error/>`, `<show/>`, …) are recognized in either. Attributes other
//! than `id`, `type`, `from`, `to` and `xml:lang` are dropped, as is whitespace between the
//! children of a stanza.

use std::fmt;
use std::str::FromStr;

use crate::element::Element;
use crate::jid::{Jid, JidError};
use crate::ns;

/// Why an element is not a valid stanza. A session answers it with
/// [`StanzaParseError::to_stanza_error`] (`bad-request`, or `jid-malformed` for an address).
///
/// Messages describe the problem without quoting the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StanzaParseError {
    /// The element is not the expected stanza (wrong name or namespace).
    #[error("not the expected stanza ({expected}) in a stanza namespace")]
    WrongElement {
        /// The element that was expected, e.g. `"iq"`.
        expected: &'static str,
    },
    /// A required attribute is missing (e.g. the `id` of an iq, RFC 6120 §8.2.3).
    #[error("the '{attr}' attribute is missing")]
    MissingAttribute {
        /// The attribute's name.
        attr: &'static str,
    },
    /// An attribute has a value outside the ones the RFC allows (e.g. an unknown `type`).
    #[error("the '{attr}' attribute has an invalid value")]
    InvalidAttribute {
        /// The attribute's name.
        attr: &'static str,
    },
    /// The `from` or `to` attribute (or an error's `by`) is not a valid JID.
    #[error("the '{attr}' attribute is not a valid JID: {source}")]
    InvalidJid {
        /// The attribute's name.
        attr: &'static str,
        /// What is wrong with the address.
        source: JidError,
    },
    /// An iq of type get or set without exactly one child, or a result with more than one
    /// (RFC 6120 §8.2.3).
    #[error("an iq of type '{kind}' has {found} child elements")]
    IqChildren {
        /// The iq's type.
        kind: IqType,
        /// How many child elements it has.
        found: usize,
    },
    /// Any other violation of RFC 6120 §8 or RFC 6121, described.
    #[error("{0}")]
    Invalid(&'static str),
}

impl StanzaParseError {
    /// The stanza error to answer with: `jid-malformed` for a bad address, `bad-request`
    /// otherwise, with this error's message as text.
    pub fn to_stanza_error(&self) -> StanzaError {
        let error = match self {
            Self::InvalidJid { .. } => StanzaError::jid_malformed(),
            _ => StanzaError::bad_request(),
        };
        error.with_text(self.to_string())
    }
}

/// Whether `ns` is a content namespace of stanzas.
fn is_stanza_ns(ns: &str) -> bool {
    ns == ns::JABBER_CLIENT || ns == ns::JABBER_COMPONENT_ACCEPT
}

/// Checks name and namespace of a stanza.
fn expect_stanza(element: &Element, name: &'static str) -> Result<(), StanzaParseError> {
    if element.name() == name && is_stanza_ns(element.ns()) {
        Ok(())
    } else {
        Err(StanzaParseError::WrongElement { expected: name })
    }
}

fn jid_attr(element: &Element, attr: &'static str) -> Result<Option<Jid>, StanzaParseError> {
    element
        .attr(attr)
        .map(|value| {
            value
                .parse()
                .map_err(|source| StanzaParseError::InvalidJid { attr, source })
        })
        .transpose()
}

fn type_attr<T: FromStr>(element: &Element) -> Result<Option<T>, StanzaParseError> {
    element
        .attr("type")
        .map(|value| {
            value
                .parse()
                .map_err(|_| StanzaParseError::InvalidAttribute { attr: "type" })
        })
        .transpose()
}

/// The attributes every stanza has, written in a fixed order.
fn stanza_element(
    name: &str,
    content_ns: &str,
    id: Option<&str>,
    kind: Option<&str>,
    from: Option<&Jid>,
    to: Option<&Jid>,
    lang: Option<&str>,
) -> Element {
    let mut element = Element::new(name, content_ns);
    if let Some(id) = id {
        element.set_attr("id", id);
    }
    if let Some(kind) = kind {
        element.set_attr("type", kind);
    }
    if let Some(from) = from {
        element.set_attr("from", from.to_string());
    }
    if let Some(to) = to {
        element.set_attr("to", to.to_string());
    }
    if let Some(lang) = lang {
        element.set_attr_ns("lang", ns::XML, lang);
    }
    element
}

/// Declares an enum of attribute values with `as_str`, `Display` and `FromStr`.
macro_rules! attr_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $value:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// The attribute value or element name, as on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $value,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($value => Ok(Self::$variant),)*
                    _ => Err(UnknownValue),
                }
            }
        }
    };
}

/// A string that is not one of the values of an attribute enum ([`IqType`], …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown value")]
pub struct UnknownValue;

attr_enum! {
    /// The `type` of an iq (RFC 6120 §8.2.3).
    IqType {
        /// A request for information.
        Get => "get",
        /// A request to change something.
        Set => "set",
        /// A successful answer.
        Result => "result",
        /// A failed answer.
        Error => "error",
    }
}

attr_enum! {
    /// The `type` of a message (RFC 6121 §5.2.2).
    #[derive(Default)]
    MessageType {
        /// A standalone message (the default when `type` is absent).
        #[default]
        Normal => "normal",
        /// One-to-one chat.
        Chat => "chat",
        /// Multi-user chat.
        Groupchat => "groupchat",
        /// An alert or notification that expects no reply (e.g. pubsub events).
        Headline => "headline",
        /// An error about a message sent earlier.
        Error => "error",
    }
}

attr_enum! {
    /// The `type` of a presence (RFC 6121 §4.7.1); absent means available.
    #[derive(Default)]
    PresenceType {
        /// Available (no `type` attribute on the wire).
        #[default]
        Available => "available",
        /// No longer available.
        Unavailable => "unavailable",
        /// A request to subscribe to the recipient's presence.
        Subscribe => "subscribe",
        /// The sender allows the recipient's subscription.
        Subscribed => "subscribed",
        /// A request to unsubscribe.
        Unsubscribe => "unsubscribe",
        /// The sender cancels the recipient's subscription.
        Unsubscribed => "unsubscribed",
        /// A request for the current presence, sent by servers.
        Probe => "probe",
        /// An error about a presence sent earlier.
        Error => "error",
    }
}

attr_enum! {
    /// The `<show/>` of an available presence (RFC 6121 §4.7.2.1).
    Show {
        /// Temporarily away.
        Away => "away",
        /// Interested in chatting.
        Chat => "chat",
        /// Do not disturb.
        Dnd => "dnd",
        /// Extended away.
        Xa => "xa",
    }
}

attr_enum! {
    /// The `type` of a stanza error (RFC 6120 §8.3.2).
    ErrorType {
        /// Retry after providing credentials.
        Auth => "auth",
        /// Do not retry (unrecoverable).
        Cancel => "cancel",
        /// Proceed (the condition was only a warning).
        Continue => "continue",
        /// Retry after changing the data sent.
        Modify => "modify",
        /// Retry after waiting (temporary).
        Wait => "wait",
    }
}

attr_enum! {
    /// A defined stanza error condition (RFC 6120 §8.3.3); [`DefinedCondition::as_str`] is
    /// the name of its element in [`ns::STANZAS`].
    DefinedCondition {
        /// §8.3.3.1: the request is malformed or unexpected.
        BadRequest => "bad-request",
        /// §8.3.3.2: a resource or session with that name already exists.
        Conflict => "conflict",
        /// §8.3.3.3: the feature is not implemented by the recipient.
        FeatureNotImplemented => "feature-not-implemented",
        /// §8.3.3.4: the requester lacks the permissions.
        Forbidden => "forbidden",
        /// §8.3.3.5: the recipient is no longer at this address (may carry a new one).
        Gone => "gone",
        /// §8.3.3.6: a misconfiguration or internal fault.
        InternalServerError => "internal-server-error",
        /// §8.3.3.7: the addressed JID or item does not exist.
        ItemNotFound => "item-not-found",
        /// §8.3.3.8: an address violates RFC 7622.
        JidMalformed => "jid-malformed",
        /// §8.3.3.9: the request does not meet the recipient's criteria.
        NotAcceptable => "not-acceptable",
        /// §8.3.3.10: no entity is allowed to perform the action.
        NotAllowed => "not-allowed",
        /// §8.3.3.11: the sender must authenticate first.
        NotAuthorized => "not-authorized",
        /// §8.3.3.12: a local service policy was violated.
        PolicyViolation => "policy-violation",
        /// §8.3.3.13: the intended recipient is temporarily unavailable.
        RecipientUnavailable => "recipient-unavailable",
        /// §8.3.3.14: the request should go to another address (may carry it).
        Redirect => "redirect",
        /// §8.3.3.15: registration is required first.
        RegistrationRequired => "registration-required",
        /// §8.3.3.16: the remote domain does not exist or cannot be resolved.
        RemoteServerNotFound => "remote-server-not-found",
        /// §8.3.3.17: the remote server could not be reached in time.
        RemoteServerTimeout => "remote-server-timeout",
        /// §8.3.3.18: the server lacks the resources to service the request.
        ResourceConstraint => "resource-constraint",
        /// §8.3.3.19: the recipient does not provide the requested service.
        ServiceUnavailable => "service-unavailable",
        /// §8.3.3.20: a subscription is required first.
        SubscriptionRequired => "subscription-required",
        /// §8.3.3.21: no other condition applies (usually with an application condition).
        UndefinedCondition => "undefined-condition",
        /// §8.3.3.22: the request is valid but not expected now.
        UnexpectedRequest => "unexpected-request",
    }
}

impl DefinedCondition {
    /// The error type RFC 6120 §8.3.3 gives for this condition.
    pub const fn default_type(self) -> ErrorType {
        match self {
            Self::BadRequest
            | Self::JidMalformed
            | Self::NotAcceptable
            | Self::PolicyViolation
            | Self::Redirect => ErrorType::Modify,
            Self::Forbidden
            | Self::NotAuthorized
            | Self::RegistrationRequired
            | Self::SubscriptionRequired => ErrorType::Auth,
            Self::Conflict
            | Self::FeatureNotImplemented
            | Self::Gone
            | Self::InternalServerError
            | Self::ItemNotFound
            | Self::NotAllowed
            | Self::RemoteServerNotFound
            | Self::ServiceUnavailable
            | Self::UndefinedCondition => ErrorType::Cancel,
            Self::RecipientUnavailable
            | Self::RemoteServerTimeout
            | Self::ResourceConstraint
            | Self::UnexpectedRequest => ErrorType::Wait,
        }
    }
}

/// A stanza error (RFC 6120 §8.3): `<error type='…' [by='…']><condition
/// xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>[<text/>][application condition]</error>`.
///
/// The `xml:lang` of `<text/>` is not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StanzaError {
    /// What the sender may do about it.
    pub kind: ErrorType,
    /// The defined condition.
    pub condition: DefinedCondition,
    /// The content of the condition element: the alternate address that `gone` and
    /// `redirect` may carry (RFC 6120 §8.3.3.5, §8.3.3.14).
    pub alternate: Option<String>,
    /// The entity that generated the error (`by`).
    pub by: Option<Jid>,
    /// A human-readable description.
    pub text: Option<String>,
    /// An application-specific condition, e.g. XEP-0060's `<invalid-jid
    /// xmlns='http://jabber.org/protocol/pubsub#errors'/>`.
    pub app_specific: Option<Element>,
}

/// Shorthand constructors, one per condition, with the RFC's default type.
macro_rules! condition_constructors {
    ($($fn_name:ident => $variant:ident,)*) => {
        $(
            #[doc = concat!("A `", stringify!($fn_name), "` error with its default type.")]
            pub fn $fn_name() -> Self {
                Self::from_condition(DefinedCondition::$variant)
            }
        )*
    };
}

impl StanzaError {
    /// An error with `kind` and `condition` and nothing else.
    pub fn new(kind: ErrorType, condition: DefinedCondition) -> Self {
        Self {
            kind,
            condition,
            alternate: None,
            by: None,
            text: None,
            app_specific: None,
        }
    }

    /// An error with `condition` and the type RFC 6120 §8.3.3 gives it.
    pub fn from_condition(condition: DefinedCondition) -> Self {
        Self::new(condition.default_type(), condition)
    }

    condition_constructors! {
        bad_request => BadRequest,
        conflict => Conflict,
        feature_not_implemented => FeatureNotImplemented,
        forbidden => Forbidden,
        internal_server_error => InternalServerError,
        item_not_found => ItemNotFound,
        jid_malformed => JidMalformed,
        not_acceptable => NotAcceptable,
        not_allowed => NotAllowed,
        not_authorized => NotAuthorized,
        policy_violation => PolicyViolation,
        recipient_unavailable => RecipientUnavailable,
        registration_required => RegistrationRequired,
        remote_server_not_found => RemoteServerNotFound,
        remote_server_timeout => RemoteServerTimeout,
        resource_constraint => ResourceConstraint,
        service_unavailable => ServiceUnavailable,
        subscription_required => SubscriptionRequired,
        undefined_condition => UndefinedCondition,
        unexpected_request => UnexpectedRequest,
    }

    /// This error with a human-readable `text`.
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// This error with an application-specific condition element.
    #[must_use]
    pub fn with_app(mut self, app_specific: Element) -> Self {
        self.app_specific = Some(app_specific);
        self
    }

    /// This error as an `<error/>` element in the stanza namespace `content_ns`.
    pub fn into_element(self, content_ns: &str) -> Element {
        let mut error = Element::new("error", content_ns);
        error.set_attr("type", self.kind.as_str());
        if let Some(by) = &self.by {
            error.set_attr("by", by.to_string());
        }
        let mut condition = Element::new(self.condition.as_str(), ns::STANZAS);
        if let Some(alternate) = &self.alternate {
            condition.append_text(alternate);
        }
        error.append_child(condition);
        if let Some(text) = &self.text {
            error
                .append_child(Element::new("text", ns::STANZAS))
                .append_text(text);
        }
        if let Some(app) = self.app_specific {
            error.append_child(app);
        }
        error
    }
}

impl StanzaError {
    /// An error reply to `stanza`, for stanzas that could not be parsed into a typed view
    /// (RFC 6120 §8.3.1): same name, namespace and `id` (if any), `type='error'`, the
    /// original `from` and `to` swapped as given (they are not parsed), and this error as
    /// the only child.
    ///
    /// Do not answer an error stanza with an error (§8.3.1); check its `type` first.
    pub fn reply_to(self, stanza: &Element) -> Element {
        let mut reply = Element::new(stanza.name(), stanza.ns());
        if let Some(id) = stanza.attr("id") {
            reply.set_attr("id", id);
        }
        reply.set_attr("type", "error");
        if let Some(to) = stanza.attr("to") {
            reply.set_attr("from", to);
        }
        if let Some(from) = stanza.attr("from") {
            reply.set_attr("to", from);
        }
        reply.append_child(self.into_element(stanza.ns()));
        reply
    }
}

impl fmt::Display for StanzaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.condition, self.kind)?;
        if let Some(text) = &self.text {
            write!(f, ": {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StanzaError {}

impl From<StanzaError> for Element {
    fn from(error: StanzaError) -> Self {
        error.into_element(ns::JABBER_CLIENT)
    }
}

impl TryFrom<&Element> for StanzaError {
    type Error = StanzaParseError;

    fn try_from(element: &Element) -> Result<Self, Self::Error> {
        expect_stanza(element, "error")?;
        let kind =
            type_attr(element)?.ok_or(StanzaParseError::MissingAttribute { attr: "type" })?;
        let by = jid_attr(element, "by")?;
        let mut condition = None;
        let mut alternate = None;
        let mut text = None;
        let mut app_specific = None;
        for child in element.children() {
            if child.ns() == ns::STANZAS {
                if child.name() == "text" {
                    if text.is_some() {
                        return Err(StanzaParseError::Invalid("a stanza error has two <text/>"));
                    }
                    text = Some(child.text());
                } else {
                    let defined = child
                        .name()
                        .parse::<DefinedCondition>()
                        .map_err(|_| StanzaParseError::Invalid("unknown stanza error condition"))?;
                    if condition.is_some() {
                        return Err(StanzaParseError::Invalid(
                            "a stanza error has two defined conditions",
                        ));
                    }
                    condition = Some(defined);
                    let content = child.text();
                    alternate = (!content.is_empty()).then_some(content);
                }
            } else if app_specific.is_some() {
                return Err(StanzaParseError::Invalid(
                    "a stanza error has two application-specific conditions",
                ));
            } else {
                app_specific = Some(child.clone());
            }
        }
        let condition = condition.ok_or(StanzaParseError::Invalid(
            "a stanza error has no defined condition",
        ))?;
        Ok(Self {
            kind,
            condition,
            alternate,
            by,
            text,
            app_specific,
        })
    }
}

/// Finds the `<error/>` child of an error stanza.
fn error_child(element: &Element) -> Result<StanzaError, StanzaParseError> {
    let child = element
        .children()
        .find(|child| child.is("error", element.ns()))
        .ok_or(StanzaParseError::Invalid(
            "an error stanza has no <error/> child",
        ))?;
    StanzaError::try_from(child)
}

/// An iq stanza (RFC 6120 §8.2.3): a request and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iq {
    /// Matches the answer to the request; required.
    pub id: String,
    /// Request or answer.
    pub kind: IqType,
    /// The sender.
    pub from: Option<Jid>,
    /// The recipient.
    pub to: Option<Jid>,
    /// The `xml:lang` of the stanza.
    pub lang: Option<String>,
    /// The single child of a get or set, the optional child of a result, or the original
    /// request's child that an error may carry.
    pub payload: Option<Element>,
    /// The error of an iq of type error.
    pub error: Option<StanzaError>,
}

impl Iq {
    fn request(kind: IqType, id: impl Into<String>, payload: Element) -> Self {
        Self {
            id: id.into(),
            kind,
            from: None,
            to: None,
            lang: None,
            payload: Some(payload),
            error: None,
        }
    }

    /// An iq of type get with `payload`, not yet addressed.
    pub fn get(id: impl Into<String>, payload: Element) -> Self {
        Self::request(IqType::Get, id, payload)
    }

    /// An iq of type set with `payload`, not yet addressed.
    pub fn set(id: impl Into<String>, payload: Element) -> Self {
        Self::request(IqType::Set, id, payload)
    }

    /// An empty result answering this iq: same id, `from` and `to` swapped. Set
    /// [`Iq::payload`] to return data.
    pub fn result(&self) -> Self {
        Self {
            id: self.id.clone(),
            kind: IqType::Result,
            from: self.to.clone(),
            to: self.from.clone(),
            lang: None,
            payload: None,
            error: None,
        }
    }

    /// An error answering this iq: same id, `from` and `to` swapped.
    pub fn error_reply(&self, error: StanzaError) -> Self {
        Self {
            kind: IqType::Error,
            error: Some(error),
            ..self.result()
        }
    }

    /// This iq as an element in the stanza namespace `content_ns`.
    pub fn into_element(self, content_ns: &str) -> Element {
        let mut element = stanza_element(
            "iq",
            content_ns,
            Some(&self.id),
            Some(self.kind.as_str()),
            self.from.as_ref(),
            self.to.as_ref(),
            self.lang.as_deref(),
        );
        if let Some(payload) = self.payload {
            element.append_child(payload);
        }
        if let Some(error) = self.error {
            element.append_child(error.into_element(content_ns));
        }
        element
    }
}

impl From<Iq> for Element {
    fn from(iq: Iq) -> Self {
        iq.into_element(ns::JABBER_CLIENT)
    }
}

impl TryFrom<&Element> for Iq {
    type Error = StanzaParseError;

    fn try_from(element: &Element) -> Result<Self, Self::Error> {
        expect_stanza(element, "iq")?;
        let id = element
            .attr("id")
            .ok_or(StanzaParseError::MissingAttribute { attr: "id" })?
            .to_owned();
        let kind: IqType =
            type_attr(element)?.ok_or(StanzaParseError::MissingAttribute { attr: "type" })?;
        let from = jid_attr(element, "from")?;
        let to = jid_attr(element, "to")?;
        let (payloads, error): (Vec<&Element>, _) = if kind == IqType::Error {
            let error = error_child(element)?;
            let others = element
                .children()
                .filter(|child| !child.is("error", element.ns()))
                .collect();
            (others, Some(error))
        } else {
            (element.children().collect(), None)
        };
        let allowed = match kind {
            IqType::Get | IqType::Set => payloads.len() == 1,
            IqType::Result | IqType::Error => payloads.len() <= 1,
        };
        if !allowed {
            return Err(StanzaParseError::IqChildren {
                kind,
                found: payloads.len(),
            });
        }
        Ok(Self {
            id,
            kind,
            from,
            to,
            lang: element.lang().map(str::to_owned),
            payload: payloads.first().map(|&payload| payload.clone()),
            error,
        })
    }
}

/// A message stanza (RFC 6120 §8.2.1, RFC 6121 §5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// Identifies the message, e.g. to match an error to it.
    pub id: Option<String>,
    /// The kind of conversation.
    pub kind: MessageType,
    /// The sender.
    pub from: Option<Jid>,
    /// The recipient.
    pub to: Option<Jid>,
    /// The `xml:lang` of the stanza.
    pub lang: Option<String>,
    /// The children (`<body/>`, `<subject/>`, extensions), except the error of a message of
    /// type error.
    pub payloads: Vec<Element>,
    /// The error of a message of type error.
    pub error: Option<StanzaError>,
}

impl Message {
    /// The text of the first `<body/>`, if any.
    pub fn body(&self) -> Option<String> {
        self.payloads
            .iter()
            .find(|child| child.name() == "body" && is_stanza_ns(child.ns()))
            .map(Element::text)
    }

    /// This message as an element in the stanza namespace `content_ns`. A
    /// [`MessageType::Normal`] message is written without `type`.
    pub fn into_element(self, content_ns: &str) -> Element {
        let kind = (self.kind != MessageType::Normal).then_some(self.kind.as_str());
        let mut element = stanza_element(
            "message",
            content_ns,
            self.id.as_deref(),
            kind,
            self.from.as_ref(),
            self.to.as_ref(),
            self.lang.as_deref(),
        );
        append_payloads(&mut element, self.payloads, self.error, content_ns);
        element
    }
}

impl From<Message> for Element {
    fn from(message: Message) -> Self {
        message.into_element(ns::JABBER_CLIENT)
    }
}

impl TryFrom<&Element> for Message {
    type Error = StanzaParseError;

    fn try_from(element: &Element) -> Result<Self, Self::Error> {
        expect_stanza(element, "message")?;
        let kind = type_attr(element)?.unwrap_or_default();
        let (payloads, error) = split_error(element, kind == MessageType::Error)?;
        Ok(Self {
            id: element.attr("id").map(str::to_owned),
            kind,
            from: jid_attr(element, "from")?,
            to: jid_attr(element, "to")?,
            lang: element.lang().map(str::to_owned),
            payloads,
            error,
        })
    }
}

/// Appends a message's or presence's payloads, then its error (the inverse of
/// [`split_error`]).
fn append_payloads(
    element: &mut Element,
    payloads: Vec<Element>,
    error: Option<StanzaError>,
    content_ns: &str,
) {
    for payload in payloads {
        element.append_child(payload);
    }
    if let Some(error) = error {
        element.append_child(error.into_element(content_ns));
    }
}

/// The children of a message or presence, with the error taken out of an error stanza.
fn split_error(
    element: &Element,
    is_error: bool,
) -> Result<(Vec<Element>, Option<StanzaError>), StanzaParseError> {
    if !is_error {
        return Ok((element.children().cloned().collect(), None));
    }
    let error = error_child(element)?;
    let payloads = element
        .children()
        .filter(|child| !child.is("error", element.ns()))
        .cloned()
        .collect();
    Ok((payloads, Some(error)))
}

/// A presence stanza (RFC 6120 §8.2.2, RFC 6121 §4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Presence {
    /// Identifies the presence, e.g. to match an error to it.
    pub id: Option<String>,
    /// Availability or subscription management.
    pub kind: PresenceType,
    /// The sender.
    pub from: Option<Jid>,
    /// The recipient.
    pub to: Option<Jid>,
    /// The `xml:lang` of the stanza.
    pub lang: Option<String>,
    /// The `<show/>` of an available presence.
    pub show: Option<Show>,
    /// The first `<status/>` without `xml:lang`; statuses in other languages stay in
    /// [`Presence::payloads`].
    pub status: Option<String>,
    /// The `<priority/>`, -128 to 127.
    pub priority: Option<i8>,
    /// The other children (extensions, statuses with `xml:lang`), except the error of a
    /// presence of type error.
    pub payloads: Vec<Element>,
    /// The error of a presence of type error.
    pub error: Option<StanzaError>,
}

impl Presence {
    /// This presence as an element in the stanza namespace `content_ns`: `<show/>`,
    /// `<status/>` and `<priority/>` first, then the payloads. An available presence is
    /// written without `type`.
    pub fn into_element(self, content_ns: &str) -> Element {
        let kind = (self.kind != PresenceType::Available).then_some(self.kind.as_str());
        let mut element = stanza_element(
            "presence",
            content_ns,
            self.id.as_deref(),
            kind,
            self.from.as_ref(),
            self.to.as_ref(),
            self.lang.as_deref(),
        );
        if let Some(show) = self.show {
            element
                .append_child(Element::new("show", content_ns))
                .append_text(show.as_str());
        }
        if let Some(status) = &self.status {
            element
                .append_child(Element::new("status", content_ns))
                .append_text(status);
        }
        if let Some(priority) = self.priority {
            element
                .append_child(Element::new("priority", content_ns))
                .append_text(&priority.to_string());
        }
        append_payloads(&mut element, self.payloads, self.error, content_ns);
        element
    }
}

impl From<Presence> for Element {
    fn from(presence: Presence) -> Self {
        presence.into_element(ns::JABBER_CLIENT)
    }
}

impl TryFrom<&Element> for Presence {
    type Error = StanzaParseError;

    fn try_from(element: &Element) -> Result<Self, Self::Error> {
        expect_stanza(element, "presence")?;
        // RFC 6121 §4.7.1: there is no 'available' value; absence means available.
        let kind = match element.attr("type") {
            Some("available") => {
                return Err(StanzaParseError::InvalidAttribute { attr: "type" });
            }
            _ => type_attr(element)?.unwrap_or_default(),
        };
        let (children, error) = split_error(element, kind == PresenceType::Error)?;
        let mut show = None;
        let mut status = None;
        let mut priority = None;
        let mut payloads = Vec::new();
        for child in children {
            if child.ns() != element.ns() {
                payloads.push(child);
                continue;
            }
            match child.name() {
                "show" => {
                    if show.is_some() {
                        return Err(StanzaParseError::Invalid("a presence has two <show/>"));
                    }
                    show = Some(child.text().trim().parse::<Show>().map_err(|_| {
                        StanzaParseError::Invalid("a presence has an unknown <show/> value")
                    })?);
                }
                "priority" => {
                    if priority.is_some() {
                        return Err(StanzaParseError::Invalid("a presence has two <priority/>"));
                    }
                    priority = Some(child.text().trim().parse::<i8>().map_err(|_| {
                        StanzaParseError::Invalid("a presence has a <priority/> outside -128..127")
                    })?);
                }
                "status" if status.is_none() && child.lang().is_none() => {
                    status = Some(child.text());
                }
                _ => payloads.push(child),
            }
        }
        Ok(Self {
            id: element.attr("id").map(str::to_owned),
            kind,
            from: jid_attr(element, "from")?,
            to: jid_attr(element, "to")?,
            lang: element.lang().map(str::to_owned),
            show,
            status,
            priority,
            payloads,
            error,
        })
    }
}

/// Any of the three stanzas, chosen by the element's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stanza {
    /// An `<iq/>`.
    Iq(Iq),
    /// A `<message/>`.
    Message(Message),
    /// A `<presence/>`.
    Presence(Presence),
}

impl TryFrom<&Element> for Stanza {
    type Error = StanzaParseError;

    fn try_from(element: &Element) -> Result<Self, Self::Error> {
        match element.name() {
            "iq" => Iq::try_from(element).map(Self::Iq),
            "message" => Message::try_from(element).map(Self::Message),
            "presence" => Presence::try_from(element).map(Self::Presence),
            _ => Err(StanzaParseError::WrongElement {
                expected: "iq, message or presence",
            }),
        }
    }
}

impl From<Stanza> for Element {
    fn from(stanza: Stanza) -> Self {
        match stanza {
            Stanza::Iq(iq) => iq.into(),
            Stanza::Message(message) => message.into(),
            Stanza::Presence(presence) => presence.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoder, Frame, Limits, StreamHeader};
    use crate::writer::{WriteContext, stream_header};

    fn jid(s: &str) -> Jid {
        match s.parse() {
            Ok(jid) => jid,
            Err(error) => panic!("{s:?} was refused: {error}"),
        }
    }

    /// Decodes `bytes` as the only stanza of a `jabber:client` stream.
    fn decode_one(bytes: &[u8]) -> Element {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(&stream_header(&StreamHeader::new(ns::JABBER_CLIENT)));
        decoder.feed(bytes);
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        match decoder.next() {
            Ok(Some(Frame::Stanza(element))) => element,
            other => panic!("expected a stanza, got {other:?}"),
        }
    }

    /// Element → typed → Element → bytes → Element, checking each step; returns the bytes.
    fn round_trip<T>(element: &Element) -> (T, String)
    where
        T: for<'a> TryFrom<&'a Element, Error = StanzaParseError> + Into<Element> + Clone,
    {
        let typed = match T::try_from(element) {
            Ok(typed) => typed,
            Err(error) => panic!("refused: {error}"),
        };
        let back: Element = typed.clone().into();
        assert_eq!(&back, element);
        let bytes = back.to_bytes(WriteContext::stream(ns::JABBER_CLIENT));
        assert_eq!(&decode_one(&bytes), element);
        (typed, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn ping() -> Element {
        Element::new("ping", ns::PING)
    }

    #[test]
    fn an_iq_get_round_trips_through_the_typed_view_and_the_wire() {
        let element = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "p1")
            .attr("type", "get")
            .attr("from", "juliet@example.com/balcony")
            .attr("to", "example.com")
            .attr_ns("lang", ns::XML, "en")
            .append(ping())
            .build();
        let (iq, bytes) = round_trip::<Iq>(&element);
        assert_eq!(iq.id, "p1");
        assert_eq!(iq.kind, IqType::Get);
        assert_eq!(iq.from, Some(jid("juliet@example.com/balcony")));
        assert_eq!(iq.to, Some(jid("example.com")));
        assert_eq!(iq.lang.as_deref(), Some("en"));
        assert_eq!(iq.payload, Some(ping()));
        assert_eq!(
            bytes,
            "<iq id='p1' type='get' from='juliet@example.com/balcony' to='example.com' \
             xml:lang='en'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
    }

    #[test]
    fn an_iq_result_swaps_the_addresses_and_keeps_the_id() {
        let request = Iq {
            from: Some(jid("a@b/c")),
            to: Some(jid("b")),
            ..Iq::get("x1", ping())
        };
        let result = request.result();
        assert_eq!(result.id, "x1");
        assert_eq!(result.kind, IqType::Result);
        assert_eq!(result.from, Some(jid("b")));
        assert_eq!(result.to, Some(jid("a@b/c")));
        assert_eq!(result.payload, None);
        let element = Element::from(result.clone());
        assert_eq!(Iq::try_from(&element), Ok(result));
        assert_eq!(
            String::from_utf8_lossy(&element.to_bytes(WriteContext::stream(ns::JABBER_CLIENT))),
            "<iq id='x1' type='result' from='b' to='a@b/c'/>"
        );
    }

    #[test]
    fn an_iq_error_reply_round_trips_with_its_error() {
        let request = Iq {
            from: Some(jid("a@b/c")),
            to: Some(jid("pubsub.b")),
            ..Iq::set("s1", Element::new("pubsub", ns::PUBSUB))
        };
        let reply = request.error_reply(StanzaError::item_not_found().with_text("no such node"));
        assert_eq!(reply.kind, IqType::Error);
        assert_eq!(reply.to, request.from);
        let element = Element::from(reply.clone());
        let (parsed, bytes) = round_trip::<Iq>(&element);
        assert_eq!(parsed, reply);
        assert_eq!(
            bytes,
            "<iq id='s1' type='error' from='pubsub.b' to='a@b/c'><error type='cancel'>\
             <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>no such node</text></error></iq>"
        );
    }

    #[test]
    fn an_iq_error_may_carry_the_original_payload() {
        let element = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "e1")
            .attr("type", "error")
            .append(ping())
            .append(Element::from(StanzaError::service_unavailable()))
            .build();
        let (iq, _) = round_trip::<Iq>(&element);
        assert_eq!(iq.payload, Some(ping()));
        assert_eq!(iq.error, Some(StanzaError::service_unavailable()));
    }

    #[test]
    fn a_message_round_trips_with_its_payloads() {
        let element = Element::builder("message", ns::JABBER_CLIENT)
            .attr("id", "m1")
            .attr("type", "chat")
            .attr("from", "romeo@example.net/orchard")
            .attr("to", "juliet@example.com")
            .append(Element::builder("body", ns::JABBER_CLIENT).append("Art thou not Romeo?"))
            .append(Element::new(
                "active",
                "http://jabber.org/protocol/chatstates",
            ))
            .build();
        let (message, bytes) = round_trip::<Message>(&element);
        assert_eq!(message.kind, MessageType::Chat);
        assert_eq!(message.id.as_deref(), Some("m1"));
        assert_eq!(message.body().as_deref(), Some("Art thou not Romeo?"));
        assert_eq!(message.payloads.len(), 2);
        assert_eq!(
            bytes,
            "<message id='m1' type='chat' from='romeo@example.net/orchard' \
             to='juliet@example.com'><body>Art thou not Romeo?</body>\
             <active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        );
    }

    #[test]
    fn a_message_without_type_is_normal_and_is_written_without_type() {
        let element = Element::builder("message", ns::JABBER_CLIENT)
            .attr("to", "a@b")
            .build();
        let (message, bytes) = round_trip::<Message>(&element);
        assert_eq!(message.kind, MessageType::Normal);
        assert_eq!(message.id, None);
        assert_eq!(bytes, "<message to='a@b'/>");
    }

    #[test]
    fn a_headline_message_with_a_pubsub_event_round_trips() {
        let event = Element::builder("event", ns::PUBSUB_EVENT)
            .append(Element::builder("items", ns::PUBSUB_EVENT).attr("node", "news"))
            .build();
        let message = Message {
            kind: MessageType::Headline,
            from: Some(jid("pubsub.example.com")),
            to: Some(jid("a@example.com")),
            payloads: vec![event],
            ..Message::default()
        };
        let element = Element::from(message.clone());
        let (parsed, _) = round_trip::<Message>(&element);
        assert_eq!(parsed, message);
    }

    #[test]
    fn a_message_error_takes_the_error_out_of_the_payloads() {
        let element = Element::builder("message", ns::JABBER_CLIENT)
            .attr("type", "error")
            .attr("from", "b")
            .append(Element::builder("body", ns::JABBER_CLIENT).append("hi"))
            .append(Element::from(StanzaError::recipient_unavailable()))
            .build();
        let (message, _) = round_trip::<Message>(&element);
        assert_eq!(message.payloads.len(), 1);
        assert_eq!(
            message.error.map(|e| (e.kind, e.condition)),
            Some((ErrorType::Wait, DefinedCondition::RecipientUnavailable))
        );
    }

    #[test]
    fn a_presence_round_trips_with_show_status_priority_and_payloads() {
        let element = Element::builder("presence", ns::JABBER_CLIENT)
            .attr("from", "juliet@example.com/balcony")
            .append(Element::builder("show", ns::JABBER_CLIENT).append("dnd"))
            .append(Element::builder("status", ns::JABBER_CLIENT).append("busy"))
            .append(Element::builder("priority", ns::JABBER_CLIENT).append("-1"))
            .append(
                Element::builder("status", ns::JABBER_CLIENT)
                    .attr_ns("lang", ns::XML, "fr")
                    .append("occupée"),
            )
            .append(Element::builder("c", "http://jabber.org/protocol/caps").attr("node", "n"))
            .build();
        let (presence, bytes) = round_trip::<Presence>(&element);
        assert_eq!(presence.kind, PresenceType::Available);
        assert_eq!(presence.show, Some(Show::Dnd));
        assert_eq!(presence.status.as_deref(), Some("busy"));
        assert_eq!(presence.priority, Some(-1));
        assert_eq!(presence.payloads.len(), 2);
        assert!(bytes.starts_with(
            "<presence from='juliet@example.com/balcony'><show>dnd</show>\
             <status>busy</status><priority>-1</priority><status xml:lang='fr'>"
        ));
    }

    #[test]
    fn a_subscription_presence_round_trips() {
        let element = Element::builder("presence", ns::JABBER_CLIENT)
            .attr("id", "sub1")
            .attr("type", "subscribe")
            .attr("to", "juliet@example.com")
            .build();
        let (presence, bytes) = round_trip::<Presence>(&element);
        assert_eq!(presence.kind, PresenceType::Subscribe);
        assert_eq!(
            bytes,
            "<presence id='sub1' type='subscribe' to='juliet@example.com'/>"
        );
    }

    #[test]
    fn stanzas_are_dispatched_by_name() {
        let element = Element::builder("presence", ns::JABBER_CLIENT)
            .attr("type", "unavailable")
            .build();
        assert!(matches!(
            Stanza::try_from(&element),
            Ok(Stanza::Presence(Presence {
                kind: PresenceType::Unavailable,
                ..
            }))
        ));
        let other = Element::new("features", ns::STREAM);
        assert!(matches!(
            Stanza::try_from(&other),
            Err(StanzaParseError::WrongElement { .. })
        ));
    }

    #[test]
    fn component_stanzas_are_accepted_and_written_back_in_their_namespace() {
        let element = Element::builder("iq", ns::JABBER_COMPONENT_ACCEPT)
            .attr("id", "c1")
            .attr("type", "get")
            .append(ping())
            .build();
        let Ok(iq) = Iq::try_from(&element) else {
            panic!("a component iq was refused");
        };
        assert_eq!(iq.into_element(ns::JABBER_COMPONENT_ACCEPT), element);
    }

    #[test]
    fn an_iq_without_id_is_refused() {
        let element = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("type", "get")
            .append(ping())
            .build();
        let Err(error) = Iq::try_from(&element) else {
            panic!("an iq without id was accepted");
        };
        assert_eq!(error, StanzaParseError::MissingAttribute { attr: "id" });
        let reply = error.to_stanza_error();
        assert_eq!(reply.condition, DefinedCondition::BadRequest);
        assert_eq!(reply.kind, ErrorType::Modify);
        assert_eq!(reply.text.as_deref(), Some("the 'id' attribute is missing"));
    }

    #[test]
    fn an_unparsable_stanza_gets_an_error_reply_with_swapped_raw_addresses() {
        let element = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "q1")
            .attr("type", "get")
            .attr("from", "a@b/c")
            .attr("to", "not a jid")
            .append(ping())
            .build();
        let Err(error) = Iq::try_from(&element) else {
            panic!("an iq with a bad to was accepted");
        };
        let reply = error.to_stanza_error().reply_to(&element);
        assert_eq!(reply.attr("id"), Some("q1"));
        assert_eq!(reply.attr("type"), Some("error"));
        assert_eq!(reply.attr("from"), Some("not a jid"));
        assert_eq!(reply.attr("to"), Some("a@b/c"));
        assert_eq!(reply.children().count(), 1);
        let condition = reply
            .get_child("error", ns::JABBER_CLIENT)
            .and_then(|e| StanzaError::try_from(e).ok())
            .map(|e| e.condition);
        assert_eq!(condition, Some(DefinedCondition::JidMalformed));
    }

    #[test]
    fn an_iq_get_with_two_children_or_none_is_refused() {
        let two = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "1")
            .attr("type", "get")
            .append(ping())
            .append(Element::new("query", ns::DISCO_INFO))
            .build();
        assert_eq!(
            Iq::try_from(&two),
            Err(StanzaParseError::IqChildren {
                kind: IqType::Get,
                found: 2
            })
        );
        let none = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "1")
            .attr("type", "set")
            .build();
        assert_eq!(
            Iq::try_from(&none),
            Err(StanzaParseError::IqChildren {
                kind: IqType::Set,
                found: 0
            })
        );
    }

    #[test]
    fn unknown_type_values_are_refused() {
        let iq = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "1")
            .attr("type", "fetch")
            .append(ping())
            .build();
        let message = Element::builder("message", ns::JABBER_CLIENT)
            .attr("type", "shout")
            .build();
        let presence = Element::builder("presence", ns::JABBER_CLIENT)
            .attr("type", "available")
            .build();
        let invalid = Some(StanzaParseError::InvalidAttribute { attr: "type" });
        assert_eq!(Iq::try_from(&iq).err(), invalid);
        assert_eq!(Message::try_from(&message).err(), invalid);
        assert_eq!(Presence::try_from(&presence).err(), invalid);
    }

    #[test]
    fn a_bad_jid_in_from_is_refused_as_jid_malformed() {
        let element = Element::builder("message", ns::JABBER_CLIENT)
            .attr("from", "a b@example.com")
            .build();
        let Err(error) = Message::try_from(&element) else {
            panic!("a message with a bad from was accepted");
        };
        assert!(matches!(
            error,
            StanzaParseError::InvalidJid { attr: "from", .. }
        ));
        assert_eq!(
            error.to_stanza_error().condition,
            DefinedCondition::JidMalformed
        );
    }

    #[test]
    fn elements_that_are_not_the_stanza_are_refused() {
        let wrong_ns = Element::builder("iq", ns::STREAM).attr("id", "1").build();
        assert_eq!(
            Iq::try_from(&wrong_ns),
            Err(StanzaParseError::WrongElement { expected: "iq" })
        );
        let message = Element::new("message", ns::JABBER_CLIENT);
        assert_eq!(
            Presence::try_from(&message),
            Err(StanzaParseError::WrongElement {
                expected: "presence"
            })
        );
    }

    #[test]
    fn an_error_stanza_without_error_child_is_refused() {
        let element = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("id", "1")
            .attr("type", "error")
            .build();
        assert!(matches!(
            Iq::try_from(&element),
            Err(StanzaParseError::Invalid(_))
        ));
    }

    #[test]
    fn presence_with_bad_show_or_priority_is_refused() {
        for (name, value) in [("show", "sleeping"), ("priority", "300")] {
            let element = Element::builder("presence", ns::JABBER_CLIENT)
                .append(Element::builder(name, ns::JABBER_CLIENT).append(value))
                .build();
            assert!(matches!(
                Presence::try_from(&element),
                Err(StanzaParseError::Invalid(_))
            ));
        }
    }

    #[test]
    fn an_error_element_round_trips_with_an_application_specific_condition() {
        let invalid_jid = Element::new("invalid-jid", ns::PUBSUB_ERRORS);
        let error = StanzaError::bad_request()
            .with_text("the JID does not match")
            .with_app(invalid_jid.clone());
        let element = Element::from(error.clone());
        assert_eq!(StanzaError::try_from(&element), Ok(error));
        let bytes = element.to_bytes(WriteContext::stream(ns::JABBER_CLIENT));
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            "<error type='modify'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>the JID does not match</text>\
             <invalid-jid xmlns='http://jabber.org/protocol/pubsub#errors'/></error>"
        );
        let parsed = StanzaError::try_from(&decode_one(&bytes));
        assert_eq!(
            parsed.map(|e| (e.condition, e.app_specific)),
            Ok((DefinedCondition::BadRequest, Some(invalid_jid)))
        );
    }

    #[test]
    fn gone_and_redirect_keep_their_alternate_address_and_by() {
        let mut error = StanzaError::from_condition(DefinedCondition::Redirect);
        error.alternate = Some("xmpp:other@example.com".to_owned());
        error.by = Some(jid("example.com"));
        let element = Element::from(error.clone());
        assert_eq!(element.attr("by"), Some("example.com"));
        assert_eq!(StanzaError::try_from(&element), Ok(error));
    }

    #[test]
    fn malformed_error_elements_are_refused() {
        let no_type = Element::builder("error", ns::JABBER_CLIENT)
            .append(Element::new("conflict", ns::STANZAS))
            .build();
        assert_eq!(
            StanzaError::try_from(&no_type),
            Err(StanzaParseError::MissingAttribute { attr: "type" })
        );
        let unknown = Element::builder("error", ns::JABBER_CLIENT)
            .attr("type", "cancel")
            .append(Element::new("on-fire", ns::STANZAS))
            .build();
        assert!(StanzaError::try_from(&unknown).is_err());
        let no_condition = Element::builder("error", ns::JABBER_CLIENT)
            .attr("type", "cancel")
            .build();
        assert!(StanzaError::try_from(&no_condition).is_err());
    }

    #[test]
    fn conditions_have_the_default_types_of_rfc_6120() {
        assert_eq!(StanzaError::service_unavailable().kind, ErrorType::Cancel);
        assert_eq!(StanzaError::bad_request().kind, ErrorType::Modify);
        assert_eq!(StanzaError::forbidden().kind, ErrorType::Auth);
        assert_eq!(StanzaError::item_not_found().kind, ErrorType::Cancel);
        assert_eq!(StanzaError::not_authorized().kind, ErrorType::Auth);
        assert_eq!(StanzaError::resource_constraint().kind, ErrorType::Wait);
        assert_eq!(
            StanzaError::feature_not_implemented().kind,
            ErrorType::Cancel
        );
        assert_eq!(
            StanzaError::new(ErrorType::Wait, DefinedCondition::Conflict).kind,
            ErrorType::Wait
        );
    }

    #[test]
    fn every_defined_condition_parses_back_from_its_name() {
        use DefinedCondition::*;
        let all = [
            BadRequest,
            Conflict,
            FeatureNotImplemented,
            Forbidden,
            Gone,
            InternalServerError,
            ItemNotFound,
            JidMalformed,
            NotAcceptable,
            NotAllowed,
            NotAuthorized,
            PolicyViolation,
            RecipientUnavailable,
            Redirect,
            RegistrationRequired,
            RemoteServerNotFound,
            RemoteServerTimeout,
            ResourceConstraint,
            ServiceUnavailable,
            SubscriptionRequired,
            UndefinedCondition,
            UnexpectedRequest,
        ];
        assert_eq!(all.len(), 22);
        for condition in all {
            assert_eq!(condition.as_str().parse(), Ok(condition));
            let element = Element::from(StanzaError::from_condition(condition));
            assert_eq!(
                StanzaError::try_from(&element).map(|e| e.condition),
                Ok(condition)
            );
        }
    }
}
