"""Logs in to an XMPP server with slixmpp (a client library we did not write) and runs a list
of steps, for tests that need an ordinary client in the loop (e.g. a user of Prosody talking
to juxta's component).

Usage: slixmpp_steps.py HOST PORT JID PASSWORD CA_FILE STEPS_JSON

Connects with STARTTLS, verifying the server certificate against CA_FILE, authenticates, then
runs the steps in order and prints one JSON object:

    {"connected": true, "jid": "alice@example.org/abc", "steps": [{"op": ..., "ok": ...}, ...]}

Exits 0 only if it connected and every step is ok. A step that fails records
"error": {"condition", "type", "text"} (condition "timeout" when nothing came back) and the
steps after it still run. A step with "expect_error": CONDITION is ok only if it fails with
that condition. Every step takes an optional "timeout" in seconds (default 10).

Steps ("to" is the JID asked; "node" a pubsub or disco node):
  {"op": "ping", "to"}                                   -> "rtt"
  {"op": "disco_info", "to", "node"?}                    -> "identities": [[category, type, name]],
                                                            "features": [...]
  {"op": "disco_items", "to", "node"?}                   -> "items": [{"jid", "node", "name"}]
  {"op": "create", "to", "node"}
  {"op": "subscribe", "to", "node"}                      -> "subscription" (e.g. "subscribed")
  {"op": "unsubscribe", "to", "node"}
  {"op": "publish", "to", "node", "id"?, "payload"}      -> "id"; payload is one XML element
  {"op": "items", "to", "node", "max"?}                  -> "items": [{"id", "payload"}]
  {"op": "retract", "to", "node", "id", "notify"?}       notify: ask for a notification
                                                            (XEP-0060 §7.2.2.1)
  {"op": "wait_events", "node", "count", "from"?}        -> "events": the first COUNT events of
        NODE received since login: [{"kind": "published"|"retracted"|"purged"|"deleted",
        "from", "id"?, "payload"?}]. Events are collected from the start, so ones that arrive
        before this step are not missed.
  {"op": "iq", "type", "to", "payload"}                  -> "reply": the answer's XML
  {"op": "sleep", "seconds"}
  {"op": "events", "node"}                               -> "events": every event of NODE
                                                          received so far, without waiting
  {"op": "presence", "type"?}                            broadcasts presence ("unavailable", or
                                                          available when no type is given)
  {"op": "touch", "path"}                                creates the file PATH, for the test to
                                                          see how far the client got
"""

import asyncio
import json
import ssl
import sys

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream import ET, tostring

DEFAULT_TIMEOUT = 10


def error_of(exc):
    if isinstance(exc, IqTimeout):
        return {"condition": "timeout", "type": None, "text": None}
    if isinstance(exc, IqError):
        err = exc.iq["error"]
        return {
            "condition": err["condition"],
            "type": err["type"],
            "text": err["text"] or None,
        }
    return {"condition": "exception", "type": None, "text": repr(exc)}


class Runner(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca_file, steps):
        super().__init__(jid, password)
        self.steps = steps
        self.result = {"connected": False, "steps": []}
        self.events = []
        self.event_arrived = asyncio.Event()
        self.ssl_context = ssl.create_default_context(cafile=ca_file)
        for plugin in ("xep_0030", "xep_0060", "xep_0199"):
            self.register_plugin(plugin)
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("failed_auth", self.on_failed_auth)
        self.add_event_handler("pubsub_publish", self.on_publish)
        self.add_event_handler("pubsub_retract", self.on_retract)
        self.add_event_handler("pubsub_purge", self.on_node_event("purged"))
        self.add_event_handler("pubsub_delete", self.on_node_event("deleted"))

    def on_failed_auth(self, _event):
        self.result["error"] = "authentication failed"
        self.disconnect()

    def record(self, msg, kind, node, item=None, payload=None):
        event = {"kind": kind, "node": node, "from": str(msg["from"])}
        if item is not None:
            event["id"] = item
        if payload is not None:
            event["payload"] = payload
        self.events.append(event)
        self.event_arrived.set()

    def on_publish(self, msg):
        items = msg["pubsub_event"]["items"]
        item = items["item"]
        payload = item["payload"]
        self.record(
            msg,
            "published",
            items["node"],
            item["id"],
            tostring(payload) if payload is not None else None,
        )

    def on_retract(self, msg):
        items = msg["pubsub_event"]["items"]
        self.record(msg, "retracted", items["node"], items["retract"]["id"])

    def on_node_event(self, kind):
        def handler(msg):
            event = msg["pubsub_event"]
            node = event["purge"]["node"] if kind == "purged" else event["delete"]["node"]
            self.record(msg, kind, node)

        return handler

    async def wait_events(self, node, count, sender, timeout):
        def matching():
            return [
                e
                for e in self.events
                if e["node"] == node and (sender is None or e["from"] == sender)
            ]

        async def until_enough():
            while len(matching()) < count:
                self.event_arrived.clear()
                await self.event_arrived.wait()

        try:
            await asyncio.wait_for(until_enough(), timeout)
        except asyncio.TimeoutError:
            pass
        return matching()[:count]

    async def run_step(self, step):
        op = step["op"]
        timeout = step.get("timeout", DEFAULT_TIMEOUT)
        out = {}
        if op == "ping":
            out["rtt"] = await self.plugin["xep_0199"].ping(jid=step["to"], timeout=timeout)
        elif op == "disco_info":
            info = await self.plugin["xep_0030"].get_info(
                jid=step["to"], node=step.get("node"), timeout=timeout
            )
            out["identities"] = sorted(
                [c, t, n] for (c, t, _lang, n) in info["disco_info"]["identities"]
            )
            out["features"] = sorted(info["disco_info"]["features"])
        elif op == "disco_items":
            items = await self.plugin["xep_0030"].get_items(
                jid=step["to"], node=step.get("node"), timeout=timeout
            )
            out["items"] = [
                {"jid": str(j), "node": n, "name": name}
                for (j, n, name) in items["disco_items"]["items"]
            ]
        elif op == "create":
            await self.plugin["xep_0060"].create_node(step["to"], step["node"], timeout=timeout)
        elif op == "subscribe":
            reply = await self.plugin["xep_0060"].subscribe(
                step["to"], step["node"], timeout=timeout
            )
            out["subscription"] = reply["pubsub"]["subscription"]["subscription"]
        elif op == "unsubscribe":
            await self.plugin["xep_0060"].unsubscribe(step["to"], step["node"], timeout=timeout)
        elif op == "publish":
            payload = ET.fromstring(step["payload"])
            reply = await self.plugin["xep_0060"].publish(
                step["to"], step["node"], id=step.get("id"), payload=payload, timeout=timeout
            )
            out["id"] = reply["pubsub"]["publish"]["item"]["id"] or step.get("id")
        elif op == "items":
            reply = await self.plugin["xep_0060"].get_items(
                step["to"], step["node"], max_items=step.get("max"), timeout=timeout
            )
            out["items"] = [
                {
                    "id": item["id"],
                    "payload": tostring(item["payload"])
                    if item["payload"] is not None
                    else None,
                }
                for item in reply["pubsub"]["items"]
            ]
        elif op == "retract":
            await self.plugin["xep_0060"].retract(
                step["to"], step["node"], step["id"], notify=step.get("notify"), timeout=timeout
            )
        elif op == "wait_events":
            events = await self.wait_events(
                step["node"], step["count"], step.get("from"), timeout
            )
            out["events"] = events
            if len(events) < step["count"]:
                raise asyncio.TimeoutError(
                    f"{len(events)} of {step['count']} events within {timeout} s"
                )
        elif op == "iq":
            iq = self.make_iq(ito=step["to"], itype=step["type"])
            iq.append(ET.fromstring(step["payload"]))
            reply = await iq.send(timeout=timeout)
            out["reply"] = str(reply)
        elif op == "sleep":
            await asyncio.sleep(step["seconds"])
        elif op == "events":
            out["events"] = [e for e in self.events if e["node"] == step["node"]]
        elif op == "touch":
            open(step["path"], "w").close()
        elif op == "presence":
            if step.get("type"):
                self.send_presence(ptype=step["type"])
            else:
                self.send_presence()
        else:
            raise ValueError(f"unknown op {op!r}")
        return out

    async def on_start(self, _event):
        self.result["connected"] = True
        self.result["jid"] = str(self.boundjid)
        # Available presence, so that messages to the bare JID (pubsub notifications) reach
        # this resource instead of offline storage (RFC 6121 §8.5.2).
        self.send_presence()
        for step in self.steps:
            report = {"op": step["op"]}
            try:
                report.update(await self.run_step(step))
                report["ok"] = "expect_error" not in step
            except asyncio.TimeoutError as e:
                report["error"] = {"condition": "timeout", "type": None, "text": str(e)}
            except Exception as e:  # an IqError/IqTimeout is the step's outcome, not a crash
                report["error"] = error_of(e)
            if "error" in report:
                report["ok"] = report["error"]["condition"] == step.get("expect_error")
            self.result["steps"].append(report)
        self.disconnect()


async def main():
    host, port, jid, password, ca_file, steps_json = sys.argv[1:7]
    steps = json.loads(steps_json)
    runner = Runner(jid, password, ca_file, steps)
    runner.connect(host=host, port=int(port))
    budget = 30 + sum(s.get("timeout", DEFAULT_TIMEOUT) + s.get("seconds", 0) for s in steps)
    try:
        await asyncio.wait_for(runner.disconnected, timeout=budget)
    except asyncio.TimeoutError:
        runner.result["error"] = f"timed out after {budget} s"
    print(json.dumps(runner.result))
    ok = (
        runner.result["connected"]
        and "error" not in runner.result
        and len(runner.result["steps"]) == len(steps)
        and all(s["ok"] for s in runner.result["steps"])
    )
    sys.exit(0 if ok else 1)


asyncio.run(main())
