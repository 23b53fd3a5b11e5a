"""Saving an :class:`~serving.ann_index.AnnIndex` to a directory and loading it back, so that a
restart does not re-index the catalog from scratch.

A saved index is a directory of ``ids.npy`` and ``vectors.npy`` (the vector store), the graph
(``graph.usearch``, the HNSW graph in usearch's format, or ``graph.faiss``, the ``ivf_sq8`` lists
in faiss's; absent for ``retrieval: exact`` or lists not yet trained) and ``meta.json`` (format,
mode, dim, item count, the table version the contents reflect, and the SHA-256 of every file). A
graph saved under another mode than the one loading it is rebuilt from the saved vectors.
It is written beside the target and renamed over it, so a crash mid-save leaves the old one.

Loading never crashes on a bad directory: a graph that is missing, fails its checksum or does not
restore is rebuilt from the saved vectors; vectors that fail are replaced by ``rebuild_from()``
(the replica table's rows, say) or, without it, an empty index. Each case logs a warning and
counts in ``hw_serve_ann_load_failures{reason}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import numpy as np

from serving import ann_ivf
from serving.ann_index import AnnConfig, AnnIndex
from serving.metrics import ANN_LOAD_FAILURES

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "load_index", "save_index"]

FORMAT = 2  # 2: graph keys are ann_vectors.ann_keys(ids), not the ids' bits
GRAPH_FILES = {"hnsw": "graph.usearch", "ivf_sq8": "graph.faiss"}  # per retrieval mode
RebuildSource = Callable[[], tuple[np.ndarray, Any]]
"""Returns (ids, vectors ``[n, dim]``) to rebuild from when the saved vectors are unusable."""


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def save_index(index: AnnIndex, path: str) -> dict:
    """Writes ``index`` to directory ``path`` (replacing it); returns the meta written."""
    tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    graph_file = GRAPH_FILES.get(index.cfg.retrieval, "graph")
    ids, vecs, has_graph, version = index.export_state(os.path.join(tmp, graph_file))
    np.save(os.path.join(tmp, "ids.npy"), ids)
    np.save(os.path.join(tmp, "vectors.npy"), vecs)
    files = ["ids.npy", "vectors.npy"] + ([graph_file] if has_graph else [])
    meta = {"format": FORMAT, "retrieval": index.cfg.retrieval, "dim": index.cfg.dim, "items": int(ids.size),
            "synced_version": int(version), "sha256": {n: _sha256(os.path.join(tmp, n)) for n in files}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    old = f"{path.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def load_index(path: str, cfg: AnnConfig, rebuild_from: RebuildSource | None = None) -> AnnIndex:
    """The index saved at ``path`` under ``cfg``; rebuilt (see the module doc) where unusable."""
    index = AnnIndex(cfg)
    if not os.path.isdir(path):  # a first start: nothing saved yet, nothing failed
        log.info("ann index: none saved at %s; building from the source", path)
        ids, vecs = _from_source(rebuild_from, cfg)
        index.install(ids, vecs, graph=None, synced_version=-1)
        index.origin = "source"
        return index
    try:
        meta = _read_meta(path, cfg)
        ids, vecs = _read_vectors(path, meta)
    except _Unusable as e:
        _failed(path, e)
        ids, vecs = _from_source(rebuild_from, cfg)
        index.install(ids, vecs, graph=None, synced_version=-1)
        index.origin = "source"
        return index
    graph = None
    # an ivf_sq8 index saved before its lists were trained has no graph file, and needs none
    untrained = cfg.retrieval == "ivf_sq8" and meta.get("retrieval") == "ivf_sq8" and "graph.faiss" not in meta.get("sha256", {})
    if cfg.retrieval != "exact" and not untrained:
        try:
            graph = _read_graph(path, meta, cfg)
        except _Unusable as e:
            _failed(path, e)
    index.install(ids, vecs, graph=graph, synced_version=int(meta.get("synced_version", -1)))
    index.origin = "loaded" if graph is not None or cfg.retrieval == "exact" or untrained else "rebuilt"
    return index


def _read_meta(path: str, cfg: AnnConfig) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise _Unusable("missing", f"no saved index: {e}") from e
    except (OSError, ValueError) as e:
        raise _Unusable("format", f"meta.json unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("dim") != cfg.dim:
        raise _Unusable("format", f"meta.json: format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                        f"dim {meta.get('dim') if isinstance(meta, dict) else '?'} (want {FORMAT}, {cfg.dim})")
    return meta


def _checked(path: str, meta: dict, name: str) -> str:
    file = os.path.join(path, name)
    want = meta.get("sha256", {}).get(name)
    if not os.path.exists(file):
        raise _Unusable("missing", f"{name} missing")
    if want is None or _sha256(file) != want:
        raise _Unusable("checksum", f"{name}: checksum mismatch")
    return file


def _read_vectors(path: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    try:
        ids = np.load(_checked(path, meta, "ids.npy"), allow_pickle=False)
        vecs = np.load(_checked(path, meta, "vectors.npy"), allow_pickle=False)
    except _Unusable as e:
        raise _Unusable("vectors", str(e)) from e
    except (OSError, ValueError) as e:
        raise _Unusable("vectors", f"vectors unreadable: {e}") from e
    if ids.shape != (meta["items"],) or vecs.shape != (meta["items"], meta["dim"]):
        raise _Unusable("vectors", f"vectors: shapes {ids.shape}, {vecs.shape} disagree with meta.json")
    return ids.astype(np.int64), vecs.astype(np.float32)


def _read_graph(path: str, meta: dict, cfg: AnnConfig) -> Any:
    from usearch.index import Index

    if meta.get("retrieval", "hnsw") != cfg.retrieval:
        raise _Unusable("format", f"saved as {meta.get('retrieval')!r}, loading as {cfg.retrieval!r}")
    name = GRAPH_FILES[cfg.retrieval]
    file = _checked(path, meta, name)
    try:
        graph = Index.restore(file) if cfg.retrieval == "hnsw" else ann_ivf.restore(file)
    except (RuntimeError, ValueError, OSError) as e:
        raise _Unusable("format", f"{name} does not restore: {e}") from e
    if graph is None or graph.ndim != cfg.dim or len(graph) != meta["items"]:
        raise _Unusable("format", f"{name}: dim or item count disagrees with meta.json")
    if cfg.retrieval == "hnsw":
        graph.expansion_search = cfg.expansion_search
    return graph


def _from_source(rebuild_from: RebuildSource | None, cfg: AnnConfig) -> tuple[np.ndarray, np.ndarray]:
    if rebuild_from is None:
        log.warning("ann index: nothing to rebuild from; starting empty")
        return np.zeros(0, np.int64), np.zeros((0, cfg.dim), np.float32)
    ids, vecs = rebuild_from()
    vecs = vecs.detach().cpu().numpy() if hasattr(vecs, "detach") else vecs
    return np.asarray(ids, np.int64), np.asarray(vecs, np.float32).reshape(-1, cfg.dim)


def _failed(path: str, e: _Unusable) -> None:
    log.warning("ann index at %s failed to load (%s: %s); rebuilding", path, e.reason, e)
    ANN_LOAD_FAILURES.labels(reason=e.reason).inc()


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
