"""deploy/k8s-sharded: the base manifests with a parameter-server shard fleet and recommender
replicas. Commands and flags exist, and the shard count N agrees everywhere it is written (trainer
layout, StatefulSet replicas, shard env, the recommender's --ps list)."""

from pathlib import Path

import yaml

from headwater.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s-sharded"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization():
    return _docs(OVERLAY / "kustomization.yaml")[0]


def _resources():
    return [d for name in _kustomization()["resources"] if name.endswith(".yaml") for d in _docs(OVERLAY / name)]


def _base():
    return [d for p in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in _docs(p)]


def _patches():
    return [yaml.safe_load(p["patch"]) for p in _kustomization()["patches"]]


def _one(docs, kind, name):
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def _container(workload):
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def _flags(argv):
    return {argv[i]: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}


def _dests(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices[command]._actions}, {s for a in sub.choices[command]._actions
                                                             for s in a.option_strings}


def test_the_overlay_builds_on_the_base_and_its_files_parse():
    k = _kustomization()
    assert k["resources"][0] == "../k8s"
    assert {p.name for p in OVERLAY.glob("*.yaml")} == {"kustomization.yaml", *k["resources"][1:]}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _resources()}
    assert kinds == {("StatefulSet", "ps"), ("Service", "ps-shards"), ("Deployment", "recommender")}


def test_every_container_runs_an_existing_command_with_exact_flags():
    for w in (d for d in _resources() if d["kind"] in ("Deployment", "StatefulSet")):
        c = _container(w)
        args = build_parser().parse_args(c["args"])
        assert callable(args.handler)
        dests, known = _dests(c["args"][0])
        assert {a for a in c["args"] if a.startswith("--")} <= known, w["metadata"]["name"]
        for e in c.get("env", []):
            assert e["name"].startswith("HW_") and e["name"][3:].lower() in dests, e


def test_the_shard_count_agrees_everywhere():
    docs = _resources()
    ps, rec = _one(docs, "StatefulSet", "ps"), _one(docs, "Deployment", "recommender")
    n = ps["spec"]["replicas"]
    assert n >= 2
    env = {e["name"]: e for e in _container(ps)["env"]}
    assert int(env["HW_NUM_SHARDS"]["value"]) == n
    # The shard index is the StatefulSet ordinal.
    assert env["HW_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    (cm,) = [p for p in _patches() if p["kind"] == "ConfigMap"]
    assert int(cm["data"]["HW_NUM_PARAM_SHARDS"]) == n  # the trainer's publish layout
    assert "num_param_shards" in _dests("train")[0]
    ps_args, rec_args = _flags(_container(ps)["args"]), _flags(_container(rec)["args"])
    assert ps_args["--role"] == "ps" and rec_args["--role"] == "recommender"
    headless = _one(docs, "Service", ps["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= ps["spec"]["template"]["metadata"]["labels"].items()
    port = int(ps_args["--port"])
    # Shard order: address i is pod ps-i, which holds shard i.
    assert rec_args["--ps"].split(",") == [f"ps-{i}.{headless['metadata']['name']}:{port}" for i in range(n)]
    claim = ps["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mount = next(m["mountPath"] for m in _container(ps)["volumeMounts"] if m["name"] == claim)
    assert ps_args["--state-dir"] == mount


def test_probes_ask_each_role_for_its_own_grpc_service_on_its_port():
    from serving.pb import SERVICE_NAME
    from serving.ps_service import PS_SERVICE_NAME

    docs = _resources()
    for name, kind, service in (("ps", "StatefulSet", PS_SERVICE_NAME), ("recommender", "Deployment", SERVICE_NAME)):
        c = _container(_one(docs, kind, name))
        probe = c["readinessProbe"]["grpc"]
        assert probe["service"] == service and probe["port"] == int(_flags(c["args"])["--port"])
        assert {p["containerPort"] for p in c["ports"]} == {int(_flags(c["args"])[f]) for f in ("--port", "--metrics-port")}


def test_the_unsharded_serving_goes_and_its_services_select_the_recommender():
    base, docs = _base(), _resources()
    rec = _one(docs, "Deployment", "recommender")
    labels = rec["spec"]["template"]["metadata"]["labels"]
    rec_ports = {p["name"] for p in _container(rec)["ports"]}
    deleted = [p for p in _patches() if p.get("$patch") == "delete"]
    assert [(p["kind"], p["metadata"]["name"]) for p in deleted] == [("StatefulSet", "serving")]
    _one(base, "StatefulSet", "serving")  # the delete targets something that exists
    repointed = [p for p in _patches() if p["kind"] == "Service"]
    assert {p["metadata"]["name"] for p in repointed} == {"serving", "serving-ps"}
    for p in repointed:
        svc = _one(base, "Service", p["metadata"]["name"])
        assert p["spec"]["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in svc["spec"]["ports"]} <= rec_ports
