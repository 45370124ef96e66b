//! Who may do what: the admin key, JWTs minted by `juxta token` inside and outside their
//! patterns, and missing, forged and expired credentials, over REST, WebSocket and SSE.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use juxta_tests::{Server, SseClient, WsClient, unique};
use serde_json::json;
use tokio::time::Instant;

/// The credentials a test needs, minted once per server.
struct Creds {
    /// Allowed to publish and subscribe to `allowed*`.
    jwt: String,
    /// Same rights, signature altered.
    forged: String,
    /// Same rights, a one-second lifetime.
    expired: String,
    /// When `expired` was minted.
    expired_at: Instant,
}

async fn mint(server: &Server) -> Result<Creds> {
    let jwt = server
        .mint_token(&[
            "--sub",
            "alice",
            "--publish",
            "allowed*",
            "--subscribe",
            "allowed*",
        ])
        .await?;
    let expired = server
        .mint_token(&[
            "--sub",
            "alice",
            "--publish",
            "allowed*",
            "--subscribe",
            "allowed*",
            "--ttl",
            "1s",
        ])
        .await?;
    let expired_at = Instant::now();
    Ok(Creds {
        forged: forge(&jwt)?,
        jwt,
        expired,
        expired_at,
    })
}

/// The same header and claims with a different (wrong) signature. The first signature
/// character is changed: the last one may only carry padding bits.
fn forge(jwt: &str) -> Result<String> {
    let (signed, signature) = jwt.rsplit_once('.').context("a JWT has three parts")?;
    let mut chars: Vec<char> = signature.chars().collect();
    let first = chars.first_mut().context("empty signature")?;
    *first = if *first == 'A' { 'B' } else { 'A' };
    Ok(format!(
        "{signed}.{}",
        chars.into_iter().collect::<String>()
    ))
}

/// Waits until the one-second token is at least two seconds old.
async fn until_expired(creds: &Creds) {
    tokio::time::sleep_until(creds.expired_at + Duration::from_millis(2500)).await;
}

#[tokio::test]
async fn given_each_kind_of_credential_when_calling_rest_then_only_permitted_calls_succeed()
-> Result<()> {
    let server = Server::start_default().await?;
    let creds = mint(&server).await?;
    let admin = server.api();
    let allowed = unique("allowed");
    let secret = unique("secret");
    admin.create_node(&allowed, None).await?;
    admin.create_node(&secret, None).await?;

    // Admin key: everything.
    admin.nodes().await?.expect(200)?;
    admin
        .publish_payload(&secret, None, json!("by admin"))
        .await?;
    admin.items(&secret, &[]).await?.expect(200)?;

    // JWT inside its patterns.
    let alice = server.api_with(Some(&creds.jwt));
    let ack = alice
        .publish_payload(&allowed, Some("a1"), json!({ "v": 1 }))
        .await?;
    ensure!(ack["offset"].as_u64() == Some(1), "publish as alice: {ack}");
    let items = alice.items(&allowed, &[]).await?.expect(200)?;
    ensure!(items["items"][0]["id"] == "a1", "items as alice: {items}");

    // JWT outside its patterns.
    alice
        .publish(&secret, &json!({ "payload": 1 }))
        .await?
        .expect_problem(403, "forbidden")?;
    alice
        .items(&secret, &[])
        .await?
        .expect_problem(403, "forbidden")?;

    // No token.
    let anonymous = server.api_with(None);
    anonymous
        .nodes()
        .await?
        .expect_problem(401, "missing_token")?;
    anonymous
        .publish(&allowed, &json!({ "payload": 1 }))
        .await?
        .expect_problem(401, "missing_token")?;

    // Forged signature, garbage, a wrong admin key.
    for token in [
        creds.forged.as_str(),
        "not-a-token",
        "0123456789abcdef0123456789abcdef",
    ] {
        let api = server.api_with(Some(token));
        api.items(&allowed, &[])
            .await?
            .expect_problem(401, "invalid_token")
            .with_context(|| format!("token {token:?}"))?;
        api.publish(&allowed, &json!({ "payload": 1 }))
            .await?
            .expect_problem(401, "invalid_token")
            .with_context(|| format!("token {token:?}"))?;
    }

    // Expired.
    until_expired(&creds).await;
    server
        .api_with(Some(&creds.expired))
        .items(&allowed, &[])
        .await?
        .expect_problem(401, "token_expired")?;

    // Operational endpoints need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = anonymous.get(path).await?;
        ensure!(
            reply.status == 200,
            "GET {path} without a token: {}",
            reply.status
        );
    }

    // Nothing that was refused was stored.
    let stored = admin.all_items(&secret).await?;
    ensure!(
        stored.len() == 1,
        "refused publishes were stored: {stored:?}"
    );
    let stored = admin.all_items(&allowed).await?;
    ensure!(
        stored.len() == 1,
        "refused publishes were stored: {stored:?}"
    );
    Ok(())
}

#[tokio::test]
async fn given_each_kind_of_credential_when_using_websocket_and_sse_then_only_permitted_streams_open()
-> Result<()> {
    let server = Server::start_default().await?;
    let creds = mint(&server).await?;
    let admin = server.api();
    let allowed = unique("allowed");
    let secret = unique("secret");
    admin.create_node(&allowed, None).await?;
    admin.create_node(&secret, None).await?;
    let url = server.ws_url();

    // Admin key, as a query parameter and as a header.
    let mut ws = WsClient::connect(&url, server.admin_key()).await?;
    ws.subscribed(&secret, None, None).await?;
    let mut ws = WsClient::connect_with_header(&url, server.admin_key()).await?;
    ws.subscribed(&secret, None, None).await?;

    // JWT inside and outside its patterns: the connection opens, each op is judged.
    let mut alice = WsClient::connect(&url, &creds.jwt).await?;
    alice.subscribed(&allowed, None, None).await?;
    let refused = alice.subscribe(&secret, None, None).await?;
    ensure!(
        refused["type"] == "error" && refused["code"] == "forbidden",
        "subscribe outside the patterns: {refused}"
    );
    ensure!(
        refused["ref"] == format!("sub-{secret}").as_str(),
        "error without ref: {refused}"
    );
    alice
        .send_json(&json!({ "op": "publish", "node": secret, "payload": 1, "ref": "p-secret" }))
        .await?;
    let refused = alice.recv().await?;
    ensure!(
        refused["type"] == "error"
            && refused["code"] == "forbidden"
            && refused["ref"] == "p-secret",
        "publish outside the patterns: {refused}"
    );
    alice
        .send_json(&json!({ "op": "publish", "node": allowed, "payload": 2, "ref": "p-allowed" }))
        .await?;
    // Alice is subscribed to `allowed`: the ack and her own event arrive, in either order.
    let mut got_ack = false;
    let mut got_event = false;
    for _ in 0..2 {
        let msg = alice.recv().await?;
        match msg["type"].as_str() {
            Some("published") if msg["ref"] == "p-allowed" => {
                ensure!(msg["offset"].as_u64() == Some(1), "ack: {msg}");
                got_ack = true;
            }
            Some("event") if msg["offset"].as_u64() == Some(1) => got_event = true,
            _ => bail!("unexpected message after publish: {msg}"),
        }
    }
    ensure!(got_ack && got_event, "missing ack or event");

    // The handshake itself is refused without a valid token.
    for (what, token) in [
        ("no token", None),
        ("forged", Some(creds.forged.as_str())),
        ("garbage", Some("not-a-token")),
    ] {
        match WsClient::try_connect(&url, token, false, None).await? {
            Err(401) => {}
            Err(status) => bail!("WS with {what}: HTTP {status}, expected 401"),
            Ok(_) => bail!("WS with {what} was accepted"),
        }
    }

    // SSE: query token, header token, patterns.
    let anonymous = server.api_with(None);
    let mut sse = SseClient::open(&anonymous, &allowed, &[("token", creds.jwt.clone())], None)
        .await
        .context("SSE with ?token=")?;
    sse.next_json("subscribed").await?;
    let alice_api = server.api_with(Some(&creds.jwt));
    match SseClient::try_open(&alice_api, &secret, &[], None).await? {
        Err(reply) => reply.expect_problem(403, "forbidden")?,
        Ok(_) => bail!("SSE outside the patterns was accepted"),
    }
    match SseClient::try_open(&anonymous, &allowed, &[], None).await? {
        Err(reply) => reply.expect_problem(401, "missing_token")?,
        Ok(_) => bail!("SSE without a token was accepted"),
    }

    // Expired tokens are refused at the handshake too.
    until_expired(&creds).await;
    match WsClient::try_connect(&url, Some(&creds.expired), false, None).await? {
        Err(401) => {}
        Err(status) => bail!("WS with an expired token: HTTP {status}, expected 401"),
        Ok(_) => bail!("WS with an expired token was accepted"),
    }
    let expired_api = server.api_with(Some(&creds.expired));
    match SseClient::try_open(&expired_api, &allowed, &[], None).await? {
        Err(reply) => reply.expect_problem(401, "token_expired")?,
        Ok(_) => bail!("SSE with an expired token was accepted"),
    }
    Ok(())
}
