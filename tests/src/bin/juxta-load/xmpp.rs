//! `--mode xmpp`: S XMPP subscribers on one XEP-0060 node receive M items, against juxta or a
//! Prosody started here for comparison.
//!
//! # Phases
//!
//! 1. The server: juxta spawned (with [`JUXTA_XMPP_ENV`]) or given by --url/--xmpp, or Prosody
//!    spawned by [`prosody`](super::prosody) or given by --xmpp.
//! 2. Accounts `<prefix>0…<prefix>S-1` and the publisher: over REST for juxta, as files in the
//!    data dir for a spawned Prosody.
//! 3. The publishers log in; the first creates the node over XMPP (XEP-0060 §8.1.3, with
//!    `send_last_published_item = never`), or it is created over REST for `--publisher rest`.
//! 4. Server RSS; the subscribers log in in batches (`--connect-batch`): TCP, STARTTLS, SASL
//!    PLAIN, a new stream, resource binding, initial presence. Server RSS again: the difference
//!    divided by S is the memory per idle authenticated session. `--idle-rss` stops here.
//! 5. They subscribe (their bare JID, §6.1), in batches.
//! 6. M items are published at `--rate`: over XMPP, pipelined up to `--window` unanswered
//!    publishes per connection; or over REST as `fanout` does. Each payload is
//!    `{"t": <send time, unix ns>, "i": <item number>, "pad": "…"}`.
//! 7. Each subscriber reads until it has every acknowledged item or `--drain-timeout` passed.
//!
//! # The subscribers' client
//!
//! Until it is subscribed a subscriber parses what it receives with the bridge's own
//! [`Decoder`]. After that it only splits the stream at `</message>` and reads `"t"` and `"i"`
//! out of each notification's payload (written `&quot;t&quot;` by servers that escape quotes
//! in text, like Prosody): the tool shares the two cores with the server, so its CPU per
//! delivery matters. Which items arrived is a bitmap per subscriber, so loss and duplicates
//! are counted whatever order they arrive in and whatever ids the server gives notifications.
//!
//! TLS accepts any server certificate ([`AcceptAnyCert`]): the server under test runs on this
//! machine with a self-signed certificate, and this is a benchmark. Never copy it into a client.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use clap::ValueEnum;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use juxta_bridge_xmpp::{Decoder, Element, Frame, Limits, WriteContext, ns};
use juxta_tests::{Api, unix_nanos};
use reqwest::Method;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::prosody::Prosody;
use super::{
    Args, CONNECT_BATCH_TIMEOUT, Control, Errors, MAX_LATENCY_US, PublishStats, READ_BUFFER,
    Target, cpu_delta, find_byte, latency_json, new_histogram, payload, publish_paced,
};

/// Server settings a spawned juxta gets in this mode (before any --env, which wins): every
/// subscriber connects from 127.0.0.1, and the XMPP publisher sends faster than a client is
/// normally allowed to.
pub(super) const JUXTA_XMPP_ENV: &[(&str, &str)] = &[
    ("JUXTA_XMPP__MAX_CONNECTIONS_PER_IP", "100000"),
    ("JUXTA_XMPP__MAX_BYTES_PER_SEC", "0"),
];
/// Bytes per read while the stream is being negotiated (the fast path reads up to
/// [`READ_BUFFER`]).
const SETUP_CHUNK: usize = 4096;
/// Account creations in flight over REST.
const ACCOUNT_CONCURRENCY: usize = 8;
/// How long creating or deleting the node may take.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// The resource every client binds.
const RESOURCE: &str = "load";
/// Closes a notification; the fast path splits the stream here.
const MESSAGE_END: &[u8] = b"</message>";
/// The start of a stream error: the fast path stops on it.
const STREAM_ERROR: &[u8] = b"<stream:error";
/// Most items a run may publish: each subscriber keeps one bit per item.
const MAX_ITEMS: u64 = 100_000_000;

/// Which server this mode measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum ServerKind {
    /// juxta: spawned, or given by --url/--xmpp.
    Juxta,
    /// Prosody: spawned from --prosody with a generated configuration, or given by --xmpp.
    Prosody,
}

/// How items are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum PublisherKind {
    /// XEP-0060 §7.1 publish requests over a c2s stream.
    Xmpp,
    /// `POST /api/v1/nodes/{node}/items` (juxta only).
    Rest,
}

// ---------------------------------------------------------------------------------------------
// TLS

/// Accepts any server certificate. Signatures are still checked, so the handshake is the one a
/// real client does; only the chain and the name are not. Benchmark use only (module doc).
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

// ---------------------------------------------------------------------------------------------
// the c2s client

/// What every connection needs to log in.
struct Endpoint {
    addr: SocketAddr,
    domain: String,
    service: String,
    password: String,
    tls: TlsConnector,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

fn stream_header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xml:lang='en' \
         xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}

/// `el` serialized, shortened for an error message.
fn describe(el: &Element) -> String {
    let bytes = el.to_bytes(WriteContext::stream(ns::JABBER_CLIENT));
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]);
    text.into_owned()
}

/// One XMPP stream during negotiation: the connection and the decoder reading it.
struct XmppStream<S> {
    io: S,
    decoder: Decoder,
    chunk: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> XmppStream<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            decoder: Decoder::new(Limits::default()),
            chunk: vec![0; SETUP_CHUNK],
        }
    }

    async fn send(&mut self, xml: &str) -> Result<()> {
        self.io.write_all(xml.as_bytes()).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next top-level element; stream headers are skipped, a stream error or the end of
    /// the stream is an error.
    async fn next_element(&mut self) -> Result<Element> {
        loop {
            match self
                .decoder
                .next()
                .map_err(|e| anyhow!("unreadable stream from the server: {e}"))?
            {
                Some(Frame::Stanza(el)) if el.is("error", ns::STREAM) => {
                    bail!("stream error: {}", describe(&el))
                }
                Some(Frame::Stanza(el)) => return Ok(el),
                Some(Frame::StreamHeader(_)) => {}
                Some(Frame::StreamEnd) => bail!("the server closed the stream"),
                None => {
                    let n = self.io.read(&mut self.chunk).await?;
                    if n == 0 {
                        bail!("the connection closed");
                    }
                    self.decoder.feed(&self.chunk[..n]);
                }
            }
        }
    }

    async fn features(&mut self) -> Result<Element> {
        let el = self.next_element().await?;
        ensure!(
            el.is("features", ns::STREAM),
            "expected stream features, got {}",
            describe(&el)
        );
        Ok(el)
    }

    /// Waits for the answer to the iq `id` (other stanzas, such as the echo of our own
    /// presence, are skipped); an error answer is an error.
    async fn iq_result(&mut self, id: &str) -> Result<Element> {
        loop {
            let el = self.next_element().await?;
            if el.name() != "iq" || el.attr("id") != Some(id) {
                continue;
            }
            return match el.attr("type") {
                Some("result") => Ok(el),
                _ => Err(anyhow!("iq {id} failed: {}", describe(&el))),
            };
        }
    }
}

/// How far the subscribers of an `--idle-rss` run go before they idle: comparing the server's
/// memory per session at each stage shows what each step of the negotiation costs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(super) enum Stage {
    /// TCP connected, stream opened, features received.
    Stream,
    /// STARTTLS done, a new stream opened over TLS, features received.
    Tls,
    /// SASL PLAIN succeeded, the stream restarted, features received.
    Authenticated,
    /// A resource bound and initial presence sent: an idle authenticated session.
    Bound,
}

/// A connection held open at some [`Stage`].
enum Held {
    Plain(#[allow(dead_code, reason = "only held open")] XmppStream<TcpStream>),
    Secure(Box<XmppStream<TlsStream<TcpStream>>>),
}

/// `user`'s bound c2s stream: TCP, STARTTLS, SASL PLAIN, a new stream, resource binding
/// (RFC 6120 §§5–7).
async fn login(end: &Endpoint, user: &str) -> Result<XmppStream<TlsStream<TcpStream>>> {
    match login_to(end, user, Stage::Bound).await? {
        Held::Secure(s) => Ok(*s),
        Held::Plain(_) => bail!("a bound stream without TLS"),
    }
}

/// `user`'s c2s stream negotiated as far as `stage` (presence is the caller's).
async fn login_to(end: &Endpoint, user: &str, stage: Stage) -> Result<Held> {
    let tcp = TcpStream::connect(end.addr)
        .await
        .with_context(|| format!("connecting to {}", end.addr))?;
    tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut plain = XmppStream::new(tcp);
    plain.send(&stream_header(&end.domain)).await?;
    let features = plain.features().await?;
    if stage == Stage::Stream {
        return Ok(Held::Plain(plain));
    }
    ensure!(
        features.has_child("starttls", ns::TLS),
        "no STARTTLS offered: {}",
        describe(&features)
    );
    plain
        .send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await?;
    let proceed = plain.next_element().await?;
    ensure!(
        proceed.is("proceed", ns::TLS),
        "STARTTLS answered {}",
        describe(&proceed)
    );
    ensure!(
        plain.decoder.take_buffered().is_empty(),
        "the server sent bytes after <proceed/>"
    );
    let name = ServerName::try_from(end.domain.clone()).context("the domain as a TLS name")?;
    let tls = end
        .tls
        .connect(name, plain.io)
        .await
        .context("TLS handshake")?;
    let mut s = XmppStream::new(tls);
    s.send(&stream_header(&end.domain)).await?;
    let features = s.features().await?;
    if stage == Stage::Tls {
        return Ok(Held::Secure(Box::new(s)));
    }
    let plain_offered = features
        .get_child("mechanisms", ns::SASL)
        .is_some_and(|m| m.children().any(|c| c.text() == "PLAIN"));
    ensure!(
        plain_offered,
        "SASL PLAIN not offered: {}",
        describe(&features)
    );
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{}", end.password));
    s.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{credentials}</auth>"
    ))
    .await?;
    let outcome = s.next_element().await?;
    ensure!(
        outcome.is("success", ns::SASL),
        "{user}: authentication failed: {}",
        describe(&outcome)
    );
    s.decoder.reset();
    s.send(&stream_header(&end.domain)).await?;
    let features = s.features().await?;
    if stage == Stage::Authenticated {
        return Ok(Held::Secure(Box::new(s)));
    }
    ensure!(
        features.has_child("bind", ns::BIND),
        "no resource binding offered: {}",
        describe(&features)
    );
    s.send(&format!(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>{RESOURCE}</resource></bind></iq>"
    ))
    .await?;
    s.iq_result("bind").await?;
    Ok(Held::Secure(Box::new(s)))
}

// ---------------------------------------------------------------------------------------------
// the subscribers' fast path

/// Which items a subscriber has received: one bit per item number.
#[derive(Debug, Default)]
struct Seen {
    words: Vec<u64>,
    distinct: u64,
}

/// What [`Seen::insert`] found.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    New,
    Duplicate,
    /// An item number outside this run's `0..items`.
    Foreign,
}

impl Seen {
    fn new(items: u64) -> Self {
        let words = usize::try_from(items.div_ceil(64)).unwrap_or(0);
        Self {
            words: vec![0; words],
            distinct: 0,
        }
    }

    fn insert(&mut self, i: u64) -> Arrival {
        let Some(word) = usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        else {
            return Arrival::Foreign;
        };
        let bit = 1u64 << (i % 64);
        if *word & bit != 0 {
            return Arrival::Duplicate;
        }
        *word |= bit;
        self.distinct += 1;
        Arrival::New
    }
}

/// Where the first `</message>` in `hay` ends.
fn message_end(hay: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + find_byte(&hay[from..], b'<')?;
        if hay[at..].starts_with(MESSAGE_END) {
            return Some(at + MESSAGE_END.len());
        }
        from = at + 1;
    }
}

/// The unsigned integer of the JSON member `name` in `text`, which may be XML-escaped text:
/// `"name": 12` or `&quot;name&quot;: 12`.
fn json_u64(text: &[u8], name: &[u8]) -> Option<u64> {
    let mut from = 0;
    while from < text.len() {
        let at = from + find_byte(&text[from..], b':')?;
        let before = &text[..at];
        let quoted = |q: &[u8]| {
            before
                .strip_suffix(q)
                .and_then(|b| b.strip_suffix(name))
                .and_then(|b| b.strip_suffix(q))
                .is_some()
        };
        if quoted(b"\"") || quoted(b"&quot;") {
            let rest = text[at + 1..].trim_ascii_start();
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return None;
            }
            return rest[..digits].iter().try_fold(0u64, |n, &d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            });
        }
        from = at + 1;
    }
    None
}

/// What one subscriber saw.
#[derive(Debug)]
struct XSubStats {
    /// Whether it got as far as subscribing (only those count towards expected deliveries).
    subscribed: bool,
    seen: Seen,
    duplicates: u64,
    foreign: u64,
    last_delivery: Option<Instant>,
    latency_us: Histogram<u64>,
    error: Option<String>,
}

impl XSubStats {
    /// Accounts for every complete notification in `data`, all received at `now_ns` (unix
    /// nanos) / `now`; returns the bytes consumed (up to the end of the last one).
    fn handle(&mut self, data: &[u8], now_ns: u64, now: Instant) -> usize {
        let mut pos = 0;
        while let Some(len) = message_end(&data[pos..]) {
            self.handle_message(&data[pos..pos + len], now_ns, now);
            pos += len;
        }
        pos
    }

    fn handle_message(&mut self, message: &[u8], now_ns: u64, now: Instant) {
        let Some(i) = json_u64(message, b"i") else {
            return;
        };
        match self.seen.insert(i) {
            Arrival::New => {}
            Arrival::Duplicate => {
                self.duplicates += 1;
                return;
            }
            Arrival::Foreign => {
                self.foreign += 1;
                return;
            }
        }
        self.last_delivery = Some(now);
        if let Some(sent_ns) = json_u64(message, b"t") {
            let us = now_ns.saturating_sub(sent_ns) / 1000;
            self.latency_us
                .saturating_record(us.clamp(1, MAX_LATENCY_US));
        }
    }
}

/// The main task's handles on one logged-in subscriber.
struct SubscriberHandle {
    /// Dropping it without sending ends the subscriber (after `--idle-rss`).
    go: oneshot::Sender<()>,
    subscribed: oneshot::Receiver<std::result::Result<Duration, String>>,
    task: JoinHandle<XSubStats>,
}

/// One subscriber: logs in and reports, waits for `go`, subscribes and reports, then counts
/// notifications until it has `control`'s target (the number of acknowledged items).
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    end: Arc<Endpoint>,
    user: String,
    node: Arc<str>,
    items: u64,
    stage: Stage,
    logged_in: oneshot::Sender<std::result::Result<Duration, String>>,
    go: oneshot::Receiver<()>,
    subscribed: oneshot::Sender<std::result::Result<Duration, String>>,
    mut control: watch::Receiver<Control>,
    latency_us: Histogram<u64>,
) -> XSubStats {
    let mut stats = XSubStats {
        subscribed: false,
        seen: Seen::default(),
        duplicates: 0,
        foreign: 0,
        last_delivery: None,
        latency_us,
        error: None,
    };
    let started = Instant::now();
    let login = async {
        let mut held = login_to(&end, &user, stage).await?;
        if let Held::Secure(s) = &mut held
            && stage == Stage::Bound
        {
            s.send("<presence/>").await?;
        }
        anyhow::Ok(held)
    };
    let mut s = match tokio::time::timeout(CONNECT_BATCH_TIMEOUT, login).await {
        Ok(Ok(Held::Secure(s))) if stage == Stage::Bound => *s,
        Ok(Ok(held)) => {
            // Held open at an earlier stage until the run ends (`--idle-rss`).
            let _ = logged_in.send(Ok(started.elapsed()));
            let _ = go.await;
            drop(held);
            return stats;
        }
        Ok(Err(e)) => {
            let e = format!("{e:#}");
            let _ = logged_in.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
        Err(_) => {
            let e = format!("not logged in within {CONNECT_BATCH_TIMEOUT:?}");
            let _ = logged_in.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
    };
    let _ = logged_in.send(Ok(started.elapsed()));
    if go.await.is_err() {
        return stats;
    }
    let started = Instant::now();
    let subscribe = async {
        s.send(&format!(
            "<iq type='set' id='sub' to='{}'><pubsub xmlns='{}'><subscribe node='{node}' \
             jid='{user}@{}'/></pubsub></iq>",
            end.service,
            ns::PUBSUB,
            end.domain
        ))
        .await?;
        s.iq_result("sub").await
    };
    match tokio::time::timeout(CONNECT_BATCH_TIMEOUT, subscribe).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let e = format!("{e:#}");
            let _ = subscribed.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
        Err(_) => {
            let e = format!("not subscribed within {CONNECT_BATCH_TIMEOUT:?}");
            let _ = subscribed.send(Err(e.clone()));
            stats.error = Some(e);
            return stats;
        }
    }
    stats.subscribed = true;
    stats.seen = Seen::new(items);
    let _ = subscribed.send(Ok(started.elapsed()));

    // The fast path: what the decoder had not returned yet, then raw reads.
    let mut buf = s.decoder.take_buffered();
    buf.reserve(READ_BUFFER.saturating_sub(buf.len()));
    let mut io = s.io;
    // As in `fanout`, the receive time is taken once per read.
    let (mut now_ns, mut now) = (unix_nanos(), Instant::now());
    let mut target = control.borrow_and_update().target;
    let mut changed = Box::pin(super::control_changed(control.clone()));
    loop {
        let used = stats.handle(&buf, now_ns, now);
        buf.drain(..used);
        if target.is_some_and(|t| stats.seen.distinct >= t) {
            break;
        }
        if buf.windows(STREAM_ERROR.len()).any(|w| w == STREAM_ERROR) {
            let text = String::from_utf8_lossy(&buf[..buf.len().min(300)]).into_owned();
            stats.error = Some(format!("stream error: {text}"));
            break;
        }
        if buf.capacity() - buf.len() < SETUP_CHUNK {
            buf.reserve(READ_BUFFER);
        }
        tokio::select! {
            read = io.read_buf(&mut buf) => match read {
                Ok(0) => {
                    stats.error = Some("connection ended".to_owned());
                    break;
                }
                Ok(_) => (now_ns, now) = (unix_nanos(), Instant::now()),
                Err(e) => {
                    stats.error = Some(format!("read error: {e}"));
                    break;
                }
            },
            c = &mut changed => match c {
                Some(c) if !c.stop => {
                    target = c.target;
                    changed = Box::pin(super::control_changed(control.clone()));
                }
                _ => break,
            },
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// publishing over XMPP

/// `<iq type='set' …><pubsub><publish>` of item `k`, with the send time in its id and payload.
fn publish_iq(out: &mut String, service: &str, node: &str, k: u64, size: usize, pad: &str) {
    let body = payload(size, pad, k);
    let _ = write!(
        out,
        "<iq type='set' to='{service}' id='p{k}-{}'><pubsub xmlns='{}'><publish node='{node}'>\
         <item id='i{k}'><json xmlns='{}'>{body}</json></item></publish></pubsub></iq>",
        unix_nanos(),
        ns::PUBSUB,
        ns::JSON,
    );
}

/// The send time in a publish iq's id (`p<k>-<unix ns>`).
fn publish_sent_ns(id: &str) -> Option<u64> {
    id.strip_prefix('p')?.split_once('-')?.1.parse().ok()
}

/// The defined condition of an error answer, for the report.
fn error_condition(iq: &Element) -> String {
    iq.get_child("error", ns::JABBER_CLIENT)
        .and_then(|e| e.children().find(|c| c.ns() == ns::STANZAS))
        .map_or_else(|| describe(iq), |c| c.name().to_owned())
}

/// One XMPP publisher: claims item numbers from `next`, sends each when due (`start` +
/// k / `rate`) as long as fewer than `window` are unanswered, and counts the answers.
#[allow(clippy::too_many_arguments)]
async fn xmpp_publisher(
    mut s: XmppStream<TlsStream<TcpStream>>,
    end: Arc<Endpoint>,
    node: Arc<str>,
    next: Arc<AtomicU64>,
    items: u64,
    rate: f64,
    start: Instant,
    window: usize,
    size: usize,
) -> Result<(u64, Histogram<u64>, Errors)> {
    let pad = "x".repeat(size);
    let mut latency = new_histogram()?;
    let mut errors = Errors::default();
    let (mut acked, mut outstanding) = (0u64, 0usize);
    let due = |k: u64| {
        if rate > 0.0 {
            start + Duration::from_secs_f64(k as f64 / rate)
        } else {
            start
        }
    };
    let mut k = Some(next.fetch_add(1, Ordering::Relaxed)).filter(|&k| k < items);
    let mut out = String::new();
    loop {
        if k.is_none() && outstanding == 0 {
            break;
        }
        // Answers already decoded first, then whichever comes first: more answers, or the
        // next publish falling due while the window has room.
        match s.decoder.next() {
            Ok(Some(Frame::Stanza(el))) => {
                let Some(sent) = el
                    .attr("id")
                    .filter(|_| el.name() == "iq")
                    .and_then(publish_sent_ns)
                else {
                    continue;
                };
                outstanding = outstanding.saturating_sub(1);
                if el.attr("type") == Some("result") {
                    acked += 1;
                    let us = unix_nanos().saturating_sub(sent) / 1000;
                    latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
                } else {
                    errors.add(format!("publish refused: {}", error_condition(&el)));
                }
                continue;
            }
            Ok(Some(Frame::StreamEnd)) => bail!("the server closed the publisher's stream"),
            Ok(Some(Frame::StreamHeader(_))) => continue,
            Ok(None) => {}
            Err(e) => bail!("unreadable stream from the server: {e}"),
        }
        let send_at = k.filter(|_| outstanding < window).map(due);
        tokio::select! {
            read = s.io.read(&mut s.chunk) => {
                let n = read.context("reading publish answers")?;
                if n == 0 {
                    bail!("the publisher's connection closed");
                }
                s.decoder.feed(&s.chunk[..n]);
            }
            () = tokio::time::sleep_until(send_at.unwrap_or(start)), if send_at.is_some() => {
                // Everything due now that the window allows, in one write.
                out.clear();
                let now = Instant::now();
                while let Some(item) = k {
                    if outstanding >= window || due(item) > now {
                        break;
                    }
                    publish_iq(&mut out, &end.service, &node, item, size, &pad);
                    outstanding += 1;
                    k = Some(next.fetch_add(1, Ordering::Relaxed)).filter(|&k| k < items);
                }
                s.io.write_all(out.as_bytes()).await.context("sending publishes")?;
                s.io.flush().await?;
            }
        }
    }
    Ok((acked, latency, errors))
}

/// Publishes `items` items over the logged-in `publishers`; returns the totals.
async fn publish_xmpp(
    args: &Args,
    end: &Arc<Endpoint>,
    node: &Arc<str>,
    publishers: Vec<XmppStream<TlsStream<TcpStream>>>,
    items: u64,
) -> Result<PublishStats> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|s| {
            tokio::spawn(xmpp_publisher(
                s,
                end.clone(),
                node.clone(),
                next.clone(),
                items,
                args.rate,
                start,
                args.window.max(1),
                args.size,
            ))
        })
        .collect();
    let mut totals = PublishStats {
        acked: 0,
        max_offset: 0,
        latency_us: new_histogram()?,
        errors: Errors::default(),
    };
    for task in tasks {
        match task.await.context("publisher panicked")? {
            Ok((acked, latency, errors)) => {
                totals.acked += acked;
                totals.latency_us.add(&latency).context("merging")?;
                totals.errors.merge(errors);
            }
            Err(e) => totals.errors.add(format!("publisher failed: {e:#}")),
        }
    }
    Ok(totals)
}

// ---------------------------------------------------------------------------------------------
// the server under test

/// The server this run measures and how to reach it.
struct XTarget {
    kind: ServerKind,
    c2s: SocketAddr,
    pid: Option<u32>,
    /// juxta's REST API, when known.
    rest: Option<Target>,
    /// Keeps a spawned Prosody running.
    _prosody: Option<Prosody>,
}

impl XTarget {
    fn rss_kib(&self) -> Option<u64> {
        self.pid.and_then(|pid| juxta_tests::rss_kib_of(pid).ok())
    }

    fn cpu(&self) -> (Option<f64>, Option<f64>) {
        (
            self.pid
                .and_then(|pid| juxta_tests::cpu_seconds_of(pid).ok()),
            juxta_tests::cpu_seconds_of(std::process::id()).ok(),
        )
    }

    fn api(&self) -> Option<Api> {
        self.rest
            .as_ref()
            .map(|t| Api::new(&t.base_url, Some(&t.token)))
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    s.to_socket_addrs()
        .with_context(|| format!("resolving --xmpp {s}"))?
        .next()
        .with_context(|| format!("--xmpp {s} resolves to no address"))
}

fn account(args: &Args, i: usize) -> String {
    format!("{}{i}", args.accounts_prefix)
}

async fn start_target(args: &Args) -> Result<XTarget> {
    let given = args.xmpp.as_deref().map(parse_addr).transpose()?;
    match args.server {
        ServerKind::Juxta => {
            let rest = if args.url.is_some() || given.is_none() {
                Some(super::connect_target(args, JUXTA_XMPP_ENV).await?)
            } else {
                None
            };
            let c2s = given
                .or_else(|| rest.as_ref().and_then(|t| t.xmpp_addr))
                .context("juxta's c2s address is unknown: give --xmpp HOST:PORT")?;
            let pid = args.pid.or_else(|| rest.as_ref().and_then(|t| t.pid));
            Ok(XTarget {
                kind: ServerKind::Juxta,
                c2s,
                pid,
                rest,
                _prosody: None,
            })
        }
        ServerKind::Prosody => {
            if let Some(c2s) = given {
                return Ok(XTarget {
                    kind: ServerKind::Prosody,
                    c2s,
                    pid: args.pid,
                    rest: None,
                    _prosody: None,
                });
            }
            let users: Vec<String> = (0..args.subscribers).map(|i| account(args, i)).collect();
            let prosody = Prosody::start(
                &args.prosody,
                &args.domain,
                &args.publisher_account,
                users
                    .iter()
                    .map(String::as_str)
                    .chain([args.publisher_account.as_str()]),
                &args.password,
            )
            .await?;
            Ok(XTarget {
                kind: ServerKind::Prosody,
                c2s: prosody.c2s_addr(),
                pid: Some(prosody.pid()),
                rest: None,
                _prosody: Some(prosody),
            })
        }
    }
}

/// Creates the accounts juxta does not have yet, over REST.
async fn ensure_juxta_accounts(api: &Api, users: Vec<String>, password: &str) -> Result<usize> {
    let listed = api
        .get("/api/v1/accounts")
        .await?
        .expect(200)
        .context("listing accounts")?;
    let existing: std::collections::HashSet<&str> = listed["accounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let missing: Vec<String> = users
        .into_iter()
        .filter(|u| !existing.contains(u.as_str()))
        .collect();
    let created = missing.len();
    let limit = Arc::new(Semaphore::new(ACCOUNT_CONCURRENCY));
    let body = json!({ "password": password });
    let calls = missing.into_iter().map(|user| {
        let (api, limit, body) = (api.clone(), limit.clone(), body.clone());
        async move {
            let _permit = limit.acquire_owned().await?;
            let path = format!("/api/v1/accounts/{user}");
            let reply = api.call(Method::PUT, &path, Some(&body)).await?;
            ensure!(
                reply.status == 201 || reply.status == 200 || reply.status == 204,
                "creating account {user}: {} {}",
                reply.status,
                reply.body
            );
            anyhow::Ok(())
        }
    });
    for r in join_all(calls).await {
        r?;
    }
    Ok(created)
}

/// Sends `xml` (an iq with `id`) on `s` and waits for its answer within [`NODE_TIMEOUT`].
async fn request(s: &mut XmppStream<TlsStream<TcpStream>>, id: &str, xml: &str) -> Result<()> {
    tokio::time::timeout(NODE_TIMEOUT, async {
        s.send(xml).await?;
        s.iq_result(id).await
    })
    .await
    .map_err(|_| anyhow!("no answer to {id} within {NODE_TIMEOUT:?}"))??;
    Ok(())
}

/// Creates `node` over XMPP with `send_last_published_item = never` (XEP-0060 §8.1.3), so that
/// a node reused across runs gives subscribers nothing on subscribe.
async fn create_node_xmpp(
    s: &mut XmppStream<TlsStream<TcpStream>>,
    service: &str,
    node: &str,
) -> Result<()> {
    let xml = format!(
        "<iq type='set' id='create' to='{service}'><pubsub xmlns='{}'><create node='{node}'/>\
         <configure><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE' type='hidden'>\
         <value>http://jabber.org/protocol/pubsub#node_config</value></field>\
         <field var='pubsub#send_last_published_item'><value>never</value></field>\
         </x></configure></pubsub></iq>",
        ns::PUBSUB
    );
    request(s, "create", &xml).await
}

async fn delete_node_xmpp(
    s: &mut XmppStream<TlsStream<TcpStream>>,
    service: &str,
    node: &str,
) -> Result<()> {
    let xml = format!(
        "<iq type='set' id='delete' to='{service}'><pubsub xmlns='{}'>\
         <delete node='{node}'/></pubsub></iq>",
        ns::PUBSUB_OWNER
    );
    request(s, "delete", &xml).await
}

// ---------------------------------------------------------------------------------------------
// the run

/// Waits for one batch of reports (logins or subscriptions), recording their latency.
async fn collect_batch(
    ready: Vec<oneshot::Receiver<std::result::Result<Duration, String>>>,
    latency: &mut Histogram<u64>,
    errors: &mut Errors,
    what: &str,
) {
    let outcomes = join_all(
        ready
            .into_iter()
            .map(|rx| tokio::time::timeout(CONNECT_BATCH_TIMEOUT + Duration::from_secs(5), rx)),
    )
    .await;
    for outcome in outcomes {
        match outcome {
            Ok(Ok(Ok(took))) => {
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
            }
            Ok(Ok(Err(e))) => errors.add(e),
            Ok(Err(_)) => errors.add(format!("subscriber ended before {what}")),
            Err(_) => errors.add(format!("no {what} report in time")),
        }
    }
}

/// Runs the xmpp mode; returns the report.
pub(super) async fn run(args: &Args) -> Result<Value> {
    let items = args.items.unwrap_or(1000);
    ensure!(
        items <= MAX_ITEMS,
        "--items is at most {MAX_ITEMS} in xmpp mode"
    );
    ensure!(
        args.server == ServerKind::Juxta || args.publisher == PublisherKind::Xmpp,
        "--publisher rest needs juxta"
    );
    ensure!(
        args.login_stage == Stage::Bound || args.idle_rss,
        "--login-stage before bound needs --idle-rss"
    );
    let settle = Duration::from_secs_f64(args.settle.max(0.0));
    let target = start_target(args).await?;
    let end = Arc::new(Endpoint {
        addr: target.c2s,
        domain: args.domain.clone(),
        service: format!("pubsub.{}", args.domain),
        password: args.password.clone(),
        tls: tls_connector()?,
    });
    let node: Arc<str> = args
        .node
        .clone()
        .unwrap_or_else(|| juxta_tests::unique("xload"))
        .into();

    // Accounts.
    let users: Vec<String> = (0..args.subscribers).map(|i| account(args, i)).collect();
    if let Some(api) = target.api()
        && target.kind == ServerKind::Juxta
    {
        eprintln!("xmpp: ensuring {} accounts", users.len() + 1);
        let mut all = users.clone();
        all.push(args.publisher_account.clone());
        let created = ensure_juxta_accounts(&api, all, &args.password).await?;
        eprintln!("xmpp: created {created} accounts");
    }

    // Publishers, and the node.
    let xmpp_publishers = match args.publisher {
        PublisherKind::Xmpp => args.publishers.unwrap_or(1).max(1),
        PublisherKind::Rest => 0,
    };
    let mut publishers = Vec::with_capacity(xmpp_publishers);
    let mut owner = login(&end, &args.publisher_account)
        .await
        .context("logging the publisher in")?;
    match args.publisher {
        PublisherKind::Xmpp => {
            if let Err(e) = create_node_xmpp(&mut owner, &end.service, &node).await {
                if args.node.is_none() {
                    return Err(e.context(format!("creating node {node}")));
                }
                eprintln!("xmpp: creating node {node} failed ({e:#}); using it as it is");
            }
        }
        PublisherKind::Rest => {
            let api = target
                .api()
                .context("--publisher rest needs juxta's REST API")?;
            let config = json!({
                "max_items": args.max_items,
                "send_last_published_item": "never",
            });
            let reply = api.put_node(&node, Some(&config)).await?;
            ensure!(
                reply.status == 200 || reply.status == 201,
                "creating node {node}: {} {}",
                reply.status,
                reply.body
            );
        }
    }
    for _ in 1..xmpp_publishers {
        publishers.push(login(&end, &args.publisher_account).await?);
    }

    // Subscribers log in.
    tokio::time::sleep(settle).await;
    let rss_before = target.rss_kib();
    let (control_tx, control_rx) = watch::channel(Control::default());
    let mut subs: Vec<SubscriberHandle> = Vec::with_capacity(args.subscribers);
    let mut login_latency = new_histogram()?;
    let mut login_errors = Errors::default();
    let batch = args.connect_batch.max(1);
    eprintln!(
        "xmpp: logging {} subscribers in to {} ({:?})",
        args.subscribers, target.c2s, target.kind
    );
    let login_start = Instant::now();
    for chunk in users.chunks(batch) {
        let mut ready = Vec::with_capacity(chunk.len());
        for user in chunk {
            let (logged_in_tx, logged_in) = oneshot::channel();
            let (go, go_rx) = oneshot::channel();
            let (subscribed_tx, subscribed) = oneshot::channel();
            ready.push(logged_in);
            let task = tokio::spawn(subscriber(
                end.clone(),
                user.clone(),
                node.clone(),
                items,
                args.login_stage,
                logged_in_tx,
                go_rx,
                subscribed_tx,
                control_rx.clone(),
                new_histogram()?,
            ));
            subs.push(SubscriberHandle {
                go,
                subscribed,
                task,
            });
        }
        collect_batch(ready, &mut login_latency, &mut login_errors, "login").await;
    }
    let login_secs = login_start.elapsed().as_secs_f64();
    let logged_in = u64::try_from(args.subscribers)? - login_errors.total;
    tokio::time::sleep(settle).await;
    let rss_logged_in = target.rss_kib();
    let kib_per_session = match (rss_before, rss_logged_in) {
        (Some(a), Some(b)) if logged_in > 0 => Some(b.saturating_sub(a) as f64 / logged_in as f64),
        _ => None,
    };
    let mut report = json!({
        "mode": "xmpp",
        "server": format!("{:?}", target.kind).to_lowercase(),
        "c2s": target.c2s.to_string(),
        "node": &*node,
        "subscribers": args.subscribers,
        "login_stage": format!("{:?}", args.login_stage).to_lowercase(),
        "logged_in": logged_in,
        "login_seconds": login_secs,
        "login_errors": login_errors.json(),
        "login_latency_ms": latency_json(&login_latency),
        "server_rss_kib_before_login": rss_before,
        "server_rss_kib_logged_in": rss_logged_in,
        "server_rss_kib_per_idle_session": kib_per_session,
    });
    if args.idle_rss {
        // Dropping `go` ends each subscriber, which closes its connection.
        let tasks: Vec<_> = subs.into_iter().map(|s| s.task).collect();
        for task in tasks {
            let _ = task.await;
        }
        return Ok(report);
    }

    // Subscribe, in batches.
    eprintln!("xmpp: subscribing to {node}");
    let mut sub_latency = new_histogram()?;
    let mut sub_errors = Errors::default();
    let subscribe_start = Instant::now();
    let mut tasks = Vec::with_capacity(subs.len());
    let mut pending = Vec::with_capacity(batch);
    for s in subs {
        let _ = s.go.send(());
        pending.push(s.subscribed);
        tasks.push(s.task);
        if pending.len() == batch {
            let ready = std::mem::take(&mut pending);
            collect_batch(ready, &mut sub_latency, &mut sub_errors, "subscription").await;
        }
    }
    collect_batch(pending, &mut sub_latency, &mut sub_errors, "subscription").await;
    let subscribe_secs = subscribe_start.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let rss_subscribed = target.rss_kib();

    // Publish.
    eprintln!(
        "xmpp: publishing {items} items at {} items/s over {:?}",
        args.rate, args.publisher
    );
    let cpu_before = target.cpu();
    let publish_start = Instant::now();
    let published = match args.publisher {
        PublisherKind::Xmpp => {
            publishers.insert(0, owner);
            publish_xmpp(args, &end, &node, publishers, items).await?
        }
        PublisherKind::Rest => {
            let rest = target.rest.as_ref().context("no REST target")?;
            let n = args.publishers.unwrap_or(4).max(1);
            publish_paced(args, rest, &node, items, n).await?
        }
    };
    let publish_secs = publish_start.elapsed().as_secs_f64();

    // Drain.
    control_tx.send_replace(Control {
        target: Some(published.acked),
        stop: false,
    });
    let drain = Duration::from_secs_f64(args.drain_timeout.max(0.0));
    let stopper = {
        let control_tx = control_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            control_tx.send_modify(|c| c.stop = true);
        })
    };
    let mut latency = new_histogram()?;
    let (mut received, mut lost, mut duplicates, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    let (mut subscribed, mut subscribers_with_loss) = (0u64, 0u64);
    let mut last_delivery: Option<Instant> = None;
    let mut errors = Errors::default();
    for task in tasks {
        let stats = task.await.context("subscriber panicked")?;
        if stats.subscribed {
            subscribed += 1;
            received += stats.seen.distinct;
            let missing = published.acked.saturating_sub(stats.seen.distinct);
            lost += missing;
            subscribers_with_loss += u64::from(missing > 0);
        }
        duplicates += stats.duplicates;
        foreign += stats.foreign;
        if let Some(e) = stats.error {
            errors.add(e);
        }
        latency.add(&stats.latency_us).context("merging")?;
        last_delivery = last_delivery.max(stats.last_delivery);
    }
    stopper.abort();
    let cpu_after = target.cpu();
    let delivery_secs = last_delivery
        .map(|t| t.saturating_duration_since(publish_start).as_secs_f64())
        .unwrap_or(0.0);
    let rss_after = target.rss_kib();

    // Leave no trace of our own node (the owner's stream went with the XMPP publishers).
    if args.node.is_none() {
        let deleted = match (args.publisher, target.api()) {
            (PublisherKind::Rest, Some(api)) => api.delete_node(&node).await.map(drop),
            _ => match login(&end, &args.publisher_account).await {
                Ok(mut owner) => delete_node_xmpp(&mut owner, &end.service, &node).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = deleted {
            eprintln!("xmpp: deleting node {node} failed: {e:#}");
        }
    }

    let extra = json!({
        "subscribed": subscribed,
        "subscribe_seconds": subscribe_secs,
        "subscribe_errors": sub_errors.json(),
        "subscribe_latency_ms": latency_json(&sub_latency),
        "server_rss_kib_subscribed": rss_subscribed,
        "publisher": format!("{:?}", args.publisher).to_lowercase(),
        "publishers": if args.publisher == PublisherKind::Xmpp { xmpp_publishers } else { args.publishers.unwrap_or(4).max(1) },
        "window": args.window,
        "items": items,
        "size_bytes": args.size,
        "target_rate": args.rate,
        "published": published.acked,
        "publish_seconds": publish_secs,
        "publish_rate": published.acked as f64 / publish_secs.max(1e-9),
        "publish_errors": published.errors.json(),
        "publish_latency_ms": latency_json(&published.latency_us),
        "deliveries": received,
        "expected_deliveries": subscribed * published.acked,
        "delivery_seconds": delivery_secs,
        "deliveries_per_second": if delivery_secs > 0.0 { received as f64 / delivery_secs } else { 0.0 },
        "latency_ms": latency_json(&latency),
        "lost": lost,
        "duplicates": duplicates,
        "foreign": foreign,
        "subscribers_with_loss": subscribers_with_loss,
        "subscriber_errors": errors.json(),
        "server_cpu_seconds": cpu_delta(cpu_before.0, cpu_after.0),
        "load_tool_cpu_seconds": cpu_delta(cpu_before.1, cpu_after.1),
        "server_rss_kib_after": rss_after,
    });
    if let (Some(r), Value::Object(extra)) = (report.as_object_mut(), extra) {
        r.extend(extra);
    }
    Ok(report)
}

/// The human-readable report of an xmpp run.
pub(super) fn print_human(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let kib = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "n/a".to_owned(), |k| format!("{k} KiB"))
    };
    let lat = |v: &Value| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            f(&v["p50"]),
            f(&v["p99"]),
            f(&v["p999"]),
            f(&v["max"])
        )
    };
    let errs = |v: &Value| {
        let total = v["total"].as_u64().unwrap_or(0);
        if total == 0 {
            "0".to_owned()
        } else {
            format!("{total} {}", v["kinds"])
        }
    };
    println!(
        "juxta-load xmpp against {} at {} (node {})",
        r["server"].as_str().unwrap_or(""),
        r["c2s"].as_str().unwrap_or(""),
        r["node"]
    );
    println!(
        "  logged in    {} of {} (as far as: {}) in {:.2} s, errors {}",
        r["logged_in"],
        r["subscribers"],
        r["login_stage"].as_str().unwrap_or(""),
        f(&r["login_seconds"]),
        errs(&r["login_errors"])
    );
    println!("  login        {}", lat(&r["login_latency_ms"]));
    println!(
        "  server RSS   {} before -> {} with idle sessions = {} per idle authenticated session",
        kib(&r["server_rss_kib_before_login"]),
        kib(&r["server_rss_kib_logged_in"]),
        r["server_rss_kib_per_idle_session"]
            .as_f64()
            .map_or_else(|| "n/a".to_owned(), |k| format!("{k:.1} KiB"))
    );
    if r.get("published").is_none() {
        return;
    }
    println!(
        "  subscribed   {} in {:.2} s, errors {}; server RSS then {}",
        r["subscribed"],
        f(&r["subscribe_seconds"]),
        errs(&r["subscribe_errors"]),
        kib(&r["server_rss_kib_subscribed"])
    );
    println!(
        "  published    {} of {} items x {} B over {} ({} publishers, window {}) in {:.2} s = {:.0} items/s (target {}), errors {}",
        r["published"],
        r["items"],
        r["size_bytes"],
        r["publisher"].as_str().unwrap_or(""),
        r["publishers"],
        r["window"],
        f(&r["publish_seconds"]),
        f(&r["publish_rate"]),
        r["target_rate"],
        errs(&r["publish_errors"])
    );
    println!("  publish RTT  {}", lat(&r["publish_latency_ms"]));
    println!(
        "  delivered    {} of {} in {:.2} s = {:.0} deliveries/s",
        r["deliveries"],
        r["expected_deliveries"],
        f(&r["delivery_seconds"]),
        f(&r["deliveries_per_second"])
    );
    println!("  latency      {}", lat(&r["latency_ms"]));
    println!(
        "  lost {}, duplicates {}, foreign {}, subscribers with loss {}, subscriber errors {}",
        r["lost"],
        r["duplicates"],
        r["foreign"],
        r["subscribers_with_loss"],
        errs(&r["subscriber_errors"])
    );
    println!("  server RSS after run {}", kib(&r["server_rss_kib_after"]));
    println!("  CPU          {}", super::cpu(r));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_raw_and_escaped_json_when_scanned_then_members_are_found() {
        let juxta = br#"<message from='pubsub.localhost' type='headline' id='0-7'><event xmlns='http://jabber.org/protocol/pubsub#event'><items node='n'><item id='i7' publisher='bench@localhost'><json xmlns='urn:xmpp:json:0'>{"i":7,"pad":"xx","t":1700000000000000000}</json></item></items></event></message>"#;
        assert_eq!(json_u64(juxta, b"i"), Some(7));
        assert_eq!(json_u64(juxta, b"t"), Some(1_700_000_000_000_000_000));
        let prosody = br#"<message type="headline" from="pubsub.localhost" to="u1@localhost" id="x"><event xmlns="http://jabber.org/protocol/pubsub#event"><items node="n"><item id="i3"><json xmlns="urn:xmpp:json:0">{&quot;t&quot;: 5,&quot;i&quot;:3}</json></item></items></event></message>"#;
        assert_eq!(json_u64(prosody, b"i"), Some(3));
        assert_eq!(json_u64(prosody, b"t"), Some(5));
        assert_eq!(json_u64(prosody, b"pad"), None);
        assert_eq!(json_u64(br#"{"ti":1}"#, b"i"), None);
        assert_eq!(json_u64(br#"{"i":"x"}"#, b"i"), None);
    }

    #[test]
    fn given_messages_split_anywhere_when_handled_then_each_counts_once() {
        let mut wire = Vec::new();
        for i in [0u64, 1, 1, 3, 99] {
            wire.extend_from_slice(
                format!("<message><json>{{\"t\":1,\"i\":{i}}}</json></message>").as_bytes(),
            );
        }
        wire.extend_from_slice(b"<presence/>");
        for cut in 0..wire.len() {
            let mut stats = XSubStats {
                subscribed: true,
                seen: Seen::new(10),
                duplicates: 0,
                foreign: 0,
                last_delivery: None,
                latency_us: new_histogram().expect("valid bounds"),
                error: None,
            };
            let now = Instant::now();
            let mut buf = wire[..cut].to_vec();
            let used = stats.handle(&buf, 2_000, now);
            buf.drain(..used);
            buf.extend_from_slice(&wire[cut..]);
            let used = stats.handle(&buf, 2_000, now);
            assert_eq!(&buf[used..], b"<presence/>", "cut at {cut}");
            assert_eq!(
                (stats.seen.distinct, stats.duplicates, stats.foreign),
                (3, 1, 1),
                "cut at {cut}"
            );
            assert_eq!(stats.latency_us.len(), 3);
        }
    }

    #[test]
    fn given_item_numbers_when_inserted_then_new_duplicate_and_foreign_are_told_apart() {
        let mut seen = Seen::new(65);
        assert_eq!(seen.insert(64), Arrival::New);
        assert_eq!(seen.insert(64), Arrival::Duplicate);
        assert_eq!(seen.insert(0), Arrival::New);
        assert_eq!(seen.insert(128), Arrival::Foreign);
        assert_eq!(seen.distinct, 2);
    }

    #[test]
    fn given_a_publish_id_when_parsed_then_the_send_time_is_found() {
        let mut out = String::new();
        publish_iq(&mut out, "pubsub.localhost", "n", 12, 64, "xxxx");
        let id = out
            .split("id='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .expect("an id");
        assert!(publish_sent_ns(id).is_some_and(|t| t > 0), "{id}");
        assert_eq!(publish_sent_ns("bind"), None);
        assert!(out.contains("<item id='i12'>"), "{out}");
    }
}
