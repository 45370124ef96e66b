//! XMPP clients over real sockets: STARTTLS with the certificate the gateway generated,
//! SASL PLAIN against an account created over REST, resource binding and ping; refusals for
//! a wrong password and for authenticating before TLS; and slixmpp, an XMPP client library we
//! did not write, logging in with SCRAM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use juxta_tests::{Server, ServerOptions};
use reqwest::Method;
use rustls_pki_types::pem::PemObject as _;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' \
     xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// Reads until `marker` has arrived (or fails after 10 s); returns everything read.
async fn read_until(io: &mut (impl AsyncRead + Unpin), marker: &str) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains(marker) {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                bail!("connection closed; got {:?}", String::from_utf8_lossy(&got));
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await
    .with_context(|| {
        format!(
            "waiting for {marker:?}; got {:?}",
            String::from_utf8_lossy(&got)
        )
    })??;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

async fn send(io: &mut (impl AsyncWrite + Unpin), xml: &str) -> Result<()> {
    io.write_all(xml.as_bytes()).await?;
    io.flush().await?;
    Ok(())
}

/// Connects, runs STARTTLS trusting the gateway's self-signed certificate, and reads the
/// features offered on the encrypted stream.
async fn connect_tls(
    server: &Server,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, String)> {
    let addr = server
        .xmpp_addr()
        .context("the gateway printed no XMPP address")?;
    let mut tcp = TcpStream::connect(addr).await?;
    send(&mut tcp, HEADER).await?;
    let features = read_until(&mut tcp, "</stream:features>").await?;
    ensure!(
        features.contains("urn:ietf:params:xml:ns:xmpp-tls"),
        "STARTTLS offered: {features}"
    );
    send(
        &mut tcp,
        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    )
    .await?;
    read_until(&mut tcp, "<proceed").await?;

    let config = client_tls(server, None)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    send(&mut tls, HEADER).await?;
    let features = read_until(&mut tls, "</stream:features>").await?;
    Ok((tls, features))
}

/// A TLS client configuration that trusts the certificate the gateway generated into its
/// data dir, offering `alpn` if given.
fn client_tls(server: &Server, alpn: Option<&[u8]>) -> Result<rustls::ClientConfig> {
    let cert_path = server.data_dir().join("xmpp-localhost.crt");
    let cert = rustls_pki_types::CertificateDer::from_pem_file(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    Ok(config)
}

fn plain(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b64}</auth>")
}

#[tokio::test]
async fn given_an_account_when_a_client_logs_in_over_starttls_then_it_binds_and_pings() -> Result<()>
{
    let server = Server::start_default().await?;
    server
        .api()
        .call(
            Method::PUT,
            "/api/v1/accounts/alice",
            Some(&json!({"password": "pencil"})),
        )
        .await?
        .expect(201)?;
    let (mut tls, features) = connect_tls(&server).await?;
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] {
        ensure!(
            features.contains(mechanism),
            "{mechanism} offered over TLS: {features}"
        );
    }
    send(&mut tls, &plain("alice", "pencil")).await?;
    read_until(&mut tls, "<success").await?;
    send(&mut tls, HEADER).await?;
    let features = read_until(&mut tls, "</stream:features>").await?;
    ensure!(
        features.contains("urn:ietf:params:xml:ns:xmpp-bind"),
        "bind offered: {features}"
    );
    send(
        &mut tls,
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>laptop</resource></bind></iq>",
    )
    .await?;
    let bound = read_until(&mut tls, "</iq>").await?;
    ensure!(
        bound.contains("alice@localhost/laptop"),
        "full JID: {bound}"
    );
    send(
        &mut tls,
        "<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await?;
    // The answer is an empty `<iq type='result' id='p1' …>`: read to the end of its tag.
    let pong = read_until(&mut tls, "p1").await?;
    let tail = pong.rsplit("p1").next().unwrap_or_default();
    let pong = if tail.contains('>') {
        pong
    } else {
        pong + &read_until(&mut tls, ">").await?
    };
    ensure!(
        pong.contains("result") && !pong.contains("error"),
        "ping result: {pong}"
    );
    send(&mut tls, "</stream:stream>").await?;
    read_until(&mut tls, "</stream:stream>").await?;
    Ok(())
}

#[tokio::test]
async fn given_a_wrong_password_or_no_tls_then_authentication_is_refused() -> Result<()> {
    let server = Server::start_default().await?;
    server
        .api()
        .call(
            Method::PUT,
            "/api/v1/accounts/bob",
            Some(&json!({"password": "right"})),
        )
        .await?
        .expect(201)?;
    let (mut tls, _) = connect_tls(&server).await?;
    send(&mut tls, &plain("bob", "wrong")).await?;
    let failure = read_until(&mut tls, "</failure>").await?;
    ensure!(failure.contains("not-authorized"), "{failure}");
    let metrics = reqwest::get(format!("{}/metrics", server.base_url()))
        .await?
        .text()
        .await?;
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("juxta_xmpp_auth_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    ensure!(
        counted == Some(1.0),
        "one auth failure counted: {counted:?}"
    );

    // Before TLS, PLAIN is not even offered and authenticating is a policy violation.
    let addr = server.xmpp_addr().context("no XMPP address")?;
    let mut tcp = TcpStream::connect(addr).await?;
    send(&mut tcp, HEADER).await?;
    let features = read_until(&mut tcp, "</stream:features>").await?;
    ensure!(
        !features.contains("PLAIN"),
        "no PLAIN before TLS: {features}"
    );
    send(&mut tcp, &plain("bob", "right")).await?;
    let error = read_until(&mut tcp, "</stream:stream>").await?;
    ensure!(error.contains("policy-violation"), "{error}");
    // The gateway is still serving.
    ensure!(server.api().healthy().await?, "still healthy");
    Ok(())
}

#[tokio::test]
async fn given_direct_tls_when_a_client_connects_then_plain_is_offered_at_once_and_works()
-> Result<()> {
    let server =
        Server::start(ServerOptions::new().env("JUXTA_XMPP__DIRECT_TLS_LISTEN", "127.0.0.1:0"))
            .await?;
    server
        .api()
        .call(
            Method::PUT,
            "/api/v1/accounts/dora",
            Some(&json!({"password": "pw"})),
        )
        .await?
        .expect(201)?;
    let addr = server
        .xmpps_addr()
        .context("the gateway printed no direct-TLS address")?;
    let config = client_tls(&server, Some(b"xmpp-client"))?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    ensure!(
        tls.get_ref().1.alpn_protocol() == Some(&b"xmpp-client"[..]),
        "ALPN xmpp-client agreed"
    );
    send(&mut tls, HEADER).await?;
    let features = read_until(&mut tls, "</stream:features>").await?;
    ensure!(
        !features.contains("xmpp-tls") && features.contains("PLAIN"),
        "{features}"
    );
    send(&mut tls, &plain("dora", "pw")).await?;
    read_until(&mut tls, "<success").await?;
    Ok(())
}

#[tokio::test]
async fn slixmpp_logs_in_with_scram_over_starttls_and_gets_ping_and_disco_answers() -> Result<()> {
    let python = juxta_tests::interop::python()?;
    let server = Server::start_default().await?;
    server
        .api()
        .call(
            Method::PUT,
            "/api/v1/accounts/carol",
            Some(&json!({"password": "p4ss word"})),
        )
        .await?
        .expect(201)?;
    let addr = server.xmpp_addr().context("no XMPP address")?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/slixmpp_login.py");
    let ca = server.data_dir().join("xmpp-localhost.crt");
    let run = |password: &str| {
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg("carol@localhost")
            .arg(password)
            .arg(&ca)
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
                .await
                .context("slixmpp did not finish in 60 s")??;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let report: serde_json::Value =
                serde_json::from_str(stdout.trim()).with_context(|| {
                    format!(
                        "slixmpp printed no report: {stdout} {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                })?;
            anyhow::Ok((out.status.success(), report))
        }
    };
    let (ok, report) = run("p4ss word").await?;
    ensure!(ok, "slixmpp failed: {report}");
    ensure!(report["mechanism"] == "SCRAM-SHA-256", "{report}");
    ensure!(
        report["jid"]
            .as_str()
            .is_some_and(|j| j.starts_with("carol@localhost/")),
        "{report}"
    );
    ensure!(report["ping"] == true, "{report}");
    let features = report["features"].to_string();
    ensure!(
        features.contains("urn:xmpp:ping") && features.contains("disco#info"),
        "{report}"
    );
    let (ok, report) = run("wrong").await?;
    ensure!(
        !ok && report["connected"] == false,
        "a wrong password must not log in: {report}"
    );
    Ok(())
}

#[tokio::test]
async fn given_hostile_xml_then_that_stream_ends_with_the_right_error_and_others_are_unaffected()
-> Result<()> {
    let server =
        Server::start(ServerOptions::new().env("JUXTA_XMPP__MAX_STANZA_BYTES", "8192")).await?;
    server
        .api()
        .call(
            Method::PUT,
            "/api/v1/accounts/erin",
            Some(&json!({"password": "pw"})),
        )
        .await?
        .expect(201)?;
    // A bystander logs in first and must keep working throughout.
    let (mut bystander, _) = connect_tls(&server).await?;
    send(&mut bystander, &plain("erin", "pw")).await?;
    read_until(&mut bystander, "<success").await?;

    let addr = server.xmpp_addr().context("no XMPP address")?;
    let cases: [(&str, String); 4] = [
        (
            "restricted-xml",
            "<!DOCTYPE lol [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><iq/>".to_owned(),
        ),
        ("not-well-formed", "<iq type='get' id='1'></message>".to_owned()),
        // An unclosed stanza that keeps growing is cut off at the stanza limit.
        ("policy-violation", format!("<message><body>{}", "a".repeat(64 * 1024))),
        (
            "invalid-namespace",
            "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' \
             xmlns:stream='urn:wrong'>"
                .to_owned(),
        ),
    ];
    for (condition, hostile) in cases {
        let mut tcp = TcpStream::connect(addr).await?;
        if condition != "invalid-namespace" {
            send(&mut tcp, HEADER).await?;
            read_until(&mut tcp, "</stream:features>").await?;
        }
        // The server may close while we are still writing: that is the point.
        let _ = tcp.write_all(hostile.as_bytes()).await;
        let reply = read_until(&mut tcp, "</stream:stream>").await?;
        ensure!(reply.contains(condition), "{condition} expected: {reply}");
    }

    send(&mut bystander, HEADER).await?;
    read_until(&mut bystander, "</stream:features>").await?;
    send(
        &mut bystander,
        "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
    )
    .await?;
    let bound = read_until(&mut bystander, "</iq>").await?;
    ensure!(
        bound.contains("erin@localhost/"),
        "the bystander still binds: {bound}"
    );
    ensure!(
        server.api().healthy().await?,
        "the gateway still serves HTTP"
    );
    Ok(())
}

/// Logs `user` in over STARTTLS with PLAIN and binds a resource; returns the bound stream.
async fn bound_session(
    server: &Server,
    user: &str,
    password: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let (mut tls, _) = connect_tls(server).await?;
    send(&mut tls, &plain(user, password)).await?;
    read_until(&mut tls, "<success").await?;
    send(&mut tls, HEADER).await?;
    read_until(&mut tls, "</stream:features>").await?;
    send(
        &mut tls,
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
    )
    .await?;
    read_until(&mut tls, "</iq>").await?;
    Ok(tls)
}

#[tokio::test]
async fn given_short_timeouts_then_a_stalled_handshake_and_a_silent_session_end_with_connection_timeout_while_a_pinging_one_stays()
-> Result<()> {
    let server = Server::start(
        ServerOptions::new()
            .env("JUXTA_XMPP__HANDSHAKE_TIMEOUT_SECS", "2")
            .env("JUXTA_XMPP__IDLE_TIMEOUT_SECS", "3"),
    )
    .await?;
    server
        .api()
        .call(
            Method::PUT,
            "/api/v1/accounts/alice",
            Some(&json!({"password": "pencil"})),
        )
        .await?
        .expect(201)?;
    let addr = server.xmpp_addr().context("no XMPP address")?;

    // Opens a stream, then says nothing: the handshake timeout ends it.
    let started = tokio::time::Instant::now();
    let mut stalled = TcpStream::connect(addr).await?;
    send(&mut stalled, HEADER).await?;
    let got = read_until(&mut stalled, "</stream:stream>").await?;
    let waited = started.elapsed();
    ensure!(
        got.contains("<connection-timeout"),
        "stalled handshake: {got}"
    );
    ensure!(
        waited >= Duration::from_millis(1900),
        "ended after {waited:?}, before the 2 s handshake timeout"
    );

    // Two bound sessions: one pings every second, the other stays silent.
    let mut silent = bound_session(&server, "alice", "pencil").await?;
    let mut pinging = bound_session(&server, "alice", "pencil").await?;
    let silent_since = tokio::time::Instant::now();
    let silent_end = tokio::spawn(async move {
        let got = read_until(&mut silent, "</stream:stream>").await;
        (got, silent_since.elapsed())
    });
    for i in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        send(
            &mut pinging,
            &format!(
                "<iq type='get' id='ping{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
            ),
        )
        .await?;
        read_until(&mut pinging, &format!("ping{i}")).await?;
    }
    let (got, waited) = silent_end.await?;
    let got = got?;
    ensure!(got.contains("<connection-timeout"), "silent session: {got}");
    ensure!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "the silent session ended after {waited:?}; idle timeout 3 s"
    );
    // 6 s of pings, past twice the idle timeout, and the pinging session still answers.
    send(
        &mut pinging,
        "<iq type='get' id='last' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await?;
    read_until(&mut pinging, "last").await?;
    Ok(())
}
