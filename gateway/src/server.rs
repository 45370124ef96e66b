//! Wiring: configuration in, a running gateway out, until SIGTERM.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use juxta_core::metrics::EngineMetrics;
use juxta_core::{
    Bus, EmbeddedConfig, EmbeddedStore, FanOut, Limits, MemoryStore, Metrics, RedisConfig,
    RedisStore, Store,
};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use juxta_bridge_xmpp::server::Transport;

use crate::auth::Authenticator;
use crate::config::{Backend, Config};
use crate::http::{self, LimitedListener, Shared};
use crate::metrics::HttpMetrics;

/// How long open streams get to say goodbye after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);
/// The embedded store's file in the data directory.
pub const STORE_FILE: &str = "juxta.redb";

/// Raises the soft open-files limit to the hard limit: every connection is a descriptor.
#[allow(unsafe_code)]
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The running parts, built from configuration.
#[derive(Debug)]
pub struct Gateway {
    /// What the HTTP handlers share.
    pub shared: Arc<Shared>,
    /// The XMPP listener's metric handles, in the same registry.
    pub xmpp_metrics: Arc<juxta_bridge_xmpp::metrics::Metrics>,
    /// The overlay's metric handles, in the same registry (when the overlay is enabled).
    pub overlay_metrics: Option<OverlayMetricHandles>,
}

/// What the overlay records into the registry: libp2p's own metrics and the bridge's.
pub struct OverlayMetricHandles {
    /// libp2p's behaviour metrics.
    pub libp2p: std::sync::Mutex<Option<libp2p::metrics::Metrics>>,
    /// The bridge's counters.
    pub bridge: Arc<crate::metrics::OverlayMetrics>,
}

impl std::fmt::Debug for OverlayMetricHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayMetricHandles")
            .field("bridge", &self.bridge)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the store, bus, fan-out and authenticator.
    pub fn build(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
        let mut registry = Registry::default();
        let core_metrics = Arc::new(Metrics::register(&mut registry));
        let http_metrics = Arc::new(HttpMetrics::register(&mut registry));
        let xmpp_metrics = Arc::new(juxta_bridge_xmpp::metrics::Metrics::register(&mut registry));
        let overlay_metrics = cfg.p2p.enabled.then(|| OverlayMetricHandles {
            libp2p: std::sync::Mutex::new(Some(libp2p::metrics::Metrics::new(
                registry.sub_registry_with_prefix("juxta_overlay"),
            ))),
            bridge: Arc::new(crate::metrics::OverlayMetrics::register(&mut registry)),
        });
        let fanout = Arc::new(FanOut::new(cfg.fanout.queue_capacity, core_metrics.clone()));
        let store: Arc<dyn Store> = match cfg.store.backend {
            Backend::Embedded => {
                let mut ec = EmbeddedConfig::new(cfg.data_dir.join(STORE_FILE));
                ec.cache_bytes = cfg.store.cache_mib << 20;
                ec.idempotency_window = Duration::from_secs(cfg.store.idempotency_window_secs);
                Arc::new(
                    EmbeddedStore::open(ec, fanout.clone(), core_metrics).context(
                        "opening the embedded store (is another juxta using this data directory?)",
                    )?,
                )
            }
            Backend::Memory => Arc::new(MemoryStore::new(fanout.clone())),
            Backend::Redis => {
                let rc = RedisConfig {
                    urls: cfg
                        .store
                        .url
                        .split(',')
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    cluster: cfg.store.cluster,
                    prefix: cfg.store.prefix.clone(),
                    idempotency_window: Duration::from_secs(cfg.store.idempotency_window_secs),
                    timeout: Duration::from_secs(cfg.store.timeout_secs.max(1)),
                    tls_ca_pem: match &cfg.store.tls_ca_file {
                        Some(path) => Some(std::fs::read(path).with_context(|| {
                            format!("store.tls_ca_file: reading {}", path.display())
                        })?),
                        None => None,
                    },
                    min_replicas: cfg.store.min_replicas,
                };
                let engine_metrics = Arc::new(EngineMetrics::register(&mut registry));
                let store = RedisStore::start(rc, fanout.clone(), core_metrics, engine_metrics)
                    .context("starting the Redis store")?;
                fanout.set_interest(store.engine());
                Arc::new(store)
            }
        };
        let bus = Bus::new(
            store,
            fanout,
            Limits {
                max_payload_bytes: cfg.http.max_body_bytes,
            },
        );
        let auth = Authenticator::from_config(cfg)?;
        Ok(Self {
            xmpp_metrics,
            overlay_metrics,
            shared: Arc::new(Shared {
                bus,
                auth,
                metrics: http_metrics,
                registry: Arc::new(registry),
                http: cfg.http.clone(),
                shutdown,
                xmpp_websocket: std::sync::OnceLock::new(),
                overlay: std::sync::OnceLock::new(),
            }),
        })
    }
}

/// How often an instance on a shared engine re-reads XMPP subscriptions.
const PUBSUB_REFRESH: Duration = Duration::from_secs(2);
/// How often it reads every node's memberships again, whatever the change log says.
const PUBSUB_FULL_REFRESH: Duration = Duration::from_secs(60);

/// Loads the XMPP subscriptions kept in the store. A shared engine may be unreachable at
/// start: then the gateway serves anyway (not ready) and loads them once it answers.
async fn start_pubsub(
    cfg: &Config,
    gw: &Gateway,
    pubsub: &juxta_bridge_xmpp::pubsub::PubSub,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if cfg.store.backend != Backend::Redis {
        return pubsub.start().await.context("loading XMPP subscriptions");
    }
    let store = gw.shared.bus.store().clone();
    // A reachable Redis answers within milliseconds; an unreachable one must not hold up
    // the listeners, so the refresh below loads the subscriptions once it answers.
    let mut ready = store.ready();
    for _ in 0..10 {
        if ready.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = store.ready();
    }
    match ready {
        Ok(()) => {
            if let Err(e) = pubsub.start().await {
                tracing::warn!(error = %e, "loading XMPP subscriptions from Redis: retrying");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Redis is not reachable yet: serving, not ready, until it is");
        }
    }
    // Other instances change subscriptions too, and a subscriber may be connected here:
    // follow what the shared store holds, through its log of membership changes (a few
    // commands per poll, whatever the number of nodes), and read everything again now and
    // then, and whenever the log cannot say what changed.
    let (pubsub, shutdown) = (pubsub.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut cursor: Option<u64> = None;
        let mut last_full = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            tokio::time::sleep(PUBSUB_REFRESH).await;
            if store.ready().is_err() {
                continue;
            }
            let full = cursor.is_none() || last_full.elapsed() >= PUBSUB_FULL_REFRESH;
            let step = if full {
                full_refresh(&*store, &pubsub).await
            } else {
                match store.member_changes(cursor).await {
                    Ok(c) if c.complete => pubsub.refresh_nodes(&c.nodes).await.map(|()| c.cursor),
                    Ok(_) => full_refresh(&*store, &pubsub).await,
                    Err(e) => Err(e),
                }
            };
            match step {
                Ok(c) => {
                    cursor = Some(c);
                    if full {
                        last_full = tokio::time::Instant::now();
                    }
                }
                Err(e) => {
                    cursor = None;
                    tracing::debug!(error = %e, "refreshing XMPP subscriptions from Redis");
                }
            }
        }
    });
    Ok(())
}

/// Reads every node's memberships; returns the change log's cursor from before the read, so
/// that what changes meanwhile is read again next time.
async fn full_refresh(
    store: &dyn juxta_core::Store,
    pubsub: &juxta_bridge_xmpp::pubsub::PubSub,
) -> Result<u64, juxta_core::Error> {
    let cursor = store.member_changes(None).await?.cursor;
    pubsub.refresh().await?;
    Ok(cursor)
}

/// Runs the gateway until SIGTERM or SIGINT, then drains and closes the store.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    raise_nofile_limit();
    let shutdown = CancellationToken::new();
    let gw = Gateway::build(&cfg, shutdown.clone())?;
    let router = Arc::new(juxta_bridge_xmpp::router::Router::new());
    let pubsub = pubsub_service(&cfg, &gw, router.clone())?;
    start_pubsub(&cfg, &gw, &pubsub, &shutdown).await?;
    if let Some(c) = &cfg.xmpp.component {
        let jid = juxta_bridge_xmpp::Jid::domain_jid(&c.jid)
            .map_err(|e| anyhow::anyhow!("xmpp.component.jid: {e}"))?;
        let mut component = juxta_bridge_xmpp::component::ComponentConfig::new(
            c.server.clone(),
            jid,
            c.secret.clone(),
        );
        component.limits = juxta_bridge_xmpp::Limits {
            max_stanza_bytes: cfg.xmpp.max_stanza_bytes,
            ..Default::default()
        };
        component
            .validate()
            .map_err(|e| anyhow::anyhow!("xmpp.component: {e}"))?;
        tracing::info!(server = %c.server, jid = %c.jid, "attaching the pubsub service as an external component");
        tokio::spawn(juxta_bridge_xmpp::component::run(
            component,
            Arc::new(pubsub.clone()),
            gw.xmpp_metrics.clone(),
            shutdown.clone(),
        ));
    }
    if cfg.xmpp.enabled {
        let mut xmpp = xmpp_config(&cfg, gw.xmpp_metrics.clone(), router)?;
        // Local clients reach the service at pubsub.<domain> even when it is also a
        // component of another server under another name.
        let local_jid = juxta_bridge_xmpp::Jid::domain_jid(&format!("pubsub.{}", cfg.xmpp.domain))
            .map_err(|e| anyhow::anyhow!("pubsub address: {e}"))?;
        xmpp.service = Some((local_jid, Arc::new(pubsub.clone())));
        let _ = gw.shared.xmpp_websocket.set(http::xmpp_ws::XmppWebSocket {
            config: xmpp.clone(),
            secret: rand::random(),
        });
        let tcp = bind(cfg.xmpp.listen)
            .with_context(|| format!("binding XMPP to {}", cfg.xmpp.listen))?;
        let addr = tcp.local_addr()?;
        println!("listening xmpp://{addr}");
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, domain = %cfg.xmpp.domain, "XMPP clients welcome");
        if let Some(direct) = cfg.xmpp.direct_tls_listen {
            let tls_tcp =
                bind(direct).with_context(|| format!("binding direct-TLS XMPP to {direct}"))?;
            let tls_addr = tls_tcp.local_addr()?;
            println!("listening xmpps://{tls_addr}");
            tokio::spawn(juxta_bridge_xmpp::server::serve(
                tls_tcp,
                Transport::DirectTls,
                xmpp.clone(),
                gw.shared.bus.store().clone(),
                shutdown.clone(),
            ));
        }
        tokio::spawn(juxta_bridge_xmpp::server::serve(
            tcp,
            Transport::StartTls,
            xmpp,
            gw.shared.bus.store().clone(),
            shutdown.clone(),
        ));
    }
    if cfg.p2p.enabled {
        start_overlay(&cfg, &gw, shutdown.clone()).await?;
    }
    let tcp =
        bind(cfg.http.listen).with_context(|| format!("binding HTTP to {}", cfg.http.listen))?;
    let addr = tcp.local_addr()?;
    // Scripts and tests wait for this line (printed after the XMPP one).
    println!("listening http://{addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), backend = ?cfg.store.backend, "juxta is serving");

    tokio::spawn(wait_for_signal(shutdown.clone()));
    let listener = LimitedListener::new(tcp, cfg.http.max_connections, gw.shared.metrics.clone());
    let app = http::router(gw.shared.clone());
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let drained = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        r = server => r.context("HTTP server")?,
        () = drained => tracing::warn!("connections still open after the drain period; closing anyway"),
    }
    gw.shared.bus.store().close().await;
    tracing::info!("juxta stopped");
    Ok(())
}

/// Joins the overlay: the gateway's identity from the data dir, the `public` group and every
/// protected group whose key is in `<data dir>/groups`, catch-up from the store, and the
/// bridge between the bus and the pipes. Prints `listening p2p <multiaddr>/p2p/<peer id>`
/// for each address.
async fn start_overlay(
    cfg: &Config,
    gw: &Gateway,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use juxta_bridge_p2p::group::{Group, GroupKey, Membership};
    use juxta_bridge_p2p::node::{Config as NodeConfig, Overlay, OverlayEvent, Role};
    let keypair = juxta_bridge_p2p::identity::load_or_create(&cfg.data_dir)?;
    let mut groups = vec![Group::public()];
    if let Ok(entries) = std::fs::read_dir(cfg.data_dir.join("groups")) {
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".key"))
            else {
                continue;
            };
            let key = GroupKey::load_file(&cfg.data_dir, name)
                .with_context(|| format!("loading the key of group {name}"))?;
            groups.push(Group {
                name: name.to_owned(),
                membership: Membership::Protected(key.public()),
            });
        }
    }
    let mut node = NodeConfig::new(Role::Gateway);
    // Config::validate has checked that each of these parses.
    let addrs = |list: &[String]| {
        list.iter()
            .map(|a| a.parse())
            .collect::<Result<Vec<_>, _>>()
    };
    node.listen = addrs(&cfg.p2p.listen)?;
    node.bootstrap = addrs(&cfg.p2p.bootstrap)?;
    node.external = addrs(&cfg.p2p.external)?;
    node.groups = groups.clone();
    let (libp2p_metrics, bridge_metrics) = match &gw.overlay_metrics {
        Some(m) => (
            m.libp2p.lock().ok().and_then(|mut l| l.take()),
            m.bridge.clone(),
        ),
        None => (None, Arc::new(crate::metrics::OverlayMetrics::default())),
    };
    let bus = gw.shared.bus.clone();
    let catch_up = Arc::new(juxta_bridge_p2p::bridge::StoreCatchUp::new(bus.clone()));
    let (overlay, mut events) =
        Overlay::spawn(keypair, node.clone(), libp2p_metrics, Some(catch_up))
            .await
            .context("starting the overlay")?;
    // Wait for each listener's real address (a port of 0 is chosen now).
    let mut listening = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listening.len() < node.listen.len() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(OverlayEvent::Listening(addr))) => {
                let full = addr.with(libp2p::multiaddr::Protocol::P2p(overlay.local_peer_id()));
                println!("listening p2p {full}");
                listening.push(full);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let _ = std::io::stdout().flush();
    tracing::info!(peer = %overlay.local_peer_id(), addrs = ?listening, "overlay joined");
    let _ = gw.shared.overlay.set(http::OverlayInfo {
        overlay: overlay.clone(),
        listening,
        groups: groups.iter().map(|g| g.name.clone()).collect(),
    });
    tokio::spawn(juxta_bridge_p2p::bridge::run(
        bus,
        overlay,
        events,
        groups.into_iter().map(|g| g.name).collect(),
        node.advert_ttl,
        bridge_metrics,
        shutdown,
    ));
    Ok(())
}

/// The c2s listener's settings, with TLS from the configured files or a self-signed
/// development certificate in the data directory.
fn xmpp_config(
    cfg: &Config,
    metrics: Arc<juxta_bridge_xmpp::metrics::Metrics>,
    router: Arc<juxta_bridge_xmpp::router::Router>,
) -> anyhow::Result<juxta_bridge_xmpp::server::ServerConfig> {
    use juxta_bridge_xmpp::tls::{ALPN_XMPP_CLIENT, Identity};
    let x = &cfg.xmpp;
    let identity = match (&x.tls_cert, &x.tls_key) {
        (Some(cert), Some(key)) => Identity::from_pem_files(cert, key)?,
        _ => Identity::self_signed(&x.domain, &cfg.data_dir)?,
    };
    let limits = juxta_bridge_xmpp::Limits {
        max_stanza_bytes: x.max_stanza_bytes,
        ..Default::default()
    };
    Ok(juxta_bridge_xmpp::server::ServerConfig {
        domain: x.domain.clone(),
        tls: identity.server_config(&[ALPN_XMPP_CLIENT])?,
        tls_required: x.tls_required,
        max_connections_per_ip: x.max_connections_per_ip,
        handshake_timeout: Duration::from_secs(x.handshake_timeout_secs),
        idle_timeout: Duration::from_secs(x.idle_timeout_secs),
        limits,
        max_bytes_per_sec: x.max_bytes_per_sec,
        metrics,
        link_capacity: x.max_queued_stanzas,
        router,
        service: None,
    })
}

/// The XEP-0060 service: at `pubsub.<xmpp.domain>` for local clients, or at the
/// component's address when one is configured.
fn pubsub_service(
    cfg: &Config,
    gw: &Gateway,
    router: Arc<juxta_bridge_xmpp::router::Router>,
) -> anyhow::Result<juxta_bridge_xmpp::pubsub::PubSub> {
    use juxta_bridge_xmpp::pubsub::{CreatePolicy, PubSub, PubSubConfig};
    let x = &cfg.xmpp;
    let mut local_domains = vec![x.domain.clone()];
    let jid = match &x.component {
        Some(c) => {
            if let Some((_, parent)) = c.jid.split_once('.') {
                local_domains.push(parent.to_owned());
            }
            c.jid.clone()
        }
        None => format!("pubsub.{}", x.domain),
    };
    let config = PubSubConfig {
        jid: juxta_bridge_xmpp::Jid::domain_jid(&jid)
            .map_err(|e| anyhow::anyhow!("pubsub address {jid:?}: {e}"))?,
        local_domains,
        c2s_domain: x.domain.clone(),
        create: match x.pubsub.create {
            crate::config::CreateNodes::Local => CreatePolicy::Local,
            crate::config::CreateNodes::Admins => CreatePolicy::Admins,
        },
        admins: x.pubsub.admins.clone(),
    };
    Ok(PubSub::new(
        config,
        gw.shared.bus.clone(),
        router,
        gw.xmpp_metrics.clone(),
    ))
}

/// Accept backlog: a burst of thousands of subscribers connecting at once should queue in the
/// kernel, not be dropped (the kernel caps this at `net.core.somaxconn`).
const BACKLOG: u32 = 4096;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
