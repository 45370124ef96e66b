//! Cross-process harness for juxta: spawns the real `juxta` binary and talks to it over real
//! sockets with clients we did not write (reqwest, tokio-tungstenite).
//!
//! # Layout
//! - [`Server`] / [`ServerOptions`] (`server`): starts `juxta serve` as a child process on
//!   `127.0.0.1:0`, learns its port from the `listening http://…` line on stdout, and can
//!   SIGKILL, SIGTERM and restart it on the same data dir. Dropping it kills the child.
//! - [`Api`] / [`Reply`] (`api`): REST calls with the bearer token; every call returns the
//!   status and the body as JSON so tests can assert on problem+json error codes.
//! - [`WsClient`] (`ws`): the `/api/v1/ws` protocol — send an op, receive the next JSON message
//!   with a timeout.
//! - [`SseClient`] / [`SseFrame`] (`sse`): `/api/v1/nodes/{node}/events` parsed into frames.
//! - [`interop`]: slixmpp, an XMPP client library we did not write, run step by step.
//! - `sys`: the few OS calls the harness needs (signals, `RLIMIT_NOFILE`, RSS from `/proc`,
//!   root or not, programs on `PATH`).
//! - [`prosody`]: a real Prosody from Debian on free local ports, with an external component
//!   and users, for the XEP-0114 tests; [`prosody::require_prosody`] installs it or says why a
//!   test is skipped.
//! - [`peer`]: `juxta peer`, an edge peer of the overlay in its own process, read line by line.
//! - [`netns`]: a NAT laboratory in network namespaces (`nat/topology.sh`): a public segment
//!   where the gateway runs, two peers each behind its own NAT router; torn down on drop;
//!   [`netns::require_nat_lab`] says why a test is skipped when this is not root.
//!
//! Data moves one way: a test starts a [`Server`], builds clients from its URLs and admin key,
//! and asserts on what the clients receive. Nothing here knows the gateway's internals.
#![warn(missing_docs)]

mod api;
pub mod interop;
pub mod netns;
pub mod peer;
pub mod prosody;
mod server;
mod sse;
mod sys;
mod ws;

pub use api::{Api, Reply, encode_path_segment};
pub use server::{
    DEFAULT_P2P_LISTEN, SHUTDOWN_TIMEOUT, STARTUP_TIMEOUT, Server, ServerOptions, juxta_bin,
};
pub use sse::{SseClient, SseFrame};
pub use sys::{RlimitNofile, cpu_seconds_of, raise_nofile_limit, rss_kib_of, unix_nanos};
pub use ws::WsClient;

use std::time::Duration;

/// How long a test waits for any single expected message before it fails. Generous: it only
/// matters when something is broken, and CI machines are slow.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(15);

/// A short random suffix for node names, so tests never depend on a fresh data dir.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &sys::random_hex(4))
}
