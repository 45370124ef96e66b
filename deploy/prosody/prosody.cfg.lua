-- Prosody for deploy/compose.yaml: the XMPP server of example.org, with the pubsub service of
-- the juxta1 gateway attached as the external component pubsub.example.org (XEP-0114).
-- Users of example.org log in here (c2s, 5222) and discover pubsub.example.org as their
-- pubsub service; nodes and items are juxta's, shared by every gateway on the same Redis.
--
-- The component secret comes from the environment (JUXTA_COMPONENT_SECRET in compose.yaml);
-- juxta1 gets the same value as JUXTA_XMPP__COMPONENT__SECRET.
-- Check with: prosodyctl --config deploy/prosody/prosody.cfg.lua check config

admins = { }

modules_enabled = {
	"roster";
	"saslauth";
	"tls";
	"disco";
	"ping";
	"carbons";
	"smacks";
}
-- No federation in this demo stack.
modules_disabled = { "s2s" }

authentication = "internal_hashed"
storage = "internal"
data_path = "/var/lib/prosody"

-- Clients must use TLS. Certificates for example.org go into /etc/prosody/certs (see the
-- README's "Deploying" section for generating a self-signed one).
certificates = "/etc/prosody/certs"
c2s_require_encryption = true

log = { info = "*console" }

-- Components connect from other containers on the compose network, not only from localhost
-- (Prosody's default for component_interfaces).
component_ports = { 5347 }
component_interfaces = { "*" }

VirtualHost "example.org"

Component "pubsub.example.org"
	component_secret = ENV_JUXTA_COMPONENT_SECRET
