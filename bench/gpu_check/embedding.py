"""The embedding store's Triton kernels on the device: bag pooling (lookups) and the fused sparse
Adagrad update, against the torch reference and a plain ``index_select`` gather of the same rows.

- kernels: ``embedding_bag_triton`` and ``adagrad_update_triton`` on device tensors, checked
  against :mod:`embedding_store.kernels.reference` on the same inputs; lookups/s and updates/s
  against the gather of the same rows (the bandwidth ceiling: a gather reads each row once and
  writes it once; an Adagrad update reads value, accumulator and gradient and writes two rows);
- the product path: an ``EmbeddingTable(device=...)`` (the table's own ``device`` option) whose
  ``lookup_bags`` and ``apply_gradients`` reach those kernels on CUDA, checked against the same
  table on the CPU, with its id -> row probe on the host counted in its rate;
- the trainer and serving on the device (:mod:`.embedding_product`): a ``Learner`` with
  ``device=<the run's device>`` and the serving replica it publishes to, against both on the CPU.

Without CUDA the device-side tables take the Triton kernels under the interpreter
(``embedding_store.kernels.triton_on_cpu``), so the product path still meets the kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.gpu_check.common import Setup, result, rounded, targets, time_ms
from bench.gpu_check.embedding_product import check_product, kernels_on
from embedding_store import EmbeddingTable, SlotConfig
from embedding_store.kernels import to_offsets
from embedding_store.kernels.reference import adagrad_update_reference, embedding_bag_reference

TOLERANCE = 1e-4


def _kernels(setup: Setup, rows_n: int, dim: int, n_ids: int, bag: int, n_upd: int) -> dict:
    from embedding_store.kernels.triton_kernels import adagrad_update_triton, embedding_bag_triton

    dev = setup.device
    g = torch.Generator().manual_seed(setup.seed)
    values = torch.randn(rows_n, dim, generator=g).to(dev)
    accum = torch.rand(rows_n, dim, generator=g).to(dev)
    rows = torch.randint(0, rows_n, (n_ids,), generator=g).to(dev)
    offsets = to_offsets(n_ids, torch.full((n_ids // bag,), bag), None).to(dev)
    shift = 1.0 if setup.perturb else 0.0

    got = embedding_bag_triton(values, rows, offsets, "sum", None, None)
    want = embedding_bag_reference(values, rows, offsets, "sum", None, None) + shift
    bag_diff = float((got - want).abs().max())
    upd_rows = torch.randperm(rows_n, generator=g)[:n_upd].to(dev)  # the table sums duplicates first
    grads = torch.randn(n_upd, dim, generator=g).to(dev)
    v1, a1, v2, a2 = values.clone(), accum.clone(), values.clone(), accum.clone()
    adagrad_update_triton(v1, a1, upd_rows, grads, 0.05, 1e-10)
    adagrad_update_reference(v2, a2, upd_rows, grads, 0.05, 1e-10)
    upd_diff = max(float((v1 - v2 - shift).abs().max()), float((a1 - a2).abs().max()))
    del v2, a2

    inner = 1 if setup.tiny else 10
    gather_ms = time_ms(setup, lambda: values.index_select(0, rows), inner=inner, warmup=2)
    bag_ms = time_ms(setup, lambda: embedding_bag_triton(values, rows, offsets, "sum", None, None),
                     inner=inner, warmup=2)
    ref_bag_ms = time_ms(setup, lambda: embedding_bag_reference(values, rows, offsets, "sum", None, None),
                         inner=inner, warmup=1)
    upd_ms = time_ms(setup, lambda: adagrad_update_triton(v1, a1, upd_rows, grads, 0.05, 1e-10), inner=inner, warmup=2)
    ref_upd_ms = time_ms(setup, lambda: adagrad_update_reference(v1, a1, upd_rows, grads, 0.05, 1e-10),
                         inner=inner, warmup=1)
    gather_rows_s = n_ids / (gather_ms / 1000)
    row_bytes = dim * values.element_size()
    return {
        "rows": rows_n, "dim": dim, "ids": n_ids, "bag_size": bag, "updated_rows": n_upd,
        "lookup_max_abs_diff": bag_diff, "update_max_abs_diff": upd_diff,
        "gather_rows_per_s": rounded(gather_rows_s),
        "gather_gb_s": rounded(2 * n_ids * row_bytes / (gather_ms / 1000) / 1e9),
        "lookups_per_s": rounded(n_ids / (bag_ms / 1000)),
        "torch_reference_lookups_per_s": rounded(n_ids / (ref_bag_ms / 1000)),
        "lookup_fraction_of_gather": rounded(gather_ms / bag_ms),
        "updates_per_s": rounded(n_upd / (upd_ms / 1000)),
        "torch_reference_updates_per_s": rounded(n_upd / (ref_upd_ms / 1000)),
        # an update moves 5 rows of bytes (3 read, 2 written), a gathered row 2 (read + write)
        "update_fraction_of_gather_bytes": rounded((n_upd * 5 * row_bytes / (upd_ms / 1000))
                                                   / (gather_rows_s * 2 * row_bytes)),
    }


def _table(setup: Setup, n_rows: int, dim: int, n_ids: int, bag: int) -> dict:
    """The table's own device option against the same table on the CPU."""
    slots = [SlotConfig("item", dim, optimizer="adagrad", init_std=0.1)]
    tables = {"device": EmbeddingTable(slots, device=setup.device, seed=setup.seed),
              "cpu": EmbeddingTable(slots, device="cpu", seed=setup.seed)}
    rng = np.random.default_rng(setup.seed)
    known = rng.choice(1 << 40, n_rows, replace=False).astype(np.int64)
    for t in tables.values():
        for chunk in np.array_split(known, max(1, n_rows // 65536)):
            t.lookup("item", torch.from_numpy(chunk), train=True, now=0.0)
    ids = torch.from_numpy(rng.choice(known, n_ids))
    lengths = torch.full((n_ids // bag,), bag)
    upd = torch.from_numpy(rng.choice(known, min(n_rows, n_ids // 4), replace=False))
    grads = torch.from_numpy(rng.standard_normal((upd.numel(), dim)).astype(np.float32))
    shift = 1.0 if setup.perturb else 0.0
    table = tables["device"]
    with kernels_on(setup):  # the device table's calls; the CPU table keeps the torch reference
        got = table.lookup_bags("item", ids, lengths).cpu()
        table.apply_gradients("item", upd, grads, now=1.0)
        updated = table.lookup("item", upd).cpu()
        look_ms = time_ms(setup, lambda: table.lookup_bags("item", ids, lengths), warmup=1)
        upd_ms = time_ms(setup, lambda: table.apply_gradients("item", upd, grads, now=2.0), warmup=1)
        from embedding_store.kernels import use_triton

        on_triton = use_triton(table._store("item").values)  # noqa: SLF001 - which kernels the table reaches
    want = tables["cpu"].lookup_bags("item", ids, lengths) + shift
    tables["cpu"].apply_gradients("item", upd, grads, now=1.0)
    after = float((updated - tables["cpu"].lookup("item", upd) - shift).abs().max())
    return {"rows": n_rows, "ids": n_ids, "bag_size": bag, "updated_rows": int(upd.numel()),
            "kernels": "triton" + ("" if setup.cuda else " (interpreter, on CPU tensors)") if on_triton
            else "torch reference (HEADWATER_NO_TRITON=1)",
            "lookup_max_abs_diff": float((got - want).abs().max()), "update_max_abs_diff": after,
            "lookups_per_s": rounded(n_ids / (look_ms / 1000)),
            "updates_per_s": rounded(int(upd.numel()) / (upd_ms / 1000)),
            "note": "rates include the id -> row probe, which runs on the host (NumPy) for every table"}


def check_embedding(setup: Setup) -> dict:
    if setup.tiny:
        kern = _kernels(setup, rows_n=512, dim=16, n_ids=256, bag=4, n_upd=64)
        table = _table(setup, n_rows=300, dim=16, n_ids=256, bag=4)
    else:
        kern = _kernels(setup, rows_n=1 << 22, dim=64, n_ids=1 << 20, bag=16, n_upd=1 << 19)
        table = _table(setup, n_rows=1 << 20, dim=64, n_ids=1 << 18, bag=16)
    product = check_product(setup)  # tiny shapes everywhere: it checks the plumbing, not speed
    worst = max(kern["lookup_max_abs_diff"], kern["update_max_abs_diff"], table["lookup_max_abs_diff"],
                table["update_max_abs_diff"], product["max_abs_diff"])
    figures = {"kernels": kern, "table": table, "product": product, "max_abs_diff": worst, "tolerance": TOLERANCE,
               "targets": targets(setup, lookup_fraction_of_gather=(kern["lookup_fraction_of_gather"], 0.25))}
    if not setup.cuda:
        figures["timing_note"] = "TRITON_INTERPRET=1: kernel rates are the interpreter's, not a GPU's"
    return result("embedding", setup, worst <= TOLERANCE and not product.get("errors"), (
        "embedding_store.kernels.reference (torch) on the same device tensors; the same table, Learner and "
        "serving replica on the CPU; speed: torch.index_select of the same rows"), **figures)
