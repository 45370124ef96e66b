//! XMPP accounts over REST and `juxta user`: created with salted SCRAM credentials, listed,
//! replaced, deleted; refused for bad names, empty passwords and non-admin tokens; kept across
//! a restart.

use anyhow::{Context, Result, ensure};
use juxta_tests::Server;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn given_an_admin_when_accounts_are_managed_over_rest_then_they_survive_a_restart()
-> Result<()> {
    let mut server = Server::start_default().await?;
    let api = server.api();
    let body = json!({"password": "pencil"});
    let r = api
        .call(Method::PUT, "/api/v1/accounts/Alice", Some(&body))
        .await?;
    let v = r.expect(201)?;
    ensure!(
        v["username"] == "alice",
        "usernames are stored lowercase: {v}"
    );
    api.call(
        Method::PUT,
        "/api/v1/accounts/alice",
        Some(&json!({"password": "other"})),
    )
    .await?
    .expect(200)?;
    api.call(Method::PUT, "/api/v1/accounts/bob", Some(&body))
        .await?
        .expect(201)?;
    let list = api.get("/api/v1/accounts").await?.expect(200)?;
    ensure!(list["accounts"] == json!(["alice", "bob"]), "{list}");

    server.restart().await?;
    let api = server.api();
    let list = api.get("/api/v1/accounts").await?.expect(200)?;
    ensure!(
        list["accounts"] == json!(["alice", "bob"]),
        "after restart: {list}"
    );
    api.call(Method::DELETE, "/api/v1/accounts/bob", None)
        .await?
        .expect(204)?;
    api.call(Method::DELETE, "/api/v1/accounts/bob", None)
        .await?
        .expect_problem(404, "account_not_found")?;
    Ok(())
}

#[tokio::test]
async fn given_bad_input_or_a_non_admin_token_then_accounts_are_refused_and_unchanged() -> Result<()>
{
    let server = Server::start_default().await?;
    let api = server.api();
    api.call(
        Method::PUT,
        "/api/v1/accounts/carol",
        Some(&json!({"password": "x"})),
    )
    .await?
    .expect(201)?;
    api.call(
        Method::PUT,
        "/api/v1/accounts/a%40b",
        Some(&json!({"password": "x"})),
    )
    .await?
    .expect_problem(400, "invalid_username")?;
    api.call(
        Method::PUT,
        "/api/v1/accounts/dave",
        Some(&json!({"password": ""})),
    )
    .await?
    .expect_problem(400, "invalid_password")?;
    api.call(
        Method::PUT,
        "/api/v1/accounts/dave",
        Some(&json!({"pass": "x"})),
    )
    .await?
    .expect_problem(400, "invalid_request")?;
    let jwt = server
        .mint_token(&["--sub", "eve", "--publish", "*", "--subscribe", "*"])
        .await?;
    let eve = server.api_with(Some(&jwt));
    eve.call(Method::DELETE, "/api/v1/accounts/carol", None)
        .await?
        .expect_problem(403, "forbidden")?;
    eve.get("/api/v1/accounts")
        .await?
        .expect_problem(403, "forbidden")?;
    let list = api.get("/api/v1/accounts").await?.expect(200)?;
    ensure!(list["accounts"] == json!(["carol"]), "{list}");
    Ok(())
}

#[tokio::test]
async fn juxta_user_adds_lists_and_deletes_accounts() -> Result<()> {
    let server = Server::start_default().await?;
    let target = ["--url", &server.base_url(), "--token", server.admin_key()].map(str::to_owned);
    let run = |args: Vec<String>| {
        let mut cmd = server.command();
        cmd.args(args);
        async move {
            let out = cmd.output().await.context("running juxta user")?;
            ensure!(
                out.status.success(),
                "juxta user failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let with = |head: &[&str]| {
        head.iter()
            .map(|s| (*s).to_owned())
            .chain(target.clone())
            .collect::<Vec<_>>()
    };
    run(with(&["user", "add", "frank", "--password", "s3cret"])).await?;
    let listed = run(with(&["user", "list"])).await?;
    ensure!(
        listed.lines().collect::<Vec<_>>() == vec!["frank"],
        "{listed}"
    );
    run(with(&["user", "del", "frank"])).await?;
    let listed = run(with(&["user", "list"])).await?;
    ensure!(listed.trim().is_empty(), "{listed}");
    Ok(())
}
