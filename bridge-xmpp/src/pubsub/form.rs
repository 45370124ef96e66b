//! XEP-0004 data forms as XEP-0060 uses them: the node configuration form
//! (`pubsub#node_config`), publish-options, the node meta-data form of disco#info
//! (`pubsub#meta-data`) and the subscription authorization form.

use juxta_core::{AccessModel, NodeConfig, PublishModel, SendLastPublished};

use crate::element::Element;
use crate::ns;

/// `FORM_TYPE` of node configuration and publish-options forms.
pub(crate) const NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";
/// `FORM_TYPE` of publish-options.
pub(crate) const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
/// `FORM_TYPE` of the node meta-data in disco#info (XEP-0060 §5.4).
pub(crate) const META_DATA: &str = "http://jabber.org/protocol/pubsub#meta-data";
/// `FORM_TYPE` of subscription authorization requests (XEP-0060 §8.6).
pub(crate) const SUBSCRIBE_AUTHORIZATION: &str =
    "http://jabber.org/protocol/pubsub#subscribe_authorization";

/// A field of a submitted form: its `var` and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) var: String,
    pub(crate) values: Vec<String>,
}

impl Field {
    fn value(&self) -> &str {
        self.values.first().map_or("", String::as_str)
    }
}

/// A submitted form (`type='submit'`), without its `FORM_TYPE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Submitted {
    pub(crate) form_type: Option<String>,
    pub(crate) fields: Vec<Field>,
}

impl Submitted {
    /// Reads `<x xmlns='jabber:x:data'>`; `None` if it is not a submission (a cancel, or
    /// another type).
    pub(crate) fn parse(x: &Element) -> Option<Self> {
        if !x.is("x", ns::DATA_FORMS) || !matches!(x.attr("type"), Some("submit" | "form") | None) {
            return None;
        }
        let mut form = Submitted::default();
        for field in x.children().filter(|c| c.is("field", ns::DATA_FORMS)) {
            let var = field.attr("var").unwrap_or("").to_owned();
            let values = field
                .children()
                .filter(|c| c.is("value", ns::DATA_FORMS))
                .map(Element::text)
                .collect();
            if var == "FORM_TYPE" {
                form.form_type = Some(Field { var, values }.value().to_owned());
            } else {
                form.fields.push(Field { var, values });
            }
        }
        Some(form)
    }

    /// The first value of `var`.
    pub(crate) fn get(&self, var: &str) -> Option<&str> {
        self.fields.iter().find(|f| f.var == var).map(Field::value)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn access_model(v: &str) -> Option<AccessModel> {
    Some(match v {
        "open" => AccessModel::Open,
        "presence" => AccessModel::Presence,
        "authorize" => AccessModel::Authorize,
        "whitelist" => AccessModel::Whitelist,
        _ => return None,
    })
}

fn access_name(m: AccessModel) -> &'static str {
    match m {
        AccessModel::Open => "open",
        AccessModel::Presence => "presence",
        AccessModel::Authorize => "authorize",
        AccessModel::Whitelist => "whitelist",
    }
}

fn publish_model(v: &str) -> Option<PublishModel> {
    Some(match v {
        "publishers" => PublishModel::Publishers,
        "subscribers" => PublishModel::Subscribers,
        "open" => PublishModel::Open,
        _ => return None,
    })
}

fn publish_name(m: PublishModel) -> &'static str {
    match m {
        PublishModel::Publishers => "publishers",
        PublishModel::Subscribers => "subscribers",
        PublishModel::Open => "open",
    }
}

fn send_last(v: &str) -> Option<SendLastPublished> {
    Some(match v {
        "never" => SendLastPublished::Never,
        "on_sub" => SendLastPublished::OnSub,
        "on_sub_and_presence" => SendLastPublished::OnSubAndPresence,
        _ => return None,
    })
}

/// The configuration fields we support, in the order the form lists them.
pub(crate) const CONFIG_FIELDS: &[&str] = &[
    "pubsub#title",
    "pubsub#max_items",
    "pubsub#persist_items",
    "pubsub#access_model",
    "pubsub#publish_model",
    "pubsub#deliver_payloads",
    "pubsub#notify_retract",
    "pubsub#notify_delete",
    "pubsub#presence_based_delivery",
    "pubsub#send_last_published_item",
    "pubsub#max_payload_size",
    "juxta#group",
];

/// Applies the submitted fields to `config`. An unknown field, or a value out of range, is
/// an error naming it (XEP-0060 §8.2.5: `not-acceptable`).
pub(crate) fn apply(form: &Submitted, config: &mut NodeConfig) -> Result<(), String> {
    for field in &form.fields {
        let v = field.value();
        let bad = || format!("{} cannot be {v:?}", field.var);
        match field.var.as_str() {
            "pubsub#title" => config.title = (!v.is_empty()).then(|| v.to_owned()),
            "pubsub#max_items" => {
                config.max_items = if v == "max" {
                    juxta_core::model::MAX_MAX_ITEMS
                } else {
                    v.parse().map_err(|_| bad())?
                }
            }
            "pubsub#persist_items" => config.persist = parse_bool(v).ok_or_else(bad)?,
            "pubsub#access_model" => config.access_model = access_model(v).ok_or_else(bad)?,
            "pubsub#publish_model" => config.publish_model = publish_model(v).ok_or_else(bad)?,
            "pubsub#deliver_payloads" => config.deliver_payloads = parse_bool(v).ok_or_else(bad)?,
            "pubsub#notify_retract" => config.notify_retract = parse_bool(v).ok_or_else(bad)?,
            "pubsub#notify_delete" => config.notify_delete = parse_bool(v).ok_or_else(bad)?,
            "pubsub#presence_based_delivery" => {
                config.presence_based_delivery = parse_bool(v).ok_or_else(bad)?
            }
            "pubsub#send_last_published_item" => {
                config.send_last_published_item = send_last(v).ok_or_else(bad)?
            }
            // Read-only: the bus's limit. Accepted when unchanged, so that a client can
            // submit back the form it was given.
            "pubsub#max_payload_size" => {}
            "juxta#group" => config.group = v.to_owned(),
            other => return Err(format!("unsupported field {other}")),
        }
    }
    config.validate().map_err(|e| e.to_string())
}

/// The value `config` has for `var`, as form text.
pub(crate) fn value_of(config: &NodeConfig, var: &str, max_payload: usize) -> Option<String> {
    let b = |x: bool| if x { "1" } else { "0" }.to_owned();
    Some(match var {
        "pubsub#title" => config.title.clone().unwrap_or_default(),
        "pubsub#max_items" => config.max_items.to_string(),
        "pubsub#persist_items" => b(config.persist),
        "pubsub#access_model" => access_name(config.access_model).to_owned(),
        "pubsub#publish_model" => publish_name(config.publish_model).to_owned(),
        "pubsub#deliver_payloads" => b(config.deliver_payloads),
        "pubsub#notify_retract" => b(config.notify_retract),
        "pubsub#notify_delete" => b(config.notify_delete),
        "pubsub#presence_based_delivery" => b(config.presence_based_delivery),
        "pubsub#send_last_published_item" => config.send_last_published_item.as_str().to_owned(),
        "pubsub#max_payload_size" => max_payload.to_string(),
        "juxta#group" => config.group.clone(),
        _ => return None,
    })
}

/// Checks publish-options preconditions (XEP-0060 §7.1.5): every field must equal the
/// node's value. Returns the first field that differs.
pub(crate) fn precondition_failure(
    form: &Submitted,
    config: &NodeConfig,
    max_payload: usize,
) -> Option<String> {
    form.fields.iter().find_map(|f| {
        let want = f.value();
        let have = value_of(config, &f.var, max_payload);
        let same = match (&have, parse_bool(want)) {
            (Some(h), Some(w)) if parse_bool(h).is_some() => parse_bool(h) == Some(w),
            (Some(h), _) => h == want,
            (None, _) => false,
        };
        (!same).then(|| f.var.clone())
    })
}

fn field(var: &str, kind: &str, label: Option<&str>, values: &[&str]) -> Element {
    let mut f = Element::builder("field", ns::DATA_FORMS)
        .attr("var", var)
        .attr("type", kind);
    if let Some(label) = label {
        f = f.attr("label", label);
    }
    for v in values {
        f = f.append(Element::builder("value", ns::DATA_FORMS).append(*v));
    }
    f.build()
}

fn options(field: &mut Element, choices: &[&str]) {
    for c in choices {
        field.append_child(
            Element::builder("option", ns::DATA_FORMS)
                .append(Element::builder("value", ns::DATA_FORMS).append(*c))
                .build(),
        );
    }
}

fn kind_of(var: &str) -> (&'static str, &'static str, &'static [&'static str]) {
    match var {
        "pubsub#title" => ("text-single", "A friendly name for the node", &[]),
        "pubsub#max_items" => ("text-single", "Max # of items to persist", &[]),
        "pubsub#persist_items" => ("boolean", "Persist items to storage", &[]),
        "pubsub#access_model" => (
            "list-single",
            "Specify the subscriber model",
            &["open", "presence", "authorize", "whitelist"],
        ),
        "pubsub#publish_model" => (
            "list-single",
            "Specify the publisher model",
            &["publishers", "subscribers", "open"],
        ),
        "pubsub#deliver_payloads" => ("boolean", "Deliver payloads with event notifications", &[]),
        "pubsub#notify_retract" => ("boolean", "Notify subscribers when items are removed", &[]),
        "pubsub#notify_delete" => (
            "boolean",
            "Notify subscribers when the node is deleted",
            &[],
        ),
        "pubsub#presence_based_delivery" => (
            "boolean",
            "Deliver notifications only to available users",
            &[],
        ),
        "pubsub#send_last_published_item" => (
            "list-single",
            "When to send the last published item",
            &["never", "on_sub", "on_sub_and_presence"],
        ),
        "pubsub#max_payload_size" => ("text-single", "Max payload size in bytes (fixed)", &[]),
        _ => ("text-single", "Peer group of the node's overlay pipe", &[]),
    }
}

/// The node configuration form (`type='form'`) holding `config`'s values (XEP-0060 §8.2.1).
pub(crate) fn config_form(config: &NodeConfig, max_payload: usize) -> Element {
    let mut x = Element::builder("x", ns::DATA_FORMS)
        .attr("type", "form")
        .append(field("FORM_TYPE", "hidden", None, &[NODE_CONFIG]))
        .build();
    for var in CONFIG_FIELDS {
        let value = value_of(config, var, max_payload).unwrap_or_default();
        let (kind, label, choices) = kind_of(var);
        let mut f = field(var, kind, Some(label), &[&value]);
        options(&mut f, choices);
        x.append_child(f);
    }
    x
}

/// The `pubsub#meta-data` form of a node's disco#info (XEP-0060 §5.4).
pub(crate) fn meta_data(config: &NodeConfig, owners: &[String], max_payload: usize) -> Element {
    let mut x = Element::builder("x", ns::DATA_FORMS)
        .attr("type", "result")
        .append(field("FORM_TYPE", "hidden", None, &[META_DATA]))
        .build();
    let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
    x.append_child(field("pubsub#owner", "jid-multi", None, &owners));
    x.append_child(field("pubsub#type", "text-single", None, &["leaf"]));
    for var in [
        "pubsub#title",
        "pubsub#access_model",
        "pubsub#publish_model",
        "pubsub#max_items",
    ] {
        let value = value_of(config, var, max_payload).unwrap_or_default();
        x.append_child(field(var, kind_of(var).0, None, &[&value]));
    }
    x
}

/// The subscription authorization request sent to owners (XEP-0060 §8.6).
pub(crate) fn authorization_request(node: &str, subscriber: &str, subid: &str) -> Element {
    Element::builder("x", ns::DATA_FORMS)
        .attr("type", "form")
        .append(Element::builder("title", ns::DATA_FORMS).append("PubSub subscriber request"))
        .append(field(
            "FORM_TYPE",
            "hidden",
            None,
            &[SUBSCRIBE_AUTHORIZATION],
        ))
        .append(field("pubsub#subid", "hidden", None, &[subid]))
        .append(field(
            "pubsub#node",
            "text-single",
            Some("Node ID"),
            &[node],
        ))
        .append(field(
            "pubsub#subscriber_jid",
            "jid-single",
            Some("Subscriber Address"),
            &[subscriber],
        ))
        .append(field(
            "pubsub#allow",
            "boolean",
            Some("Allow this JID to subscribe to this pubsub node?"),
            &["false"],
        ))
        .build()
}

/// Whether an authorization answer allows (`pubsub#allow`).
pub(crate) fn allows(form: &Submitted) -> Option<bool> {
    form.get("pubsub#allow").and_then(parse_bool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(fields: &[(&str, &str)]) -> Submitted {
        Submitted {
            form_type: Some(NODE_CONFIG.into()),
            fields: fields
                .iter()
                .map(|(k, v)| Field {
                    var: (*k).into(),
                    values: vec![(*v).into()],
                })
                .collect(),
        }
    }

    #[test]
    fn a_submitted_config_changes_the_named_fields_and_refuses_unknown_ones() {
        let mut c = NodeConfig::default();
        apply(
            &submit(&[
                ("pubsub#max_items", "5"),
                ("pubsub#access_model", "whitelist"),
                ("pubsub#persist_items", "false"),
            ]),
            &mut c,
        )
        .expect("valid");
        assert_eq!(c.max_items, 5);
        assert_eq!(c.access_model, AccessModel::Whitelist);
        assert!(!c.persist);
        assert!(apply(&submit(&[("pubsub#nope", "1")]), &mut c).is_err());
        assert!(apply(&submit(&[("pubsub#access_model", "roster")]), &mut c).is_err());
        assert!(apply(&submit(&[("pubsub#max_items", "0")]), &mut c).is_err());
    }

    #[test]
    fn the_config_form_round_trips_through_a_submission() {
        let c = NodeConfig {
            title: Some("T".into()),
            max_items: 9,
            ..NodeConfig::default()
        };
        let form = config_form(&c, 100);
        let mut sub = Submitted::parse(&form).expect("a form parses like a submission");
        sub.fields
            .retain(|f| f.var != "pubsub#max_payload_size" || f.value() == "100");
        let mut d = NodeConfig::default();
        apply(&sub, &mut d).expect("applies");
        assert_eq!(c, d);
        assert_eq!(
            precondition_failure(&submit(&[("pubsub#max_items", "9")]), &c, 100),
            None
        );
        assert_eq!(
            precondition_failure(&submit(&[("pubsub#access_model", "authorize")]), &c, 100),
            Some("pubsub#access_model".into())
        );
        assert_eq!(
            precondition_failure(&submit(&[("pubsub#persist_items", "true")]), &c, 100),
            None,
            "booleans compare by value, not spelling"
        );
    }
}
