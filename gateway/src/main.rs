//! `juxta`: the gateway and its command-line tools.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use juxta_core::{Grants, Pattern};
use juxta_gateway::auth;
use juxta_gateway::client::{self, Target};
use juxta_gateway::config::{Config, LogFormat, Overrides};

#[derive(Parser)]
#[command(
    name = "juxta",
    version,
    about = "juxta: one pubsub node = one overlay pipe = one HTTP channel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML config file (default: ./juxta.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (store, generated keys).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// HTTP listen address.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// XMPP client (c2s) listen address.
        #[arg(long)]
        xmpp: Option<SocketAddr>,
        /// Overlay listen multiaddr (repeatable), e.g. /ip4/0.0.0.0/tcp/4001.
        #[arg(long)]
        p2p: Vec<String>,
        /// Print the effective configuration (secrets redacted) and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Mint a JWT for a subject.
    Token {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The subject (`sub` claim), recorded as publisher.
        #[arg(long)]
        sub: String,
        /// Node patterns the subject may publish to (exact or trailing `*`); repeatable.
        #[arg(long)]
        publish: Vec<String>,
        /// Node patterns the subject may subscribe to; repeatable.
        #[arg(long)]
        subscribe: Vec<String>,
        /// Allow managing nodes.
        #[arg(long)]
        admin: bool,
        /// Lifetime: 30s, 10m, 1h, 30d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Sign with this Ed25519 private key (PEM) instead of the HS256 secret.
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
    /// Publish a JSON payload (or one per stdin line with `-`).
    Pub {
        /// The node.
        node: String,
        /// JSON text, or `-` for stdin lines.
        payload: Option<String>,
        /// Item id (default: assigned by the service).
        #[arg(long)]
        id: Option<String>,
        /// The payload is one XML element, not JSON.
        #[arg(long)]
        xml: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print a node's events as JSON lines; reconnects and resumes.
    Sub {
        /// The node.
        node: String,
        /// Start after this offset (default: live events only).
        #[arg(long)]
        after: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// List nodes, one JSON object per line.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
    /// Manage XMPP accounts (`username@<domain>`).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Join the overlay as an edge peer: print each event of the subscribed nodes as a JSON
    /// line (the WebSocket event shape); with `--publish NODE`, publish each stdin line.
    Peer {
        /// A gateway to join through, `/ip4/…/tcp/4001/p2p/<peer id>` (repeatable).
        #[arg(long, required_unless_present = "print_peer_id")]
        bootstrap: Vec<String>,
        /// The peer group.
        #[arg(long, default_value = "public")]
        group: String,
        /// A membership credential file (`juxta group admit`), for a protected group.
        #[arg(long)]
        credential: Option<PathBuf>,
        /// A node to follow (repeatable).
        #[arg(long)]
        subscribe: Vec<String>,
        /// Resume a node after an offset: `NODE=OFFSET` (repeatable; default: from the start
        /// of history).
        #[arg(long)]
        after: Vec<String>,
        /// Publish each stdin line (JSON) into this node; exit when stdin ends.
        #[arg(long)]
        publish: Option<String>,
        /// Where this peer's identity key lives (created when missing): a credential is
        /// issued to one peer id, so keep it.
        #[arg(long, default_value = "./juxta-peer")]
        identity_dir: PathBuf,
        /// Print this peer's id and exit (for `juxta group admit --peer`).
        #[arg(long)]
        print_peer_id: bool,
        /// Print which nodes group GROUP offers and which peers serve them (JSON lines),
        /// then exit.
        #[arg(long, value_name = "GROUP", conflicts_with_all = ["subscribe", "publish", "group"])]
        discover: Option<String>,
        /// Where to listen, so hole punching can reuse the port (repeatable; default: any
        /// TCP and QUIC port). `none` listens nowhere.
        #[arg(long)]
        listen: Vec<String>,
    },
    /// Manage the overlay's protected peer groups.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Make a protected group: its key is written to `<data dir>/groups/<G>.key`, and the
    /// gateway carries the group from its next start.
    Create {
        /// The group name (lowercase letters, digits, `-_.`).
        group: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Issue a membership credential for a peer; prints it (for `juxta peer --credential`).
    Admit {
        /// The group.
        group: String,
        /// The peer id admitted.
        #[arg(long)]
        peer: String,
        /// Lifetime: 45s, 90m, 12h, 30d.
        #[arg(long, default_value = "30d")]
        ttl: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create an account or change its password.
    Add {
        /// The username.
        name: String,
        /// The password (default: one line read from stdin).
        #[arg(long)]
        password: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete an account.
    Del {
        /// The username.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List usernames.
    List {
        #[command(flatten)]
        target: Target,
    },
}

/// mimalloc: the gateway allocates many small, short-lived buffers on many threads (frames,
/// requests, store pages); it measured faster than the system allocator here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logs(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    // Two rustls crypto providers are compiled in (libp2p's QUIC brings aws-lc-rs); libraries
    // that build TLS configurations with the process default (the Redis client, for
    // rediss://) need one chosen. juxta's own TLS uses ring explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Command::Serve {
            cfg,
            http,
            xmpp,
            p2p,
            print_config,
        } => {
            let overrides = Overrides {
                data_dir: cfg.data_dir,
                http,
                xmpp,
                p2p,
            };
            let config = Config::load(cfg.config.as_deref(), &overrides)?;
            if print_config {
                print!("{}", config.to_redacted_toml());
                return Ok(());
            }
            init_logs(&config.log.level, config.log.format);
            rt.block_on(juxta_gateway::server::run(config))
        }
        Command::Token {
            cfg,
            sub,
            publish,
            subscribe,
            admin,
            ttl,
            private_key,
        } => {
            let overrides = Overrides {
                data_dir: cfg.data_dir,
                ..Overrides::default()
            };
            let config = Config::load(cfg.config.as_deref(), &overrides)?;
            let grants = Grants {
                publish: publish.into_iter().map(Pattern::new).collect(),
                subscribe: subscribe.into_iter().map(Pattern::new).collect(),
                admin,
            };
            let ttl = auth::parse_ttl(&ttl)?;
            let token = match private_key {
                Some(path) => {
                    let pem = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    auth::mint_eddsa(&pem, &sub, grants, ttl)?
                }
                None => auth::mint_hs256(&auth::jwt_secret(&config)?, &sub, grants, ttl)?,
            };
            println!("{token}");
            Ok(())
        }
        Command::Pub {
            node,
            payload,
            id,
            xml,
            target,
        } => rt.block_on(client::publish(
            &target,
            &node,
            payload.as_deref(),
            id.as_deref(),
            xml,
        )),
        Command::Sub {
            node,
            after,
            target,
        } => rt.block_on(client::subscribe(&target, &node, after)),
        Command::Nodes { target } => rt.block_on(client::nodes(&target)),
        Command::User { cmd } => match cmd {
            UserCmd::Add {
                name,
                password,
                target,
            } => rt.block_on(client::user_add(&target, &name, password.as_deref())),
            UserCmd::Del { name, target } => rt.block_on(client::user_del(&target, &name)),
            UserCmd::List { target } => rt.block_on(client::user_list(&target)),
        },
        Command::Group { cmd } => group(cmd),
        Command::Peer {
            bootstrap,
            group,
            credential,
            subscribe,
            after,
            publish,
            identity_dir,
            print_peer_id,
            discover,
            listen,
        } => {
            use juxta_bridge_p2p::group::Credential;
            use juxta_bridge_p2p::peer::{PeerConfig, parse_after, run_cli};
            let keypair = juxta_bridge_p2p::identity::load_or_create(&identity_dir)?;
            if print_peer_id {
                println!("{}", keypair.public().to_peer_id());
                return Ok(());
            }
            let mut config = PeerConfig::new(
                bootstrap
                    .iter()
                    .map(|a| {
                        a.parse()
                            .map_err(|e| anyhow::anyhow!("--bootstrap {a}: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
            );
            config.group = discover.clone().unwrap_or(group);
            config.listen = match listen.as_slice() {
                [] => vec![
                    "/ip4/0.0.0.0/tcp/0".parse()?,
                    "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
                ],
                [none] if none == "none" => Vec::new(),
                addrs => addrs
                    .iter()
                    .map(|a| a.parse().map_err(|e| anyhow::anyhow!("--listen {a}: {e}")))
                    .collect::<anyhow::Result<_>>()?,
            };
            if let Some(path) = credential {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                config.credential = Some(Credential::from_text(text.trim())?);
            }
            for node in &subscribe {
                config.subscribe.push(juxta_core::NodeName::new(node)?);
            }
            for a in &after {
                let (node, offset) = parse_after(a)?;
                config.after.insert(node, offset);
            }
            let publish = publish
                .as_deref()
                .map(juxta_core::NodeName::new)
                .transpose()?;
            let stop = publish.is_some();
            let level = std::env::var("JUXTA_LOG__LEVEL").unwrap_or_else(|_| "warn".into());
            init_logs(&level, LogFormat::Text);
            if discover.is_some() {
                let found = rt.block_on(juxta_bridge_p2p::peer::discover(
                    keypair,
                    config,
                    std::time::Duration::from_secs(10),
                ))?;
                for line in juxta_bridge_p2p::peer::discovery_lines(&found) {
                    println!("{line}");
                }
                return Ok(());
            }
            rt.block_on(run_cli(
                keypair,
                config,
                publish,
                tokio::io::BufReader::new(tokio::io::stdin()),
                tokio::io::stdout(),
                stop,
            ))?;
            Ok(())
        }
    }
}

fn group(cmd: GroupCmd) -> anyhow::Result<()> {
    use juxta_bridge_p2p::group::{Credential, GroupKey, parse_ttl, validate_group_name};
    let data_dir = |cfg: ConfigArgs| -> anyhow::Result<PathBuf> {
        let overrides = Overrides {
            data_dir: cfg.data_dir,
            ..Overrides::default()
        };
        Ok(Config::load(cfg.config.as_deref(), &overrides)?.data_dir)
    };
    match cmd {
        GroupCmd::Create { group, cfg } => {
            validate_group_name(&group)?;
            let dir = data_dir(cfg)?;
            let key = GroupKey::create_file(&dir, &group)?;
            println!("{}", key.public().to_base64());
            eprintln!(
                "juxta: created protected group {group:?}; its key is in {}",
                dir.join("groups").display()
            );
            Ok(())
        }
        GroupCmd::Admit {
            group,
            peer,
            ttl,
            cfg,
        } => {
            let peer: libp2p::PeerId = peer.parse().map_err(|e| anyhow::anyhow!("--peer: {e}"))?;
            let key = GroupKey::load_file(&data_dir(cfg)?, &group)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let credential = Credential::issue(&key, &group, peer, now + parse_ttl(&ttl)?);
            println!("{}", credential.to_text());
            Ok(())
        }
    }
}
