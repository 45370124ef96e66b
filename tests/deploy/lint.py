"""Checks of deploy/ that no off-the-shelf validator makes: YAML without duplicate keys, the
files agreeing with each other (ports, probes, selectors, secrets), and every metric an alert
or a dashboard panel uses being one juxta exports. Used by tests/deploy/check.sh:

    python3 tests/deploy/lint.py yaml FILE...
    python3 tests/deploy/lint.py dashboard deploy/grafana/juxta-dashboard.json
    python3 tests/deploy/lint.py metrics [--exported METRICS_TEXT]
    python3 tests/deploy/lint.py k8s RENDERED_YAML
    python3 tests/deploy/lint.py compose RENDERED_YAML
    python3 tests/deploy/lint.py compose-env RENDERED_YAML SERVICE   (prints SERVICE's environment)
    python3 tests/deploy/lint.py dockerfile
    python3 tests/deploy/lint.py healthcheck PORT   (prints the HEALTHCHECK command, one
                                                     argument a line, aimed at PORT)
    python3 tests/deploy/lint.py compose-healthcheck RENDERED_YAML SERVICE PORT
    python3 tests/deploy/lint.py get URL [FILE]     (waits up to 10 s for a 200, saves the body)

Each prints what it checked and exits 1 with the problems when there are any.
"""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The ports every deployment file must agree on (deploy/container.toml, Dockerfile, compose,
# Kubernetes).
HTTP_PORT, XMPP_PORT, P2P_PORT = 8080, 5222, 4001

problems = []


def problem(msg):
    problems.append(msg)


def finish(what):
    if problems:
        for p in problems:
            print(f"    {p}")
        sys.exit(1)
    print(what)


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys, which PyYAML (and most YAML
    consumers) would silently resolve to the last one."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]


def cmd_yaml(files):
    for f in files:
        try:
            docs = load_all(f)
        except yaml.YAMLError as e:
            problem(f"{f}: {e}")
            continue
        if not docs:
            problem(f"{f}: empty")
    finish(f"{len(files)} YAML files parse, no duplicate keys")


# ---------------------------------------------------------------------------------------------
# Metrics

METRIC = re.compile(r"\bjuxta_[a-z0-9_]+")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")


def base_name(name):
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def used_metrics():
    """Metric names used by the alert rules and the dashboard: {name: [where, ...]}."""
    used = {}
    for group in load_all(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"]:
        for rule in group["rules"]:
            for m in METRIC.findall(rule["expr"]):
                used.setdefault(m, []).append(f"alert {rule['alert']}")
    dash = json.loads((DEPLOY / "grafana" / "juxta-dashboard.json").read_text())
    for panel in all_panels(dash):
        for t in panel.get("targets", []):
            for m in METRIC.findall(t.get("expr", "")):
                used.setdefault(m, []).append(f"panel {panel.get('title')!r}")
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        for m in METRIC.findall(q):
            used.setdefault(m, []).append(f"variable {var.get('name')}")
    return used


def source_metrics():
    """Metric names registered in the Rust sources: string constants named juxta_*."""
    names = set()
    for crate in ("core", "gateway", "bridge-xmpp", "bridge-p2p"):
        for f in (ROOT / crate / "src").rglob("*.rs"):
            names.update(re.findall(r'"(juxta_[a-z0-9_]+)"', f.read_text(encoding="utf-8")))
    return names


def exported_metrics(text):
    """Metric families in a Prometheus text exposition (from # TYPE lines and samples)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def cmd_metrics(args):
    used = used_metrics()
    known = source_metrics()
    exported = None
    if args[:1] == ["--exported"]:
        exported = exported_metrics(pathlib.Path(args[1]).read_text())
    # libp2p's own metrics register under the juxta_overlay prefix; without a live /metrics
    # their names cannot be checked against anything but that prefix.
    libp2p_wired = any(
        'sub_registry_with_prefix("juxta_overlay")' in f.read_text(encoding="utf-8")
        for f in (ROOT / "gateway" / "src").rglob("*.rs"))
    for name, where in sorted(used.items()):
        base = base_name(name)
        if exported is not None and (name in exported or base in exported):
            continue
        if base in known:
            continue
        if exported is None and libp2p_wired and name.startswith("juxta_overlay_libp2p_"):
            continue
        problem(f"{name} (used by {', '.join(sorted(set(where)))}) is not a metric juxta "
                "exports" + (" (not in the live /metrics)" if exported is not None else ""))
    how = "the live /metrics and the sources" if exported is not None else "the sources"
    finish(f"{len(used)} metric names used by alerts and dashboard all exist in {how}")


# ---------------------------------------------------------------------------------------------
# Grafana

def all_panels(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def cmd_dashboard(path):
    dash = json.loads(pathlib.Path(path).read_text())
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in dash:
            problem(f"dashboard has no {key!r}")
    ids = {}
    for p in all_panels(dash):
        if "id" not in p:
            problem(f"panel {p.get('title')!r} has no id")
        elif p["id"] in ids:
            problem(f"panel id {p['id']} used by {ids[p['id']]!r} and {p.get('title')!r}")
        else:
            ids[p["id"]] = p.get("title")
        if p.get("type") == "row":
            continue
        gp = p.get("gridPos", {})
        if not all(k in gp for k in ("h", "w", "x", "y")) or gp.get("x", 0) + gp.get("w", 0) > 24:
            problem(f"panel {p.get('title')!r}: gridPos must have h, w, x, y within 24 columns")
        if not p.get("targets"):
            problem(f"panel {p.get('title')!r} has no query")
        for t in p.get("targets", []):
            if not t.get("expr"):
                problem(f"panel {p.get('title')!r}: a target without expr")
            ds = t.get("datasource") or p.get("datasource")
            if not ds or ds.get("uid") != "${datasource}":
                problem(f"panel {p.get('title')!r}: queries must use the ${{datasource}} variable")
    variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    for v in ("datasource", "instance"):
        if v not in variables:
            problem(f"dashboard has no ${v} variable")
    finish(f"dashboard {dash.get('title')!r}: {len(ids)} panels, unique ids, every query on ${{datasource}}")


# ---------------------------------------------------------------------------------------------
# Kubernetes (the output of kubectl kustomize deploy/k8s)

def cmd_k8s(path):
    objs = load_all(path)
    by_kind = {}
    for o in objs:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in o:
                problem(f"an object without {key}: {str(o)[:80]}")
        by_kind.setdefault(o.get("kind"), []).append(o)
    for kind in ("Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "ServiceMonitor"):
        if len(by_kind.get(kind, [])) != 1:
            problem(f"expected one {kind}, found {len(by_kind.get(kind, []))}")
    if problems:
        finish("")
    dep = by_kind["Deployment"][0]
    svc = by_kind["Service"][0]
    cm = by_kind["ConfigMap"][0]
    secret = by_kind["Secret"][0]
    pdb = by_kind["PodDisruptionBudget"][0]
    hpa = by_kind["HorizontalPodAutoscaler"][0]
    sm = by_kind["ServiceMonitor"][0]

    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]

    def selects(selector, labels, what):
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problem(f"{what} selector {selector} does not select the pods ({pod_labels})")

    selects(spec["selector"]["matchLabels"], pod_labels, "Deployment")
    selects(svc["spec"]["selector"], pod_labels, "Service")
    selects(pdb["spec"]["selector"]["matchLabels"], pod_labels, "PodDisruptionBudget")
    selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"].get("labels", {}),
            "ServiceMonitor (of the Service's labels)")
    if spec.get("replicas") != 3:
        problem(f"Deployment replicas is {spec.get('replicas')}, expected 3")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
        problem(f"HPA scales {ref}, not the Deployment")
    if hpa["apiVersion"] != "autoscaling/v2":
        problem(f"HPA apiVersion {hpa['apiVersion']}")
    if hpa["spec"].get("minReplicas", 1) <= pdb["spec"].get("minAvailable", 0):
        problem("HPA minReplicas must exceed the PDB's minAvailable, or no node can drain")
    if pod.get("enableServiceLinks") is not False:
        problem("enableServiceLinks must be false: Kubernetes would inject JUXTA_SERVICE_HOST "
                "and friends, which juxta reads as unknown configuration keys")

    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
        problem("pod securityContext must set runAsNonRoot and a non-zero runAsUser")
    (c,) = pod["containers"]
    csc = c.get("securityContext", {})
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False:
        problem("container securityContext must be readOnlyRootFilesystem, no privilege escalation")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        problem("container must drop ALL capabilities")
    if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
        problem("container needs resource requests and limits")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if ports != {"http": HTTP_PORT, "xmpp": XMPP_PORT, "p2p": P2P_PORT}:
        problem(f"container ports {ports}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("http", HTTP_PORT):
            problem(f"{probe} must GET {path} on the http port, is {get}")
    for p in svc["spec"]["ports"]:
        if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
            problem(f"Service port {p} targets no container port")
    if not any(e.get("port") == "http" and e.get("path") == "/metrics"
               for e in sm["spec"]["endpoints"]):
        problem("ServiceMonitor must scrape /metrics on the http port")

    # Volumes: config from the generated ConfigMap, writable data and /tmp.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    for path_, name in (("/etc/juxta", "config"), ("/var/lib/juxta", "data"), ("/tmp", "tmp")):
        if mounts.get(path_) != name or name not in vols:
            problem(f"{path_} must be mounted from volume {name}")
    if vols.get("config", {}).get("configMap", {}).get("name") != cm["metadata"]["name"]:
        problem("the config volume does not use the generated ConfigMap")
    if "juxta.toml" not in cm.get("data", {}):
        problem("the ConfigMap has no juxta.toml")
    else:
        toml = cm["data"]["juxta.toml"]
        if f'listen = "0.0.0.0:{HTTP_PORT}"' not in toml:
            problem(f"juxta.toml in the ConfigMap must listen on 0.0.0.0:{HTTP_PORT}")
        if 'backend = "redis"' not in toml:
            problem("juxta.toml in the ConfigMap must use the redis backend")
    env = {e["name"]: e for e in c.get("env", [])}
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and (ref["name"] != secret["metadata"]["name"] or ref["key"] not in keys):
            problem(f"env {e['name']} refers to a missing secret key {ref}")
    for name in ("JUXTA_ADMIN_KEY", "JUXTA_AUTH__JWT_SECRET", "JUXTA_STORE__URL"):
        if name not in env:
            problem(f"the container gets no {name}")
    for k, v in secret.get("stringData", {}).items():
        if "REPLACE" not in v and k != "redis-url":
            problem(f"Secret value {k} must be an obvious placeholder (contain REPLACE)")
    finish(f"{len(objs)} objects agree: selectors, ports, probes, secrets, ConfigMap, HPA, PDB")


# ---------------------------------------------------------------------------------------------
# Compose (the output of docker compose config)

def cmd_compose(path):
    (doc,) = load_all(path)
    services = doc.get("services", {})
    gateways = sorted(s for s in services if re.fullmatch(r"juxta\d+", s))
    if gateways != ["juxta1", "juxta2", "juxta3"]:
        problem(f"expected gateways juxta1..3, found {gateways}")
    redis = services.get("redis", {})
    cmd = redis.get("command") or []
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    for flag, value in (("--appendonly", "yes"), ("--appendfsync", "always")):
        if flag not in cmd or cmd[cmd.index(flag) + 1] != value:
            problem(f"redis must run with {flag} {value}")
    if not redis.get("volumes"):
        problem("redis needs a volume for its AOF")
    if not redis.get("healthcheck"):
        problem("redis needs a healthcheck")
    component_gateways = []
    for g in gateways:
        s = services[g]
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        if env.get("JUXTA_STORE__BACKEND") != "redis":
            problem(f"{g}: JUXTA_STORE__BACKEND must be redis")
        if not str(env.get("JUXTA_STORE__URL", "")).startswith("redis://redis:"):
            problem(f"{g}: JUXTA_STORE__URL must point at the redis service")
        if len(str(env.get("JUXTA_ADMIN_KEY", ""))) < 16:
            problem(f"{g}: needs JUXTA_ADMIN_KEY (at least 16 characters)")
        if "JUXTA_XMPP__COMPONENT__SERVER" in env:
            component_gateways.append(g)
            for k in ("JUXTA_XMPP__COMPONENT__JID", "JUXTA_XMPP__COMPONENT__SECRET"):
                if not env.get(k):
                    problem(f"{g}: {k} missing")
        dep = s.get("depends_on", {})
        if (dep.get("redis") or {}).get("condition") != "service_healthy":
            problem(f"{g}: must depend on redis with condition service_healthy")
        if not s.get("healthcheck"):
            problem(f"{g}: needs a healthcheck")
        targets = {str(p.get("target")) if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0]
                   for p in s.get("ports", [])}
        for port in (HTTP_PORT, XMPP_PORT, P2P_PORT):
            if str(port) not in targets:
                problem(f"{g}: container port {port} is not published")
    if len(component_gateways) != 1:
        problem(f"exactly one gateway should be the XMPP component, found {component_gateways}")
    prosody = services.get("prosody")
    if not prosody:
        problem("no prosody service")
    else:
        cfg = (DEPLOY / "prosody" / "prosody.cfg.lua").read_text()
        mounts = [str(v.get("source") if isinstance(v, dict) else v.split(":")[0])
                  for v in prosody.get("volumes", [])]
        if not any(m.endswith("prosody.cfg.lua") for m in mounts):
            problem("prosody does not mount deploy/prosody/prosody.cfg.lua")
        if component_gateways:
            env = services[component_gateways[0]]["environment"]
            jid = env.get("JUXTA_XMPP__COMPONENT__JID")
            host, _, port = str(env.get("JUXTA_XMPP__COMPONENT__SERVER", "")).rpartition(":")
            if f'Component "{jid}"' not in cfg:
                problem(f"prosody.cfg.lua declares no Component \"{jid}\"")
            if not re.search(r"component_ports\s*=\s*\{\s*" + re.escape(port) + r"\s*\}", cfg):
                problem(f"prosody.cfg.lua: component_ports must be {{ {port} }}")
            if host != "prosody":
                problem(f"the component server must be the prosody service, is {host}")
            psecret = (prosody.get("environment") or {}).get("JUXTA_COMPONENT_SECRET")
            if psecret != env.get("JUXTA_XMPP__COMPONENT__SECRET"):
                problem("prosody's JUXTA_COMPONENT_SECRET differs from the component secret")
            if "ENV_JUXTA_COMPONENT_SECRET" not in cfg:
                problem("prosody.cfg.lua must read the secret from ENV_JUXTA_COMPONENT_SECRET")
    # Bind mounts must exist (compose would create empty directories in their place).
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = v.get("source") if isinstance(v, dict) else v.split(":")[0]
            typ = v.get("type") if isinstance(v, dict) else ("bind" if "/" in src else "volume")
            if typ == "bind" and not pathlib.Path(src).exists():
                problem(f"{name}: bind mount {src} does not exist")
    prom = services.get("prometheus")
    if prom:
        scrape = load_all(DEPLOY / "prometheus" / "prometheus.yml")[0]
        targets = {t for job in scrape["scrape_configs"] if job["job_name"] == "juxta"
                   for sc in job["static_configs"] for t in sc["targets"]}
        want = {f"{g}:{HTTP_PORT}" for g in gateways}
        if targets != want:
            problem(f"prometheus.yml scrapes {sorted(targets)}, the gateways are {sorted(want)}")
    finish(f"{len(services)} services agree: 3 gateways on one durable Redis, Prosody with the component, scrape targets")


def cmd_compose_env(path, service):
    (doc,) = load_all(path)
    env = doc["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    for k, v in env.items():
        print(f"{k}={'' if v is None else v}")


# ---------------------------------------------------------------------------------------------
# Dockerfile (no daemon here to build it: check what a reader would)

def cmd_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "")
             for l in lines if l.strip() and not l.lstrip().startswith("#")]
    froms = [i for i, (k, _) in enumerate(instr) if k == "FROM"]
    if len(froms) < 2:
        problem("the Dockerfile must be multi-stage (a build stage and a runtime stage)")
    final = instr[froms[-1]:] if froms else instr
    kinds = {}
    for k, v in final:
        kinds.setdefault(k, []).append(v)
    user = (kinds.get("USER") or ["root"])[-1].split(":")[0]
    if user in ("root", "0"):
        problem("the runtime stage must run as a non-root USER")
    exposed = {p.split("/")[0] for v in kinds.get("EXPOSE", []) for p in v.split()}
    if exposed != {str(HTTP_PORT), str(XMPP_PORT), str(P2P_PORT)}:
        problem(f"EXPOSE {sorted(exposed)}, expected {HTTP_PORT} {XMPP_PORT} {P2P_PORT}")
    if not any("/var/lib/juxta" in v for v in kinds.get("VOLUME", [])):
        problem("VOLUME /var/lib/juxta missing")
    if not any("juxta" in v for v in kinds.get("ENTRYPOINT", [])) or \
            not any("serve" in v for v in kinds.get("CMD", []) + kinds.get("ENTRYPOINT", [])):
        problem("the image must run `juxta serve`")
    hc = " ".join(kinds.get("HEALTHCHECK", []))
    if "/healthz" not in hc or f"/{HTTP_PORT}" not in hc:
        problem(f"HEALTHCHECK must ask /healthz on port {HTTP_PORT}")
    for k, v in final:
        if k == "COPY" and "--from=" not in v:
            src = v.split()[0]
            if not (ROOT / src).exists():
                problem(f"COPY {src}: no such file in the build context")
    container = (DEPLOY / "container.toml").read_text()
    if f'listen = "0.0.0.0:{HTTP_PORT}"' not in container:
        problem(f"deploy/container.toml must listen on 0.0.0.0:{HTTP_PORT} (the HEALTHCHECK port)")
    ignore = (ROOT / ".dockerignore").read_text().split()
    for must in (".git", "**/target", "**/node_modules"):
        if must not in ignore:
            problem(f".dockerignore must exclude {must}")
    finish("Dockerfile: multi-stage, non-root, ports, volume, entrypoint, healthcheck, .dockerignore")


def healthcheck_args():
    """The exec form of the Dockerfile's HEALTHCHECK CMD [...]."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    for line in text.splitlines():
        m = re.match(r"HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", line)
        if m:
            return json.loads(m.group(1))
    return None


def cmd_healthcheck(port):
    args = healthcheck_args()
    if not args:
        sys.exit("deploy/Dockerfile has no HEALTHCHECK CMD [...] (exec form)")
    for a in args:
        print(a.replace(f"/{HTTP_PORT}", f"/{port}"))


def cmd_compose_healthcheck(path, service, port):
    """A compose service's CMD healthcheck, as the container would run it, aimed at PORT."""
    (doc,) = load_all(path)
    test = doc["services"][service]["healthcheck"]["test"]
    if isinstance(test, str) or test[0] != "CMD":
        sys.exit(f"{service}: the healthcheck must be a CMD list")
    for a in test[1:]:
        print(a.replace("$$", "$").replace(f"/{HTTP_PORT}", f"/{port}"))


def cmd_get(url, out=None):
    import time
    import urllib.request
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read()
            break
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"GET {url}: {e}")
            time.sleep(0.1)
    if out:
        pathlib.Path(out).write_bytes(body)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "yaml":
        cmd_yaml(args)
    elif cmd == "dashboard":
        cmd_dashboard(args[0])
    elif cmd == "metrics":
        cmd_metrics(args)
    elif cmd == "k8s":
        cmd_k8s(args[0])
    elif cmd == "compose":
        cmd_compose(args[0])
    elif cmd == "compose-env":
        cmd_compose_env(args[0], args[1])
    elif cmd == "dockerfile":
        cmd_dockerfile()
    elif cmd == "healthcheck":
        cmd_healthcheck(args[0])
    elif cmd == "compose-healthcheck":
        cmd_compose_healthcheck(*args)
    elif cmd == "get":
        cmd_get(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
