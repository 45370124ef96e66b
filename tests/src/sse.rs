//! A reader for `GET /api/v1/nodes/{node}/events` (server-sent events) over reqwest's byte
//! stream, parsing frames as the WHATWG event-stream format says.

use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use crate::RECV_TIMEOUT;
use crate::api::{Api, Reply, encode_path_segment};

/// Longest frame we accept before calling the stream broken: bounds the parse buffer.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event: the fields of one blank-line-terminated block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseFrame {
    /// `id:`, if present.
    pub id: Option<String>,
    /// `event:`, if present.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseFrame {
    /// `data` parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.data).with_context(|| format!("SSE data is not JSON: {self:?}"))
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An open event stream.
pub struct SseClient {
    stream: ByteStream,
    buf: Vec<u8>,
    /// Comment lines (`: ping`) seen so far.
    pub comments: u64,
}

impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseClient")
            .field("buffered", &self.buf.len())
            .field("comments", &self.comments)
            .finish_non_exhaustive()
    }
}

impl SseClient {
    /// Opens the stream of `node`. `query` holds extra `k=v` pairs (`after`, `epoch`, `token`),
    /// `last_event_id` becomes the `Last-Event-ID` header. `Ok(Err(reply))` when the server
    /// answered with anything but 200 (the problem body is in the reply).
    pub async fn try_open(
        api: &Api,
        node: &str,
        query: &[(&str, String)],
        last_event_id: Option<&str>,
    ) -> Result<std::result::Result<Self, Reply>> {
        let mut path = format!("/api/v1/nodes/{}/events", encode_path_segment(node));
        for (i, (key, value)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(key);
            path.push('=');
            path.push_str(&encode_path_segment(value));
        }
        let mut rb = api
            .request(reqwest::Method::GET, &path)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id);
        }
        let resp = rb.send().await.context("opening the event stream")?;
        if resp.status().as_u16() != 200 {
            return Ok(Err(api.read_reply(resp).await?));
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "event stream answered with content type {content_type:?}"
        );
        Ok(Ok(Self {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            comments: 0,
        }))
    }

    /// [`SseClient::try_open`] that fails unless the server answered 200.
    pub async fn open(
        api: &Api,
        node: &str,
        query: &[(&str, String)],
        last_event_id: Option<&str>,
    ) -> Result<Self> {
        match Self::try_open(api, node, query, last_event_id).await? {
            Ok(client) => Ok(client),
            Err(reply) => bail!(
                "event stream of {node} refused: {} {}",
                reply.status,
                reply.body
            ),
        }
    }

    /// The next frame with at least one field, within [`RECV_TIMEOUT`]. Comments are counted
    /// and skipped.
    pub async fn next_frame(&mut self) -> Result<SseFrame> {
        self.next_frame_within(RECV_TIMEOUT).await
    }

    /// Like [`SseClient::next_frame`] with an explicit timeout.
    pub async fn next_frame_within(&mut self, limit: Duration) -> Result<SseFrame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(frame) = self.parse_buffered()? {
                return Ok(frame);
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .map_err(|_| anyhow!("no SSE frame within {limit:?}"))?;
            match chunk {
                None => bail!("the event stream ended"),
                Some(Err(e)) => return Err(anyhow!(e).context("reading the event stream")),
                Some(Ok(bytes)) => {
                    self.buf.extend_from_slice(&bytes);
                    ensure!(
                        self.buf.len() <= MAX_FRAME_BYTES,
                        "an SSE frame exceeded {MAX_FRAME_BYTES} bytes"
                    );
                }
            }
        }
    }

    /// The next frame's `data` as JSON, checking its `event:` name.
    pub async fn next_json(&mut self, event: &str) -> Result<(SseFrame, Value)> {
        let frame = self.next_frame().await?;
        ensure!(
            frame.event.as_deref() == Some(event),
            "expected an SSE `{event}` frame, got {frame:?}"
        );
        let value = frame.json()?;
        Ok((frame, value))
    }

    /// Takes complete blocks out of the buffer until one yields a frame.
    fn parse_buffered(&mut self) -> Result<Option<SseFrame>> {
        loop {
            let Some((block_len, sep_len)) = find_block_end(&self.buf) else {
                return Ok(None);
            };
            let block: Vec<u8> = self.buf.drain(..block_len + sep_len).collect();
            let text = std::str::from_utf8(&block[..block_len]).context("SSE is not UTF-8")?;
            let (frame, comments) = parse_block(text);
            self.comments += comments;
            if let Some(frame) = frame {
                return Ok(Some(frame));
            }
        }
    }
}

/// The end of the first block (`\n\n`, `\r\n\r\n` or `\r\r`): its length and the separator's.
fn find_block_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        for sep in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if buf[i..].starts_with(sep) {
                return Some((i, sep.len()));
            }
        }
        i += 1;
    }
    None
}

/// Parses one block: `None` if it held only comments (which are counted).
fn parse_block(block: &str) -> (Option<SseFrame>, u64) {
    let mut frame = SseFrame::default();
    let mut has_field = false;
    let mut data_lines: Vec<&str> = Vec::new();
    let mut comments = 0;
    for line in block.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        if line.starts_with(':') {
            comments += 1;
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => frame.id = Some(value.to_owned()),
            "event" => frame.event = Some(value.to_owned()),
            "data" => data_lines.push(value),
            _ => continue,
        }
        has_field = true;
    }
    frame.data = data_lines.join("\n");
    (has_field.then_some(frame), comments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_an_event_block_when_parsed_then_all_fields_are_read() {
        let (frame, comments) =
            parse_block("id: 00ab:7\nevent: published\ndata: {\"a\":1}\ndata: x");
        assert_eq!(comments, 0);
        assert_eq!(
            frame,
            Some(SseFrame {
                id: Some("00ab:7".into()),
                event: Some("published".into()),
                data: "{\"a\":1}\nx".into(),
            })
        );
    }

    #[test]
    fn given_a_ping_comment_when_parsed_then_no_frame_is_dispatched() {
        assert_eq!(parse_block(": ping"), (None, 1));
    }

    #[test]
    fn given_crlf_blocks_when_searched_then_the_first_end_is_found() {
        assert_eq!(find_block_end(b"data: 1\r\n\r\ndata: 2"), Some((7, 4)));
        assert_eq!(find_block_end(b"data: 1\n\ndata"), Some((7, 2)));
        assert_eq!(find_block_end(b"data: 1\n"), None);
    }
}
