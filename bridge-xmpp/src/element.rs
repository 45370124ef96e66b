//! The owned XML tree the codec produces and serializes.
//!
//! Names are stored resolved: an element has a namespace URI and a local name, never a
//! prefix. Unprefixed attributes have no namespace (XML Namespaces §6.2); prefixed ones such
//! as `xml:lang` keep their resolved namespace. Typed stanzas convert from this tree; it does
//! not leave the crate's protocol layers.

use crate::ns;

/// An XML element with its namespace resolved.
///
/// Adjacent text is kept as one [`Node::Text`] and empty text is dropped, so a tree built with
/// [`ElementBuilder`] compares equal to the same tree parsed back from its serialization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    name: String,
    ns: String,
    attrs: Vec<Attribute>,
    children: Vec<Node>,
}

/// One attribute of an [`Element`]: a local name, the namespace of its prefix (if it had
/// one) and the value, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    name: String,
    ns: Option<String>,
    value: String,
}

impl Attribute {
    /// The local name, without prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace of a prefixed attribute (e.g. [`ns::XML`] for `xml:lang`); `None` for
    /// an unprefixed attribute.
    pub fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// The value, with references resolved.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// A child of an [`Element`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data, unescaped (CDATA sections become plain text).
    Text(String),
}

impl From<Element> for Node {
    fn from(element: Element) -> Self {
        Self::Element(element)
    }
}

impl From<String> for Node {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for Node {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl Element {
    /// An element with no attributes and no children.
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Starts building an element: `Element::builder("iq", ns::JABBER_CLIENT).attr("type",
    /// "get").append(child).build()`.
    ///
    /// Names are taken as given: they are meant to be constants of the code, not input.
    pub fn builder(name: impl Into<String>, ns: impl Into<String>) -> ElementBuilder {
        ElementBuilder {
            element: Self::new(name, ns),
        }
    }

    /// The local name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace URI (empty when the element is in no namespace).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Moves this element, and every descendant in namespace `from`, to namespace `to`: a
    /// stanza built for `jabber:client` becomes one for `jabber:component:accept`.
    pub fn rename_ns(&mut self, from: &str, to: &str) {
        if self.ns == from {
            self.ns = to.to_owned();
        }
        for child in self.children_mut() {
            child.rename_ns(from, to);
        }
    }

    /// Whether this element has local name `name` in namespace `ns`.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The value of the unprefixed attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.ns.is_none() && a.name == name)
            .map(|a| a.value.as_str())
    }

    /// The value of the attribute `name` in namespace `ns` (e.g. `("lang", ns::XML)`).
    pub fn attr_ns(&self, name: &str, ns: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.ns.as_deref() == Some(ns) && a.name == name)
            .map(|a| a.value.as_str())
    }

    /// The `xml:lang` attribute.
    pub fn lang(&self) -> Option<&str> {
        self.attr_ns("lang", ns::XML)
    }

    /// All attributes, in document order.
    pub fn attrs(&self) -> &[Attribute] {
        &self.attrs
    }

    /// Sets the unprefixed attribute `name`, replacing an existing value.
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.set(name.into(), None, value.into());
    }

    /// Sets the attribute `name` in namespace `ns`, replacing an existing value.
    pub fn set_attr_ns(
        &mut self,
        name: impl Into<String>,
        ns: impl Into<String>,
        value: impl Into<String>,
    ) {
        self.set(name.into(), Some(ns.into()), value.into());
    }

    fn set(&mut self, name: String, ns: Option<String>, value: String) {
        match self.attrs.iter_mut().find(|a| a.ns == ns && a.name == name) {
            Some(existing) => existing.value = value,
            None => self.attrs.push(Attribute { name, ns, value }),
        }
    }

    /// Removes the unprefixed attribute `name`, returning its value.
    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let index = self
            .attrs
            .iter()
            .position(|a| a.ns.is_none() && a.name == name)?;
        Some(self.attrs.remove(index).value)
    }

    /// All children, elements and text, in document order.
    pub fn nodes(&self) -> &[Node] {
        &self.children
    }

    /// The child elements, in document order.
    pub fn children(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|node| match node {
            Node::Element(element) => Some(element),
            Node::Text(_) => None,
        })
    }

    /// The child elements, mutably.
    pub fn children_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|node| match node {
            Node::Element(element) => Some(element),
            Node::Text(_) => None,
        })
    }

    /// The first child element named `name` in namespace `ns`.
    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.children().find(|child| child.is(name, ns))
    }

    /// The first child element named `name` in namespace `ns`, mutably.
    pub fn get_child_mut(&mut self, name: &str, ns: &str) -> Option<&mut Element> {
        self.children_mut().find(|child| child.is(name, ns))
    }

    /// Whether a child element named `name` in namespace `ns` exists.
    pub fn has_child(&self, name: &str, ns: &str) -> bool {
        self.get_child(name, ns).is_some()
    }

    /// The concatenated text children of this element (not of its descendants).
    pub fn text(&self) -> String {
        let mut text = String::new();
        for node in &self.children {
            if let Node::Text(part) = node {
                text.push_str(part);
            }
        }
        text
    }

    /// Appends a child element and returns it for further changes.
    pub fn append_child(&mut self, child: Element) -> &mut Element {
        self.children.push(Node::Element(child));
        match self.children.last_mut() {
            Some(Node::Element(child)) => child,
            // The element was pushed on the line above.
            _ => unreachable!("the last child is the element just appended"),
        }
    }

    /// Appends text, merged into a preceding text node; empty text is ignored.
    pub fn append_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        match self.children.last_mut() {
            Some(Node::Text(last)) => last.push_str(text),
            _ => self.children.push(Node::Text(text.to_owned())),
        }
    }

    /// Appends a node (see [`Element::append_child`] and [`Element::append_text`]).
    pub fn append_node(&mut self, node: Node) {
        match node {
            Node::Element(child) => {
                self.children.push(Node::Element(child));
            }
            Node::Text(text) => {
                if text.is_empty() {
                    return;
                }
                match self.children.last_mut() {
                    Some(Node::Text(last)) => last.push_str(&text),
                    _ => self.children.push(Node::Text(text)),
                }
            }
        }
    }

    /// Used by the parser: attributes arrive resolved and checked for duplicates.
    pub(crate) fn push_attr(&mut self, name: String, ns: Option<String>, value: String) {
        self.attrs.push(Attribute { name, ns, value });
    }
}

/// Builds an [`Element`]; see [`Element::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ElementBuilder {
    element: Element,
}

impl ElementBuilder {
    /// Sets the unprefixed attribute `name`. Namespaces are given to [`Element::builder`],
    /// never as `xmlns` attributes.
    pub fn attr(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.element.set_attr(name, value);
        self
    }

    /// Sets the attribute `name` in namespace `ns` (e.g. `("lang", ns::XML, "en")`).
    pub fn attr_ns(
        mut self,
        name: impl Into<String>,
        ns: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.element.set_attr_ns(name, ns, value);
        self
    }

    /// Appends a child element or text.
    pub fn append(mut self, node: impl Into<Node>) -> Self {
        self.element.append_node(node.into());
        self
    }

    /// Appends every node of `nodes`.
    pub fn append_all<N: Into<Node>>(mut self, nodes: impl IntoIterator<Item = N>) -> Self {
        for node in nodes {
            self.element.append_node(node.into());
        }
        self
    }

    /// The finished element.
    pub fn build(self) -> Element {
        self.element
    }
}

impl From<ElementBuilder> for Element {
    fn from(builder: ElementBuilder) -> Self {
        builder.build()
    }
}

impl From<ElementBuilder> for Node {
    fn from(builder: ElementBuilder) -> Self {
        Node::Element(builder.build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish() -> Element {
        Element::builder("iq", ns::JABBER_CLIENT)
            .attr("type", "set")
            .attr("id", "pub1")
            .attr_ns("lang", ns::XML, "en")
            .append(
                Element::builder("pubsub", ns::PUBSUB).append(
                    Element::builder("publish", ns::PUBSUB)
                        .attr("node", "news")
                        .append(Element::builder("item", ns::PUBSUB).attr("id", "1")),
                ),
            )
            .build()
    }

    #[test]
    fn attributes_are_found_by_local_name_and_namespaced_ones_by_namespace() {
        let iq = publish();
        assert_eq!(iq.attr("type"), Some("set"));
        assert_eq!(iq.attr("lang"), None);
        assert_eq!(iq.attr_ns("lang", ns::XML), Some("en"));
        assert_eq!(iq.lang(), Some("en"));
        assert_eq!(iq.attrs().len(), 3);
    }

    #[test]
    fn setting_an_existing_attribute_replaces_its_value_and_removing_returns_it() {
        let mut iq = publish();
        iq.set_attr("type", "get");
        assert_eq!(iq.attr("type"), Some("get"));
        assert_eq!(iq.attrs().len(), 3);
        assert_eq!(iq.remove_attr("type"), Some("get".to_owned()));
        assert_eq!(iq.attr("type"), None);
        assert_eq!(iq.remove_attr("type"), None);
    }

    #[test]
    fn children_are_found_by_name_and_namespace() {
        let iq = publish();
        let pubsub = iq.get_child("pubsub", ns::PUBSUB);
        assert!(pubsub.is_some());
        assert!(iq.get_child("pubsub", ns::PUBSUB_OWNER).is_none());
        assert!(iq.has_child("pubsub", ns::PUBSUB));
        let item = pubsub
            .and_then(|p| p.get_child("publish", ns::PUBSUB))
            .and_then(|p| p.get_child("item", ns::PUBSUB))
            .and_then(|i| i.attr("id"));
        assert_eq!(item, Some("1"));
    }

    #[test]
    fn adjacent_text_is_merged_and_empty_text_is_dropped() {
        let body = Element::builder("body", ns::JABBER_CLIENT)
            .append("Hello")
            .append("")
            .append(String::from(", world"))
            .append(Element::new("br", ns::JABBER_CLIENT))
            .append("!")
            .build();
        assert_eq!(body.nodes().len(), 3);
        assert_eq!(body.text(), "Hello, world!");
        assert_eq!(body.children().count(), 1);
    }

    #[test]
    fn append_child_returns_the_child_for_further_changes() {
        let mut message = Element::new("message", ns::JABBER_CLIENT);
        message
            .append_child(Element::new("body", ns::JABBER_CLIENT))
            .append_text("hi");
        if let Some(body) = message.get_child_mut("body", ns::JABBER_CLIENT) {
            body.append_text(" there");
        }
        assert_eq!(
            message
                .get_child("body", ns::JABBER_CLIENT)
                .map(Element::text),
            Some("hi there".to_owned())
        );
    }
}
