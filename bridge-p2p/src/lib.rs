//! juxta's overlay: JXTA concepts on libp2p.
//!
//! | JXTA | here |
//! |---|---|
//! | peer id | libp2p `PeerId`, an ed25519 key persisted in the data dir ([`identity`]) |
//! | peer group, membership | [`group`]: open groups, and protected ones whose credential is a group-key signature over (peer id, group, expiry) |
//! | propagate pipe | a gossipsub topic `juxta/<group>/<node>` carrying [`envelope::Envelope`]s |
//! | reliable pipe | the catch-up request-response protocol ([`catchup`]): items after an offset, in bounded pages |
//!
//! Gossipsub is best-effort; offsets in every envelope and catch-up after a gap or a
//! reconnect make a pipe reliable: a peer ends with every item, in order, once.

pub mod bridge;
pub mod catchup;
pub mod envelope;
pub mod group;
pub mod identity;
pub mod node;
pub mod peer;
