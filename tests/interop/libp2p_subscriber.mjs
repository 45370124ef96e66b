// Joins a juxta gateway's propagate pipe with js-libp2p (a libp2p implementation we did not
// write): TCP + Noise + Yamux, identify, ping and gossipsub with signed messages, configured
// as the README's "Joining a pipe from js-libp2p" shows. Decodes each pipe message (the CBOR
// envelope of bridge-p2p/src/envelope.rs) and reports it.
//
// Usage: node libp2p_subscriber.mjs GATEWAY_MULTIADDR TOPIC [TIMEOUT_SECONDS]
//
// GATEWAY_MULTIADDR ends in /p2p/<peer id> (what `juxta serve` prints after `listening p2p`);
// TOPIC is `juxta/<group>/<node>`. Prints one JSON object per line:
//   {"event": "started", "peer_id"}
//   {"event": "connected", "peer"}                 the gateway's connection is up
//   {"event": "ready", "topic", "subscribers"}     the gateway is in the pipe (once)
//   {"event": "item", "from", "topic", "node", "kind", "id", "offset", "epoch",
//    "content_type", "payload", "publisher", "time"}
//        payload: JSON content as a JSON value, XML as a string, binary as base64; epoch as
//        16 hex digits, as the HTTP API writes it; offset and time as numbers when they fit a
//        double exactly, else as decimal strings
//   {"event": "invalid", "from", "error"}          a pipe message that is not an envelope
//   {"event": "error", "error"}                    then exits 1
// Runs until SIGTERM or SIGINT (exits 0) or TIMEOUT_SECONDS (default 120; exits 2).

import { createLibp2p } from "libp2p";
import { tcp } from "@libp2p/tcp";
import { noise } from "@chainsafe/libp2p-noise";
import { yamux } from "@chainsafe/libp2p-yamux";
import { identify } from "@libp2p/identify";
import { ping } from "@libp2p/ping";
import { gossipsub } from "@chainsafe/libp2p-gossipsub";
import { multiaddr } from "@multiformats/multiaddr";
import { decode } from "cborg";

// Node 20 lacks Promise.withResolvers (Node 22 has it), which js-libp2p 2's peer store calls
// through mortice → it-queue. Defined before any libp2p code runs; nothing calls it at import.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new this((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}

const [gatewayAddr, topic, timeoutArg] = process.argv.slice(2);
if (!gatewayAddr || !topic) {
  process.stderr.write("usage: node libp2p_subscriber.mjs GATEWAY_MULTIADDR TOPIC [TIMEOUT_SECONDS]\n");
  process.exit(64);
}
const timeoutSeconds = Number(timeoutArg ?? 120);

function emit(event) {
  process.stdout.write(
    JSON.stringify(event, (_, v) =>
      typeof v === "bigint" ? (Number.isSafeInteger(Number(v)) ? Number(v) : v.toString()) : v,
    ) + "\n",
  );
}

const KINDS = ["published", "retracted", "purged", "deleted"];
const CONTENT_TYPES = ["json", "xml", "binary"];

// A pipe message (bridge-p2p/src/envelope.rs): one envelope, or on a busy pipe a batch
// [2, [envelope, …]] of stored events of the node, in offset order.
function decodeMessage(bytes) {
  // cborg refuses trailing bytes; integers above 2^53 come back as BigInt.
  const top = decode(bytes);
  if (Array.isArray(top) && top[0] === 2) {
    if (top.length !== 2 || !Array.isArray(top[1])) throw new Error("a batch is [2, [envelope, …]]");
    return top[1].map(decodeEnvelope);
  }
  return [decodeEnvelope(top)];
}

// The envelope, version 1: one CBOR array of 11 fields — version, node, kind, item id,
// offset, epoch, content type, payload, publisher, time, seq.
function decodeEnvelope(fields) {
  if (!Array.isArray(fields) || fields[0] !== 1) {
    throw new Error(`not a version 1 envelope: ${JSON.stringify(fields?.[0] ?? null)}`);
  }
  if (fields.length !== 11) {
    throw new Error(`a version 1 envelope has 11 fields, not ${fields.length}`);
  }
  const [, node, kind, id, offset, epoch, contentType, payload, publisher, time, seq] = fields;
  const ct = contentType === null ? null : CONTENT_TYPES[contentType] ?? String(contentType);
  let value = null;
  if (payload instanceof Uint8Array) {
    const text = () => new TextDecoder("utf-8", { fatal: true }).decode(payload);
    value = ct === "json" ? JSON.parse(text()) : ct === "xml" ? text() : Buffer.from(payload).toString("base64");
  }
  return {
    node,
    kind: KINDS[kind] ?? String(kind),
    id,
    offset,
    epoch: epoch === null ? null : BigInt(epoch).toString(16).padStart(16, "0"),
    content_type: ct,
    payload: value,
    publisher,
    time,
    seq,
  };
}

const gateway = multiaddr(gatewayAddr);
const gatewayPeer = gatewayAddr.match(/\/p2p\/([^/]+)$/)?.[1];
if (!gatewayPeer) {
  process.stderr.write(`${gatewayAddr} does not end in /p2p/<peer id>\n`);
  process.exit(64);
}

let node;
async function stop(code) {
  try {
    await node?.stop();
  } finally {
    process.exit(code);
  }
}
process.on("SIGTERM", () => stop(0));
process.on("SIGINT", () => stop(0));
setTimeout(() => {
  emit({ event: "error", error: `timeout after ${timeoutSeconds} s` });
  stop(2);
}, timeoutSeconds * 1000).unref();

try {
  node = await createLibp2p({
    // A subscriber only dials out; nothing to listen on.
    addresses: { listen: [] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      // gossipsub learns which protocols a peer speaks from identify.
      identify: identify(),
      ping: ping(),
      pubsub: gossipsub({
        // The gateway signs every message and rejects unsigned ones (ValidationMode::Strict).
        globalSignaturePolicy: "StrictSign",
      }),
    },
  });
  emit({ event: "started", peer_id: node.peerId.toString() });

  const pubsub = node.services.pubsub;
  let ready = false;
  const checkReady = () => {
    if (ready) return;
    const subscribers = pubsub.getSubscribers(topic).map(String);
    if (subscribers.includes(gatewayPeer)) {
      ready = true;
      emit({ event: "ready", topic, subscribers });
    }
  };
  pubsub.addEventListener("subscription-change", checkReady);
  pubsub.addEventListener("message", (evt) => {
    const msg = evt.detail;
    if (msg.topic !== topic) return;
    const from = msg.type === "signed" ? msg.from.toString() : null;
    try {
      const envelopes = decodeMessage(msg.data);
      for (const envelope of envelopes) {
        emit({ event: "item", from, topic: msg.topic, in_message_of: envelopes.length, ...envelope });
      }
    } catch (e) {
      emit({ event: "invalid", from, error: String(e?.message ?? e) });
    }
  });
  // The topic string is sent as is (rust-libp2p's IdentTopic), not hashed.
  pubsub.subscribe(topic);

  const connection = await node.dial(gateway);
  emit({ event: "connected", peer: connection.remotePeer.toString() });
  checkReady();
} catch (e) {
  emit({ event: "error", error: String(e?.stack ?? e) });
  await stop(1);
}
