"""The rank launcher and the torchrun environment: what `headwater train --nproc N` relies on."""

from __future__ import annotations

import json
import sys
import time

import pytest

from headwater.cli.train import _strip_nproc
from training.distributed.consumer import rank_partitions
from training.distributed.env import DistEnv, spawn_ranks


def test_the_environment_is_read_as_torchrun_writes_it():
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, master_addr="10.0.0.1", master_port=29400)
    assert env.distributed and not DistEnv.from_env({}).distributed
    with pytest.raises(ValueError, match="out of range"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="bad torchrun"):
        DistEnv.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_each_rank_gets_its_own_variables(tmp_path):
    code = ("import json, os, sys; keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', "
            "'MASTER_PORT'); open(os.path.join(sys.argv[1], 'rank' + os.environ['RANK']), 'w')"
            ".write(json.dumps([os.environ[k] for k in keys]))")
    assert spawn_ranks(3, [sys.executable, "-c", code, str(tmp_path)], timeout_s=60) == [0, 0, 0]
    seen = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(3)]
    assert [s[:3] for s in seen] == [["0", "3", "0"], ["1", "3", "1"], ["2", "3", "2"]]
    assert {s[3] for s in seen} == {"127.0.0.1"}
    assert len({s[4] for s in seen}) == 1  # one rendezvous port for all


def test_one_failing_rank_stops_the_others_instead_of_leaving_them_blocked():
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(120)"
    t0 = time.monotonic()
    codes = spawn_ranks(2, [sys.executable, "-c", code], timeout_s=90)
    assert codes[1] == 3 and codes[0] != 0
    assert time.monotonic() - t0 < 60


def test_the_launcher_passes_every_other_flag_on_to_the_ranks():
    argv = ["train", "--nproc", "2", "--json", "--nproc=4", "--batch-size", "64"]
    assert _strip_nproc(argv) == ["train", "--json", "--batch-size", "64"]


def test_partitions_are_dealt_round_robin_and_none_is_read_twice():
    parts = list(range(5))
    got = [rank_partitions(parts, r, 2) for r in range(2)]
    assert got == [[0, 2, 4], [1, 3]]
    assert rank_partitions([0], 1, 2) == []  # more ranks than partitions: an idle rank
