"""``headwater demo --dataset FILE``: what the demo settles before a replay and reports after it.

Before: one schema for every process that reads the log. The replay, the joiner (which must
expect the schema's dense width) and the baselines scored after the run must agree on the
columns, so the demo reads the log once before anything starts: it infers the schema (the
columns ``--schema`` does not describe), saves it complete under the data directory and hands
that file to each of them; it counts the rows, so that the trainer's AUC window is a tenth of
the examples (the good rows and, for a log of positives only, their sampled negatives, about: a
draw may be dropped; its last window is then the log's last tenth, the span the learning bench calls
``auc_last_window``); and it finds bad rows, so that ``--on-bad-row error`` fails at once. The
trainer's model follows the schema (crosses, pooling: ``TrainerConfig.for_log``), and a second,
lighter pass lists the log's user and item ids for the Recommend load, which calls with the ids
serving has learned (:mod:`headwater.demo.dataset_load`), not the generator's.

After: the summary of a log that went all the way through: the trainer's prequential figures
over the whole log and its last tenth, the dead-lettered rows and messages, and the baselines
(counting, Vowpal Wabbit) scored on the same file with the same schema.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headwater.config import ConfigError

if TYPE_CHECKING:
    from headwater.demo.dataset_load import DatasetLoadClient

log = logging.getLogger(__name__)

__all__ = ["DatasetPlan", "prepare_dataset", "count_dead_letters", "examples_trained",
           "dataset_summary", "score_baselines", "dataset_load"]


@dataclass(frozen=True)
class DatasetPlan:
    """The log the demo replays and what the processes reading it must agree on."""

    path: Path
    schema_path: Path  # given with --schema, or inferred and saved under the data directory
    on_bad_row: str  # "error" | "dead-letter"
    rows: int  # data rows in the file, bad ones (cell count, label, time, empty id) included
    skipped_rows: int  # rows without a user or item, not sent (the schema's skip_empty_ids)
    dense_dim: int  # width of an impression's dense features (the joiner checks it)
    eval_window: int  # examples per trainer AUC window
    crosses: tuple[str, ...] = ()  # crossed slots the trainer learns (user x item-side slots)
    pooling: str = "sum"  # the trainer's bag pooling, from the schema (TrainerConfig.for_log)
    slot_pooling: tuple[str, ...] = ()  # per-slot entries, when multi-valued columns disagree
    recent_items: int = 0  # the schema's recent_items: serving fills the slot from its live history
    # The log's user and item ids, each once, in the order the replay first sends them: the
    # Recommend load's ids (headwater.demo.dataset_load).
    users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False, repr=False)
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False, repr=False)

    def replay_args(self) -> list[str]:
        """``headwater replay`` flags beyond the file and the Kafka settings."""
        return ["--schema", str(self.schema_path), "--on-bad-row", self.on_bad_row]

    def serve_args(self) -> list[str]:
        """``headwater serve`` flags: the live history that fills recent_items, when the schema asks."""
        return ["--recent-items", str(self.recent_items)] if self.recent_items else []

    def trainer_args(self) -> list[str]:
        """``headwater train`` flags of the model over this log: crosses and pooling."""
        out = ["--pooling", self.pooling]
        if self.crosses:
            out += ["--crosses", ",".join(self.crosses)]
        if self.slot_pooling:
            out += ["--slot-pooling", ",".join(self.slot_pooling)]
        return out


def prepare_dataset(path: Path, schema: Path | None, on_bad_row: str, eval_window: int,
                    data_dir: Path, item_table: Path | None = None, negatives: int = 0,
                    user_table: Path | None = None) -> DatasetPlan:
    """One pass over the log: its schema (``schema``'s, inference for the columns it omits),
    saved under ``data_dir`` for every reader, and its row counts; see the module docstring.

    ``eval_window`` 0 means a tenth of the examples. Raises :class:`SchemaError` for a log
    that cannot be read, or that has bad rows while ``on_bad_row`` is ``"error"`` (before any
    process starts, naming the first bad lines).
    """
    from streams.events import SchemaError
    from streams.log_infer import infer_schema
    from streams.log_reader import log_entities
    from streams.log_schema import LogSchema
    from training.config import TrainerConfig

    path = Path(path)
    if not path.exists():  # a file, or a directory of Parquet files
        raise ConfigError(f"[demo] --dataset {path}: no such file")
    if schema is not None and not Path(schema).is_file():
        raise ConfigError(f"[demo] --schema {schema}: no such file")
    overrides = LogSchema.from_toml(schema) if schema is not None else None
    if item_table is not None:  # the flag wins over the schema file's items_file
        overrides = replace(overrides or LogSchema(), items_file=str(Path(item_table).resolve()))
    if user_table is not None:
        overrides = replace(overrides or LogSchema(), users_file=str(Path(user_table).resolve()))
    sch, stats = infer_schema(path, overrides, negatives=negatives or None)
    if stats.bad_rows and on_bad_row == "error":
        raise SchemaError(f"{path}: {stats.bad_rows} bad rows ({'; '.join(stats.bad_examples)}); "
                          "--on-bad-row dead-letter replays the rest")
    schema_path = data_dir / "dataset-schema.toml"
    schema_path.write_text(sch.to_toml())  # every column described: no reader infers again
    good = stats.rows - stats.bad_rows - stats.skipped_rows
    examples = good + sch.negatives * (round(stats.label_rate * good) if good else 0)  # about: draws may drop
    log.info("%s: %d rows (%d bad), schema in %s", path, stats.rows, stats.bad_rows, schema_path)
    model = TrainerConfig().for_log(sch)
    users, items = log_entities(path, sch)
    return DatasetPlan(path, schema_path, on_bad_row, stats.rows, stats.skipped_rows, len(sch.dense_names()),
                       eval_window or max(1, examples // 10), model.crosses, model.pooling,
                       model.slot_pooling, sch.recent_items, users=users, items=items)


def dataset_load(plan: DatasetPlan, target: str, qps: float, seed: int = 0) -> "DatasetLoadClient":
    """The Recommend load of a replayed log: its own users and items, as serving learns them."""
    from headwater.demo.dataset_load import DatasetLoadClient

    return DatasetLoadClient(target, qps, plan.users, plan.items, seed=seed)


def count_dead_letters(bootstrap_servers: str, topic_prefix: str) -> int | None:
    """Messages on the dead-letter topic: rows the replay refused (one message each) plus
    messages the joiner or the trainer could not use; None when the broker does not answer."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from headwater.demo.drain import log_end
    from streams.kafka_io import topic_names

    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                 client_id="hw-demo-dlq")
        try:
            return sum(log_end(consumer, topic_names(topic_prefix).dlq).values())
        finally:
            consumer.close()
    except (KafkaError, TimeoutError) as exc:
        log.warning("could not count the dead letters: %s", exc)
        return None


def examples_trained(checkpoint_dir: Path) -> int | None:
    """Distinct examples in the trainer's newest checkpoint (None without one).

    The joiner's output counter counts an example again when the joiner re-reads input it
    could not commit (say, after it dropped out of its consumer group) and the trainer's
    counters restart with its process; the checkpoint's count is de-duplicated and carried
    across restarts, so it is the number of the log's examples learned from."""
    from training.checkpoint import CheckpointStore

    if not checkpoint_dir.is_dir():
        return None
    manifest = CheckpointStore(checkpoint_dir).latest()
    return manifest.examples_trained if manifest is not None else None


def dataset_summary(plan: DatasetPlan, last: dict, dead_letters: int | None, drained: bool,
                    baselines: bool, examples: int | None,
                    load: "DatasetLoadClient | None" = None) -> dict:
    """The fields a replayed log adds to the demo's summary (``last``: the monitor's last row;
    ``examples``: :func:`examples_trained`; ``load``: the :func:`dataset_load` client, stopped)."""
    out: dict = {
        **({"examples": examples} if examples is not None else {}),  # else the joiner's count
        "dataset": str(plan.path),
        "rows": plan.rows,
        "skipped_rows": plan.skipped_rows,
        "drained": drained,
        "dead_letters": dead_letters,
        "auc_overall": _number(last.get("auc_overall")),
        "logloss": _number(last.get("logloss_overall")),
        "eval_window": plan.eval_window,
    }
    if load is not None:
        out.update(load.summary())
    if baselines:
        out["baselines"] = score_baselines(plan)
    return out


def score_baselines(plan: DatasetPlan) -> dict[str, dict]:
    """Counting and Vowpal Wabbit on the log's good rows, scored as ``headwater bench learning
    --dataset`` scores them: prequential, in event-time order, in the trainer's mini-batches,
    each example id once, ``auc_last_window`` over the last tenth.

    The bench's own entry point would also run the learner over the whole log again; the
    trainer has just done that live, so only the baselines run here."""
    from streams.log_reader import encode_log, log_examples, source_name
    from streams.log_schema import LogSchema
    from training.baselines import CountingBaseline, VowpalWabbitBaseline
    from training.config import TrainerConfig
    from training.dedup import SeenFilter
    from training.prequential import metrics_of

    cfg = TrainerConfig()
    encoded = encode_log(plan.path, LogSchema.from_toml(plan.schema_path), on_bad_row="dead-letter")
    models = [CountingBaseline(), VowpalWabbitBaseline()]
    seen = SeenFilter(cfg.dedup_capacity, generations=2)
    logits: dict[str, list[np.ndarray]] = {m.name: [] for m in models}
    labels: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for batch in log_examples(encoded, source_name(plan.path), cfg.batch_size):
        keep = seen.filter_new(batch.example_id)
        batch = batch if keep.all() else batch.take(keep)
        if not len(batch):
            continue
        for m in models:
            p = np.clip(np.asarray(m.update(batch), np.float64), 1e-7, 1 - 1e-7)
            logits[m.name].append(np.log(p) - np.log1p(-p))
        labels.append(np.asarray(batch.label, np.float32))
        weights.append(1.0 / np.clip(np.asarray(batch.sample_rate, np.float64), 1e-6, None))
    if not labels:
        return {}
    y, w = np.concatenate(labels), np.concatenate(weights)
    return {name: metrics_of(np.concatenate(v), y, w).to_dict() for name, v in logits.items()}


def _number(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
