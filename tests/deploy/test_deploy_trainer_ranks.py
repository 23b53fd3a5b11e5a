"""deploy/k8s-multirank: the multi-rank trainer overlay references only what exists and lines up.

The overlay swaps the one-process trainer Deployment for a StatefulSet whose pods run torchrun
(one rank per pod) around ``headwater train``; these checks read the YAML (no cluster needed).
"""

import re
from pathlib import Path

import yaml

from headwater.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s-multirank"
BASE = ROOT / "deploy" / "k8s"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization():
    return _docs(OVERLAY / "kustomization.yaml")[0]


def _overlay_resources():
    return [d for name in _kustomization()["resources"] if name.endswith(".yaml")
            for d in _docs(OVERLAY / name)]


def _sts():
    (sts,) = [d for d in _overlay_resources() if d["kind"] == "StatefulSet"]
    return sts


def _container():
    (c,) = _sts()["spec"]["template"]["spec"]["containers"]
    return c


def _torchrun():
    """torchrun's parsed command line, with ``$(VAR)`` expanded to 0 as Kubernetes would for pod 0."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args([re.sub(r"\$\(\w+\)", "0", a) for a in _container()["args"]])


def _flags(argv):
    return {argv[i]: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}


def test_the_overlay_builds_on_the_base_and_removes_the_one_process_trainer():
    k = _kustomization()
    assert "../k8s" in k["resources"]
    for name in k["resources"]:
        assert (OVERLAY / name).exists(), name
    deleted = set()
    base_names = {(d["kind"], d["metadata"]["name"]) for p in BASE.glob("*.yaml") for d in _docs(p)
                  if "metadata" in d}
    for p in k["patches"]:
        doc = yaml.safe_load(p["patch"])
        assert (doc["kind"], doc["metadata"]["name"]) in base_names, doc["metadata"]
        if doc.get("$patch") == "delete":
            deleted.add((doc["kind"], doc["metadata"]["name"]))
    assert deleted == {("Deployment", "trainer"), ("PersistentVolumeClaim", "trainer-checkpoints")}


def test_torchrun_runs_one_rank_per_pod_with_the_pod_index_as_node_rank():
    sts, c = _sts(), _container()
    assert c["command"] == ["torchrun"]
    tr = _torchrun()
    assert int(tr.nnodes) == sts["spec"]["replicas"] and int(tr.nproc_per_node) == 1
    assert tr.no_python and tr.training_script == "headwater"
    assert int(tr.node_rank) == 0
    (node_rank,) = [a for a in c["args"] if a.startswith("--node-rank=")]
    (var,) = re.fullmatch(r"--node-rank=\$\((\w+)\)", node_rank).groups()
    env = {e["name"]: e for e in c["env"]}
    assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    # Every variable the container sets is consumed by torchrun's command line.
    assert set(env) == set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    # The rendezvous is pod 0 of the headless service, on a port the pod and the service open.
    ns, svc_name = sts["metadata"]["namespace"], sts["spec"]["serviceName"]
    assert tr.master_addr == f"{sts['metadata']['name']}-0.{svc_name}.{ns}.svc.cluster.local"
    (svc,) = [d for d in _overlay_resources() if d["kind"] == "Service" and d["metadata"]["name"] == svc_name]
    assert svc["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(tr.master_port) == ports["rendezvous"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert sts["spec"]["selector"]["matchLabels"].items() <= svc["spec"]["selector"].items()


def test_the_ranks_run_headwater_train_with_exact_flags_in_the_trainers_group():
    tr = _torchrun()
    argv = [tr.training_script_args[0], *tr.training_script_args[1:]]
    args = build_parser().parse_args(argv)  # unknown command or flag: SystemExit
    assert argv[0] == "train" and callable(args.handler)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    known = {s for a in sub._actions for s in a.option_strings}
    assert {a for a in argv if a.startswith("--")} <= known
    assert "--nproc" not in argv  # torchrun launches the ranks; train must not spawn more
    flags = _flags(argv)
    assert flags["--group-id"] == "hw-trainer"
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(flags["--metrics-port"]) == ports["metrics"]
    for kind in ("readinessProbe", "livenessProbe"):
        assert c[kind]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert c["envFrom"] == [{"configMapRef": {"name": "headwater"}}]  # HW_BOOTSTRAP_SERVERS


def test_checkpoints_live_on_one_volume_every_rank_shares():
    c, spec = _container(), _sts()["spec"]["template"]["spec"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == _flags(c["args"])["--checkpoint-dir"])
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = vol["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in _overlay_resources() if d["kind"] == "PersistentVolumeClaim"
              and d["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_dashboards_trainer_source_now_scrapes_rank_0():
    patches = [yaml.safe_load(p["patch"]) for p in _kustomization()["patches"]]
    (svc,) = [d for d in patches if d["kind"] == "Service"]
    assert svc["metadata"]["name"] == "trainer-metrics"
    sel = svc["spec"]["selector"]
    assert sel.pop("$patch") == "replace"
    assert sel == {"statefulset.kubernetes.io/pod-name": f"{_sts()['metadata']['name']}-0"}
    dash = "\n".join(p.read_text() for p in BASE.glob("dashboard.yaml"))
    assert "trainer=trainer-metrics:9100" in dash
