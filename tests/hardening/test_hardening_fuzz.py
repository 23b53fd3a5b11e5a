"""Every decoder of bytes read from Kafka, fuzzed: it raises only its documented error type.

Inputs are random bytes, byte-level mutations of valid messages (flips, truncation, insertion),
structural mutations (a field of the decoded msgpack map replaced by another value, then
re-encoded, so the mutation reaches past the envelope), and for the checksummed delta format,
mutations with the checksum recomputed (so they reach the parser). Hypothesis' deadline catches
hangs; ``tracemalloc`` catches a length field that would allocate far more than the message.
"""

from __future__ import annotations

import tracemalloc
import zlib
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_store import DeltaFormatError, SlotDelta, TableDelta, decode_delta, encode_delta
from paramsync import DENSE, SPARSE, ParamsMessage, ParamsWireError, decode_params, encode_params
from streams.events import (Action, DeadLetter, Impression, SchemaError, Watermark, decode_dead_letter,
                            decode_event, encode_actions, encode_dead_letter, encode_impression, encode_watermark)
from streams.example_batch import ExampleBatch, Ragged, decode_examples, encode_examples
from training.model import DenseTower, ModelConfig, tower_from_safetensors, tower_to_safetensors

FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
ALLOC_SLACK = 4 << 20  # bytes a decoder may allocate beyond 64x its input


def _examples() -> bytes:
    n = 4
    return encode_examples(ExampleBatch(
        example_id=np.arange(n, dtype=np.int64), user_id=np.arange(n, dtype=np.int64),
        item_id=np.arange(n, dtype=np.int64) + 10, label=np.array([1, 0, 0, 1], np.float32),
        sample_rate=np.ones(n, np.float32), event_time_ms=np.full(n, 1_000, np.int64),
        sparse={"user_id": Ragged(np.arange(n, dtype=np.int64), np.ones(n, np.int32)),
                "tags": Ragged(np.arange(6, dtype=np.int64), np.array([0, 1, 2, 3], np.int32))},
        dense=np.ones((n, 3), np.float32), truth_p=np.full(n, np.nan, np.float32)))


def _delta_chunks() -> list[bytes]:
    ids = np.array([1, 5, 9], np.int64)
    state = {"accum": torch.ones(3, 4)}
    return encode_delta(TableDelta(0, 3, {"item_id": SlotDelta(ids, torch.randn(3, 4), np.array([2], np.int64),
                                                                state)}))


TOWER = tower_to_safetensors(DenseTower(ModelConfig(slots=("user_id", "item_id"), embedding_dim=4, hidden=(8,))))


def _params() -> list[bytes]:
    (delta,) = encode_delta(TableDelta(0, 1, {"item_id": SlotDelta(np.array([3], np.int64), torch.ones(1, 4))}))
    return [encode_params(ParamsMessage(kind=SPARSE, model_id="ctr", version=1, slot="item_id", payload=delta)),
            encode_params(ParamsMessage(kind=DENSE, model_id="ctr", version=2, payload=TOWER))]


VALID_EVENTS = [
    encode_impression(Impression("r1", 7, 1_000, [1, 2], {"cat": [[3], [4, 5]]}, {"age": [2]},
                                 [[0.5], [0.25]], [0.1, 0.2])),
    encode_actions([Action("r1", 7, 1, "click", 1.0, 1_100), Action("r1", 7, 2, "view", 0.5, 1_200)]),
    encode_watermark(Watermark(2_000)),
]
VALID_DEAD = [encode_dead_letter(DeadLetter("bad", "hw.examples", 0, 12, b"\x00\x01"))]


def _params_payloads(data: bytes) -> None:
    """A params message as the replica uses it: the envelope, then the payload it carries."""
    msg = decode_params(data)
    if msg.kind == SPARSE:
        msg.table_delta()


# decoder, its documented error type, valid messages to mutate
DECODERS: dict[str, tuple[Callable[[bytes], Any], type[Exception], list[bytes]]] = {
    "decode_event": (decode_event, SchemaError, VALID_EVENTS),
    "decode_examples": (decode_examples, SchemaError, [_examples()]),
    "decode_dead_letter": (decode_dead_letter, SchemaError, VALID_DEAD),
    "decode_params": (_params_payloads, ParamsWireError, _params()),
    "decode_delta": (decode_delta, DeltaFormatError, _delta_chunks()),
    "tower_from_safetensors": (tower_from_safetensors, ValueError, [TOWER]),
}


def check(name: str, data: bytes) -> None:
    """Decodes ``data``: success or the documented error, and bounded allocation either way."""
    decode, error, _ = DECODERS[name]
    bound = 64 * len(data) + ALLOC_SLACK
    # tracemalloc counts every thread: a daemon thread an earlier test left running can allocate
    # inside the window. An unbounded decode allocates again on the second try; that cannot.
    for _attempt in range(2):
        tracemalloc.start()
        try:
            decode(data)
        except error:
            pass
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        if peak <= bound:
            break
    assert peak <= bound, f"{name} allocated {peak} bytes for a {len(data)}-byte input"


@st.composite
def byte_mutations(draw, valid: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(valid)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def field_mutations(draw, valid: list[bytes]) -> bytes:
    """Re-encoded msgpack maps with one (possibly nested) value replaced or a key removed."""
    obj = msgpack.unpackb(draw(st.sampled_from(valid)), raw=False, strict_map_key=False)
    target = obj
    key = draw(st.sampled_from(sorted(target, key=str)))
    # Descend into nested maps/lists sometimes (sparse slots, dense pairs, action columns).
    while isinstance(target[key], (dict, list)) and target[key] and draw(st.booleans()):
        target = target[key]
        key = draw(st.sampled_from(sorted(target, key=str)) if isinstance(target, dict)
                   else st.integers(0, len(target) - 1))
    if isinstance(target, dict) and draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(MSGPACK_VALUES)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_the_documented_error(name, data):
    check(name, data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_messages_raise_only_the_documented_error(name, data):
    check(name, data.draw(byte_mutations(DECODERS[name][2])))


@pytest.mark.parametrize("name", ["decode_event", "decode_examples", "decode_dead_letter", "decode_params"])
@FUZZ
@given(data=st.data())
def test_mutated_fields_raise_only_the_documented_error(name, data):
    check(name, data.draw(field_mutations(DECODERS[name][2])))


@FUZZ
@given(data=st.data())
def test_delta_mutations_behind_a_valid_checksum_raise_only_delta_format_error(data):
    body = data.draw(byte_mutations([c[:-4] for c in _delta_chunks()]))
    check("decode_delta", body + zlib.crc32(body).to_bytes(4, "little"))


@pytest.mark.parametrize("n", [2**31, 2**62])
def test_a_huge_row_count_allocates_nothing(n):
    obj = msgpack.unpackb(_examples(), raw=False)
    obj["n"] = n
    data = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(SchemaError, match="example_id has 32 bytes"):
        decode_examples(data)
    check("decode_examples", data)


def test_a_tower_config_asking_for_huge_layers_is_refused_before_allocating():
    header_len = int.from_bytes(TOWER[:8], "little")
    header = TOWER[8:8 + header_len]
    assert b'\\"hidden\\": [8]' in header
    header = header.replace(b'\\"hidden\\": [8]', b'\\"hidden\\": [999999999]')
    forged = len(header).to_bytes(8, "little") + header + TOWER[8 + header_len:]
    with pytest.raises(ValueError, match="do not match"):
        tower_from_safetensors(forged)
    check("tower_from_safetensors", forged)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=5000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_long_fuzz_of_every_decoder(name, data):
    """The default suite's checks, 5000 non-derandomized cases per decoder (``scripts/test.sh --slow``)."""
    valid = DECODERS[name][2]
    strategies = [st.binary(max_size=8192), byte_mutations(valid)]
    if name not in ("decode_delta", "tower_from_safetensors"):
        strategies.append(field_mutations(valid))
    check(name, data.draw(st.one_of(strategies)))
