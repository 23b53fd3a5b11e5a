"""The 64-bit mixers are a contract (example ids, sampling draws, sketches in snapshots, shard
placement): fixed outputs, vectorised, bijective."""

import numpy as np

from hashing import fmix64, mix64, splitmix64


def test_splitmix64_of_state_zero_is_the_reference_generators_first_output():
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_outputs_are_fixed_and_int64_input_reads_as_its_bits():
    one = np.array([1], dtype=np.int64)
    assert int(mix64(one)[0]) == 0x5692161D100B05E5 and int(mix64(np.zeros(1, np.int64))[0]) == 0
    assert int(fmix64(one)[0]) == 0xB456BCFC34C2CB2C
    neg = np.array([-1], dtype=np.int64)
    for f in (mix64, splitmix64, fmix64):
        assert f(neg)[0] == f(neg.view(np.uint64))[0] and f(one).dtype == np.uint64


def test_mixers_are_bijective_and_leave_their_input_alone():
    x = np.arange(-50_000, 50_000, dtype=np.int64) * 4096  # keys that agree in their low bits
    before = x.copy()
    for f in (mix64, splitmix64, fmix64):
        assert np.unique(f(x)).size == x.size
    assert (x == before).all()
