//! The `juxta` binary's library: configuration, authentication, the HTTP front, the wiring of
//! all adapters, and the CLI client.
//!
//! # Layout
//!
//! - [`config`]: TOML + `JUXTA_*` environment + flags.
//! - [`auth`]: admin keys and JWTs.
//! - [`http`]: REST, WebSocket, SSE, OpenAPI, metrics and health, behind a connection limit.
//! - [`server`]: builds the store, bus and fan-out from configuration and runs them until
//!   SIGTERM.
//! - [`client`]: `juxta pub`, `juxta sub`, `juxta nodes`.
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod config;
pub mod http;
pub mod metrics;
pub mod server;
