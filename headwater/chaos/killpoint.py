"""``headwater train`` with a kill point inside its checkpoint write: the chaos run's trainer.

Usage: ``python -m headwater.chaos.killpoint NOTE train ...`` runs ``headwater train ...``
unchanged until it receives SIGUSR2. That arms the kill point: the next checkpoint write
SIGKILLs the process right after the checkpoint's table is durable and before its state file and
manifest are written (the moment at which a table saved in place used to run ahead of its
manifest). Just before dying it writes ``NOTE`` (JSON: the checkpoint's ``seq``, its
``table_dir`` and the ``examples_trained`` that table holds), so the fault can tell afterwards
which table the restarted trainer read (:func:`headwater.chaos.faults.checkpoint_fault`).

The kill is timed by the write itself, not by a clock, so it lands mid-write every time.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
from pathlib import Path

from training import checkpoint

_armed = False
_write, _save_table = checkpoint.CheckpointStore.write, checkpoint.CheckpointStore._save_table
_examples: dict[int, int] = {}  # id(store) -> examples_trained of the write in progress


def _arm(*_: object) -> None:
    global _armed
    _armed = True


def _write_noting(self, *args, **kwargs):
    bound = inspect.signature(_write).bind(self, *args, **kwargs)
    _examples[id(self)] = int(bound.arguments.get("examples_trained", 0))
    return _write(self, *args, **kwargs)


def _save_table_then_die(self, table, seq, prev):
    rel = _save_table(self, table, seq, prev)
    if _armed:
        note = {"seq": seq, "table_dir": rel, "table_version": int(table.version),
                "examples_trained": _examples.get(id(self), 0), "previous_seq": prev.seq if prev else 0}
        checkpoint.atomic_write_bytes(Path(NOTE), json.dumps(note).encode())
        os.kill(os.getpid(), signal.SIGKILL)
    return rel


if __name__ == "__main__":
    NOTE = sys.argv[1]
    checkpoint.CheckpointStore.write = _write_noting
    checkpoint.CheckpointStore._save_table = _save_table_then_die
    signal.signal(signal.SIGUSR2, _arm)

    from headwater.cli import main

    sys.exit(main(sys.argv[2:]))
