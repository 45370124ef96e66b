//! A Prosody (Debian's package) for `--mode xmpp --server prosody`: the same scenario against
//! another server, on the same machine, in the same run.
//!
//! [`Prosody::start`] writes into a fresh temporary directory a configuration close to
//! Prosody's defaults for one virtual host — c2s on a free port of 127.0.0.1 with STARTTLS
//! required (a self-signed certificate made here), `internal_plain` authentication, the
//! `internal` (file) storage, the epoll backend, its pubsub service as
//! `Component "pubsub.<domain>" "pubsub"`, and `admins` naming the publisher, since Prosody's
//! pubsub lets only admins create nodes — and the accounts as files in its data directory
//! (`<data>/<host>/accounts/<user>.dat`, the format `prosodyctl register` writes), which is
//! much faster than registering 10 000 users one `prosodyctl` at a time. Not loaded: s2s,
//! HTTP, `mod_limits` (c2s rate limits; juxta's equivalent is turned off for the benchmark
//! too), and the modules of Debian's example configuration that the scenario does not use.
//! Logging is at `warn`, to a file. Prosody runs in the foreground (`-F`) as our child, so
//! its pid is the process whose RSS is measured; dropping the handle kills it.
//!
//! This is deliberately independent of the test harness's `juxta_tests::prosody` (which
//! registers a few users with `prosodyctl` and logs at debug level for test diagnostics).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// How long Prosody may take to open its c2s port.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of Prosody's log a failure message shows.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// A running Prosody; see the module documentation.
#[derive(Debug)]
pub(super) struct Prosody {
    child: Child,
    pid: u32,
    c2s: SocketAddr,
    /// Declared last: removed after the process is gone.
    dir: TempDir,
}

impl Prosody {
    /// Writes the configuration and the accounts `users` (all with `password`), starts
    /// `binary` and returns once its c2s port accepts connections.
    pub(super) async fn start<'a>(
        binary: &Path,
        domain: &str,
        admin: &str,
        users: impl Iterator<Item = &'a str>,
        password: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("juxta-load-prosody-")
            .tempdir()
            .context("creating Prosody's directory")?;
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs)?;
        let generated =
            rcgen::generate_simple_self_signed(vec![domain.to_owned(), format!("pubsub.{domain}")])
                .context("generating a certificate")?;
        let cert = certs.join(format!("{domain}.crt"));
        let key = certs.join(format!("{domain}.key"));
        std::fs::write(&cert, generated.cert.pem())?;
        std::fs::write(&key, generated.key_pair.serialize_pem())?;

        let accounts = dir
            .path()
            .join("data")
            .join(encode(domain))
            .join("accounts");
        std::fs::create_dir_all(&accounts)?;
        let record = format!("return {{\n\t[\"password\"] = {};\n}};\n", lua(password));
        let mut count = 0usize;
        for user in users {
            std::fs::write(accounts.join(format!("{}.dat", encode(user))), &record)
                .with_context(|| format!("writing the account of {user}"))?;
            count += 1;
        }

        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("probing for a free port")?
            .port();
        let c2s = SocketAddr::from(([127, 0, 0, 1], port));
        let config = render_config(dir.path(), domain, admin, port, &cert, &key);
        let config_path = dir.path().join("prosody.cfg.lua");
        std::fs::write(&config_path, config).context("writing prosody.cfg.lua")?;
        let console = std::fs::File::create(dir.path().join("console.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install it with `apt-get install prosody`)",
                    binary.display()
                )
            })?;
        let pid = child.id().context("Prosody has no pid")?;
        let mut this = Self {
            child,
            pid,
            c2s,
            dir,
        };
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = this.child.try_wait() {
                bail!("prosody exited with {status}:\n{}", this.log());
            }
            if tokio::net::TcpStream::connect(c2s).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "Prosody's c2s port {c2s} did not open within {STARTUP_TIMEOUT:?}:\n{}",
                    this.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "xmpp: Prosody (pid {pid}) listens on {c2s} with {count} accounts, in {}",
            this.dir.path().display()
        );
        Ok(this)
    }

    pub(super) fn c2s_addr(&self) -> SocketAddr {
        self.c2s
    }

    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// The end of Prosody's log and console output.
    fn log(&self) -> String {
        let mut out = String::new();
        for name in ["prosody.log", "console.log"] {
            let text = std::fs::read(self.dir.path().join(name)).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(LOG_TAIL_BYTES)..];
            let _ = writeln!(out, "--- {name} ---\n{}", String::from_utf8_lossy(tail));
        }
        out
    }
}

/// Prosody's file names for hosts and users (`util.datamanager`'s `encode`): every byte that
/// is not an ASCII letter or digit becomes `%xx`.
fn encode(s: &str) -> String {
    s.bytes()
        .fold(String::with_capacity(s.len()), |mut out, b| {
            if b.is_ascii_alphanumeric() {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02x}");
            }
            out
        })
}

/// A Lua string literal.
fn lua(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\{:03}", u32::from(c) & 0xff);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_config(
    dir: &Path,
    domain: &str,
    admin: &str,
    c2s_port: u16,
    cert: &Path,
    key: &Path,
) -> String {
    let path = |p: PathBuf| lua(&p.to_string_lossy());
    format!(
        r#"-- Written by juxta-load (tests/src/bin/juxta-load/prosody.rs) for one benchmark run.
-- The tool may run as root; mod_posix refuses to without this.
run_as_root = true
pidfile = {pidfile}
data_path = {data}
certificates = {certs}
ssl = {{ certificate = {cert}, key = {key} }}
network_backend = "epoll"

interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}

c2s_require_encryption = true
authentication = "internal_plain"
storage = "internal"
admins = {{ {admin} }}
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "posix" }}
modules_disabled = {{ "s2s" }}
log = {{ warn = {log} }}

VirtualHost {domain}

Component {pubsub} "pubsub"
"#,
        pidfile = path(dir.join("prosody.pid")),
        data = path(dir.join("data")),
        certs = path(dir.join("certs")),
        cert = path(cert.to_owned()),
        key = path(key.to_owned()),
        admin = lua(&format!("{admin}@{domain}")),
        log = path(dir.join("prosody.log")),
        domain = lua(domain),
        pubsub = lua(&format!("pubsub.{domain}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_names_when_encoded_then_they_match_prosodys_file_names() {
        assert_eq!(encode("localhost"), "localhost");
        assert_eq!(encode("pubsub.localhost"), "pubsub%2elocalhost");
        assert_eq!(encode("u-1_x"), "u%2d1%5fx");
    }

    #[test]
    fn given_a_port_when_the_config_is_rendered_then_it_serves_only_that_port() {
        let config = render_config(
            Path::new("/tmp/p"),
            "localhost",
            "bench",
            5999,
            Path::new("/tmp/p/certs/localhost.crt"),
            Path::new("/tmp/p/certs/localhost.key"),
        );
        for expected in [
            "c2s_ports = { 5999 }",
            "s2s_ports = { }",
            "admins = { \"bench@localhost\" }",
            "VirtualHost \"localhost\"",
            "Component \"pubsub.localhost\" \"pubsub\"",
            "authentication = \"internal_plain\"",
        ] {
            assert!(config.contains(expected), "{expected:?} not in\n{config}");
        }
    }
}
