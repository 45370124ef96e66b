"""Logs in to juxta with slixmpp, an XMPP client library we did not write.

Usage: slixmpp_login.py HOST PORT JID PASSWORD CA_FILE

Connects with STARTTLS (verifying the server certificate against CA_FILE), authenticates
with the best SASL mechanism both sides offer, pings the server (XEP-0199), asks for its
disco#info (XEP-0030), and prints one JSON object with what happened. Exits 0 only if all of
that worked.
"""

import asyncio
import json
import ssl
import sys

import slixmpp


class Probe(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca_file):
        super().__init__(jid, password)
        self.result = {"connected": False}
        self.ssl_context = ssl.create_default_context(cafile=ca_file)
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199")
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("failed_auth", self.on_failed_auth)
        self.add_event_handler("auth_success", self.on_auth_success)

    def on_auth_success(self, _event):
        self.result["mechanism"] = str(self.plugin["feature_mechanisms"].mech.name)

    def on_failed_auth(self, _event):
        self.result["error"] = "authentication failed"
        self.disconnect()

    async def on_start(self, _event):
        self.result["connected"] = True
        self.result["jid"] = str(self.boundjid)
        try:
            rtt = await self.plugin["xep_0199"].ping(jid=self.boundjid.domain, timeout=10)
            self.result["ping"] = rtt is not None
            info = await self.plugin["xep_0030"].get_info(jid=self.boundjid.domain, timeout=10)
            self.result["features"] = sorted(info["disco_info"]["features"])
        except Exception as e:  # any IqError/IqTimeout ends the probe with a reason
            self.result["error"] = repr(e)
        self.disconnect()


async def main():
    host, port, jid, password, ca_file = sys.argv[1:6]
    probe = Probe(jid, password, ca_file)
    probe.connect(host=host, port=int(port))
    try:
        await asyncio.wait_for(probe.disconnected, timeout=30)
    except asyncio.TimeoutError:
        probe.result["error"] = "timed out"
    print(json.dumps(probe.result))
    ok = probe.result.get("connected") and probe.result.get("ping") and "error" not in probe.result
    sys.exit(0 if ok else 1)


asyncio.run(main())
