//! The CLI client: `juxta pub`, `juxta sub`, `juxta nodes`, over the public HTTP API.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::auth::ADMIN_KEY_FILE;
use crate::config::DEFAULT_DATA_DIR;

/// Where the gateway is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The gateway's HTTP URL.
    #[arg(long, env = "JUXTA_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Admin key or JWT. Without one, the admin key in `--data-dir` is used if readable.
    #[arg(long, env = "JUXTA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory whose admin key to fall back on.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

impl Target {
    fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let path = self.data_dir.join(ADMIN_KEY_FILE);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .with_context(|| {
                format!(
                    "no --token or JUXTA_TOKEN given, and {} is not readable",
                    path.display()
                )
            })
    }

    fn base(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    fn ws_url(&self) -> anyhow::Result<String> {
        let base = self.base();
        if let Some(rest) = base.strip_prefix("http://") {
            Ok(format!("ws://{rest}/api/v1/ws"))
        } else if base.starts_with("https://") {
            bail!("https is not supported by this client; put it behind a local http address")
        } else {
            bail!("--url must start with http://")
        }
    }
}

fn encode_node(node: &str) -> String {
    node.replace('%', "%25").replace('/', "%2F")
}

async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let code = body["code"].as_str().unwrap_or("error");
        let detail = body["detail"].as_str().unwrap_or("");
        bail!("{status}: {code}: {detail}");
    }
    Ok(body)
}

/// `juxta pub NODE [JSON|-]`: publishes one payload, or one per stdin line with `-`.
pub async fn publish(
    target: &Target,
    node: &str,
    payload: Option<&str>,
    id: Option<&str>,
    xml: bool,
) -> anyhow::Result<()> {
    let token = target.token()?;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/nodes/{}/items", target.base(), encode_node(node));
    let one = |line: &str| -> anyhow::Result<Value> {
        let mut body = if xml {
            json!({ "xml": line })
        } else {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
            json!({ "payload": v })
        };
        if let Some(id) = id {
            body["id"] = json!(id);
        }
        Ok(body)
    };
    let send = |body: Value| {
        let req = http.post(&url).bearer_auth(&token).json(&body);
        async move { check(req.send().await.context("cannot reach the gateway")?).await }
    };
    match payload {
        Some("-") => {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let r = send(one(&line)?).await?;
                println!("{r}");
            }
        }
        Some(p) => println!("{}", send(one(p)?).await?),
        None => bail!("give a JSON payload, or - to read one per line from stdin"),
    }
    Ok(())
}

/// `juxta nodes`: one node JSON per line.
pub async fn nodes(target: &Target) -> anyhow::Result<()> {
    let token = target.token()?;
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/nodes", target.base()))
        .bearer_auth(token)
        .send()
        .await
        .context("cannot reach the gateway")?;
    let body = check(resp).await?;
    for n in body["nodes"].as_array().into_iter().flatten() {
        println!("{n}");
    }
    Ok(())
}

/// Codes after which retrying cannot help.
const FATAL: &[&str] = &[
    "node_not_found",
    "forbidden",
    "invalid_node_name",
    "offset_out_of_range",
    "invalid_epoch",
    "missing_token",
    "invalid_token",
    "token_expired",
];

/// `juxta sub NODE [--after OFFSET]`: prints each event's JSON on its own line; reconnects
/// with backoff and resumes after the last offset printed.
pub async fn subscribe(target: &Target, node: &str, mut after: Option<u64>) -> anyhow::Result<()> {
    let token = target.token()?;
    let url = format!("{}?token={}", target.ws_url()?, urlencode(&token));
    let mut epoch: Option<String> = None;
    let mut backoff = Duration::from_millis(250);
    let stdout = std::io::stdout();
    loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Err(e) => eprintln!("juxta sub: cannot connect: {e}; retrying in {backoff:?}"),
            Ok((mut ws, _)) => {
                let mut op = json!({"op": "subscribe", "node": node});
                if let Some(a) = after {
                    op["after"] = json!(a);
                }
                if let Some(e) = &epoch {
                    op["epoch"] = json!(e);
                }
                ws.send(Message::text(op.to_string())).await.ok();
                while let Some(msg) = ws.next().await {
                    let Ok(Message::Text(t)) = msg else {
                        if msg.is_err() {
                            break;
                        }
                        continue;
                    };
                    let v: Value = match serde_json::from_str(t.as_str()) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    match v["type"].as_str() {
                        Some("event") => {
                            let mut out = stdout.lock();
                            writeln!(out, "{}", t.as_str())?;
                            out.flush()?;
                            after = v["offset"].as_u64().or(after);
                            epoch = v["epoch"].as_str().map(str::to_owned).or(epoch);
                            backoff = Duration::from_millis(250);
                            if v["kind"] == "deleted" {
                                eprintln!("juxta sub: node {node} was deleted");
                                return Ok(());
                            }
                        }
                        Some("subscribed") => {
                            epoch = v["epoch"].as_str().map(str::to_owned);
                            if v["recovered"] == false {
                                eprintln!(
                                    "juxta sub: could not resume exactly ({}); delivering what history still holds",
                                    v["reason"].as_str().unwrap_or("unknown")
                                );
                            }
                        }
                        Some("error") => {
                            let code = v["code"].as_str().unwrap_or("");
                            eprintln!("juxta sub: {code}: {}", v["message"].as_str().unwrap_or(""));
                            if FATAL.contains(&code) {
                                bail!("{code}");
                            }
                        }
                        _ => {}
                    }
                }
                eprintln!(
                    "juxta sub: disconnected; resuming after offset {after:?} in {backoff:?}"
                );
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `juxta user add NAME`: creates the account or changes its password (read from stdin when
/// `password` is `None`).
pub async fn user_add(target: &Target, name: &str, password: Option<&str>) -> anyhow::Result<()> {
    let password = match password {
        Some(p) => p.to_owned(),
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/api/v1/accounts/{}",
            target.base(),
            encode_node(name)
        ))
        .bearer_auth(target.token()?)
        .json(&json!({ "password": password }))
        .send()
        .await
        .context("cannot reach the gateway")?;
    println!("{}", check(resp).await?);
    Ok(())
}

/// `juxta user del NAME`.
pub async fn user_del(target: &Target, name: &str) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/accounts/{}",
            target.base(),
            encode_node(name)
        ))
        .bearer_auth(target.token()?)
        .send()
        .await
        .context("cannot reach the gateway")?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        check(resp).await.map(|_| ())
    }
}

/// `juxta user list`: one username per line.
pub async fn user_list(target: &Target) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/accounts", target.base()))
        .bearer_auth(target.token()?)
        .send()
        .await
        .context("cannot reach the gateway")?;
    let body = check(resp).await?;
    for u in body["accounts"].as_array().into_iter().flatten() {
        println!("{}", u.as_str().unwrap_or_default());
    }
    Ok(())
}
