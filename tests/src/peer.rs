//! `juxta peer`: an edge peer of the overlay in its own process, bootstrapped from a gateway,
//! printing one JSON line per event, error or discovery record.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{RECV_TIMEOUT, Server};

/// A running `juxta peer --bootstrap <gateway> --identity-dir <dir> ARGS…`.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Peer {
    /// Starts a peer bootstrapped from `server`'s overlay address, with its identity key in
    /// `identity` (created when missing). Its stderr goes to the test's.
    pub fn start(server: &Server, args: &[&str], identity: &Path) -> Result<Self> {
        let bootstrap = server
            .p2p_addr()
            .context("the gateway printed no p2p address")?;
        let mut child = Command::new(server.binary())
            .arg("peer")
            .arg("--bootstrap")
            .arg(bootstrap)
            .arg("--identity-dir")
            .arg(identity)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting juxta peer")?;
        let stdout = child.stdout.take().context("stdout")?;
        Ok(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next JSON line, waiting up to twice [`RECV_TIMEOUT`] (joining the overlay takes
    /// a few gossip heartbeats).
    pub async fn next(&mut self) -> Result<Value> {
        let line = tokio::time::timeout(2 * RECV_TIMEOUT, self.lines.next_line())
            .await
            .context("juxta peer printed nothing in time")??
            .context("juxta peer ended")?;
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))
    }

    /// Fails if the peer prints anything within `quiet`.
    pub async fn silent_for(&mut self, quiet: Duration) -> Result<()> {
        let more = tokio::time::timeout(quiet, self.lines.next_line()).await;
        ensure!(more.is_err(), "juxta peer printed more: {more:?}");
        Ok(())
    }

    /// The peer's standard input (`--publish` reads items from it, one JSON line each);
    /// dropping it ends the input.
    pub fn stdin(&mut self) -> Result<ChildStdin> {
        self.child.stdin.take().context("stdin already taken")
    }

    /// Waits up to `limit` for the peer to exit.
    pub async fn exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .context("juxta peer did not exit in time")?
            .context("waiting for juxta peer")
    }

    /// Kills the peer.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The peer id `juxta peer --print-peer-id` derives from (or creates in) `identity`.
pub fn peer_id(server: &Server, identity: &Path) -> Result<String> {
    let out = std::process::Command::new(server.binary())
        .args(["peer", "--print-peer-id", "--identity-dir"])
        .arg(identity)
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
