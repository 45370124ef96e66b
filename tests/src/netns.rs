//! A NAT laboratory in Linux network namespaces, built by `tests/nat/topology.sh`: a public
//! segment (a bridge in the root namespace, where the gateway under test runs unchanged) and
//! two peers, each behind its own NAT router (nftables masquerade; new inbound connections
//! are dropped). See the script for the picture.
//!
//! Tests begin with [`require_nat_lab`], which says loudly that the test is skipped when this
//! is not root or a tool is missing (and fails instead under `CI=true`). [`NatLab::up`] builds
//! the topology and checks it with `ping`; dropping the [`NatLab`] tears it down, also when
//! the test fails. Programs run inside a namespace through [`NatLab::command_in`]
//! (`ip netns exec`).
//!
//! Names carry this process's id (`jn<pid><letter>-r1`, …), so parallel runs never meet, and
//! [`NatLab::up`] first removes laboratories left behind by test processes that no longer
//! exist (killed before their guard ran).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, Result, bail};

/// The topology script.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nat/topology.sh");

/// The name prefix of every laboratory; followed by the owning process's id and a letter.
const NAME_PREFIX: &str = "jn";

/// How many public /24s [`NatLab::up`] tries before giving up (a host may use some of
/// `10.x.0.0/24` already).
const UP_ATTEMPTS: usize = 4;

/// Distinguishes laboratories of one process (a letter after the pid).
static NEXT_LAB: AtomicU8 = AtomicU8::new(0);

/// Which of the two NAT'd sides: peer 1 behind router 1, peer 2 behind router 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// 192.168.1.0/24 behind router 1.
    One,
    /// 192.168.2.0/24 behind router 2.
    Two,
}

impl Side {
    fn index(self) -> u8 {
        match self {
            Side::One => 1,
            Side::Two => 2,
        }
    }

    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::One => Side::Two,
            Side::Two => Side::One,
        }
    }
}

/// Whether the NAT laboratory can be built for the test `test`: root, `ip` (iproute2), `nft`
/// (nftables) and `ping` are needed (`tests/run.sh` installs the tools when it runs as root).
/// When they are not there, under CI (`CI=true`) that is an error, because a skipped test
/// must never pass silently there; elsewhere a line saying that and why `test` is skipped is
/// written straight to stderr (past the test harness's capture) and `Ok(false)` is returned.
pub fn require_nat_lab(test: &str) -> Result<bool> {
    let mut missing = Vec::new();
    if !crate::sys::is_root() {
        missing.push("this user is not root".to_owned());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
    ] {
        if crate::sys::find_on_path(tool).is_none() {
            missing.push(format!("`{tool}` is missing (Debian package {package})"));
        }
    }
    if missing.is_empty() {
        return Ok(true);
    }
    let reason = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test}: needs root and nftables ({reason}); CI must run it, not skip it");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED: {test} needs root and nftables ({reason}). Run `bash tests/run.sh` as root \
         (it installs iproute2, nftables and iputils-ping) to run it.\n"
    );
    Ok(false)
}

/// A built NAT topology; dropping it runs `topology.sh down`.
#[derive(Debug)]
pub struct NatLab {
    prefix: String,
    octet: u8,
    /// The output of `topology.sh verify` right after `up`.
    reachability: String,
}

impl NatLab {
    /// Builds the topology on a free `10.x.0.0/24` and checks it with `topology.sh verify`
    /// (pings that must and must not get through). Fails with the script's output.
    pub fn up() -> Result<Self> {
        remove_orphans();
        let letter = char::from(b'a' + NEXT_LAB.fetch_add(1, Ordering::Relaxed) % 26);
        let prefix = format!("{NAME_PREFIX}{}{letter}", std::process::id());
        let mut last_error = String::new();
        for attempt in 0..UP_ATTEMPTS {
            let octet = pick_octet(attempt);
            let out = script(&["up", &prefix, &octet.to_string()])?;
            if !out.status.success() {
                last_error = render(&out);
                continue;
            }
            // From here on the guard owns the namespaces, whatever happens next.
            let mut lab = Self {
                prefix,
                octet,
                reachability: String::new(),
            };
            let verify = script(&["verify", &lab.prefix, &octet.to_string()])?;
            if !verify.status.success() {
                bail!(
                    "the NAT topology does not behave as a NAT:\n{}",
                    render(&verify)
                );
            }
            lab.reachability = String::from_utf8_lossy(&verify.stdout).into_owned();
            return Ok(lab);
        }
        bail!("`{SCRIPT} up {prefix}` failed {UP_ATTEMPTS} times; last output:\n{last_error}")
    }

    /// What `topology.sh verify` printed: which pings got through.
    pub fn reachability(&self) -> &str {
        &self.reachability
    }

    /// The root namespace's address on the public segment, where the gateway listens.
    pub fn public_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 1)
    }

    /// A router's address on the public segment: what the other side sees as the peer's
    /// address after masquerading.
    pub fn router_public_ip(&self, side: Side) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 10 + side.index())
    }

    /// A peer's private address (192.168.1.2 or 192.168.2.2).
    pub fn peer_ip(&self, side: Side) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, side.index(), 2)
    }

    /// The namespace of the peer on `side`.
    pub fn peer_ns(&self, side: Side) -> String {
        format!("{}-p{}", self.prefix, side.index())
    }

    /// The namespace of the router on `side`.
    pub fn router_ns(&self, side: Side) -> String {
        format!("{}-r{}", self.prefix, side.index())
    }

    /// `ip netns exec NS PROGRAM` as a tokio command (`ip` execs the program in place, so
    /// the child's pid is the program's and killing the child kills it).
    pub fn command_in(&self, ns: &str, program: impl AsRef<Path>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.arg("netns")
            .arg("exec")
            .arg(ns)
            .arg(program.as_ref())
            .kill_on_drop(true);
        cmd
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        match script(&["down", &self.prefix]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "tearing down NAT topology {} failed:\n{}",
                self.prefix,
                render(&out)
            ),
            Err(e) => eprintln!("tearing down NAT topology {}: {e:#}", self.prefix),
        }
    }
}

/// Runs the topology script with `args`.
fn script(args: &[&str]) -> Result<Output> {
    Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {SCRIPT} {}", args.join(" ")))
}

fn render(out: &Output) -> String {
    format!(
        "{}{}(exit: {})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    )
}

/// The second octet of the public /24 for attempt `attempt`: spread by process id so that
/// parallel runs rarely pick the same one (the script refuses a /24 already in use).
fn pick_octet(attempt: usize) -> u8 {
    // 64..=253: clear of the low 10.x networks that container runtimes and VPNs favour.
    let spread = (std::process::id() as usize).wrapping_mul(7) + attempt * 37;
    u8::try_from(64 + spread % 190).unwrap_or(77)
}

/// Removes laboratories whose owning process is gone (`jn<pid><letter>-…` with no
/// `/proc/<pid>`). Best effort: a failure here only leaves namespaces behind.
fn remove_orphans() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let mut prefixes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| name.split_once('-').map(|(prefix, _)| prefix.to_owned()))
        .filter(|prefix| owner_gone(prefix))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    for prefix in prefixes {
        let _ = script(&["down", &prefix]);
    }
}

/// Whether `prefix` is one of ours (`jn<pid><letter>`) and its process no longer exists.
fn owner_gone(prefix: &str) -> bool {
    let Some(rest) = prefix.strip_prefix(NAME_PREFIX) else {
        return false;
    };
    let Some(pid) = rest
        .strip_suffix(|c: char| c.is_ascii_lowercase())
        .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
    else {
        return false;
    };
    !PathBuf::from(format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_lab_names_when_checked_then_only_ours_with_a_dead_owner_count_as_orphans() {
        let me = std::process::id();
        assert!(!owner_gone(&format!("jn{me}a")), "a live owner");
        assert!(owner_gone("jn4294967295a"), "no such process");
        assert!(!owner_gone("jnabc"), "not a pid");
        assert!(!owner_gone("jn123"), "no letter");
        assert!(!owner_gone("docker0"), "not ours");
    }

    #[test]
    fn given_any_attempt_then_the_octet_stays_in_the_chosen_range() {
        for attempt in 0..UP_ATTEMPTS {
            assert!((64..=253).contains(&pick_octet(attempt)));
        }
    }
}
