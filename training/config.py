"""The trainer's typed configuration (``headwater train`` turns every field into a flag)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from training.model.config import ModelFields, model_field

if TYPE_CHECKING:
    from streams.log_schema import LogSchema

__all__ = ["TrainerConfig"]


@dataclass
class TrainerConfig(ModelFields):
    """How ``headwater train`` learns, syncs and checkpoints. Kafka settings live in ``KafkaConfig``.

    The model's own fields (embedding_dim, hidden, pooling, crosses, ...) are those of
    :class:`~training.model.config.ModelFields`, inherited: one definition, one flag each.
    """

    model_id: str = field(default="ctr", metadata={"help": "model name carried by every hw.params message"})
    group_id: str = field(default="hw-trainer", metadata={"help": "consumer group on hw.examples"})
    # -- mini-batches
    batch_size: int = field(default=1024, metadata={"help": "examples per mini-batch"})
    batch_warmup_rows: int = field(default=65536, metadata={
        "help": "a new model's mini-batches grow from 64 rows to batch_size over its first this many "
                "examples, while the trainer keeps up (a cold model gains most from frequent updates; "
                "with a full batch pending it trains full ones; 0 = full batches at once)"})
    max_batch_wait_ms: int = field(default=50, metadata={"help": "train a partial batch once its oldest row waited this long"})
    fetch_max_wait_ms: int = field(default=20, metadata={"help": "longest the broker may hold a fetch waiting for data"})
    # -- model: the ModelFields (training.model.config) are inherited; only the data's slots here
    slots: tuple[str, ...] = field(default=(), metadata={"help": "sparse slots to use (comma list; empty = all seen in the first batch)"})
    counters: bool = model_field("counters", True)  # the trainer learns with per-id counters
    count_decay: float = field(default=0.95, metadata={
        "help": "each new example of an id first multiplies its counters by this (1 = plain counts; "
                "below 1 follows drifting rates)"})
    early_correction: str = field(default="fnw", metadata={
        "help": "loss on examples the joiner emitted early (join --emit early): fnw (fake-negative "
                "weighting, Ktena et al. 2019) or none (uncorrected, biased low)"})
    early_memory_rows: int = field(default=1 << 20, metadata={
        "help": "early negatives whose tower input (rows and counters) is kept for their positive copy (about "
                "the impressions of one join window; 0 = off)"})
    early_label_wait_s: float = field(default=605.0, metadata={
        "help": "live evaluation of an early stream: an early negative is scored on its final label "
                "once event time is this far past it (the joiner's window + lateness; 605 = the "
                "default join window 600 s + 5 s)"})
    early_warmup_examples: int = field(default=40_000, metadata={
        "help": "cold start of an early stream: until a fresh learner has trained this many "
                "examples on final labels, it holds each early negative until its label is final "
                "(early_label_wait_s) and trains it once as the windowed join would "
                "(training.delayed_feedback.ColdStartHold; 0 = off; a windowed stream's rows "
                "count towards it, so it costs a windowed stream nothing)"})
    # -- optimisers
    sparse_optimizer: str = field(default="adagrad", metadata={"help": "table optimizer: adagrad, sgd, ftrl, adam"})
    sparse_lr: float = field(default=0.05, metadata={"help": "learning rate of the embedding rows"})
    init_std: float = field(default=0.01, metadata={"help": "std of new embedding rows"})
    dense_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the dense tower"})
    dense_precision: str = field(default="auto", metadata={
        "help": "tower forward/backward precision: fp32, bf16 (autocast; weights, Adam state, "
                "loss and what serving receives stay fp32), or auto (bf16 where the CPU has "
                "native bf16 matmuls)"})
    # -- bounded memory
    ttl_s: float = field(default=0.0, metadata={"help": "expire rows untouched this long (0 = never)"})
    ttl_clock: str = field(default="event", metadata={"help": "TTL measured in stream event time (event) or wall time (wall)"})
    admit_threshold: int = field(default=1, metadata={"help": "sightings before an id gets its own row"})
    expire_interval_s: float = field(default=10.0, metadata={"help": "how often expiry runs when ttl_s > 0"})
    dedup_capacity: int = field(default=1 << 20, metadata={"help": "example ids per de-dup generation (2 kept)"})
    # -- sync to serving
    publish: bool = field(default=True, metadata={"help": "publish parameters to hw.params"})
    sparse_sync_interval_s: float = field(default=1.0, metadata={"help": "publish changed rows this often"})
    dense_sync_interval_s: float = field(default=60.0, metadata={"help": "publish the dense tower this often"})
    snapshot_interval_s: float = field(default=600.0, metadata={"help": "publish a full snapshot this often (and at start)"})
    sync_fp16: bool = field(default=False, metadata={"help": "ship row values as float16"})
    params_message_bytes: int = field(default=1 << 20, metadata={"help": "largest hw.params message (chunks stay under it)"})
    num_param_shards: int = field(default=1, metadata={"help": "serving PS shards: rows go to hw.params partition shard_of(id, N), the tower to partition N (1 = unsharded)"})
    # -- publish guard (training/publish_guard.py: what fails, and what happens then)
    guard: bool = field(default=True, metadata={
        "help": "check every update before publishing it (finite values, bounded norms, no sudden "
                "AUC/logloss drop) and hold back what fails"})
    guard_max_row_norm: float = field(default=100.0, metadata={"help": "largest L2 norm of a published embedding row, counter columns left out (0 = no limit)"})
    guard_max_tower_norm: float = field(default=1000.0, metadata={"help": "largest L2 norm of any one dense tower tensor (0 = no limit)"})
    guard_auc_drop: float = field(default=0.1, metadata={"help": "hold updates back when the newest window's prequential AUC is this much below the last good window's (0 = off)"})
    guard_logloss_rise: float = field(default=0.1, metadata={"help": "hold updates back when the newest window's log loss is this much above the last good window's, carried to the newest window's click rate (0 = off)"})
    guard_window: int = field(default=20_000, metadata={"help": "examples the quality check judges (the newest ones); fewer since the last failure: not judged"})
    guard_max_failures: int = field(default=3, metadata={
        "help": "consecutive failed checks before the trainer rolls back to its last good checkpoint "
                "(a non-finite state rolls back at once; 0 = never, keep holding)"})
    # -- retrieval (training.two_tower.rows: a two-tower model learns the same batches)
    two_tower: bool = field(default=False, metadata={
        "help": "also learn a two-tower retrieval model on every batch and ship each user's query "
                "vector and each item's vector as rows of the retrieval slots "
                "(paramsync.retrieval_slots): Recommend without candidates then searches those"})
    two_tower_dim: int = field(default=64, metadata={"help": "width of the two-tower vectors"})
    two_tower_refresh_s: float = field(default=30.0, metadata={
        "help": "re-ship every known item's vector this often (each step moves them all a little; "
                "a batch's own items and users go at once)"})
    # -- checkpoints
    checkpoint_dir: str = field(default="", metadata={"help": "checkpoint directory (empty = none)"})
    checkpoint_interval_s: float = field(default=30.0, metadata={"help": "checkpoint this often"})
    # -- evaluation and run control
    eval_window: int = field(default=50_000, metadata={"help": "examples per prequential window"})
    max_examples: int = field(default=0, metadata={"help": "stop after training this many examples (0 = never)"})
    idle_exit_s: float = field(default=0.0, metadata={"help": "stop after no input for this long (0 = never)"})
    seed: int = field(default=0, metadata={"help": "random seed of the table and the tower"})
    device: str = field(default="cpu", metadata={
        "help": "where the table, the dense tower and its optimizer live: cpu, or cuda[:N] (table "
                "reads and Adagrad updates then run the Triton kernels; the id index, evaluator "
                "and publisher stay on the host)"})
    torch_threads: int = field(default=1, metadata={
        "help": "torch intra-op threads (0 = torch's default). 1: on a busy few-core machine the "
                "OpenMP threads of a parallel region wait for each other's time slices, which "
                "slowed training many-fold under load; Kafka I/O has the other core"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0 = off)"})

    def for_log(self, schema: "LogSchema", crosses: tuple[str, ...] | None = None) -> "TrainerConfig":
        """This config for a model over a log described by ``schema``: crossed slots ``crosses``
        (default: the user with every item-side categorical and multi-valued column) and each
        multi-valued column pooled as the schema says (entries already in ``slot_pooling`` win).

        Every other slot of a log holds one id per row, which pools alike by sum or by mean; so
        when the multi-valued columns all pool one way, that becomes ``pooling`` for every slot
        and the per-slot entries stay empty; otherwise each gets its entry (serving pools every
        slot by ``pooling_of`` either way, as training does).
        """
        from streams.log_history import RECENT_SLOT
        from training.model.crosses import user_item_crosses

        crosses = user_item_crosses(schema.item_slots()) if crosses is None else tuple(crosses)
        given = self.pooling_overrides()
        wanted = {c.name: c.pooling for c in schema.columns if c.kind == "multi" and c.name not in given}
        if schema.recent_items and RECENT_SLOT not in given:  # pooled by sum: its length says too
            wanted[RECENT_SLOT] = "sum"  # how much the user did (MovieLens positives only: 0.870 vs 0.865 by mean)
        modes = set(wanted.values())
        if not given and len(modes) == 1:
            return replace(self, crosses=crosses, pooling=modes.pop())
        entries = tuple(f"{slot}={mode}" for slot, mode in wanted.items())
        return replace(self, crosses=crosses, slot_pooling=entries + tuple(self.slot_pooling))

    def validate(self) -> None:
        if self.batch_size <= 0 or self.batch_warmup_rows < 0:
            raise ValueError("batch_size must be positive and batch_warmup_rows >= 0")
        if self.ttl_clock not in ("event", "wall"):
            raise ValueError(f"ttl_clock must be event or wall, got {self.ttl_clock!r}")
        self.validate_fields()
        if self.early_correction not in ("fnw", "none"):
            raise ValueError(f"early_correction must be fnw or none, got {self.early_correction!r}")
        if self.early_warmup_examples < 0 or self.early_label_wait_s < 0:
            raise ValueError("early_warmup_examples and early_label_wait_s must be >= 0")
        if self.dense_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dense_precision must be auto, fp32 or bf16, got {self.dense_precision!r}")
        if not 0.5 <= self.count_decay <= 1.0:
            raise ValueError(f"count_decay must be in [0.5, 1], got {self.count_decay}")
        if self.sparse_sync_interval_s <= 0 or self.dense_sync_interval_s <= 0:
            raise ValueError("sync intervals must be positive")
        if self.params_message_bytes < 4096:
            raise ValueError("params_message_bytes must be at least 4096")
        if min(self.guard_max_row_norm, self.guard_max_tower_norm, self.guard_auc_drop,
               self.guard_logloss_rise, self.guard_max_failures) < 0:
            raise ValueError("guard limits, margins and guard_max_failures must be >= 0 (0 = off)")
        if self.two_tower_dim <= 0 or self.two_tower_refresh_s <= 0:
            raise ValueError("two_tower_dim and two_tower_refresh_s must be positive")
        if self.guard_window <= 0:
            raise ValueError(f"guard_window must be positive, got {self.guard_window}")
        from training.model import resolve_device

        resolve_device(self.device)
