"""deploy/ parses, and references only commands, flags, env vars, ports, topics, metrics and
images that exist: the compose file, the Kubernetes manifests, the Dockerfile, Prometheus, Grafana."""

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from headwater.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"headwater:{PYPROJECT['project']['version']}"
OFFICIAL = {"apache/kafka", "prom/prometheus", "grafana/grafana", "python"}
PORT_FLAGS = ("--port", "--metrics-port")


def _yaml(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose():
    return _yaml(DEPLOY / "compose.yaml")[0]


def _k8s():
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _yaml(p)]


def _workloads():
    return [d for d in _k8s() if d["kind"] in ("Deployment", "StatefulSet")]


def _configmap_env():
    return {k: v for d in _k8s() if d["kind"] == "ConfigMap" for k, v in d["data"].items()}


def _subparser(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


def _flag_values(argv):
    return {argv[i]: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}


def invocations():
    """(where, argv, env) of every container that runs the headwater image."""
    out = []
    for name, svc in _compose()["services"].items():
        if svc.get("image") == IMAGE:
            out.append((f"compose:{name}", [str(a) for a in svc["command"]], dict(svc.get("environment", {}))))
    for d in _workloads():
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["image"] == IMAGE:
                env = _configmap_env() if c.get("envFrom") else {}
                env.update({e["name"]: e.get("value") for e in c.get("env", [])})
                out.append((f"k8s:{d['metadata']['name']}", [str(a) for a in c["args"]], env))
    return out


def test_every_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"compose.yaml", "Dockerfile", "prometheus.yml", "headwater.json"}
    for p in files:
        if p.suffix in (".yaml", ".yml"):
            assert _yaml(p), p
        elif p.suffix == ".json":
            assert json.loads(p.read_text())["panels"], p
    kinds = {d["kind"] for d in _k8s()}
    assert kinds >= {"ConfigMap", "Deployment", "StatefulSet", "Service", "Namespace"}
    listed = _yaml(DEPLOY / "k8s" / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("where,argv,env", invocations(), ids=[i[0] for i in invocations()])
def test_commands_and_flags_exist_exactly(where, argv, env):
    args = build_parser().parse_args(argv)  # unknown command or flag: SystemExit
    assert callable(args.handler)
    known = {s for a in _subparser(argv[0])._actions for s in a.option_strings}
    # Exact names only: argparse would also accept an abbreviation.
    assert {a for a in argv if a.startswith("--")} <= known, where


@pytest.mark.parametrize("where,argv,env", invocations(), ids=[i[0] for i in invocations()])
def test_env_vars_are_config_fields_of_the_command_or_read_by_the_code(where, argv, env):
    dests = {a.dest for a in _subparser(argv[0])._actions}
    code = "\n".join(p.read_text() for p in (ROOT / "headwater").rglob("*.py"))
    for var in env:
        assert var.startswith("HW_"), var
        # headwater.config.load_config reads HW_<FIELD> for every field of a loaded config.
        assert var[3:].lower() in dests or f'"{var}"' in code, (where, var)


def test_the_workloads_that_need_kafka_get_the_bootstrap_servers_from_config():
    assert _configmap_env()["HW_BOOTSTRAP_SERVERS"]
    for where, argv, env in invocations():
        if "bootstrap_servers" in {a.dest for a in _subparser(argv[0])._actions}:
            assert env.get("HW_BOOTSTRAP_SERVERS"), where
            assert "--bootstrap-servers" not in argv, where  # one place to change it


def test_images_are_ours_or_official_and_pinned():
    images = [s["image"] for s in _compose()["services"].values()]
    images += [c["image"] for d in _workloads() for c in d["spec"]["template"]["spec"]["containers"]]
    base = re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert base and IMAGE in images
    for image in images + base:
        repo, _, tag = image.partition(":")
        assert image == IMAGE or repo in OFFICIAL, image
        assert tag and tag != "latest", image


def test_the_dockerfile_installs_every_package_and_runs_the_console_script():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(\w+)\s", text, re.M))
    assert set(PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]) <= copied
    assert 'ENTRYPOINT ["headwater"]' in text and "headwater" in PYPROJECT["project"]["scripts"]
    assert "torch==2.13.0" in text  # the CPU build, as scripts/setup.sh pins it
    # The context is the repository root: the ignore file lets through exactly what is copied.
    allowed = {l[1:].strip("/") for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if l.startswith("!")}
    sources = {w for line in re.findall(r"^COPY\s+(.+)$", text, re.M) for w in line.split()[:-1]}
    assert sources == allowed
    build = _compose()["services"]["serving"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


def test_compose_ports_sources_and_scrape_targets_are_the_ports_the_commands_open():
    services = _compose()["services"]
    opened = {}  # service -> {flag: port}
    for name, svc in services.items():
        if svc.get("image") == IMAGE:
            flags = _flag_values([str(a) for a in svc["command"]])
            opened[name] = {f: int(flags[f]) for f in PORT_FLAGS if f in flags}
            for mapping in svc.get("ports", []):
                host_ip, _, container = str(mapping).rpartition(":")
                assert host_ip.startswith("127.0.0.1:"), mapping  # published on loopback only
                assert int(container) in opened[name].values(), (name, mapping)
    metrics = {f"{n}:{p['--metrics-port']}" for n, p in opened.items() if "--metrics-port" in p}
    # The LLM HTTP server (`headwater llm serve`) serves /metrics on its own --port.
    metrics |= {f"{n}:{opened[n]['--port']}" for n, svc in services.items()
                if svc.get("image") == IMAGE and [str(a) for a in svc["command"][:2]] == ["llm", "serve"]}
    prom = _yaml(DEPLOY / "prometheus.yml")[0]
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == metrics
    sources = _flag_values([str(a) for a in services["dashboard"]["command"]])["--sources"]
    assert {s.split("=", 1)[1] for s in sources.split(",")} == metrics


def test_compose_creates_exactly_the_topic_set_of_the_code():
    from streams.kafka_io import topic_names

    script = "\n".join(_compose()["services"]["topics"]["command"])
    prefix = _compose()["x-headwater"]["environment"]["HW_TOPIC_PREFIX"]
    assert set(re.findall(r"\bhw\.[a-z]+", script)) == set(topic_names(prefix).all())


def _pods_by_service():
    """Service -> the container ports (name -> number) of the workloads its selector picks."""
    out = {}
    for svc in (d for d in _k8s() if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        ports = {}
        for w in _workloads():
            labels = w["spec"]["template"]["metadata"]["labels"]
            if all(labels.get(k) == v for k, v in sel.items()):
                for c in w["spec"]["template"]["spec"]["containers"]:
                    ports.update({p["name"]: p["containerPort"] for p in c["ports"]})
        assert ports, f"service {svc['metadata']['name']} selects no pod"
        out[svc["metadata"]["name"]] = (svc, ports)
    return out


def test_k8s_container_ports_probes_and_services_line_up_with_the_commands():
    for w in _workloads():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        for c in w["spec"]["template"]["spec"]["containers"]:
            flags = _flag_values(c["args"])
            opened = {int(flags[f]) for f in PORT_FLAGS if f in flags}
            declared = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert set(declared.values()) == opened, w["metadata"]["name"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                (how, spec), = ((k, v) for k, v in probe.items() if k in ("grpc", "httpGet", "tcpSocket"))
                port = declared.get(spec["port"], spec["port"])
                assert port in opened, (w["metadata"]["name"], kind)
                if how == "grpc":  # only `serve` runs the gRPC health service, on --port
                    assert c["args"][0] == "serve" and port == int(flags["--port"])
                    from serving.pb import SERVICE_NAME
                    assert spec.get("service", SERVICE_NAME) in ("", SERVICE_NAME)
                if how == "httpGet":
                    if port == int(flags.get("--metrics-port", -1)):
                        assert spec["path"] == "/metrics"
                    else:
                        assert c["args"][0] == "dashboard" and spec["path"] in _dashboard_paths()
    for name, (svc, ports) in _pods_by_service().items():
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports or p["targetPort"] in ports.values(), (name, p)


def _dashboard_paths():
    from serving.dashboard import MetricsScraper, create_app

    return set(create_app(MetricsScraper({})).openapi()["paths"])


def test_k8s_roles_are_deployments_in_groups_and_serving_is_a_stateful_set_with_a_volume():
    kinds = {w["metadata"]["name"]: w for w in _workloads()}
    for role, group in (("joiner", "hw-joiner"), ("trainer", "hw-trainer")):
        assert kinds[role]["kind"] == "Deployment"
        assert _flag_values(kinds[role]["spec"]["template"]["spec"]["containers"][0]["args"])["--group-id"] == group
    ps = kinds["serving"]
    assert ps["kind"] == "StatefulSet"
    claim = ps["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    c = ps["spec"]["template"]["spec"]["containers"][0]
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == claim)
    assert _flag_values(c["args"])["--state-dir"] == mount  # RocksDB lives on the claim
    services = _pods_by_service()
    assert services[ps["spec"]["serviceName"]][0]["spec"]["clusterIP"] == "None"
    sources = _flag_values(kinds["dashboard"]["spec"]["template"]["spec"]["containers"][0]["args"])["--sources"]
    for src in sources.split(","):
        host, port = src.split("=", 1)[1].split(":")
        svc, _ = services[host]
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, src


def _metric_names():
    import serving.metrics  # noqa: F401
    import streams.metrics  # noqa: F401
    import training.evaluation  # noqa: F401
    import training.sync  # noqa: F401
    import training.trainer  # noqa: F401
    from prometheus_client import REGISTRY

    return set(REGISTRY._names_to_collectors)  # every exported sample name, suffixes included


def test_prometheus_queries_name_only_metrics_the_code_exports():
    names = _metric_names()
    dash = json.loads((DEPLOY / "grafana" / "headwater.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bhw_[a-z0-9_]+", e)}
    assert len(used) >= 10
    assert used <= names, used - names
    uids = {d["uid"] for d in _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0]["datasources"]}
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} <= uids
