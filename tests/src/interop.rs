//! Driving XMPP clients we did not write: slixmpp (installed by `tests/run.sh` into a
//! virtualenv named by `$JUXTA_INTEROP_PYTHON`) running `tests/interop/slixmpp_steps.py`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// The Python that has slixmpp: `$JUXTA_INTEROP_PYTHON` (set by `tests/run.sh`, which
/// installs it), else `python3` if it can import slixmpp.
pub fn python() -> Result<String> {
    let candidate = std::env::var("JUXTA_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import slixmpp"])
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        ok,
        "{candidate} cannot import slixmpp: run `bash tests/run.sh` (it installs it), or set \
         JUXTA_INTEROP_PYTHON to a Python that has slixmpp"
    );
    Ok(candidate)
}

/// A running `slixmpp_steps.py`: logs in as `jid` over STARTTLS (verifying the server's
/// certificate against `ca`) and runs `steps` (see the script's doc).
#[derive(Debug)]
pub struct Slixmpp {
    child: tokio::process::Child,
}

impl Slixmpp {
    /// Starts the script.
    pub fn start(
        addr: SocketAddr,
        jid: &str,
        password: &str,
        ca: &Path,
        steps: &Value,
    ) -> Result<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/slixmpp_steps.py");
        let child = tokio::process::Command::new(python()?)
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(jid)
            .arg(password)
            .arg(ca)
            .arg(steps.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting slixmpp")?;
        Ok(Self { child })
    }

    /// Waits for the report: whether every step succeeded, and the report itself.
    pub async fn finish(self, limit: Duration) -> Result<(bool, Value)> {
        let out = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .context("slixmpp did not finish in time")??;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "slixmpp printed no report: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.success(), report))
    }
}

/// `node`, with xmpp.js installed next to `tests/interop/xmppjs_steps.js` (`tests/run.sh`
/// runs `npm ci` there).
pub fn node() -> Result<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/interop");
    let node = std::env::var("JUXTA_INTEROP_NODE").unwrap_or_else(|_| "node".into());
    let ok = std::process::Command::new(&node)
        .current_dir(dir)
        .args(["--experimental-websocket", "-e", "require('@xmpp/client')"])
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        ok,
        "{node} cannot load @xmpp/client from {dir}: run `bash tests/run.sh` (it runs `npm ci` \
         there), or `npm ci` in {dir}"
    );
    Ok(node)
}

/// A running `xmppjs_steps.js`: xmpp.js logs in as `jid` over RFC 7395 WebSocket at `url`
/// and runs `steps` (see the script's doc).
#[derive(Debug)]
pub struct XmppJs {
    child: tokio::process::Child,
}

impl XmppJs {
    /// Starts the script.
    pub fn start(url: &str, jid: &str, password: &str, steps: &Value) -> Result<Self> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/interop");
        let child = tokio::process::Command::new(node()?)
            .current_dir(dir)
            // Node 20 has the WebSocket client xmpp.js uses behind this flag.
            .arg("--experimental-websocket")
            .arg("xmppjs_steps.js")
            .arg(url)
            .arg(jid)
            .arg(password)
            .arg(steps.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting xmpp.js")?;
        Ok(Self { child })
    }

    /// Waits for the report: whether every step succeeded, and the report itself.
    pub async fn finish(self, limit: Duration) -> Result<(bool, Value)> {
        let out = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .context("xmpp.js did not finish in time")??;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "xmpp.js printed no report: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.success(), report))
    }
}

/// A server for tests that drive an XMPP client, with the account `user`/`password`. The
/// overlay is off: its pipe counts as a subscriber of every node, and these tests learn that
/// the client has subscribed from the subscriber count ([`wait_for_subscribers`]).
pub async fn xmpp_server(user: &str, password: &str) -> Result<crate::Server> {
    let server =
        crate::Server::start(crate::ServerOptions::new().env("JUXTA_P2P__ENABLED", "false"))
            .await?;
    server
        .api()
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/accounts/{user}"),
            Some(&serde_json::json!({ "password": password })),
        )
        .await?
        .expect(201)?;
    Ok(server)
}

/// Waits (30 s at most) until `node` has at least `n` subscribers; `who` names them in the
/// error.
pub async fn wait_for_subscribers(
    server: &crate::Server,
    node: &str,
    n: u64,
    who: &str,
) -> Result<()> {
    let api = server.api();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = api.get_node(node).await?;
        if reply.status == 200 && reply.body["subscribers"].as_u64().unwrap_or(0) >= n {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{who} never subscribed to {node}: {}",
            server.output_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
