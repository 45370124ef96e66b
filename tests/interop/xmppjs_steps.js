// Logs in to juxta's XMPP-over-WebSocket endpoint (RFC 7395) with xmpp.js (@xmpp/client, a
// client library we did not write) and runs a list of steps, like slixmpp_steps.py does over
// TCP.
//
// Usage: node --experimental-websocket xmppjs_steps.js URL JID PASSWORD STEPS_JSON
//
// Prints one JSON object: {"connected": true, "jid": "...", "steps": [{"op", "ok", ...}]}.
// Exits 0 only if it connected and every step is ok. Every step takes an optional "timeout"
// in seconds (default 10).
//
// Steps ("to" is the JID asked):
//   {"op": "ping", "to"}
//   {"op": "subscribe", "to", "node"}                 -> "subscription"
//   {"op": "publish", "to", "node", "id"?, "payload"} payload is one XML element -> "id"
//   {"op": "wait_events", "node", "count"}            -> "events": [{"id", "payload", "from"}],
//        items published to NODE since login, in arrival order.
"use strict";

const { client, xml } = require("@xmpp/client");
const parse = require("@xmpp/xml/lib/parse.js").default;

const [url, jid, password, stepsJson] = process.argv.slice(2);
const [local, domain] = jid.split("@");
const steps = JSON.parse(stepsJson);
const report = { connected: false, steps: [] };
const events = [];
let eventWaiter = null;

function finish(code) {
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(code);
}

function withTimeout(promise, seconds) {
  return Promise.race([
    promise,
    new Promise((_, reject) =>
      setTimeout(() => reject(new Error("timeout")), seconds * 1000),
    ),
  ]);
}

const xmpp = client({ service: url, domain, username: local, password });
xmpp.on("error", (e) => {
  report.error = String(e.condition || e.message);
});
xmpp.on("stanza", (stanza) => {
  if (!stanza.is("message")) return;
  const event = stanza.getChild("event", "http://jabber.org/protocol/pubsub#event");
  const items = event && event.getChild("items");
  if (!items) return;
  for (const item of items.getChildren("item")) {
    const payload = item.children.find((c) => typeof c !== "string");
    events.push({
      node: items.attrs.node,
      id: item.attrs.id,
      from: stanza.attrs.from,
      payload: payload ? payload.toString() : null,
    });
  }
  if (eventWaiter) eventWaiter();
});

async function run(step) {
  const iq = (type, to, child) => xmpp.iqCaller.request(xml("iq", { type, to }, child));
  switch (step.op) {
    case "ping":
      await iq("get", step.to, xml("ping", "urn:xmpp:ping"));
      return {};
    case "subscribe": {
      const reply = await iq(
        "set",
        step.to,
        xml("pubsub", "http://jabber.org/protocol/pubsub",
          xml("subscribe", { node: step.node, jid: xmpp.jid.bare().toString() })),
      );
      const sub = reply.getChild("pubsub").getChild("subscription");
      return { subscription: sub.attrs.subscription };
    }
    case "publish": {
      const attrs = step.id ? { id: step.id } : {};
      const reply = await iq(
        "set",
        step.to,
        xml("pubsub", "http://jabber.org/protocol/pubsub",
          xml("publish", { node: step.node }, xml("item", attrs, parse(step.payload)))),
      );
      const item = reply.getChild("pubsub")?.getChild("publish")?.getChild("item");
      return { id: item ? item.attrs.id : step.id };
    }
    case "wait_events": {
      const mine = () => events.filter((e) => e.node === step.node);
      while (mine().length < step.count) {
        await new Promise((resolve) => (eventWaiter = resolve));
      }
      return { events: mine().slice(0, step.count) };
    }
    default:
      throw new Error(`unknown op ${step.op}`);
  }
}

xmpp.on("online", async (address) => {
  report.connected = true;
  report.jid = address.toString();
  // Available, as a client that wants headline notifications is (RFC 6121 §8.5.2).
  await xmpp.send(xml("presence"));
  let ok = true;
  for (const step of steps) {
    const entry = { op: step.op };
    try {
      Object.assign(entry, await withTimeout(run(step), step.timeout || 10), { ok: true });
    } catch (e) {
      ok = false;
      entry.ok = false;
      entry.error = String(e.condition || e.message);
    }
    report.steps.push(entry);
  }
  await withTimeout(xmpp.stop(), 5).catch(() => {});
  finish(ok ? 0 : 1);
});

withTimeout(xmpp.start(), 15).catch((e) => {
  report.error = String(e.condition || e.message);
  finish(1);
});
