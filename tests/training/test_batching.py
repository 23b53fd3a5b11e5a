"""Mini-batches by size or time; a message's offset is done only once its last row is out."""

import numpy as np

from training.batching import BatchFormer

from training_helpers import make_batch


def test_full_batches_are_cut_at_exactly_batch_size_across_messages():
    f = BatchFormer(batch_size=100, max_wait_s=10.0)
    for off, n in enumerate([60, 60, 60]):
        f.add(make_batch(n, start=off * 1000), "ex", 0, off, now=0.0)
    (mb,) = f.pop_ready(now=0.0)
    assert len(mb) == 100
    # message 0 fully out, message 1 split: only offset 0 is done.
    assert mb.done_offsets == {("ex", 0): 1}
    assert f.pending_rows == 80 and f.pop_ready(now=1.0) == []


def test_a_partial_batch_is_released_after_max_wait():
    f = BatchFormer(batch_size=100, max_wait_s=0.5)
    f.add(make_batch(30), "ex", 2, 7, now=10.0)
    assert f.pop_ready(now=10.2) == []
    (mb,) = f.pop_ready(now=10.6)
    assert len(mb) == 30 and mb.done_offsets == {("ex", 2): 8}


def test_rows_come_out_in_order_and_none_is_lost_or_repeated():
    f = BatchFormer(batch_size=64, max_wait_s=0.0)
    out = []
    for off in range(10):
        f.add(make_batch(37, start=off * 37), "ex", 0, off, now=0.0)
        out += f.pop_ready(now=0.0)
    out += f.pop_ready(now=0.0, flush=True)
    ids = np.concatenate([mb.batch.example_id for mb in out])
    np.testing.assert_array_equal(ids, np.arange(370))
    assert max(mb.done_offsets.get(("ex", 0), 0) for mb in out) == 10


def test_empty_messages_still_advance_offsets():
    f = BatchFormer(batch_size=10, max_wait_s=0.0)
    f.add(make_batch(0), "ex", 0, 3, now=0.0)
    (mb,) = f.pop_ready(now=0.0)
    assert len(mb) == 0 and mb.done_offsets == {("ex", 0): 4}


def test_a_new_models_batches_grow_from_64_rows_to_the_batch_size():
    from training.batching import warm_batch_rows

    sizes = [warm_batch_rows(1024, t, 65536) for t in (0, 4096, 8192, 32768, 65535, 65536, 10**6)]
    assert sizes == [64, 64, 128, 512, 1023, 1024, 1024]
    assert warm_batch_rows(1024, 0, 0) == 1024  # off: full batches at once
    assert warm_batch_rows(32, 0, 65536) == 32  # never above the batch size


def test_the_prequential_stream_is_cut_as_the_trainer_cuts_it():
    from training.prequential import _rebatch

    parts = [make_batch(n) for n in (50, 300, 7, 2000, 1)]
    sizes = [len(b) for b in _rebatch(iter(parts), 256, warmup_rows=1024)]
    assert sum(sizes) == 2358 and sizes[:4] == [64, 64, 64, 64]
    fed = np.cumsum([0] + sizes[:-1])
    assert sizes[:-1] == [max(64, min(256, 256 * int(f) // 1024)) for f in fed[:-1]]
    assert [len(b) for b in _rebatch(iter(parts), 256)][:9] == [256] * 9  # no warm-up: as before
