"""``headwater join`` that kills itself with SIGKILL right after its N-th flush of examples.

Usage: ``python joiner_killed_after_flush.py N join --bootstrap-servers ...``. The kill lands
where a crash re-emits examples: the examples are acknowledged by the broker, the joiner's state
still holds their requests and the input offsets are not committed, so the restarted joiner
closes those requests again and sends the same examples (same ids) once more. Not a test module:
the duplicate tests run it as a real process, so the timing of the kill is not left to chance.
"""

import os
import signal
import sys

from streams import kafka_producer

AFTER = int(sys.argv[1])
_sent = {"examples": False, "flushes": 0}
_send, _flush = kafka_producer.BatchProducer.send, kafka_producer.BatchProducer.flush


def _send_noting_examples(self, topic, value, *args, **kwargs):
    if topic.endswith(".examples"):
        _sent["examples"] = True
    return _send(self, topic, value, *args, **kwargs)


def _flush_then_die(self, *args, **kwargs):
    _flush(self, *args, **kwargs)
    if _sent["examples"]:
        _sent["examples"] = False
        _sent["flushes"] += 1
        if _sent["flushes"] >= AFTER:
            os.kill(os.getpid(), signal.SIGKILL)


kafka_producer.BatchProducer.send = _send_noting_examples
kafka_producer.BatchProducer.flush = _flush_then_die

from headwater.cli import main  # noqa: E402  (after the patch: the joiner must see it)

sys.exit(main(sys.argv[2:]))
