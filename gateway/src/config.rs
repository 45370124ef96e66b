//! Configuration: built-in defaults, then the TOML file, then `JUXTA_<SECTION>__<KEY>`
//! environment variables, then command-line flags — each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Default HTTP address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./juxta-data";
/// The config file read when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_FILE: &str = "juxta.toml";

/// Environment variables with the `JUXTA_` prefix that are not config keys.
const NOT_CONFIG: &[&str] = &["admin_key", "token", "config", "bin", "url"];

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded store, generated keys and certificates live.
    pub data_dir: PathBuf,
    /// The HTTP front.
    pub http: HttpConfig,
    /// Storage.
    pub store: StoreConfig,
    /// Fan-out to subscribers.
    pub fanout: FanoutConfig,
    /// Authentication.
    pub auth: AuthConfig,
    /// XMPP client connections.
    pub xmpp: XmppConfig,
    /// The peer-to-peer overlay.
    pub p2p: P2pConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Default overlay listen address.
pub const DEFAULT_P2P: &str = "/ip4/127.0.0.1/tcp/4001";

/// The peer-to-peer overlay (libp2p): every node is a propagate pipe of its group.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct P2pConfig {
    /// Whether to join the overlay.
    pub enabled: bool,
    /// Multiaddrs to listen on (TCP, `/quic-v1`, `/ws`).
    pub listen: Vec<String>,
    /// Peers (other gateways) to dial at start, as multiaddrs ending in `/p2p/<peer id>`;
    /// their stored events are trusted.
    pub bootstrap: Vec<String>,
    /// Addresses peers reach this gateway at when they differ from `listen` (a public
    /// address in front of a NAT or load balancer); used in relay reservations and
    /// advertisements.
    pub external: Vec<String>,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: vec![DEFAULT_P2P.to_owned()],
            bootstrap: Vec::new(),
            external: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            http: HttpConfig::default(),
            store: StoreConfig::default(),
            fanout: FanoutConfig::default(),
            auth: AuthConfig::default(),
            xmpp: XmppConfig::default(),
            p2p: P2pConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// The HTTP front.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body; larger ones get 413. Also the largest item payload.
    pub max_body_bytes: usize,
    /// Most open connections (HTTP, WebSocket and SSE together). Taken before `accept`, so
    /// a flood of connections waits in the kernel's backlog instead of costing memory.
    pub max_connections: usize,
    /// Most subscriptions one WebSocket connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Seconds a write to a WebSocket or SSE client may take before the client is
    /// considered stalled and disconnected.
    pub write_timeout_secs: u64,
    /// Seconds between keep-alives (WebSocket pings, SSE comments).
    pub keepalive_secs: u64,
    /// Shortest time between two writes of events to one WebSocket or SSE client, in
    /// milliseconds. The first event after a quiet spell goes out at once; under load events
    /// gather into one write per period — one syscall and one client wake-up per batch
    /// instead of per event — adding at most this much latency. 0 writes every event at once.
    pub write_coalesce_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080))),
            max_body_bytes: 1 << 20,
            max_connections: 100_000,
            max_subscriptions_per_connection: 1024,
            write_timeout_secs: 30,
            keepalive_secs: 15,
            write_coalesce_ms: 10,
        }
    }
}

/// Which store backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A redb file in the data directory (fsync before acknowledgement).
    Embedded,
    /// Memory only: nothing survives a restart.
    Memory,
    /// A shared Redis (or Redis Cluster): several instances behave as one gateway.
    Redis,
}

/// Storage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The backend.
    pub backend: Backend,
    /// Page cache of the embedded store, in MiB.
    pub cache_mib: usize,
    /// Seconds an idempotency key is remembered.
    pub idempotency_window_secs: u64,
    /// The Redis engine (`backend = "redis"`): `redis://[user:password@]host:port`; for a
    /// Redis Cluster several seed URLs separated by commas, with `cluster = true`.
    pub url: String,
    /// Whether `url` names a Redis Cluster.
    pub cluster: bool,
    /// Prefix of every Redis key and channel (instances sharing one must agree).
    pub prefix: String,
    /// Seconds one Redis command may take before the engine counts as unreachable.
    pub timeout_secs: u64,
    /// With `rediss://` URLs: a PEM file of the CA certificates that verify Redis's
    /// certificate; empty = the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Redis replicas that must confirm a change (`WAIT`) before it is acknowledged and fanned
    /// out, so that a failover cannot lose it; 0 = Redis's own persistence only.
    pub min_replicas: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            cache_mib: 64,
            idempotency_window_secs: 24 * 3600,
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster: false,
            prefix: "juxta".to_owned(),
            timeout_secs: 5,
            tls_ca_file: None,
            min_replicas: 0,
        }
    }
}

/// Fan-out.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Events a subscriber may fall behind before its node's overflow policy applies. The
    /// queue is one ring per node shared by its subscribers, so this bounds memory per node,
    /// not per subscriber.
    pub queue_capacity: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            queue_capacity: juxta_core::fanout::DEFAULT_QUEUE_CAPACITY,
        }
    }
}

/// Authentication.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Admin keys (also `JUXTA_ADMIN_KEY`). When empty, one is generated into
    /// `<data_dir>/admin.key` on first start.
    pub admin_keys: Vec<String>,
    /// HS256 secret for JWTs. When neither this nor `jwt_public_key` is set, one is generated
    /// into `<data_dir>/jwt.secret`.
    pub jwt_secret: Option<String>,
    /// An Ed25519 public key (PEM file) to verify EdDSA-signed JWTs instead.
    pub jwt_public_key: Option<PathBuf>,
    /// Seconds of clock skew tolerated on `exp`.
    pub leeway_secs: u64,
}

/// Default XMPP client address.
pub const DEFAULT_XMPP: &str = "127.0.0.1:5222";

/// XMPP client connections (RFC 6120 c2s).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmppConfig {
    /// Whether to accept XMPP clients.
    pub enabled: bool,
    /// Address for client connections (STARTTLS).
    pub listen: SocketAddr,
    /// Address for direct-TLS client connections (XEP-0368), if any; 5223 is customary.
    pub direct_tls_listen: Option<SocketAddr>,
    /// The XMPP domain: accounts are `user@<domain>`, the pubsub service `pubsub.<domain>`.
    pub domain: String,
    /// PEM certificate chain; with `tls_key`. Without them a self-signed certificate for the
    /// domain is generated into the data directory (for development).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Whether clients must start TLS before authenticating.
    pub tls_required: bool,
    /// Connections allowed from one IP address at once.
    pub max_connections_per_ip: usize,
    /// Seconds a client has from connecting to a bound resource.
    pub handshake_timeout_secs: u64,
    /// Seconds a bound client may stay silent.
    pub idle_timeout_secs: u64,
    /// Largest stanza accepted, in bytes.
    pub max_stanza_bytes: usize,
    /// Bytes per second one client may send beyond a one-second burst; reading from it
    /// slows down past that. 0 turns the limit off.
    pub max_bytes_per_sec: u64,
    /// Stanzas queued for one session (notifications, replies) before it counts as too slow
    /// and its stream is closed with `policy-violation`.
    pub max_queued_stanzas: usize,
    /// The publish-subscribe service.
    pub pubsub: PubSubSection,
    /// External component mode (XEP-0114): attach the pubsub service to another server.
    pub component: Option<ComponentSection>,
}

/// Who may create nodes over XMPP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreateNodes {
    /// Any local account; the creator owns the node.
    #[default]
    Local,
    /// Only `xmpp.pubsub.admins`.
    Admins,
}

/// `[xmpp.pubsub]`: the XEP-0060 service at `pubsub.<domain>`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PubSubSection {
    /// Who may create nodes: `local` (any local account) or `admins`.
    pub create: CreateNodes,
    /// Bare JIDs that own every node and may always create nodes.
    pub admins: Vec<String>,
}

/// `[xmpp.component]`: connect the pubsub service to an XMPP server as an external
/// component (XEP-0114), e.g. Prosody's `Component "pubsub.example.org"`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSection {
    /// The server's component port, `host:port` (Prosody and ejabberd use 5347).
    pub server: String,
    /// The component's address as the server knows it, e.g. `pubsub.example.org`.
    pub jid: String,
    /// The shared secret.
    pub secret: String,
}

impl std::fmt::Debug for ComponentSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentSection")
            .field("server", &self.server)
            .field("jid", &self.jid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Default for XmppConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: DEFAULT_XMPP
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 5222))),
            direct_tls_listen: None,
            domain: "localhost".into(),
            tls_cert: None,
            tls_key: None,
            tls_required: true,
            max_connections_per_ip: juxta_bridge_xmpp::server::DEFAULT_MAX_CONNECTIONS_PER_IP,
            handshake_timeout_secs: juxta_bridge_xmpp::server::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
            idle_timeout_secs: juxta_bridge_xmpp::server::DEFAULT_IDLE_TIMEOUT.as_secs(),
            max_stanza_bytes: juxta_bridge_xmpp::DEFAULT_MAX_STANZA_BYTES,
            max_bytes_per_sec: juxta_bridge_xmpp::server::DEFAULT_MAX_BYTES_PER_SEC,
            max_queued_stanzas: juxta_bridge_xmpp::link::DEFAULT_LINK_CAPACITY,
            pubsub: PubSubSection::default(),
            component: None,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `juxta_gateway=debug,info`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Flags that override the configuration.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--http`.
    pub http: Option<SocketAddr>,
    /// `--xmpp`.
    pub xmpp: Option<SocketAddr>,
    /// `--p2p` (repeatable): replaces `p2p.listen`.
    pub p2p: Vec<String>,
}

impl Config {
    /// Loads the configuration: defaults, the file (`file`, else `$JUXTA_CONFIG`, else
    /// `./juxta.toml` if it exists), the environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let env_file = std::env::var_os("JUXTA_CONFIG").map(PathBuf::from);
        match file.map(Path::to_path_buf).or(env_file) {
            Some(path) => {
                if !path.is_file() {
                    anyhow::bail!("config file {} does not exist", path.display());
                }
                fig = fig.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                fig = fig.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        fig = fig.merge(
            Env::prefixed("JUXTA_")
                .filter(|k| !NOT_CONFIG.iter().any(|n| k == *n))
                .split("__"),
        );
        let mut cfg: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        if let Ok(key) = std::env::var("JUXTA_ADMIN_KEY")
            && !key.is_empty()
        {
            cfg.auth.admin_keys.push(key);
        }
        if let Some(d) = &overrides.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(h) = overrides.http {
            cfg.http.listen = h;
        }
        if let Some(x) = overrides.xmpp {
            cfg.xmpp.listen = x;
        }
        if !overrides.p2p.is_empty() {
            cfg.p2p.listen = overrides.p2p.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (key, addrs) in [
            ("p2p.listen", &self.p2p.listen),
            ("p2p.bootstrap", &self.p2p.bootstrap),
            ("p2p.external", &self.p2p.external),
        ] {
            for a in addrs {
                a.parse::<libp2p::Multiaddr>()
                    .map_err(|e| anyhow::anyhow!("{key}: {a:?} is not a multiaddr: {e}"))?;
            }
        }
        let h = &self.http;
        anyhow::ensure!(
            h.max_body_bytes >= 1024,
            "http.max_body_bytes must be at least 1024"
        );
        anyhow::ensure!(
            h.max_connections >= 1,
            "http.max_connections must be at least 1"
        );
        anyhow::ensure!(
            h.write_timeout_secs >= 1,
            "http.write_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            h.keepalive_secs >= 1,
            "http.keepalive_secs must be at least 1"
        );
        anyhow::ensure!(
            (1..=1 << 20).contains(&self.fanout.queue_capacity),
            "fanout.queue_capacity must be between 1 and 1048576"
        );
        anyhow::ensure!(
            self.auth.admin_keys.iter().all(|k| k.len() >= 16),
            "auth.admin_keys: each key must be at least 16 characters"
        );
        if let Some(s) = &self.auth.jwt_secret {
            anyhow::ensure!(
                s.len() >= 32,
                "auth.jwt_secret must be at least 32 characters"
            );
        }
        let x = &self.xmpp;
        anyhow::ensure!(
            juxta_bridge_xmpp::Jid::domain_jid(&x.domain).is_ok(),
            "xmpp.domain {:?} is not a valid XMPP domain",
            x.domain
        );
        anyhow::ensure!(
            x.tls_cert.is_some() == x.tls_key.is_some(),
            "xmpp.tls_cert and xmpp.tls_key go together"
        );
        anyhow::ensure!(
            x.max_connections_per_ip >= 1,
            "xmpp.max_connections_per_ip must be at least 1"
        );
        anyhow::ensure!(
            x.handshake_timeout_secs >= 1,
            "xmpp.handshake_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            x.idle_timeout_secs >= 1,
            "xmpp.idle_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            x.max_stanza_bytes >= 4096,
            "xmpp.max_stanza_bytes must be at least 4096"
        );
        anyhow::ensure!(
            (1..=1 << 20).contains(&x.max_queued_stanzas),
            "xmpp.max_queued_stanzas must be between 1 and 1048576"
        );
        for a in &x.pubsub.admins {
            let ok = a
                .parse::<juxta_bridge_xmpp::Jid>()
                .is_ok_and(|j| j.is_bare() && j.local().is_some());
            anyhow::ensure!(
                ok,
                "xmpp.pubsub.admins: {a:?} is not a bare JID like user@domain"
            );
        }
        if let Some(c) = &x.component {
            anyhow::ensure!(
                juxta_bridge_xmpp::Jid::domain_jid(&c.jid).is_ok(),
                "xmpp.component.jid {:?} is not a valid XMPP domain",
                c.jid
            );
            anyhow::ensure!(
                c.server
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "xmpp.component.server must be host:port, not {:?}",
                c.server
            );
            anyhow::ensure!(
                !c.secret.is_empty(),
                "xmpp.component.secret must not be empty"
            );
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| anyhow::anyhow!("log.level {:?}: {e}", self.log.level))?;
        Ok(())
    }

    /// The configuration as TOML, with secrets replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        for k in &mut c.auth.admin_keys {
            *k = "<redacted>".into();
        }
        if c.auth.jwt_secret.is_some() {
            c.auth.jwt_secret = Some("<redacted>".into());
        }
        if let Some(comp) = &mut c.xmpp.component {
            comp.secret = "<redacted>".into();
        }
        toml::to_string_pretty(&c)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_print_as_toml_that_loads_back() {
        let c = Config::default();
        c.validate().expect("valid");
        let text = c.to_redacted_toml();
        let back: Config = toml::from_str(&text).expect("round trip");
        assert_eq!(back.http.listen, c.http.listen);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[http]\nlisten_addr = \"x\"").is_err());
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
    }
}
