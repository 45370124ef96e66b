//! The CLI client: `juxta pub`, `juxta sub` (and its resumption with `--after`), `juxta nodes`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use juxta_tests::{RECV_TIMEOUT, Server, ServerOptions, unique};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// A running `juxta sub`, read line by line.
struct Sub {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Sub {
    async fn spawn(server: &Server, node: &str, after: Option<u64>) -> Result<Self> {
        let mut cmd = server.command();
        cmd.args([
            "sub",
            node,
            "--url",
            &server.base_url(),
            "--token",
            server.admin_key(),
        ]);
        if let Some(after) = after {
            cmd.args(["--after", &after.to_string()]);
        }
        // Diagnostics go to stderr; we do not need them, and a null sink never blocks.
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning juxta sub")?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next printed line as JSON.
    async fn next(&mut self) -> Result<Value> {
        let line = tokio::time::timeout(RECV_TIMEOUT, self.lines.next_line())
            .await
            .context("juxta sub printed nothing in time")?
            .context("reading juxta sub's stdout")?
            .context("juxta sub closed its stdout")?;
        serde_json::from_str(&line).with_context(|| format!("juxta sub printed non-JSON: {line}"))
    }

    async fn kill(mut self) -> Result<()> {
        self.child.start_kill().context("killing juxta sub")?;
        self.child.wait().await.context("reaping juxta sub")?;
        Ok(())
    }
}

/// Waits until the node reports at least `n` subscribers (so a live-only `juxta sub` cannot
/// miss the items published next).
async fn wait_for_subscribers(server: &Server, node: &str, n: u64) -> Result<()> {
    let api = server.api();
    for _ in 0..200 {
        if api.subscriber_count(node).await? >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{node} never reported {n} subscriber(s)")
}

fn check_printed(event: &Value, node: &str, offset: u64, id: &str) -> Result<()> {
    ensure!(
        event["type"] == "event"
            && event["node"] == node
            && event["kind"] == "published"
            && event["offset"].as_u64() == Some(offset)
            && event["item"]["id"] == id,
        "expected event {offset} ({id}) of {node}, juxta sub printed {event}"
    );
    Ok(())
}

#[tokio::test]
async fn given_a_killed_sub_when_it_is_restarted_with_after_its_last_offset_then_it_prints_exactly_the_missed_events()
-> Result<()> {
    // The overlay off: its pipe would count as the node's first subscriber.
    let server = Server::start(ServerOptions::new().env("JUXTA_P2P__ENABLED", "false")).await?;
    let api = server.api();
    let node = unique("cli-sub");
    api.create_node(&node, None).await?;

    let mut sub = Sub::spawn(&server, &node, None).await?;
    wait_for_subscribers(&server, &node, 1).await?;
    for n in 1..=3u64 {
        api.publish_payload(&node, Some(&format!("first-{n}")), json!({ "n": n }))
            .await?;
    }
    let mut last = 0;
    for n in 1..=3u64 {
        let event = sub.next().await?;
        check_printed(&event, &node, n, &format!("first-{n}"))?;
        last = n;
    }
    sub.kill().await?;

    for n in 4..=6u64 {
        api.publish_payload(&node, Some(&format!("missed-{n}")), json!({ "n": n }))
            .await?;
    }
    let mut sub = Sub::spawn(&server, &node, Some(last)).await?;
    for n in 4..=6u64 {
        let event = sub.next().await?;
        check_printed(&event, &node, n, &format!("missed-{n}"))?;
        ensure!(
            event["item"]["payload"]["n"].as_u64() == Some(n),
            "payload: {event}"
        );
    }
    // Exactly those: the next line is the next live item, not a repeat.
    api.publish_payload(&node, Some("live-7"), json!({ "n": 7 }))
        .await?;
    check_printed(&sub.next().await?, &node, 7, "live-7")?;
    sub.kill().await?;
    Ok(())
}

#[tokio::test]
async fn given_pub_and_nodes_commands_when_run_then_they_publish_and_list_through_the_api()
-> Result<()> {
    let server = Server::start_default().await?;
    let api = server.api();
    let node = unique("cli-pub");
    api.create_node(&node, None).await?;
    let url = server.base_url();

    // One item from the command line.
    let out = server
        .command()
        .args(["pub", &node, r#"{"hello":"world"}"#, "--id", "greeting"])
        .args(["--url", &url, "--token", server.admin_key()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .context("running juxta pub")?;
    ensure!(
        out.status.success(),
        "juxta pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("juxta pub printed {}", String::from_utf8_lossy(&out.stdout)))?;
    ensure!(
        printed["node"] == node.as_str()
            && printed["id"] == "greeting"
            && printed["offset"].as_u64() == Some(1)
            && printed["epoch"].is_string(),
        "juxta pub printed {printed}"
    );

    // One item per stdin line, token from JUXTA_TOKEN.
    let mut child = server
        .command()
        .args(["pub", &node, "-", "--url", &url])
        .env("JUXTA_TOKEN", server.admin_key())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning juxta pub -")?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin
        .write_all(b"{\"line\":1}\n{\"line\":2}\n")
        .await
        .context("writing to juxta pub")?;
    drop(stdin);
    let out = tokio::time::timeout(RECV_TIMEOUT, child.wait_with_output())
        .await
        .context("juxta pub - did not finish")??;
    ensure!(
        out.status.success(),
        "juxta pub - failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items = api.all_items(&node).await?;
    let payloads: Vec<&Value> = items.iter().map(|i| &i["payload"]).collect();
    ensure!(
        payloads
            == [
                &json!({"hello":"world"}),
                &json!({"line":1}),
                &json!({"line":2})
            ],
        "stored payloads: {payloads:?}"
    );

    // `juxta nodes` lists the node, one JSON object per line.
    let out = server
        .command()
        .args(["nodes", "--url", &url])
        .env("JUXTA_TOKEN", server.admin_key())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .context("running juxta nodes")?;
    ensure!(
        out.status.success(),
        "juxta nodes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).context("juxta nodes printed non-UTF-8")?;
    let listed: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("juxta nodes printed {stdout}"))?;
    let ours = listed
        .iter()
        .find(|n| n["node"] == node.as_str())
        .with_context(|| format!("{node} not in juxta nodes output: {stdout}"))?;
    ensure!(ours["last_offset"].as_u64() == Some(3), "listed {ours}");
    Ok(())
}
