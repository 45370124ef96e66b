//! A real Prosody, installed from Debian, for end-to-end tests of the external component
//! (XEP-0114): juxta attaches to it as a component, and ordinary clients log into it.
//!
//! [`Prosody::start`] writes a configuration into a fresh temporary directory (pid file, data,
//! certificates and log all inside it), registers the users with `prosodyctl`, runs
//! `prosody --config FILE -F` in the foreground and returns once its c2s and component ports
//! are listening. Both ports are free ports on 127.0.0.1, so tests never meet a system-wide
//! Prosody (5222/5347) or each other; there is no s2s and no HTTP. c2s requires STARTTLS with a
//! self-signed certificate generated here ([`Prosody::ca_file`] is what clients trust).
//! Dropping it kills the process.
//!
//! Tests begin with [`require_prosody`], which installs Prosody from Debian when it is missing
//! and we are root, and otherwise says loudly that the test is skipped (or fails, under CI).
//! [`Prosody::client_steps`] runs `interop/slixmpp_steps.py` ([`Slixmpp`]), a slixmpp client
//! logged into this Prosody, through a list of steps (disco, ping, pubsub
//! subscribe/publish/items, waiting for notifications, raw iqs).

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::interop::Slixmpp;
use crate::sys::{find_on_path, is_root};

/// How long Prosody may take to open its ports.
pub const PROSODY_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one run of the slixmpp step script may take beyond its steps' own timeouts.
const CLIENT_MARGIN: Duration = Duration::from_secs(60);
/// How much of the end of Prosody's log [`Prosody::log`] returns; bounded so a failure
/// message stays readable.
const LOG_TAIL_BYTES: usize = 32 * 1024;
/// Prosody's log line when a listening port cannot be bound (another process took the free
/// port we picked between probing and starting); start is then retried on new ports.
const PORT_CLASH: &str = "Failed to open server port";
/// How many times [`Prosody::start`] tries fresh ports.
const START_ATTEMPTS: usize = 3;

/// What to start.
#[derive(Debug, Clone, Copy)]
pub struct ProsodyOptions<'a> {
    /// The virtual host users live on, e.g. `prosody.test`.
    pub domain: &'a str,
    /// An external component to accept: its JID (e.g. `pubsub.prosody.test`) and secret.
    pub component: Option<(&'a str, &'a str)>,
    /// Accounts to register on `domain`: (username, password).
    pub users: &'a [(&'a str, &'a str)],
}

/// A running Prosody; see the [module documentation](self).
#[derive(Debug)]
pub struct Prosody {
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
    console_path: PathBuf,
    ca_file: PathBuf,
    domain: String,
    c2s_addr: SocketAddr,
    component_addr: Option<SocketAddr>,
    /// Declared last so it is removed after the process is gone.
    dir: TempDir,
}

impl Prosody {
    /// Writes the configuration, registers `options.users` and starts Prosody; returns once
    /// its ports listen (or fails after [`PROSODY_STARTUP_TIMEOUT`] with its log).
    pub async fn start(options: ProsodyOptions<'_>) -> Result<Self> {
        let prosody = find_on_path("prosody").context(
            "prosody is not installed: `apt-get install prosody` (tests/run.sh does it), \
             and begin tests with require_prosody()",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("juxta-prosody-")
            .tempdir()
            .context("creating Prosody's directory")?;
        for sub in ["data", "certs"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        let ca_file = write_certificate(dir.path(), options)?;
        let config_path = dir.path().join("prosody.cfg.lua");
        let log_path = dir.path().join("prosody.log");
        let console_path = dir.path().join("console.log");

        let mut this = Self {
            child: None,
            config_path,
            log_path,
            console_path,
            ca_file,
            domain: options.domain.to_owned(),
            c2s_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            component_addr: None,
            dir,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            this.c2s_addr.set_port(free_port()?);
            this.component_addr = match options.component {
                Some(_) => Some(SocketAddr::from(([127, 0, 0, 1], free_port()?))),
                None => None,
            };
            let config = render_config(
                this.dir.path(),
                options,
                this.c2s_addr.port(),
                this.component_addr.map(|a| a.port()),
            );
            std::fs::write(&this.config_path, config).context("writing prosody.cfg.lua")?;
            if attempt == 1 {
                for (user, password) in options.users {
                    register(&this.config_path, user, options.domain, password).await?;
                }
            }
            match this.spawn(&prosody).await {
                Ok(()) => return Ok(this),
                Err(Started::PortClash) if attempt < START_ATTEMPTS => this.stop().await,
                Err(Started::PortClash) => {
                    bail!(
                        "Prosody found its ports taken {START_ATTEMPTS} times; its log:\n{}",
                        this.log()
                    )
                }
                Err(Started::Failed(error)) => {
                    return Err(
                        error.context(format!("Prosody did not start; its log:\n{}", this.log()))
                    );
                }
            }
        }
    }

    /// Stops Prosody (SIGKILL) and starts it again with the same configuration, ports and
    /// data, e.g. to test that a component reconnects.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let prosody = find_on_path("prosody").context("prosody is not installed")?;
        match self.spawn(&prosody).await {
            Ok(()) => Ok(()),
            Err(Started::PortClash) => bail!(
                "Prosody could not reopen its ports after a restart; its log:\n{}",
                self.log()
            ),
            Err(Started::Failed(error)) => {
                Err(error.context(format!("Prosody did not restart; its log:\n{}", self.log())))
            }
        }
    }

    /// Kills Prosody and waits for it to exit. Dropping does the same without waiting.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// The c2s address (STARTTLS required; trust [`Prosody::ca_file`]).
    pub fn c2s_addr(&self) -> SocketAddr {
        self.c2s_addr
    }

    /// The component address, when a component was configured.
    pub fn component_addr(&self) -> Option<SocketAddr> {
        self.component_addr
    }

    /// The virtual host.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The self-signed certificate c2s presents, for clients to trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The directory holding the configuration, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of Prosody's log (and of anything it printed), for failure messages.
    pub fn log(&self) -> String {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        let console = std::fs::read(&self.console_path).unwrap_or_default();
        let tail = &log[log.len().saturating_sub(LOG_TAIL_BYTES)..];
        let mut out = String::from_utf8_lossy(tail).into_owned();
        if !console.is_empty() {
            out.push_str("\n--- console ---\n");
            out.push_str(&String::from_utf8_lossy(
                &console[console.len().saturating_sub(4096)..],
            ));
        }
        out
    }

    /// Whether Prosody's log contains `needle` (e.g. `"External component successfully
    /// authenticated"`).
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read(&self.log_path)
            .is_ok_and(|log| String::from_utf8_lossy(&log).contains(needle))
    }

    /// Waits until Prosody's log contains `needle`; fails with the log after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.log_contains(needle) {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "Prosody's log does not say {needle:?} after {timeout:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Logs `user` into this Prosody with slixmpp (`interop/slixmpp_steps.py`, see its
    /// docstring for the steps) and runs `steps`. Returns whether every step was ok, and the
    /// script's report (`{"connected", "jid", "steps": [...]}`).
    pub async fn client_steps(
        &self,
        user: &str,
        password: &str,
        steps: &serde_json::Value,
    ) -> Result<(bool, serde_json::Value)> {
        let jid = format!("{user}@{}", self.domain);
        let client = Slixmpp::start(self.c2s_addr, &jid, password, &self.ca_file, steps)?;
        let budget: f64 = steps.as_array().map_or(0.0, |steps| {
            steps
                .iter()
                .map(|s| {
                    s["timeout"].as_f64().unwrap_or(10.0) + s["seconds"].as_f64().unwrap_or(0.0)
                })
                .sum()
        });
        let limit = CLIENT_MARGIN + Duration::from_secs_f64(budget);
        client
            .finish(limit)
            .await
            .with_context(|| format!("Prosody's log:\n{}", self.log()))
    }

    /// Runs `prosody --config FILE -F` and waits for its ports.
    async fn spawn(&mut self, prosody: &Path) -> Result<(), Started> {
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console_path)
            .map_err(|e| Started::Failed(e.into()))?;
        let console_err = console.try_clone().map_err(|e| Started::Failed(e.into()))?;
        // The log of an earlier run must not make this one look ready.
        let _ = std::fs::rename(&self.log_path, self.dir.path().join("prosody.previous.log"));
        let child = Command::new(prosody)
            .arg("--config")
            .arg(&self.config_path)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Started::Failed(anyhow::Error::from(e).context("spawning prosody")))?;
        self.child = Some(child);
        let mut ready = vec![format!(
            "Activated service 'c2s' on [127.0.0.1]:{}",
            self.c2s_addr.port()
        )];
        if let Some(addr) = self.component_addr {
            ready.push(format!(
                "Activated service 'component' on [127.0.0.1]:{}",
                addr.port()
            ));
        }
        let deadline = tokio::time::Instant::now() + PROSODY_STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Started::Failed(anyhow::anyhow!("prosody exited: {status}")));
            }
            let log = std::fs::read(&self.log_path).unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            if log.contains(PORT_CLASH) {
                return Err(Started::PortClash);
            }
            if ready.iter().all(|line| log.contains(line.as_str()))
                && tokio::net::TcpStream::connect(self.c2s_addr).await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Started::Failed(anyhow::anyhow!(
                    "its ports did not open within {PROSODY_STARTUP_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// How a spawn failed.
enum Started {
    /// A port was taken between probing and binding: try other ports.
    PortClash,
    Failed(anyhow::Error),
}

/// Whether Prosody can be used by the test `test`. When `prosody` is not on `PATH` and we are
/// root, it is installed from Debian first (once per test process). Otherwise the test cannot
/// run: under CI (`CI=true`) that is an error, because a skipped test must never pass
/// silently there; elsewhere a line saying that and why `test` is skipped is written straight
/// to stderr (past the test harness's capture) and `Ok(false)` is returned.
pub fn require_prosody(test: &str) -> Result<bool> {
    let reason = match ensure_installed() {
        Ok(()) => return Ok(true),
        Err(reason) => reason,
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test}: {reason}; CI must run the Prosody tests, not skip them");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED {test}: {reason}. Install it with `apt-get install prosody` (as root, or \
         run `bash tests/run.sh` as root) to run this test.\n"
    );
    Ok(false)
}

/// The outcome of the one installation attempt of this process.
static INSTALLED: Mutex<Option<Result<(), String>>> = Mutex::new(None);

fn ensure_installed() -> Result<(), String> {
    if find_on_path("prosody").is_some() && find_on_path("prosodyctl").is_some() {
        return Ok(());
    }
    // A poisoned lock only means another test panicked while installing; the stored outcome
    // (or its absence) is still meaningful.
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    installed.get_or_insert_with(install_from_debian).clone()
}

fn install_from_debian() -> Result<(), String> {
    if !is_root() {
        return Err(
            "prosody is not installed and this user is not root, so it cannot be \
                    installed from Debian here"
                .into(),
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "prosody is missing: installing it from Debian (apt-get install prosody)"
    );
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "prosody"][..],
    ] {
        let out = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("prosody is not installed and apt-get could not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "prosody is not installed and `apt-get {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    // The package may start a system-wide service; the tests run their own Prosody on free
    // ports, so it is not needed. Best effort: there may be no init system at all.
    for (program, args) in [
        ("service", &["prosody", "stop"][..]),
        ("systemctl", &["disable", "--now", "prosody"][..]),
    ] {
        let _ = std::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if find_on_path("prosody").is_none() {
        return Err("prosody was installed but is not on PATH".into());
    }
    Ok(())
}

/// A port that was free a moment ago on 127.0.0.1 (see [`PORT_CLASH`] for the race).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Generates the self-signed certificate for the domain (and the component) into `certs/`,
/// named so that Prosody finds it for the host; returns the certificate's path.
fn write_certificate(dir: &Path, options: ProsodyOptions<'_>) -> Result<PathBuf> {
    let mut names = vec![options.domain.to_owned()];
    if let Some((jid, _)) = options.component {
        names.push(jid.to_owned());
    }
    let generated =
        rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    let cert = dir.join("certs").join(format!("{}.crt", options.domain));
    let key = dir.join("certs").join(format!("{}.key", options.domain));
    std::fs::write(&cert, generated.cert.pem())?;
    std::fs::write(&key, generated.key_pair.serialize_pem())?;
    Ok(cert)
}

/// `prosodyctl --config FILE register USER DOMAIN PASSWORD`.
async fn register(config: &Path, user: &str, domain: &str, password: &str) -> Result<()> {
    let prosodyctl = find_on_path("prosodyctl").context("prosodyctl is not installed")?;
    let out = Command::new(prosodyctl)
        .arg("--config")
        .arg(config)
        .args(["register", user, domain, password])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running prosodyctl")?;
    ensure!(
        out.status.success(),
        "prosodyctl register {user} {domain} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A Lua string literal.
fn lua(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\{:03}", u32::from(c) & 0xff)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_config(
    dir: &Path,
    options: ProsodyOptions<'_>,
    c2s_port: u16,
    component_port: Option<u16>,
) -> String {
    let path = |name: &str| lua(&dir.join(name).to_string_lossy());
    let certs = dir.join("certs");
    let cert = lua(&certs
        .join(format!("{}.crt", options.domain))
        .to_string_lossy());
    let key = lua(&certs
        .join(format!("{}.key", options.domain))
        .to_string_lossy());
    let component_ports = component_port.map(|p| p.to_string()).unwrap_or_default();
    let mut config = format!(
        r#"-- Written by juxta-tests (tests/src/prosody.rs) for one test run.
-- Tests may run as root (CI); mod_posix refuses to run as root without this.
run_as_root = true
pidfile = {pidfile}
data_path = {data}
certificates = {certs}
ssl = {{ certificate = {cert}, key = {key} }}
plugin_paths = {{ }}

-- Only 127.0.0.1, only free ports: never the ports of a system-wide server, no s2s, no HTTP.
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ {component_ports} }}
component_interfaces = {{ "127.0.0.1" }}
http_ports = {{ }}
https_ports = {{ }}

c2s_require_encryption = true
authentication = "internal_hashed"
storage = "internal"
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "posix" }}
modules_disabled = {{ "s2s" }}
log = {{ debug = {log} }}

VirtualHost {domain}
"#,
        pidfile = path("prosody.pid"),
        data = path("data"),
        certs = lua(&certs.to_string_lossy()),
        log = path("prosody.log"),
        domain = lua(options.domain),
    );
    if let Some((jid, secret)) = options.component {
        config.push_str(&format!(
            "\nComponent {}\n    component_secret = {}\n",
            lua(jid),
            lua(secret)
        ));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_strings_are_escaped() {
        assert_eq!(lua("plain"), "\"plain\"");
        assert_eq!(lua("a\"b\\c\nd"), "\"a\\\"b\\\\c\\010d\"");
    }

    #[test]
    fn the_config_has_the_component_and_only_local_free_ports() {
        let options = ProsodyOptions {
            domain: "prosody.test",
            component: Some(("pubsub.prosody.test", "s3cret")),
            users: &[],
        };
        let config = render_config(Path::new("/tmp/x"), options, 1111, Some(2222));
        for expected in [
            "c2s_ports = { 1111 }",
            "component_ports = { 2222 }",
            "s2s_ports = { }",
            "VirtualHost \"prosody.test\"",
            "Component \"pubsub.prosody.test\"\n    component_secret = \"s3cret\"",
            "data_path = \"/tmp/x/data\"",
        ] {
            assert!(config.contains(expected), "{expected:?} not in\n{config}");
        }
    }
}
