//! The few operating-system calls the harness needs: signals, `RLIMIT_NOFILE`, resident set size,
//! whether we are root and where a program is on `PATH`.
//!
//! `unsafe` is denied workspace-wide; the two libc calls below are allowed one by one, each with
//! the reason it is sound, because std has no safe wrapper for `kill(2)` with a chosen signal or
//! for `setrlimit(2)`.

use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Sends `signal` (e.g. `libc::SIGTERM`) to process `pid`.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a stale pid yields
    // ESRCH, which we report as an error.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RlimitNofile {
    /// Soft limit before the call.
    pub before: u64,
    /// Soft limit now (equal to the hard limit unless raising it failed).
    pub now: u64,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, so that thousands of sockets
/// can be open at once. Child processes (a spawned `juxta serve`) inherit the raised limit.
#[allow(unsafe_code)]
pub fn raise_nofile_limit() -> io::Result<RlimitNofile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` that lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid `rlimit` that lives across the call; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(RlimitNofile {
        before,
        now: lim.rlim_cur,
    })
}

/// The resident set size of process `pid` in KiB (`VmRSS` from `/proc/PID/status`).
pub fn rss_kib_of(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))
}

/// CPU time (user + system) that process `pid` has used so far, in seconds, from
/// `/proc/PID/stat` (fields 14 and 15, in `USER_HZ` = 100 ticks per second on Linux).
pub fn cpu_seconds_of(pid: u32) -> Result<f64> {
    const USER_HZ: f64 = 100.0;
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        let v: u64 = fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {} in {path}", i + 3))?;
        Ok(v as f64 / USER_HZ)
    };
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    Ok(tick(11)? + tick(12)?)
}

/// Now as nanoseconds since the Unix epoch (the load tool's `t` field).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `bytes` random bytes from the kernel as lowercase hex (`2 * bytes` characters).
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let read = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if read.is_err() {
        // Not secret material (test admin keys, name suffixes): fall back to the clock and pid
        // rather than failing a test on a machine without /dev/urandom.
        let seed = unix_nanos() ^ u64::from(std::process::id()).rotate_left(32);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed.rotate_left(u32::try_from(i % 64).unwrap_or(0)) & 0xff) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the effective user is root, from `/proc/self/status` (no `unsafe` needed).
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Where `program` is on `PATH`, if anywhere.
pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
