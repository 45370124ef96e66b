//! RFC 6120 §4.9: stream errors.

use std::borrow::Cow;
use std::fmt;

/// A stream error condition (RFC 6120 §4.9.3); [`Condition::as_str`] is the name of the
/// element sent inside `<stream:error>`.
///
/// `see-other-host` is left out until the bridge redirects: it carries the new host as
/// content, which [`crate::stream_error`] does not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Condition {
    /// §4.9.3.1: XML that cannot be processed (e.g. character data at stream level).
    BadFormat,
    /// §4.9.3.2: an unsupported or undeclared namespace prefix.
    BadNamespacePrefix,
    /// §4.9.3.3: a new stream for the same entity conflicts with this one.
    Conflict,
    /// §4.9.3.4: the peer has not sent anything for too long.
    ConnectionTimeout,
    /// §4.9.3.5: the `to` host is no longer serviced.
    HostGone,
    /// §4.9.3.6: the `to` host is not serviced.
    HostUnknown,
    /// §4.9.3.7: a stanza lacks a required `to` or `from`.
    ImproperAddressing,
    /// §4.9.3.8: a misconfiguration or internal fault on our side.
    InternalServerError,
    /// §4.9.3.9: a `from` the peer is not allowed to use.
    InvalidFrom,
    /// §4.9.3.10: a wrong stream namespace or an unsupported content namespace.
    InvalidNamespace,
    /// §4.9.3.11: XML that fails validation against the schema of its namespace.
    InvalidXml,
    /// §4.9.3.12: data sent before the stream was authenticated.
    NotAuthorized,
    /// §4.9.3.13: XML that is not well-formed.
    NotWellFormed,
    /// §4.9.3.14: a local policy (size, depth, attribute count, rate) was violated.
    PolicyViolation,
    /// §4.9.3.15: a remote server needed for the stream cannot be reached.
    RemoteConnectionFailed,
    /// §4.9.3.16: the stream must be renegotiated (credentials or security changed).
    Reset,
    /// §4.9.3.17: not enough resources to service the stream.
    ResourceConstraint,
    /// §4.9.3.18 and §11.1: comments, processing instructions, DTDs or entity references
    /// other than the predefined ones and character references.
    RestrictedXml,
    /// §4.9.3.20: the server is being shut down.
    SystemShutdown,
    /// §4.9.3.21: no other condition applies.
    UndefinedCondition,
    /// §4.9.3.22: the stream is not encoded in UTF-8.
    UnsupportedEncoding,
    /// §4.9.3.23: a mandatory-to-negotiate feature is not supported.
    UnsupportedFeature,
    /// §4.9.3.24: a top-level element the server does not understand.
    UnsupportedStanzaType,
    /// §4.9.3.25: an unsupported `version` in the stream header.
    UnsupportedVersion,
}

impl Condition {
    /// The element name of this condition, e.g. `"not-well-formed"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadFormat => "bad-format",
            Self::BadNamespacePrefix => "bad-namespace-prefix",
            Self::Conflict => "conflict",
            Self::ConnectionTimeout => "connection-timeout",
            Self::HostGone => "host-gone",
            Self::HostUnknown => "host-unknown",
            Self::ImproperAddressing => "improper-addressing",
            Self::InternalServerError => "internal-server-error",
            Self::InvalidFrom => "invalid-from",
            Self::InvalidNamespace => "invalid-namespace",
            Self::InvalidXml => "invalid-xml",
            Self::NotAuthorized => "not-authorized",
            Self::NotWellFormed => "not-well-formed",
            Self::PolicyViolation => "policy-violation",
            Self::RemoteConnectionFailed => "remote-connection-failed",
            Self::Reset => "reset",
            Self::ResourceConstraint => "resource-constraint",
            Self::RestrictedXml => "restricted-xml",
            Self::SystemShutdown => "system-shutdown",
            Self::UndefinedCondition => "undefined-condition",
            Self::UnsupportedEncoding => "unsupported-encoding",
            Self::UnsupportedFeature => "unsupported-feature",
            Self::UnsupportedStanzaType => "unsupported-stanza-type",
            Self::UnsupportedVersion => "unsupported-version",
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure that ends the stream: the condition to send in `<stream:error>` and a detail
/// for logs.
///
/// The detail names what was wrong in our words; it is safe to send as the error's
/// `<text/>` (it never quotes the peer's input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{condition}: {detail}")]
pub struct StreamError {
    condition: Condition,
    detail: Cow<'static, str>,
}

impl StreamError {
    /// A stream error with `condition` and a human-readable `detail`.
    pub fn new(condition: Condition, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            condition,
            detail: detail.into(),
        }
    }

    /// The RFC 6120 condition to send to the peer.
    pub fn condition(&self) -> Condition {
        self.condition
    }

    /// What was wrong, for logs and the optional `<text/>` of the stream error.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub(crate) fn not_well_formed(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Condition::NotWellFormed, detail)
    }

    pub(crate) fn restricted(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Condition::RestrictedXml, detail)
    }

    pub(crate) fn policy(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Condition::PolicyViolation, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_render_as_their_rfc_6120_element_names() {
        assert_eq!(Condition::NotWellFormed.to_string(), "not-well-formed");
        assert_eq!(Condition::RestrictedXml.as_str(), "restricted-xml");
        assert_eq!(
            Condition::BadNamespacePrefix.as_str(),
            "bad-namespace-prefix"
        );
        assert_eq!(
            Condition::UnsupportedStanzaType.as_str(),
            "unsupported-stanza-type"
        );
    }

    #[test]
    fn a_stream_error_displays_its_condition_and_detail() {
        let error = StreamError::new(Condition::PolicyViolation, "stanza too large");
        assert_eq!(error.condition(), Condition::PolicyViolation);
        assert_eq!(error.detail(), "stanza too large");
        assert_eq!(error.to_string(), "policy-violation: stanza too large");
    }
}
