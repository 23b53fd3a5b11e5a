"""Crossed slots: one stable id per pair of ids, derived the same way wherever rows are scored."""

import subprocess
import sys

import numpy as np
import pytest

from training.model import ModelConfig, cross_bags, cross_parts, with_cross_bags, Bags


def test_every_pair_of_a_row_gets_one_id_and_empty_bags_cross_to_empty():
    a_vals, a_len = np.array([1, 2, 3], np.int64), np.array([2, 0, 1])
    b_vals, b_len = np.array([10, 20, 30, 40], np.int64), np.array([1, 2, 1])
    ids, lengths = cross_bags(a_vals, a_len, b_vals, b_len)
    assert lengths.tolist() == [2, 0, 1]
    one = lambda a, b: cross_bags(np.array([a]), np.array([1]), np.array([b]), np.array([1]))[0][0]
    assert ids.tolist() == [one(1, 10), one(2, 10), one(3, 40)]
    assert one(1, 10) != one(10, 1)  # ordered: user x genre is not genre x user


def test_pair_ids_are_the_same_in_another_process():
    ids, _ = cross_bags(np.array([7, -3], np.int64), np.array([1, 1]), np.array([5, 2**62], np.int64),
                        np.array([1, 1]))
    code = ("import numpy as np; from training.model import cross_bags; "
            "print(cross_bags(np.array([7, -3]), np.array([1, 1]), np.array([5, 2**62]), np.array([1, 1]))[0].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == str(ids.tolist())


def test_with_cross_bags_adds_the_crossed_slot_and_leaves_the_parts():
    sparse = {"user_id": Bags(np.array([4, 5]), np.array([1, 1])),
              "genres": Bags(np.array([1, 2, 3]), np.array([2, 1]))}
    out = with_cross_bags(sparse, ("user_id*genres", "user_id*missing"), 2)
    assert out["user_id"] is sparse["user_id"] and out["user_id*genres"].lengths.tolist() == [2, 1]
    assert out["user_id*missing"].lengths.tolist() == [0, 0]


def test_a_cross_must_name_two_slots_of_the_model():
    assert cross_parts("user_id*genres") == ("user_id", "genres")
    with pytest.raises(ValueError):
        cross_parts("user_id")
    with pytest.raises(ValueError):
        ModelConfig(slots=("user_id", "user_id*genres"), crosses=("user_id*genres",)).validate()
    ModelConfig(slots=("user_id", "genres", "user_id*genres"), crosses=("user_id*genres",)).validate()
