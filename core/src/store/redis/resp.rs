//! One connection in sharded pub/sub mode (`SSUBSCRIBE`), speaking RESP2 itself so that the
//! engine sees exactly when it is subscribed and when the connection is gone.

use std::io;
use std::time::Duration;

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Longest bulk string accepted from the server: a record is at most the payload limit plus
/// a few hundred bytes, and a message batches records of one commit.
const MAX_BULK: usize = 512 << 20;
/// Commands waiting to be written to one connection.
const COMMAND_QUEUE: usize = 4096;

/// What a pub/sub connection reports.
#[derive(Debug)]
pub(super) enum Push {
    /// A message on a channel.
    Message { channel: Vec<u8>, payload: Vec<u8> },
    /// The server confirmed a subscription.
    Subscribed(Vec<u8>),
    /// The server ended a subscription (asked for, or the slot moved).
    Unsubscribed(Vec<u8>),
    /// The server refused a command (e.g. `MOVED` in a cluster).
    Refused(String),
    /// The connection is gone; nothing more comes from it.
    Down(String),
}

/// Credentials for `AUTH`, and TLS (`rediss://`).
#[derive(Clone, Debug, Default)]
pub(super) struct Auth {
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

/// A live pub/sub connection. Dropping it closes the connection.
#[derive(Debug)]
pub(super) struct SubConn {
    commands: mpsc::Sender<Vec<Vec<u8>>>,
}

impl SubConn {
    /// Connects to `addr` (`host:port`), authenticates, and reports what the server pushes
    /// as `(id, push)` on `events`.
    pub(super) async fn connect(
        addr: &str,
        auth: &Auth,
        timeout: Duration,
        id: u64,
        events: mpsc::Sender<(u64, Push)>,
    ) -> io::Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let (read, mut write): (Box<dyn AsyncRead + Send + Unpin>, Writer) = match &auth.tls {
            Some(config) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone());
                let stream = tokio::time::timeout(timeout, tls.connect(name, stream))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                let (r, w) = tokio::io::split(stream);
                (Box::new(r), Box::new(w))
            }
            None => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut read: Reader = BufReader::with_capacity(64 << 10, read);
        if let Some(password) = &auth.password {
            let mut cmd = vec![b"AUTH".to_vec()];
            if let Some(user) = &auth.username {
                cmd.push(user.as_bytes().to_vec());
            }
            cmd.push(password.as_bytes().to_vec());
            write.write_all(&encode(&cmd)).await?;
            match tokio::time::timeout(timeout, read_value(&mut read)).await {
                Ok(Ok(Value::Error(e))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("authentication failed: {e}"),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "AUTH timed out"));
                }
            }
        }
        let (tx, mut rx) = mpsc::channel::<Vec<Vec<u8>>>(COMMAND_QUEUE);
        tokio::spawn(async move {
            let why = loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => {
                            if let Err(e) = write.write_all(&encode(&cmd)).await {
                                break e.to_string();
                            }
                        }
                        None => return,
                    },
                    v = read_value(&mut read) => match v {
                        Ok(v) => {
                            if let Some(p) = interpret(v) && events.send((id, p)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => break e.to_string(),
                    },
                }
            };
            let _ = events.send((id, Push::Down(why))).await;
        });
        Ok(Self { commands: tx })
    }

    /// Sends a command (`SSUBSCRIBE ch…`, `SUNSUBSCRIBE ch…`); its answer comes as a push.
    /// `false` when the connection is gone or its queue is full: the caller tries again later.
    pub(super) fn send(&self, cmd: Vec<Vec<u8>>) -> bool {
        self.commands.try_send(cmd).is_ok()
    }
}

fn interpret(v: Value) -> Option<Push> {
    match v {
        Value::Error(e) => Some(Push::Refused(e)),
        Value::Array(mut parts) if parts.len() == 3 => {
            let third = parts.pop();
            let second = parts.pop();
            let kind = parts.pop();
            let (Some(Value::Bulk(kind)), Some(Value::Bulk(channel))) = (kind, second) else {
                return None;
            };
            match (&kind[..], third) {
                (b"smessage" | b"message", Some(Value::Bulk(payload))) => {
                    Some(Push::Message { channel, payload })
                }
                (b"ssubscribe", _) => Some(Push::Subscribed(channel)),
                (b"sunsubscribe", _) => Some(Push::Unsubscribed(channel)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A RESP2 value, as much of it as pub/sub needs.
#[derive(Debug)]
enum Value {
    Bulk(Vec<u8>),
    Int,
    Simple,
    Nil,
    Error(String),
    Array(Vec<Value>),
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

async fn read_line(r: &mut Reader) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(32);
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad("line without CRLF"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn number(b: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad length"))
}

async fn read_scalar(r: &mut Reader, line: &[u8]) -> io::Result<Value> {
    let (kind, rest) = line.split_first().ok_or_else(|| bad("empty line"))?;
    match kind {
        b'+' => Ok(Value::Simple),
        b':' => Ok(Value::Int),
        b'-' => Ok(Value::Error(String::from_utf8_lossy(rest).into_owned())),
        b'$' => {
            let n = number(rest)?;
            if n < 0 {
                return Ok(Value::Nil);
            }
            let n = usize::try_from(n).map_err(|_| bad("bad length"))?;
            if n > MAX_BULK {
                return Err(bad("bulk string too large"));
            }
            let mut b = vec![0; n + 2];
            r.read_exact(&mut b).await?;
            b.truncate(n);
            Ok(Value::Bulk(b))
        }
        _ => Err(bad("unexpected RESP type")),
    }
}

/// Reads one value: a scalar, or an array of scalars (pub/sub never nests deeper).
async fn read_value(r: &mut Reader) -> io::Result<Value> {
    let line = read_line(r).await?;
    if line.first() != Some(&b'*') {
        return read_scalar(r, &line).await;
    }
    let n = number(&line[1..])?;
    if n < 0 {
        return Ok(Value::Nil);
    }
    let mut parts = Vec::with_capacity(n.clamp(0, 16) as usize);
    for _ in 0..n {
        let line = read_line(r).await?;
        if line.first() == Some(&b'*') {
            return Err(bad("nested array"));
        }
        parts.push(read_scalar(r, &line).await?);
    }
    Ok(Value::Array(parts))
}
