#!/usr/bin/env python
"""Turns the Open Bandit Dataset (OBD) sample into a log Headwater reads, plus its schema TOML.

The OBD (ZOZOTOWN fashion e-commerce impressions with clicks, Apache-2.0) ships a small sample
inside the sdist of ``obp==0.5.7``: ``obp/dataset/obd/{random,bts}/{all,men,women}/`` with one
``<campaign>.csv`` of impressions and an ``item_context.csv`` of item features. Get it with

    pip download obp==0.5.7 --no-deps --no-binary :all: --ignore-requires-python -d DIR
    tar xzf DIR/obp-0.5.7.tar.gz -C DIR      # the sample: DIR/obp-0.5.7/obp/dataset/obd

or let this script do exactly that with ``--download`` (into a temporary directory; nothing is
downloaded otherwise). Example:

    python scripts/obd_to_log.py --obd-dir DIR/obp-0.5.7/obp/dataset/obd --policy random \\
        --campaign all --out /tmp/obd_random_all.csv
    headwater bench learning --json --dataset /tmp/obd_random_all.csv \\
        --schema /tmp/obd_random_all.toml

The log, one row per impression, in the file's order (Headwater sorts by time itself):

==================  ===========  ======  ===================================================
column              kind         side    from
==================  ===========  ======  ===================================================
``user_id``         (user id)            a stable id of the four hashed user features
``item_id``         (item id)            ``item_id`` (an integer, kept as the id)
``label``           (label)              ``click`` (0/1)
``ts``              (time)               ``timestamp`` (ISO-8601, microseconds, UTC)
``position``        categorical  user    the slot the item was shown in (1..3): context
``user_feature_k``  categorical  user    ``user_feature_0..3`` (hashed strings)
``item_feature_0``  numeric      item    ``item_context.csv`` (a standardised price)
``item_feature_k``  categorical  item    ``item_context.csv`` ``item_feature_1..3``
``propensity``      ignore               the logging policy's propensity (kept, not a feature)
==================  ===========  ======  ===================================================

OBD has no user ids: its users are described only by four hashed features, so ``user_id`` is
``u`` + the hex blake2b-64 digest of the four values joined by ``\\x1f`` — every impression with
the same four features is one "user" (in the ``random/all`` sample, 240 of them). The 80
``user-item_affinity_k`` columns are left out (they are per user x item, neither side's).
Clicks are rare (about 0.4%) and the logging policy is close to uniform, so every learner's AUC
on this log sits near 0.5-0.6: it exercises the schema, the hashing, calibration and log loss.
Data files are not committed: write them outside the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

log = logging.getLogger("obd_to_log")

OBP_VERSION = "0.5.7"
USER_FEATURES = tuple(f"user_feature_{k}" for k in range(4))
ITEM_FEATURES = tuple(f"item_feature_{k}" for k in range(4))
POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")


def stable_user_ids(columns: list[pa.ChunkedArray | pa.Array]) -> pa.Array:
    """``u<16 hex>`` per row: blake2b-64 of the row's values joined by ``\\x1f``; hashed once per
    distinct combination (the same in every process and run, unlike Python's ``hash``)."""
    joined = pc.binary_join_element_wise(*[pc.cast(c, pa.string()) for c in columns], "\x1f")
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    enc = joined.dictionary_encode()
    names = [f"u{hashlib.blake2b(v.encode(), digest_size=8).hexdigest()}"
             for v in enc.dictionary.to_pylist()]
    return pa.array(names, pa.string()).take(enc.indices)


def read_obd(obd_dir: Path, policy: str, campaign: str) -> pa.Table:
    """The impressions of one policy/campaign joined with their item features, as a Headwater log."""
    folder = obd_dir / policy / campaign
    events = folder / f"{campaign}.csv"
    items = folder / "item_context.csv"
    if not events.exists() or not items.exists():
        raise FileNotFoundError(f"{folder} must hold {campaign}.csv and item_context.csv")
    strings = {c: pa.string() for c in (*USER_FEATURES, "timestamp")}
    t = pa_csv.read_csv(events, convert_options=pa_csv.ConvertOptions(
        column_types=strings, include_columns=["timestamp", "item_id", "position", "click",
                                               "propensity_score", *USER_FEATURES]))
    it = pa_csv.read_csv(items, convert_options=pa_csv.ConvertOptions(
        column_types={c: pa.string() for c in ITEM_FEATURES[1:]},
        include_columns=["item_id", *ITEM_FEATURES]))
    item_ids = it.column("item_id").to_numpy()
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError(f"{items}: item_id is not unique")
    row = pc.index_in(t.column("item_id"), value_set=it.column("item_id"))
    if row.null_count:
        raise ValueError(f"{events}: {row.null_count} impressions name items missing from {items}")
    cols = {"user_id": stable_user_ids([t.column(c) for c in USER_FEATURES]),
            "item_id": t.column("item_id"), "label": t.column("click"),
            "ts": t.column("timestamp"), "position": t.column("position")}
    cols.update({c: t.column(c) for c in USER_FEATURES})
    cols.update({c: it.column(c).take(row) for c in ITEM_FEATURES})
    cols["propensity"] = t.column("propensity_score")
    return pa.table(cols)


def schema_toml() -> str:
    """The schema of the log :func:`read_obd` builds (Headwater's TOML form)."""
    from streams.log_schema import ColumnSpec, LogSchema

    columns = (ColumnSpec("position", "categorical", "user"),
               *(ColumnSpec(c, "categorical", "user") for c in USER_FEATURES),
               ColumnSpec("item_feature_0", "numeric", "item"),
               *(ColumnSpec(c, "categorical", "item") for c in ITEM_FEATURES[1:]),
               ColumnSpec("propensity", "ignore", "user"))
    schema = LogSchema(user_col="user_id", item_col="item_id", label_col="label", time_col="ts",
                       columns=columns)
    return schema.to_toml({"": "The Open Bandit Dataset as a Headwater log (scripts/obd_to_log.py)."})


def download(into: Path) -> Path:
    """``pip download`` of the obp sdist into ``into`` and its extraction; returns the obd dir."""
    subprocess.run([sys.executable, "-m", "pip", "download", f"obp=={OBP_VERSION}", "--no-deps",
                    "--no-binary", ":all:", "--ignore-requires-python", "-d", str(into)], check=True)
    archive = next(into.glob(f"obp-{OBP_VERSION}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / f"obp-{OBP_VERSION}" / "obp" / "dataset" / "obd"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--obd-dir", type=Path, default=None,
                   help="the extracted obd folder (holding random/ and bts/)")
    p.add_argument("--download", action="store_true",
                   help=f"pip download obp=={OBP_VERSION}'s sdist into a temporary folder first")
    p.add_argument("--policy", choices=POLICIES, default="random")
    p.add_argument("--campaign", choices=CAMPAIGNS, default="all")
    p.add_argument("--out", type=Path, required=True, help="the log to write (.csv, or .parquet)")
    p.add_argument("--parquet", action="store_true", help="write Parquet instead of CSV")
    p.add_argument("--schema-out", type=Path, default=None,
                   help="the schema TOML to write (default: --out with suffix .toml)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.obd_dir is None) == (not args.download):
        p.error("give exactly one of --obd-dir and --download")
    with tempfile.TemporaryDirectory() as tmp:
        obd = download(Path(tmp)) if args.download else args.obd_dir
        table = read_obd(obd, args.policy, args.campaign)
    out = args.out
    if args.parquet:
        pq.write_table(table, out)
    else:
        pa_csv.write_csv(table, out)
    schema_out = args.schema_out or out.with_suffix(".toml")
    schema_out.write_text(schema_toml())
    clicks = int(pc.sum(table.column("label")).as_py() or 0)
    log.info("wrote %s (%d rows, %d clicks, %d users, %d items) and %s", out, table.num_rows,
             clicks, len(pc.unique(table.column("user_id"))), len(pc.unique(table.column("item_id"))),
             schema_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
