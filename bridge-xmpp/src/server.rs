//! The c2s listener: the thin tokio driver around [`c2s::Session`](crate::c2s::Session).
//!
//! One task per connection owns the socket (plain, then TLS after STARTTLS), feeds received
//! bytes to the session, writes what it asks to write, looks accounts up in the store, and
//! answers stanzas it cannot route yet. The per-IP connection limit is taken before the
//! session starts; the handshake and idle timeouts end connections that stall; SIGTERM (the
//! shared cancellation token) closes every stream with `<system-shutdown/>`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use juxta_core::Store;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::c2s::{C2sConfig, Output, Session};
use crate::jid::Jid;
use crate::link::{Link, LinkQueue, Next, Outbound, StanzaHandler};
use crate::metrics::{KindLabels, Metrics};
use crate::ns;
use crate::router::Router;
use crate::stanza::{IqType, PresenceType, Stanza, StanzaError};
use crate::{Element, Limits};

/// Default connections allowed from one IP address at once.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Default time to finish authentication and binding.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a bound session may stay silent (clients ping to stay longer).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes read per socket read.
const READ_CHUNK: usize = 4096;

/// Settings of the c2s listener.
#[derive(Clone)]
pub struct ServerConfig {
    /// The domain served.
    pub domain: String,
    /// TLS for STARTTLS.
    pub tls: Arc<rustls::ServerConfig>,
    /// Whether TLS is required before authentication (RFC 6120 §5.3.1: it should be).
    pub tls_required: bool,
    /// Connections allowed per client IP.
    pub max_connections_per_ip: usize,
    /// Time allowed from connect to a bound resource.
    pub handshake_timeout: Duration,
    /// Time a bound session may send nothing.
    pub idle_timeout: Duration,
    /// Stanza size, depth and attribute limits.
    pub limits: Limits,
    /// Bytes per second one client may send after the first second's burst; reading slows
    /// down beyond it (backpressure, as Prosody's `mod_limits` does), so a flooding client
    /// cannot take more than its share of the server. 0 turns the limit off.
    pub max_bytes_per_sec: u64,
    /// Where to count.
    pub metrics: Arc<Metrics>,
    /// Stanzas queued for one session before it counts as too slow and is closed.
    pub link_capacity: usize,
    /// Bound sessions, for delivery to local addresses.
    pub router: Arc<Router>,
    /// The service stanzas to `service_jid` (and its nodes) go to, when there is one.
    pub service: Option<(Jid, Arc<dyn StanzaHandler>)>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("domain", &self.domain)
            .field("tls_required", &self.tls_required)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .finish_non_exhaustive()
    }
}

/// Default for [`ServerConfig::max_bytes_per_sec`].
pub const DEFAULT_MAX_BYTES_PER_SEC: u64 = 256 * 1024;

/// A token bucket over bytes read: `rate` per second, holding at most one second's worth.
#[derive(Debug)]
pub(crate) struct ReadBudget {
    rate: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl ReadBudget {
    pub(crate) fn new(rate: u64, now: tokio::time::Instant) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            last: now,
        }
    }

    /// Spends `n` bytes at `now`; returns how long to wait before reading again.
    pub(crate) fn spend(&mut self, n: usize, now: tokio::time::Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Counts connections per IP; a guard releases its slot on drop.
#[derive(Debug, Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot {
    ip: IpAddr,
    table: Arc<PerIp>,
}

impl PerIp {
    fn take(table: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut t = table.0.lock();
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            table: table.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock();
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// How clients start TLS on a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP; the client negotiates STARTTLS (RFC 6120 §5).
    StartTls,
    /// TLS from the first byte (XEP-0368), ALPN `xmpp-client`.
    DirectTls,
}

/// Accepts c2s connections until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    config: ServerConfig,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) {
    let per_ip = Arc::new(PerIp::default());
    // Shared, not cloned per connection: every byte a connection holds counts 10 000 times.
    let config = Arc::new(config);
    let secret: [u8; 32] = rand::random();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "xmpp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = PerIp::take(&per_ip, peer.ip(), config.max_connections_per_ip) else {
            config.metrics.refused.inc();
            tracing::info!(%peer, "xmpp: too many connections from this address; refused");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (config, store, shutdown) = (config.clone(), store.clone(), shutdown.child_token());
        tokio::spawn(async move {
            let _slot = slot;
            let sessions = config.metrics.sessions.clone();
            sessions.inc();
            let result = connection(tcp, peer, transport, config, store, shutdown, secret).await;
            sessions.dec();
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "xmpp connection ended");
            }
        });
    }
}

/// The socket, before and after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the handshake has the socket.
    Upgrading,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

impl Conn {
    /// Waits until the socket has bytes to read (or an error or EOF to report).
    async fn readable(&self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.readable().await,
            Conn::Tls(s) => s.get_ref().0.readable().await,
            Conn::Upgrading => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Reads what is there without waiting; `None` when nothing is. TLS may hold decrypted
    /// bytes the socket no longer signals, so callers read until `None` before waiting for
    /// [`Conn::readable`] again.
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut rb = ReadBuf::new(buf);
        match Pin::new(self).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => Ok(Some(rb.filled().len())),
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }
}

/// What one [`read_into_session`] found.
enum Read {
    Bytes(usize),
    Eof,
    Nothing,
}

/// Reads what the socket holds into `session`. The buffer lives on the thread's stack for
/// the duration of the call only, so an idle connection holds no read buffer of its own.
#[inline(never)]
fn read_into_session(conn: &mut Conn, session: &mut Session) -> io::Result<Read> {
    let mut buf = [0u8; READ_CHUNK];
    Ok(match conn.read_now(&mut buf)? {
        None => Read::Nothing,
        Some(0) => Read::Eof,
        Some(n) => {
            session.handle_bytes(&buf[..n]);
            Read::Bytes(n)
        }
    })
}

/// The handshake and idle timeouts of one connection, kept by one timer that may fire
/// early: activity moves the idle deadline without re-arming the timer each time, and when
/// the timer fires, [`Timeouts::check`] says whether to re-arm it or end the stream.
pub(crate) struct Timeouts {
    handshake_deadline: tokio::time::Instant,
    idle: Duration,
    last_read: tokio::time::Instant,
    expired: bool,
}

impl Timeouts {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            handshake_deadline: now + config.handshake_timeout,
            idle: config.idle_timeout,
            last_read: now,
            expired: false,
        }
    }

    /// When the connection must have bound a resource.
    pub(crate) fn handshake_deadline(&self) -> tokio::time::Instant {
        self.handshake_deadline
    }

    /// The client sent something at `now`.
    pub(crate) fn read(&mut self, now: tokio::time::Instant) {
        self.last_read = now;
    }

    /// Whether [`Timeouts::check`] has already said the connection timed out.
    pub(crate) fn expired(&self) -> bool {
        self.expired
    }

    /// The timer fired at `now`: the deadline to re-arm it for, or `None` (once) when the
    /// connection timed out.
    pub(crate) fn check(
        &mut self,
        now: tokio::time::Instant,
        bound: bool,
    ) -> Option<tokio::time::Instant> {
        let deadline = if bound {
            self.last_read + self.idle
        } else {
            self.handshake_deadline
        };
        if now >= deadline {
            self.expired = true;
            None
        } else {
            Some(deadline)
        }
    }
}

pub(crate) fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    config: Arc<ServerConfig>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    secret: [u8; 32],
) -> io::Result<()> {
    let mut timeouts = Timeouts::new(&config);
    let handshake_deadline = timeouts.handshake_deadline();
    let mut c2s = C2sConfig::new(config.domain.clone());
    c2s.tls_required = config.tls_required;
    c2s.limits = config.limits;
    let mut conn = match transport {
        Transport::StartTls => Conn::Plain(tcp),
        Transport::DirectTls => {
            c2s.already_tls = true;
            let acceptor = tokio_rustls::TlsAcceptor::from(config.tls.clone());
            let tls = tokio::time::timeout_at(handshake_deadline, Box::pin(acceptor.accept(tcp)))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            Conn::Tls(Box::new(tls))
        }
    };
    let mut session = Session::new(c2s, Box::new(random_token), secret)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut budget = ReadBudget::new(config.max_bytes_per_sec, tokio::time::Instant::now());
    let mut core = Core {
        config: &config,
        store: &store,
        peer,
        bound: None,
    };
    // The futures every pass waits on are made once, not once per pass: under fan-out a
    // session wakes about once per notification.
    let shutdown = shutdown.cancelled_owned();
    tokio::pin!(shutdown);
    let mut shutting_down = false;
    let timer = tokio::time::sleep_until(handshake_deadline);
    tokio::pin!(timer);
    // Whether bytes may be waiting without the socket saying so (decrypted TLS data).
    let mut may_read = true;
    let result = async {
        loop {
            // Do everything the session asked for before reading again.
            while let Some(out) = session.poll_output() {
                match out {
                    Output::Send(bytes) => {
                        config.metrics.bytes_out.inc_by(bytes.len() as u64);
                        conn.write_all(&bytes).await?;
                        conn.flush().await?;
                    }
                    Output::StartTls => {
                        let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Upgrading) else {
                            return Err(io::Error::other("STARTTLS on a stream that is not plain"));
                        };
                        let acceptor = tokio_rustls::TlsAcceptor::from(config.tls.clone());
                        // Boxed: the handshake's state would otherwise enlarge every
                        // connection's task for its whole life.
                        let tls = tokio::time::timeout_at(
                            handshake_deadline,
                            Box::pin(acceptor.accept(tcp)),
                        )
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                        conn = Conn::Tls(Box::new(tls));
                        session.handle_tls_established();
                        may_read = true;
                    }
                    Output::Close => {
                        let _ = conn.shutdown().await;
                        return Ok(());
                    }
                    // Boxed: what handling a stanza awaits would otherwise enlarge every
                    // idle connection's task.
                    other => Box::pin(core.handle(&mut session, other)).await,
                }
            }
            if may_read {
                let failures = session.auth_failures();
                match read_into_session(&mut conn, &mut session)? {
                    Read::Eof => return Ok(()),
                    Read::Bytes(n) => {
                        config.metrics.bytes_in.inc_by(n as u64);
                        let now = tokio::time::Instant::now();
                        timeouts.read(now);
                        let wait = budget.spend(n, now);
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        config
                            .metrics
                            .auth_failures
                            .inc_by(u64::from(session.auth_failures() - failures));
                        continue;
                    }
                    Read::Nothing => may_read = false,
                }
            }
            let is_bound = core.bound.is_some();
            tokio::select! {
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    session.shutdown();
                }
                q = core.queued() => match q {
                    Some(first) => {
                        let mut out = Vec::with_capacity(4096);
                        core.gather(first, &mut out);
                        conn.write_all(&out).await?;
                        conn.flush().await?;
                    }
                    None => core.overloaded(&mut session),
                },
                r = conn.readable() => {
                    r?;
                    may_read = true;
                }
                () = &mut timer, if !timeouts.expired() => {
                    match timeouts.check(tokio::time::Instant::now(), is_bound) {
                        Some(deadline) => timer.as_mut().reset(deadline),
                        None => {
                            tracing::debug!(%peer, bound = is_bound, "xmpp: connection timed out");
                            session.timed_out();
                        }
                    }
                }
            }
        }
    }
    .await;
    core.unregister();
    result
}

/// A bound session's delivery side.
pub(crate) struct Bound {
    jid: Jid,
    link: Link,
    rx: LinkQueue,
    /// Whether the overflow was reported (the stream is closing).
    overload_reported: bool,
}

/// Most bytes gathered from the queue into one write.
const MAX_WRITE_BATCH: usize = 64 * 1024;

/// What a c2s driver does whatever its transport (TCP or RFC 7395 WebSocket): look
/// accounts up, register the bound resource, route stanzas, and drain the resource's queue.
pub(crate) struct Core<'a> {
    pub(crate) config: &'a ServerConfig,
    pub(crate) store: &'a Arc<dyn Store>,
    pub(crate) peer: SocketAddr,
    /// Set once bound: the session's address, the queue others deliver to, and the signal
    /// that the queue overflowed.
    pub(crate) bound: Option<Bound>,
}

impl Core<'_> {
    /// Carries out an output that is not about the transport; `Send`, `StartTls` and
    /// `Close` are the driver's and are ignored here.
    pub(crate) async fn handle(&mut self, session: &mut Session, out: Output) {
        let config = self.config;
        match out {
            Output::LookupCredentials(user) => {
                let account = match self.store.account(&user).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "xmpp: account lookup failed");
                        None
                    }
                };
                let failures = session.auth_failures();
                session.handle_credentials(account);
                config
                    .metrics
                    .auth_failures
                    .inc_by(u64::from(session.auth_failures() - failures));
            }
            Output::Authenticated(user) => {
                tracing::debug!(peer = %self.peer, %user, "xmpp: authenticated")
            }
            Output::Bound(jid) => {
                config.metrics.bound.inc();
                tracing::debug!(peer = %self.peer, %jid, "xmpp: bound");
                let (link, rx) = Link::new(config.link_capacity, ns::JABBER_CLIENT);
                config.router.register(&jid, link.clone());
                self.bound = Some(Bound {
                    jid,
                    link,
                    rx,
                    overload_reported: false,
                });
            }
            Output::Stanza(first) => {
                // Stanzas that arrived together are handled together (in order), so that a
                // client's pipelined publishes become one commit.
                let mut batch = vec![*first];
                while matches!(session.peek_output(), Some(Output::Stanza(_))) {
                    if let Some(Output::Stanza(s)) = session.poll_output() {
                        batch.push(*s);
                    }
                }
                for stanza in &batch {
                    let kind = match stanza {
                        Stanza::Iq(_) => "iq",
                        Stanza::Message(_) => "message",
                        Stanza::Presence(_) => "presence",
                    };
                    config
                        .metrics
                        .stanzas_in
                        .get_or_create(&KindLabels { kind })
                        .inc();
                }
                self.route_all(session, batch).await;
            }
            Output::Send(_) | Output::StartTls | Output::Close => {}
        }
    }

    /// Routes stanzas received together, in order: runs addressed to the service go to it
    /// as one batch, anything else goes through [`route`].
    async fn route_all(&mut self, session: &mut Session, batch: Vec<Stanza>) {
        let config = self.config;
        let Some(b) = &self.bound else {
            for stanza in batch {
                unroutable(session, stanza);
            }
            return;
        };
        let Some((service_jid, handler)) = &config.service else {
            for stanza in batch {
                route(config, session, &b.jid, &b.link, stanza).await;
            }
            return;
        };
        let mut run = Vec::new();
        for stanza in batch {
            if stanza_to(&stanza).is_some_and(|to| to.domain() == service_jid.domain()) {
                run.push(stanza);
                continue;
            }
            if !run.is_empty() {
                handler
                    .handle_batch(std::mem::take(&mut run), &b.link)
                    .await;
            }
            route(config, session, &b.jid, &b.link, stanza).await;
        }
        if !run.is_empty() {
            handler.handle_batch(run, &b.link).await;
        }
    }

    /// The next stanza queued for the bound resource; `None` when its queue overflowed.
    /// Never completes before binding.
    pub(crate) async fn queued(&mut self) -> Option<Outbound> {
        let Some(b) = &mut self.bound else {
            return std::future::pending().await;
        };
        match b.rx.next().await {
            Next::Stanza(out) => Some(out),
            Next::Overloaded if !b.overload_reported => None,
            // Reported once; then only stanzas still queued go out. (The link is held in
            // `b`, so the queue never closes while bound.)
            Next::Overloaded | Next::Closed => match b.rx.try_recv() {
                Ok(out) => Some(out),
                Err(_) => std::future::pending().await,
            },
        }
    }

    /// Appends `first` and whatever else is queued, up to [`MAX_WRITE_BATCH`], to `out`:
    /// under fan-out a session's queue holds many notifications, and one TLS record and one
    /// syscall for all of them is what keeps the cost per delivery low.
    pub(crate) fn gather(&mut self, first: Outbound, out: &mut Vec<u8>) {
        let start = out.len();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outbound::Bytes(b) => out.extend_from_slice(&b),
                Outbound::Shared { stanza, to } => {
                    for chunk in stanza.addressed_to(&to).chunks() {
                        out.extend_from_slice(chunk);
                    }
                }
            }
            if out.len() - start < MAX_WRITE_BATCH {
                next = self.bound.as_mut().and_then(|b| b.rx.try_recv().ok());
            }
        }
        self.config
            .metrics
            .bytes_out
            .inc_by((out.len() - start) as u64);
    }

    /// The bound resource's queue overflowed: close the stream, once.
    pub(crate) fn overloaded(&mut self, session: &mut Session) {
        self.config.metrics.overloaded.inc();
        tracing::info!(peer = %self.peer, "xmpp: closing a session that does not read its stanzas");
        session.overloaded();
        if let Some(b) = &mut self.bound {
            b.overload_reported = true;
        }
    }

    /// Removes the bound resource from the router.
    pub(crate) fn unregister(&mut self) {
        if let Some(b) = self.bound.take() {
            self.config.router.unregister(&b.jid, &b.link);
        }
    }
}

/// Routes a stanza of the bound session `jid`: to the service when addressed to it; a
/// presence broadcast updates the session's availability (and tells the service);
/// anything else is [`unroutable`].
async fn route(
    config: &ServerConfig,
    session: &mut Session,
    jid: &Jid,
    link: &Link,
    stanza: Stanza,
) {
    let to = stanza_to(&stanza);
    if let Some((service_jid, handler)) = &config.service {
        if to.is_some_and(|to| to.domain() == service_jid.domain()) {
            handler.handle(stanza, link).await;
            return;
        }
        if let Stanza::Presence(p) = &stanza
            && to.is_none()
        {
            let available = p.kind == PresenceType::Available;
            if matches!(p.kind, PresenceType::Available | PresenceType::Unavailable) {
                let became = config
                    .router
                    .set_presence(jid, available, p.priority.unwrap_or(0));
                handler.presence_changed(jid, became).await;
            }
            return;
        }
    }
    unroutable(session, stanza);
}

fn stanza_to(stanza: &Stanza) -> Option<&Jid> {
    match stanza {
        Stanza::Iq(s) => s.to.as_ref(),
        Stanza::Message(s) => s.to.as_ref(),
        Stanza::Presence(s) => s.to.as_ref(),
    }
}

/// Answers a stanza that nothing on this server handles yet: an iq request gets
/// `service-unavailable` (RFC 6120 §8.4: never leave an iq unanswered); messages and
/// presence to unknown addresses are dropped (§10.4.3, §10.5.3 allow silent discard).
fn unroutable(session: &mut Session, stanza: Stanza) {
    if let Stanza::Iq(iq) = stanza
        && matches!(iq.kind, IqType::Get | IqType::Set)
    {
        let reply = iq.error_reply(StanzaError::service_unavailable());
        let el: Element = reply.into();
        session.send_stanza(&el);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_within_its_rate_never_waits_and_a_flood_waits_in_proportion() {
        let t0 = tokio::time::Instant::now();
        let mut b = ReadBudget::new(1000, t0);
        assert_eq!(
            b.spend(1000, t0),
            Duration::ZERO,
            "the first second's burst is free"
        );
        assert_eq!(
            b.spend(500, t0 + Duration::from_millis(500)),
            Duration::ZERO,
            "refilled at the rate"
        );
        let wait = b.spend(2000, t0 + Duration::from_millis(500));
        assert_eq!(
            wait,
            Duration::from_secs(2),
            "2000 bytes over budget at 1000/s"
        );
        let mut off = ReadBudget::new(0, t0);
        assert_eq!(
            off.spend(1 << 30, t0),
            Duration::ZERO,
            "0 turns the limit off"
        );
    }

    #[test]
    fn the_per_ip_limit_releases_slots_when_connections_end() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = [127, 0, 0, 1].into();
        let a = PerIp::take(&table, ip, 2);
        let b = PerIp::take(&table, ip, 2);
        assert!(a.is_some() && b.is_some());
        assert!(PerIp::take(&table, ip, 2).is_none(), "the third is refused");
        drop(a);
        assert!(PerIp::take(&table, ip, 2).is_some(), "a slot came back");
    }
}
