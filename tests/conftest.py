"""Suite-wide set-up. Triton kernels run under the interpreter when no CUDA GPU is present."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _cuda = False
if not _cuda:
    # Must be set before triton is imported anywhere in the process.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- Kafka (streams, issue 2)
import itertools  # noqa: E402
import logging  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs a CLI command in-process gets the CLI's stderr log handler; it must not
    outlive the test (later tests' background threads would log onto the terminal)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

_topic_sets = itertools.count()


@pytest.fixture(scope="session")
def kafka_broker():
    """One real Tansu broker (in-memory storage) on a free loopback port for the whole session.

    Tests must not share topics: take ``kafka_topics`` (a fresh prefix per test) or call
    ``kafka_broker.create_topics(prefix)`` with a prefix of your own.
    """
    from streams.broker import BrokerConfig, EmbeddedBroker

    broker = EmbeddedBroker(BrokerConfig(port=0, topic_prefix="hwtest"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_topics(kafka_broker):
    """A ``KafkaConfig`` whose ``topic_prefix`` names a fresh set of topics created for this test."""
    prefix = f"t{next(_topic_sets)}-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics(prefix)
    return kafka_broker.kafka_config(prefix)
