//! REST calls under `/api/v1`, each returning the status and the body as JSON.

use anyhow::{Context, Result, bail, ensure};
use reqwest::Method;
use serde_json::{Value, json};

/// Percent-encodes one path segment (or query value): everything but RFC 3986 unreserved
/// characters, so `sensors/temp-7` becomes `sensors%2Ftemp-7`.
pub fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A REST client for one server and one token (admin key, JWT or none).
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// What a call returned: status, content type and the body parsed as JSON (`Null` when empty,
/// a JSON string holding the text when it is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Value,
}

impl Reply {
    /// The problem+json `code` member, if any.
    pub fn code(&self) -> Option<&str> {
        self.body.get("code").and_then(Value::as_str)
    }

    /// The body, if the status is `expected`; otherwise an error showing what came back.
    pub fn expect(self, expected: u16) -> Result<Value> {
        ensure!(
            self.status == expected,
            "expected status {expected}, got {} with body {}",
            self.status,
            self.body
        );
        Ok(self.body)
    }

    /// Checks that this is an RFC 9457 problem with `status` and `code`: the content type is
    /// `application/problem+json` and `type`, `title`, `status` and `code` are present.
    pub fn expect_problem(&self, status: u16, code: &str) -> Result<()> {
        ensure!(
            self.status == status && self.code() == Some(code),
            "expected {status} {code}, got {} with body {}",
            self.status,
            self.body
        );
        let content_type = self.content_type.as_deref().unwrap_or("");
        ensure!(
            content_type.starts_with("application/problem+json"),
            "expected content type application/problem+json for {status} {code}, got {content_type:?}"
        );
        for member in ["type", "title"] {
            ensure!(
                self.body.get(member).is_some_and(Value::is_string),
                "problem {code} lacks a string `{member}`: {}",
                self.body
            );
        }
        ensure!(
            self.body.get("status").and_then(Value::as_u64) == Some(u64::from(status)),
            "problem {code} has `status` {:?}, expected {status}",
            self.body.get("status")
        );
        Ok(())
    }
}

impl Api {
    /// A client for `base_url` (`http://127.0.0.1:PORT`) sending `token` as a bearer token.
    pub fn new(base_url: &str, token: Option<&str>) -> Self {
        // Tests only talk to loopback: never route through a proxy from the environment.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.map(str::to_owned),
        }
    }

    /// The same server with another token (sharing the connection pool).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            token: token.map(str::to_owned),
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The underlying reqwest client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request to `path` (e.g. `/api/v1/nodes`) with the bearer token, ready to send with
    /// [`Api::send`].
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => rb.bearer_auth(token),
            None => rb,
        }
    }

    /// Sends a request and reads the whole reply.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Reply> {
        let resp = rb.send().await.context("sending the request")?;
        self.read_reply(resp).await
    }

    /// Reads a reply that was sent outside [`Api::send`].
    pub(crate) async fn read_reply(&self, resp: reqwest::Response) -> Result<Reply> {
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await.context("reading the reply body")?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    /// `method path` with a JSON body (or none).
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Reply> {
        let rb = self.request(method, path);
        let rb = match body {
            Some(body) => rb.json(body),
            None => rb,
        };
        self.send(rb).await
    }

    /// `method path` with raw body bytes sent as `content_type`.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Reply> {
        let rb = self
            .request(method, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.send(rb).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.call(Method::GET, path, None).await
    }

    /// `PUT /api/v1/nodes/{node}` with `config` (or an empty body for the defaults).
    pub async fn put_node(&self, node: &str, config: Option<&Value>) -> Result<Reply> {
        self.call(Method::PUT, &node_path(node), config).await
    }

    /// Creates (or updates) `node` and fails unless the server said 200 or 201.
    pub async fn create_node(&self, node: &str, config: Option<&Value>) -> Result<Value> {
        let reply = self.put_node(node, config).await?;
        if reply.status != 201 && reply.status != 200 {
            bail!("PUT node {node} returned {} {}", reply.status, reply.body);
        }
        Ok(reply.body)
    }

    /// `GET /api/v1/nodes/{node}`.
    pub async fn get_node(&self, node: &str) -> Result<Reply> {
        self.get(&node_path(node)).await
    }

    /// How many subscribers `GET /api/v1/nodes/{node}` reports: `subscribers` as a number, or
    /// the sum of its numeric members when it is an object of per-protocol counts.
    pub async fn subscriber_count(&self, node: &str) -> Result<u64> {
        let body = self.get_node(node).await?.expect(200)?;
        match body.get("subscribers") {
            Some(Value::Number(n)) => n.as_u64().context("negative subscriber count"),
            Some(Value::Object(counts)) => Ok(counts.values().filter_map(Value::as_u64).sum()),
            other => bail!("node JSON has no usable `subscribers` member: {other:?}"),
        }
    }

    /// `DELETE /api/v1/nodes/{node}`.
    pub async fn delete_node(&self, node: &str) -> Result<Reply> {
        self.call(Method::DELETE, &node_path(node), None).await
    }

    /// `GET /api/v1/nodes`.
    pub async fn nodes(&self) -> Result<Reply> {
        self.get("/api/v1/nodes").await
    }

    /// `POST /api/v1/nodes/{node}/items` with `body` (`{"id"?, "payload"|"xml"}`).
    pub async fn publish(&self, node: &str, body: &Value) -> Result<Reply> {
        self.call(
            Method::POST,
            &format!("{}/items", node_path(node)),
            Some(body),
        )
        .await
    }

    /// Publishes `payload` (with `id` if given) and returns the 201 body
    /// `{"node","id","offset","epoch"}`.
    pub async fn publish_payload(
        &self,
        node: &str,
        id: Option<&str>,
        payload: Value,
    ) -> Result<Value> {
        let body = match id {
            Some(id) => json!({ "id": id, "payload": payload }),
            None => json!({ "payload": payload }),
        };
        self.publish(node, &body).await?.expect(201)
    }

    /// `POST /api/v1/publish` with `{"items": items}`.
    pub async fn publish_batch(&self, items: &Value) -> Result<Reply> {
        self.call(
            Method::POST,
            "/api/v1/publish",
            Some(&json!({ "items": items })),
        )
        .await
    }

    /// `GET /api/v1/nodes/{node}/items?QUERY` where `query` is already-encoded `k=v` pairs.
    pub async fn items(&self, node: &str, query: &[(&str, String)]) -> Result<Reply> {
        let mut path = format!("{}/items", node_path(node));
        for (i, (key, value)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(key);
            path.push('=');
            path.push_str(&encode_path_segment(value));
        }
        self.get(&path).await
    }

    /// Every item of `node` in offset order, following `after` page by page.
    pub async fn all_items(&self, node: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut after = 0u64;
        // Bounded: at most 10 000 pages.
        for _ in 0..10_000 {
            let page = self
                .items(
                    node,
                    &[("after", after.to_string()), ("limit", "500".into())],
                )
                .await?
                .expect(200)?;
            let batch = page
                .get("items")
                .and_then(Value::as_array)
                .with_context(|| format!("no `items` array in {page}"))?;
            let Some(last) = batch.last() else {
                return Ok(items);
            };
            let last = last
                .get("offset")
                .and_then(Value::as_u64)
                .with_context(|| format!("item without offset: {last}"))?;
            ensure!(last > after, "paging did not advance past {after}");
            after = last;
            items.extend(batch.iter().cloned());
        }
        bail!("more than 10 000 pages of items in {node}")
    }

    /// `GET /api/v1/nodes/{node}/items/{id}`.
    pub async fn item(&self, node: &str, id: &str) -> Result<Reply> {
        self.get(&item_path(node, id)).await
    }

    /// `DELETE /api/v1/nodes/{node}/items/{id}` (retract).
    pub async fn retract(&self, node: &str, id: &str) -> Result<Reply> {
        self.call(Method::DELETE, &item_path(node, id), None).await
    }

    /// `POST /api/v1/nodes/{node}/purge`.
    pub async fn purge(&self, node: &str) -> Result<Reply> {
        self.call(Method::POST, &format!("{}/purge", node_path(node)), None)
            .await
    }

    /// `GET /healthz` succeeded.
    pub async fn healthy(&self) -> Result<bool> {
        Ok(self.get("/healthz").await?.status == 200)
    }
}

fn node_path(node: &str) -> String {
    format!("/api/v1/nodes/{}", encode_path_segment(node))
}

fn item_path(node: &str, id: &str) -> String {
    format!("{}/items/{}", node_path(node), encode_path_segment(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_node_with_a_slash_when_encoded_then_the_slash_is_escaped() {
        assert_eq!(encode_path_segment("sensors/temp-7"), "sensors%2Ftemp-7");
        assert_eq!(encode_path_segment("a b"), "a%20b");
        assert_eq!(encode_path_segment("abc~._-"), "abc~._-");
    }
}
