//! Spawning and controlling the real `juxta serve` process.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::sys;
use crate::ws::WsClient;

/// How long `juxta serve` may take to print its `listening http://…` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Server::terminate`] waits for a graceful exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of the child's recent stdout/stderr we keep for failure messages. Bounded so a
/// chatty server cannot grow the test process.
const OUTPUT_TAIL_BYTES: usize = 64 * 1024;

/// The line prefix `juxta serve` prints once its HTTP listener is bound.
const LISTENING_MARKER: &str = "listening http://";
/// The line `juxta serve` prints, before the HTTP one, when it accepts XMPP clients.
const XMPP_MARKER: &str = "listening xmpp://";
/// The line it prints when it also accepts direct-TLS XMPP clients (XEP-0368).
const XMPPS_MARKER: &str = "listening xmpps://";
/// Where the overlay listens unless [`ServerOptions::p2p_listen`] says otherwise.
pub const DEFAULT_P2P_LISTEN: &str = "/ip4/127.0.0.1/tcp/0";
/// The line `juxta serve` prints for each overlay listen address (a multiaddr ending in
/// `/p2p/<peer id>`).
const P2P_MARKER: &str = "listening p2p ";

/// The path of the `juxta` binary: `$JUXTA_BIN`, else next to the running executable's
/// directory (`target/<profile>/juxta` seen from `target/<profile>/deps/…`), else in the same
/// directory (seen from `target/<profile>/juxta-load`).
pub fn juxta_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("JUXTA_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("JUXTA_BIN={} does not name a file", path.display());
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let dir = exe
        .parent()
        .context("the current executable has no parent directory")?;
    let candidates: Vec<PathBuf> = [
        dir.parent().map(|d| d.join("juxta")),
        Some(dir.join("juxta")),
    ]
    .into_iter()
    .flatten()
    .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "the juxta binary was not found (looked at {}); run `cargo build -p juxta-gateway` \
             first (with the same profile), or set JUXTA_BIN=/path/to/juxta",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// How to start a [`Server`]. `ServerOptions::default()` is a fresh temporary data dir, a
/// random admin key, the overlay on [`DEFAULT_P2P_LISTEN`] and no extra arguments or
/// environment.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Data directory; `None` = a fresh temporary directory owned (and removed) by the server.
    pub data_dir: Option<PathBuf>,
    /// Extra arguments after `serve --data-dir DIR --http 127.0.0.1:0 --xmpp 127.0.0.1:0
    /// --p2p LISTEN`.
    pub args: Vec<OsString>,
    /// The overlay listen multiaddr passed as `--p2p`; `None` = [`DEFAULT_P2P_LISTEN`].
    /// (`--p2p` is repeatable, so one more in [`ServerOptions::args`] would add a second
    /// listener rather than replace this one, and [`Server::p2p_addr`] reports the first.)
    pub p2p_listen: Option<String>,
    /// Extra environment, e.g. `("JUXTA_FANOUT__QUEUE_CAPACITY", "16")`.
    pub env: Vec<(OsString, OsString)>,
    /// The binary; `None` = [`juxta_bin`].
    pub binary: Option<PathBuf>,
    /// The admin key; `None` = 32 random hex characters.
    pub admin_key: Option<String>,
}

impl ServerOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `dir` as the data directory (it is not removed afterwards).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Appends one argument to `juxta serve`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Listens for the overlay on `multiaddr` (e.g. `/ip4/10.77.0.1/tcp/0`) instead of
    /// [`DEFAULT_P2P_LISTEN`].
    pub fn p2p_listen(mut self, multiaddr: impl Into<String>) -> Self {
        self.p2p_listen = Some(multiaddr.into());
        self
    }

    /// Sets one environment variable for the child.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Uses this binary instead of [`juxta_bin`].
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Uses this admin key instead of a random one.
    pub fn admin_key(mut self, key: impl Into<String>) -> Self {
        self.admin_key = Some(key.into());
        self
    }
}

/// The last lines the child wrote, bounded to [`OUTPUT_TAIL_BYTES`].
#[derive(Debug, Default)]
struct OutputTail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl OutputTail {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > OUTPUT_TAIL_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

type SharedTail = Arc<Mutex<OutputTail>>;

fn push_line(tail: &SharedTail, line: String) {
    // A poisoned lock only means another thread panicked while pushing a log line; the tail is
    // still usable for diagnostics.
    let mut guard = tail
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    guard.push(line);
}

fn render_tail(tail: &SharedTail) -> String {
    let guard = tail
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    guard.lines.iter().cloned().collect::<Vec<_>>().join("\n")
}

/// A running `juxta serve` child process.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    xmpp_addr: Option<SocketAddr>,
    xmpps_addr: Option<SocketAddr>,
    p2p_addr: Option<String>,
    admin_key: String,
    data_dir: PathBuf,
    binary: PathBuf,
    options: ServerOptions,
    output: SharedTail,
    readers: Vec<JoinHandle<()>>,
    /// Declared last so it is dropped after the child has been killed.
    _temp_dir: Option<TempDir>,
}

impl Server {
    /// Starts `juxta serve --data-dir DIR --http 127.0.0.1:0` and returns once it printed its
    /// `listening http://127.0.0.1:PORT` line (or fails after [`STARTUP_TIMEOUT`]).
    pub async fn start(options: ServerOptions) -> Result<Self> {
        let binary = match &options.binary {
            Some(path) => path.clone(),
            None => juxta_bin()?,
        };
        let (temp_dir, data_dir) = match &options.data_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("juxta-test-")
                    .tempdir()
                    .context("creating a temporary data dir")?;
                let path = dir.path().to_owned();
                (Some(dir), path)
            }
        };
        let admin_key = options
            .admin_key
            .clone()
            .unwrap_or_else(|| sys::random_hex(16));
        let output = SharedTail::default();
        let spawned = spawn(&binary, &data_dir, &admin_key, &options, &output).await?;
        Ok(Self {
            child: spawned.child,
            pid: spawned.pid,
            addr: spawned.addr,
            xmpp_addr: spawned.xmpp_addr,
            xmpps_addr: spawned.xmpps_addr,
            p2p_addr: spawned.p2p_addr,
            admin_key,
            data_dir,
            binary,
            options,
            output,
            readers: spawned.readers,
            _temp_dir: temp_dir,
        })
    }

    /// Starts a server with default options.
    pub async fn start_default() -> Result<Self> {
        Self::start(ServerOptions::default()).await
    }

    /// The HTTP listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The XMPP client listener's address (`--xmpp 127.0.0.1:0` is always passed).
    pub fn xmpp_addr(&self) -> Option<SocketAddr> {
        self.xmpp_addr
    }

    /// The direct-TLS XMPP listener's address, when the server was started with
    /// `JUXTA_XMPP__DIRECT_TLS_LISTEN`.
    pub fn xmpps_addr(&self) -> Option<SocketAddr> {
        self.xmpps_addr
    }

    /// The first overlay address the server printed: a multiaddr ending in `/p2p/<peer id>`
    /// (`None` with `p2p.enabled = false`).
    pub fn p2p_addr(&self) -> Option<&str> {
        self.p2p_addr.as_deref()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:PORT/api/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/api/v1/ws", self.addr)
    }

    /// The admin key passed as `JUXTA_ADMIN_KEY`.
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The binary this server runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's resident set size in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        sys::rss_kib_of(self.pid)
    }

    /// The last lines (up to 64 KiB) the child wrote to stdout and stderr.
    pub fn output_tail(&self) -> String {
        render_tail(&self.output)
    }

    /// A REST client authenticated with the admin key.
    pub fn api(&self) -> Api {
        Api::new(&self.base_url(), Some(&self.admin_key))
    }

    /// A REST client with `token` (or none).
    pub fn api_with(&self, token: Option<&str>) -> Api {
        Api::new(&self.base_url(), token)
    }

    /// A WebSocket client connected with the admin key as `?token=`.
    pub async fn ws(&self) -> Result<WsClient> {
        WsClient::connect(&self.ws_url(), &self.admin_key).await
    }

    /// A `juxta` command (the same binary) with this server's environment: the admin key and
    /// the extra variables from [`ServerOptions::env`], and no other inherited `JUXTA_*`.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        scrub_juxta_env(&mut cmd);
        cmd.env("JUXTA_ADMIN_KEY", &self.admin_key)
            .env("JUXTA_LOG__LEVEL", "warn")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Mints a JWT with `juxta token --data-dir DIR <args>` (e.g. `--sub alice --publish 'x*'`).
    pub async fn mint_token(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command()
            .arg("token")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("running juxta token")?;
        if !out.status.success() {
            bail!(
                "juxta token {args:?} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8(out.stdout).context("juxta token printed non-UTF-8")?;
        let token = token.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            bail!("juxta token printed {token:?}, expected one JWT");
        }
        Ok(token.to_owned())
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the child and reaps it.
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("polling the child")? {
            return Ok(status);
        }
        self.child.start_kill().context("sending SIGKILL")?;
        let status = tokio::time::timeout(SHUTDOWN_TIMEOUT, self.child.wait())
            .await
            .context("the child did not die within 10 s of SIGKILL")?
            .context("waiting for the child")?;
        Ok(status)
    }

    /// SIGTERMs the child and waits up to [`SHUTDOWN_TIMEOUT`] for it to exit.
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        self.terminate_within(SHUTDOWN_TIMEOUT).await
    }

    /// SIGTERMs the child and waits up to `limit` for it to exit; an error if it did not.
    pub async fn terminate_within(&mut self, limit: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("polling the child")? {
            return Ok(status);
        }
        sys::send_signal(self.pid, libc::SIGTERM).context("sending SIGTERM")?;
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .map_err(|_| {
                anyhow!(
                    "juxta did not exit within {limit:?} of SIGTERM; output:\n{}",
                    self.output_tail()
                )
            })?
            .context("waiting for the child")?;
        Ok(status)
    }

    /// Starts the server again on the same data dir with the same admin key, options and
    /// environment (on a new port). A still-running child is first stopped with SIGTERM.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            let status = self.terminate().await?;
            if !status.success() {
                bail!("juxta exited with {status} on SIGTERM before the restart");
            }
        }
        for reader in self.readers.drain(..) {
            reader.abort();
        }
        push_line(&self.output, "--- restart ---".to_owned());
        let spawned = spawn(
            &self.binary,
            &self.data_dir,
            &self.admin_key,
            &self.options,
            &self.output,
        )
        .await?;
        self.child = spawned.child;
        self.pid = spawned.pid;
        self.addr = spawned.addr;
        self.xmpp_addr = spawned.xmpp_addr;
        self.xmpps_addr = spawned.xmpps_addr;
        self.p2p_addr = spawned.p2p_addr;
        self.readers = spawned.readers;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.start_kill();
            // Reap it (briefly) so the temporary data dir is removed after the process is gone.
            for _ in 0..200 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for reader in &self.readers {
            reader.abort();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last output of juxta serve (pid {}, {}) ---\n{}\n--- end ---",
                self.pid,
                self.base_url(),
                self.output_tail()
            );
        }
    }
}

/// The addresses a started server printed.
struct Addrs {
    http: SocketAddr,
    xmpp: Option<SocketAddr>,
    xmpps: Option<SocketAddr>,
    p2p: Option<String>,
}

struct Spawned {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    xmpp_addr: Option<SocketAddr>,
    xmpps_addr: Option<SocketAddr>,
    p2p_addr: Option<String>,
    readers: Vec<JoinHandle<()>>,
}

/// Removes every inherited `JUXTA_*` variable (a developer's `JUXTA_TOKEN`, say) so that the
/// child sees only what the test chose. `JUXTA_BIN` is ours, not the gateway's, and harmless.
fn scrub_juxta_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("JUXTA_") {
            cmd.env_remove(key);
        }
    }
}

async fn spawn(
    binary: &Path,
    data_dir: &Path,
    admin_key: &str,
    options: &ServerOptions,
    output: &SharedTail,
) -> Result<Spawned> {
    let p2p_listen = options.p2p_listen.as_deref().unwrap_or(DEFAULT_P2P_LISTEN);
    let mut cmd = Command::new(binary);
    scrub_juxta_env(&mut cmd);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--http")
        .arg("127.0.0.1:0")
        .arg("--xmpp")
        .arg("127.0.0.1:0")
        .arg("--p2p")
        .arg(p2p_listen)
        .args(&options.args)
        .env("JUXTA_ADMIN_KEY", admin_key)
        .env("JUXTA_LOG__LEVEL", "warn")
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {} serve", binary.display()))?;
    let pid = child.id().context("the child has no pid")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;

    let (listening_tx, listening_rx) = oneshot::channel();
    let readers = vec![
        tokio::spawn(drain(stdout, "", output.clone(), Some(listening_tx))),
        tokio::spawn(drain(stderr, "stderr: ", output.clone(), None)),
    ];

    let failure = |what: String, readers: &[JoinHandle<()>]| {
        for reader in readers {
            reader.abort();
        }
        anyhow!(
            "{what}\ncommand: {} serve --data-dir {} --http 127.0.0.1:0 --xmpp 127.0.0.1:0 \
             --p2p {p2p_listen} {:?}\noutput:\n{}",
            binary.display(),
            data_dir.display(),
            options.args,
            render_tail(output)
        )
    };

    enum Outcome {
        Listening(Addrs),
        StdoutClosed,
        Exited(std::io::Result<ExitStatus>),
        TimedOut,
    }
    let outcome = tokio::select! {
        got = listening_rx => match got {
            Ok(addr) => Outcome::Listening(addr),
            Err(_) => Outcome::StdoutClosed,
        },
        status = child.wait() => Outcome::Exited(status),
        () = tokio::time::sleep(STARTUP_TIMEOUT) => Outcome::TimedOut,
    };
    match outcome {
        Outcome::Listening(Addrs {
            http,
            xmpp,
            xmpps,
            p2p,
        }) => Ok(Spawned {
            child,
            pid,
            addr: http,
            xmpp_addr: xmpp,
            xmpps_addr: xmpps,
            p2p_addr: p2p,
            readers,
        }),
        Outcome::StdoutClosed => {
            // stdout closed without the line: the process is exiting; let stderr drain.
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(failure(
                format!(
                    "juxta serve closed stdout before printing `{LISTENING_MARKER}…` (exit: {status:?})"
                ),
                &readers,
            ))
        }
        Outcome::Exited(status) => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(failure(
                format!("juxta serve exited ({status:?}) before listening"),
                &readers,
            ))
        }
        Outcome::TimedOut => {
            let _ = child.start_kill();
            Err(failure(
                format!(
                    "juxta serve printed no `{LISTENING_MARKER}…` line within {STARTUP_TIMEOUT:?}"
                ),
                &readers,
            ))
        }
    }
}

/// Reads `pipe` line by line into the bounded tail until EOF, so the child never blocks on a
/// full pipe; the first `listening http://ADDR` line is reported through `listening`.
async fn drain(
    pipe: impl AsyncRead + Unpin,
    prefix: &'static str,
    output: SharedTail,
    mut listening: Option<oneshot::Sender<Addrs>>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    let (mut xmpp, mut xmpps, mut p2p) = (None, None, None);
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        if let Some(addr) = parse_marker(&line, XMPP_MARKER) {
            xmpp = Some(addr);
        }
        if let Some(addr) = parse_marker(&line, XMPPS_MARKER) {
            xmpps = Some(addr);
        }
        if let Some(rest) = line.strip_prefix(P2P_MARKER)
            && p2p.is_none()
        {
            p2p = Some(rest.trim().to_owned());
        }
        if let Some(http) = parse_listening(&line)
            && let Some(tx) = listening.take()
        {
            let _ = tx.send(Addrs {
                http,
                xmpp,
                xmpps,
                p2p: p2p.clone(),
            });
        }
        push_line(&output, format!("{prefix}{line}"));
    }
}

/// `listening http://127.0.0.1:PORT` (possibly with a trailing `/` or more words) → the address.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    parse_marker(line, LISTENING_MARKER)
}

/// The address after `marker` in `line`.
fn parse_marker(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let addr = rest.split_whitespace().next()?.trim_end_matches('/');
    addr.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_the_listening_line_when_parsed_then_the_address_is_found() {
        assert_eq!(
            parse_listening("listening http://127.0.0.1:4567"),
            Some("127.0.0.1:4567".parse().expect("literal address"))
        );
        assert_eq!(
            parse_listening("INFO listening http://127.0.0.1:80/ (rest)"),
            Some("127.0.0.1:80".parse().expect("literal address"))
        );
        assert_eq!(parse_listening("listening xmpp 127.0.0.1:5222"), None);
    }

    #[test]
    fn given_a_chatty_child_when_the_tail_overflows_then_it_stays_bounded() {
        let mut tail = OutputTail::default();
        for i in 0..10_000 {
            tail.push(format!("line {i} {}", "x".repeat(100)));
        }
        assert!(tail.bytes <= OUTPUT_TAIL_BYTES);
        assert!(
            tail.lines
                .back()
                .is_some_and(|l| l.starts_with("line 9999"))
        );
    }
}
