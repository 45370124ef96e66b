//! juxta's overlay: JXTA concepts on libp2p.
//!
//! | JXTA | here |
//! |---|---|
//! | peer id | libp2p `PeerId`, an ed25519 key persisted in the data dir ([`identity`]) |
//! | peer group, membership | [`group`]: open groups, and protected ones whose credential is a group-key signature over (peer id, group, expiry) |
//! | propagate pipe | a gossipsub topic `juxta/<group>/<node>` carrying [`envelope::Envelope`]s |
//! | reliable pipe | the catch-up request-response protocol ([`catchup`]): items after an offset, in bounded pages |
//! | advertisements with expiry, rendezvous, SRDI | [`advert`]: signed records in Kademlia, provider records per group and pipe, rendezvous registrations (namespace = group) |
//! | relay peer, NAT | gateways run circuit relay v2; edge peers reserve a slot, find members at the rendezvous point and hole punch (DCUtR) ([`node`]) |
//!
//! Gossipsub is best-effort; offsets in every envelope and catch-up after a gap or a
//! reconnect make a pipe reliable: a peer ends with every item, in order, once.

pub mod advert;
pub mod bridge;
pub mod catchup;
pub mod envelope;
pub mod group;
pub mod identity;
pub mod node;
pub mod peer;
