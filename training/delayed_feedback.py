"""Fake-negative weighting: the loss correction for an early-emitted (delayed-feedback) stream.

Ktena et al., "Addressing Delayed Feedback for Continuous Training with Neural Networks in CTR
prediction", RecSys 2019. With ``headwater join --emit early`` every shown item reaches the
trainer at once as a negative and each click later as a positive copy, so the stream's label
distribution is biased: b(y=1|x) = p/(1+p). Importance weights p(y|x)/b(y|x) undo it:

    y = 1:  -(1 + p) * log q          y = 0:  -(1 - p)(1 + p) * log(1 - q)

with q the model's output and p = stop_gradient(q): the weights are estimates, not something to
learn through. The model then predicts the true click probability, so serving needs nothing.

Rule: rows marked early (``ExampleBatch.emit``) get these weights when ``early_correction`` is
``fnw`` (the default); windowed rows always keep plain weighted BCE; ``none`` trains the early
stream uncorrected (the bench's comparison arm, biased low).

Cold start: the weights undo the bias of a stream in which copies of earlier clicks keep
arriving; a stream's first seconds have none, and a fresh learner trained on them learns "no
click" and unlearns it for a long while (generator, 300k events: −0.12 AUC against the window
in the first tenth of the stream, −0.035 and −0.018 in the next two, still −0.003 to −0.005 at
the end). :class:`ColdStartHold` (``early_warmup_examples``) gives a fresh learner the windowed
join's view until it has learned that many final labels: with 40,000, −0.0015 AUC / +0.0013 log
loss against the window over the whole stream (was −0.022 / +0.016).

The correction assumes the positive copy is the *same* x as its fake negative. The joiner sends
the same ids, but what the tower reads for them is the table's state when the row is trained:
the per-id counters (``ModelConfig.counters``) and the embedding rows themselves have moved by
the time the click comes, most of all the rows of the ids the negative just pushed down (a new
user's row takes a full Adagrad step from its request's negatives). The tower then learns to tell
a copy from a negative by that movement, a signal serving never sees; the smaller the batch,
the more updates between a negative and its copy, the larger the loss. On the generator (clicks
up to 5 s after a 1 s hold, 300k events, 256-row batches) early+FNW, its copies given only
their negatives' counters, fell to 0.787 AUC against the window's 0.853 this way.
:class:`EarlyFeatureMemory` keeps the tower input each early negative was trained with (every
slot's pooled row, counters included) under its copy's id and gives it to the copy, whose
gradient still updates the rows as they are now: 0.832, the rest of the gap in the stream's
first fifth (cold start). The price is a stale input for the copy: at 1024-row batches, where
little leaked, 0.004 AUC. A copy adds a positive to its ids' counters but no second example
(:func:`early_increments`).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from streams.events import ExampleBatch

__all__ = ["CORRECTIONS", "ColdStartHold", "EarlyFeatureMemory", "EarlyCounterMemory", "fnw_weights", "early_weights",
           "early_increments", "start_counts"]

CORRECTIONS = ("fnw", "none")


def fnw_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row importance weights (1 + p) for positives, (1 - p)(1 + p) for negatives, with
    p = sigmoid(logits) detached: no gradient flows through them."""
    p = torch.sigmoid(logits.detach().float())
    return torch.where(labels > 0.5, 1.0 + p, (1.0 - p) * (1.0 + p))


def early_weights(logits: torch.Tensor, labels: torch.Tensor, emit: np.ndarray | None,
                  correction: str) -> torch.Tensor | None:
    """The loss weight of each row (FNW on early rows, 1 elsewhere), or None when no row needs
    one; pass it to :func:`training.model.loss.weighted_bce`."""
    if correction == "none" or emit is None or not np.any(emit):
        return None
    early = torch.from_numpy(np.asarray(emit) != 0).to(logits.device)  # no copy on the CPU
    return torch.where(early, fnw_weights(logits, labels), torch.ones_like(labels))


def start_counts(labels: torch.Tensor, sample_rate: torch.Tensor, emit: np.ndarray | None
                 ) -> tuple[float, float, bool]:
    """(positives, impressions, early) of a batch, for the click rate a fresh model's bias starts
    at (weighted by 1/sample_rate).

    An early-emitted positive is there twice (its negative and its copy), so impressions are
    counted once: windowed rows plus early negatives. A fresh learner on an early stream sums
    these over its first batches until one holds a positive (its first rows are negatives whose
    clicks are still to come), then starts its bias there: without a start the bias sat at
    p = 1/2, and the dense tower's small Adam steps took thousands of batches to move it.
    The start is low on a stream's very first batches (clicks after the hold not yet in);
    FNW's weights then pull it up.
    """
    w = 1.0 / sample_rate.clamp(min=1e-6)
    positives = float((w * labels).sum())
    if emit is None or not np.any(emit):
        return positives, float(w.sum()), False
    early = torch.from_numpy(np.asarray(emit) != 0)
    return positives, float(w[~early | (labels <= 0.5)].sum()), True


def early_increments(increments: np.ndarray, label: np.ndarray, emit: np.ndarray | None) -> np.ndarray:
    """``increments`` (float[B, 2], positives and examples per row, from
    :func:`training.counting.example_increments`) with an early positive copy's example count
    set to 0: its impression was counted once already, by its negative."""
    if emit is None or not np.any(emit):
        return increments
    copy = (np.asarray(emit) != 0) & (np.asarray(label) > 0.5)
    out = increments.copy()
    out[copy, 1] = 0.0
    return out


class EarlyFeatureMemory:
    """The tower input each early negative was trained with, under its positive copy's id.

    A direct-mapped table of ``rows`` entries (rounded up to a power of two), keyed by
    :func:`~streams.join_build.positive_copy_ids` of the negative: O(1) and vectorised, bounded
    memory. Each entry holds a row's pooled slot vectors (float[slots, columns]); the last
    ``exact_columns`` (the counters) are kept in float32, the embedding columns in float16 (half
    the memory; the rounding, ~1e-3 relative, is far below what separates a moved row). A
    newer negative that maps to the same entry replaces the older one; a copy whose negative is
    gone (replaced, or trained before a restart) keeps what it reads now (counted in
    ``misses``). Size it for the impressions of one join window: the generator's 10 s window at
    4,000 impressions/s needs 40k; the default 1M (a 10 s window of 100k impressions/s) takes
    about 1M x slots x (2 x embedding columns + 4 x counter columns) bytes once filled.
    """

    def __init__(self, rows: int, slots: int, columns: int = 2, exact_columns: int | None = None) -> None:
        size = 1 << max(10, int(rows - 1).bit_length())
        exact = columns if exact_columns is None else min(int(exact_columns), columns)
        self.mask = np.uint64(size - 1)
        self.keys = np.zeros(size, np.int64)
        self.used = np.zeros(size, bool)
        self.split = columns - exact  # columns before it: float16; from it: float32
        self.rounded = np.zeros((size, slots, self.split), np.float16)
        self.exact = np.zeros((size, slots, exact), np.float32)
        self.hits = 0
        self.misses = 0

    def _index(self, keys: np.ndarray) -> np.ndarray:
        return (keys.view(np.uint64) & self.mask).astype(np.int64)

    def apply(self, features: np.ndarray, example_id: np.ndarray, label: np.ndarray,
              emit: np.ndarray | None) -> np.ndarray | None:
        """Remembers the early negatives' rows of ``features`` (float[B, slots, columns], what
        each row was scored with) and returns ``features`` with each early copy's rows replaced
        by its negative's (None when the batch has no early copy)."""
        if emit is None or not np.any(emit):
            return None
        from streams.join_build import positive_copy_ids

        early = np.asarray(emit) != 0
        positive = np.asarray(label) > 0.5
        neg = np.flatnonzero(early & ~positive)
        if len(neg):
            keys = positive_copy_ids(np.asarray(example_id)[neg])
            at = self._index(keys)
            self.keys[at], self.used[at] = keys, True
            self.rounded[at] = features[neg, :, :self.split]
            self.exact[at] = features[neg, :, self.split:]
        copies = np.flatnonzero(early & positive)
        if not len(copies):
            return None
        keys = np.asarray(example_id, np.int64)[copies]
        at = self._index(keys)
        hit = self.used[at] & (self.keys[at] == keys)
        self.hits += int(hit.sum())
        self.misses += int(len(hit) - hit.sum())
        out = features.copy()
        out[copies[hit], :, :self.split] = self.rounded[at[hit]]
        out[copies[hit], :, self.split:] = self.exact[at[hit]]
        return out


EarlyCounterMemory = EarlyFeatureMemory  # its first name, when it held the counters only




class ColdStartHold:
    """A fresh learner's first stretch of an early stream, joined as the windowed join would.

    FNW is unbiased for a stream in which the copies of earlier impressions' clicks keep coming
    while new negatives do; an early stream's first seconds are not that: their negatives come,
    but no click has yet, and nothing from before the start balances them. A cold learner
    fitted to that stretch learns "nothing is clicked" (FNW, weighting by that learner's own p,
    does not object) and then unlearns it slowly, most of all through the rows it pushed down.
    So until the learner has trained ``warm_examples`` rows on final labels, each early
    negative is held until its label is final (event time ``wait_ms`` past it: the join window
    plus lateness, after which no copy can come) and trained once, on that label, as a
    windowed example (``emit`` 0: no FNW, one impression for the counters); a copy that
    arrives for a held negative makes it positive and is dropped. Held rows leave in the order
    they came (a batch's rows together, once all are final), so while the learner is cold it
    sees what the windowed join would send, in the same order.

    Once warm, new rows go through as the stream sends them, and a held row leaves as soon as
    its label is final: a negative at the wait, a positive at its copy (a click makes the label
    final). Leaving the clicked ones to the wait instead would take, for a click delay, the
    positives of the last impressions held out of a stream whose new negatives already flow:
    the start's dearth again (generator: −0.011 AUC against the window in the tenth of the
    stream after the switch, instead of −0.003). Every impression is still trained once, on its
    final label.

    The cost is freshness: a fresh learner trains nothing for the first ``wait_ms`` of an early
    stream and the window's view until it is warm; a learner restored from a checkpoint after
    that is warm, and a windowed stream passes untouched (its rows count towards warmth).
    :meth:`drain` hands out what is still held (labels as known), for a stream that ends.
    """

    def __init__(self, wait_ms: int, warm_examples: int) -> None:
        if wait_ms < 0 or warm_examples <= 0:
            raise ValueError("wait_ms must be >= 0 and warm_examples positive")
        self.wait_ms, self.warm_examples = int(wait_ms), int(warm_examples)
        self.final_trained = 0  # rows handed out on final labels (held ones and windowed ones)
        self.warm_at_ms: int | None = None  # event time at which the learner became warm
        self.watermark_ms = -1
        self._parts: list[ExampleBatch | None] = []  # None once released
        self._bases: list[int] = []  # global number of each part's first row
        self._next = 0  # first part not released
        self._where: dict[int, int] = {}  # copy id -> global row number of its negative
        self.held = 0  # negatives taken in
        self.merged = 0  # copies that made a held negative positive
        self.released = 0  # held rows handed out

    @property
    def warm(self) -> bool:
        return self.final_trained >= self.warm_examples

    @property
    def done(self) -> bool:
        """Warm, and nothing held: the hold has nothing left to do."""
        return self.warm and self._next == len(self._parts)

    def apply(self, batch: ExampleBatch, watermark_ms: int) -> ExampleBatch:
        """The rows to train now: held rows whose label became final (oldest first), then
        ``batch``'s rows that are neither held nor merged into a held row."""
        from streams.join_build import positive_copy_ids

        self.watermark_ms = max(self.watermark_ms, int(watermark_ms))
        early, positive = batch.early, batch.label > 0.5
        warm = self.warm
        hold = early & ~positive if not warm else np.zeros(len(batch), bool)
        if hold.any():
            part = batch.take(hold)
            part.emit = np.zeros(len(part), np.uint8)  # it leaves as a windowed example
            base = self.held
            self._where.update(zip(positive_copy_ids(part.example_id).tolist(),
                                   range(base, base + len(part))))
            self._parts.append(part)
            self._bases.append(base)
            self.held += len(part)
        keep = ~hold
        now: list[ExampleBatch] = []  # held positives that leave at once (warm)
        copies = np.flatnonzero(early & positive)
        if len(copies) and self._where:
            first = self._bases[self._next] if self._next < len(self._parts) else self.held
            for i, key in zip(copies.tolist(), batch.example_id[copies].tolist()):
                row = self._where.pop(key, -1)
                if row < first:  # not held, or its negative has left already
                    continue
                p = bisect.bisect_right(self._bases, row) - 1
                part, r = self._parts[p], row - self._bases[p]
                keep[i] = False
                self.merged += 1
                if not warm:
                    part.label[r] = 1.0
                    continue
                pos = part.take(np.array([r]))
                pos.label = np.ones(1, np.float32)
                pos.sample_rate = np.ones(1, np.float32)  # a positive is never sampled
                now.append(pos)
                part.label[r] = -1.0  # gone
        out = self._release(self.watermark_ms - self.wait_ms) + now
        self.released += sum(len(b) for b in now)
        rest = batch if keep.all() else batch.take(keep)
        self.final_trained += sum(len(b) for b in out) + int((~rest.early).sum())
        if self.warm and self.warm_at_ms is None:
            self.warm_at_ms = self.watermark_ms
        return ExampleBatch.concat([*out, rest]) if out else rest

    def drain(self) -> ExampleBatch:
        """Every row still held, on the labels known now."""
        return ExampleBatch.concat(self._release(None))

    def _release(self, final_upto_ms: int | None) -> list[ExampleBatch]:
        out: list[ExampleBatch] = []
        while self._next < len(self._parts):
            part = self._parts[self._next]
            assert part is not None
            if (final_upto_ms is not None and int(part.event_time_ms.max()) > final_upto_ms
                    and not (part.label < 0).all()):  # (a part whose rows all left goes now)
                break
            if (part.label < 0).any():  # rows that left already
                part = part.take(part.label >= 0)
            out.append(part)
            self.released += len(part)
            self._parts[self._next] = None
            self._next += 1
        for part in out:
            part.sample_rate[part.label > 0.5] = 1.0  # a positive is never sampled
        return out

    def state(self) -> tuple[bytes, dict]:
        """What a checkpoint keeps: the rows still held (encoded, labels as known) and the
        counts; :meth:`from_state` is its inverse. The offsets a checkpoint commits lie past
        these rows, so without them a restart in the warm-up would lose them."""
        from streams.example_batch import encode_examples

        held = [p for p in self._parts[self._next:] if p is not None]
        rows = ExampleBatch.concat(held) if held else ExampleBatch.empty()
        if len(rows) and (rows.label < 0).any():
            rows = rows.take(rows.label >= 0)
        return encode_examples(rows), {**self.summary(), "wait_ms": self.wait_ms,
                                       "watermark_ms": self.watermark_ms}

    @classmethod
    def from_state(cls, rows: bytes, info: dict) -> "ColdStartHold":
        from streams.example_batch import decode_examples
        from streams.join_build import positive_copy_ids

        hold = cls(info["wait_ms"], info["warm_examples"])
        hold.watermark_ms, hold.warm_at_ms = int(info["watermark_ms"]), info["warm_at_ms"]
        hold.final_trained = int(info["final_trained"])
        part = decode_examples(rows)
        hold.held = int(info["held"]) - len(part)  # the rows below are numbered from here
        if len(part):
            hold._parts, hold._bases = [part], [hold.held]
            waiting = np.flatnonzero(part.label == 0)
            hold._where = dict(zip(positive_copy_ids(part.example_id[waiting]).tolist(),
                                   (hold.held + waiting).tolist()))
        hold.held, hold.merged, hold.released = int(info["held"]), int(info["merged"]), int(info["released"])
        return hold

    def summary(self) -> dict[str, int | None]:
        return {"warm_examples": self.warm_examples, "final_trained": self.final_trained,
                "warm_at_ms": self.warm_at_ms, "held": self.held, "merged": self.merged,
                "released": self.released}
