"""The ledger of the fault runs can fail: it re-derives the input from the generator's seed and
notices what is not on the topics (a wrong sampling draw, requests never produced, examples the
trainer never saw)."""

from __future__ import annotations

import uuid

import pytest
from chaos_helpers import drain_joiner

from headwater.chaos.accounting import account
from streams.generator import GeneratorConfig, produce_synthetic
from streams.joiner import JoinerConfig, OnlineJoiner
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer


@pytest.fixture(scope="module")
def joined(kafka_broker, tmp_path_factory):
    """512 generated requests (5 items each) joined with negatives kept at rate 0.5 (once for
    the module: the tests only read the topics)."""
    prefix = f"chaos-ledger-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics(prefix)
    kafka_topics = kafka_broker.kafka_config(prefix)
    tmp_path = tmp_path_factory.mktemp("ledger")
    gen = GeneratorConfig(bootstrap_servers=kafka_topics.bootstrap_servers,
                          topic_prefix=kafka_topics.topic_prefix, requests=512, items_per_request=5,
                          max_action_delay_ms=2000)
    producer = BatchProducer(kafka_topics)
    produce_synthetic(gen, producer, topic_names(kafka_topics.topic_prefix))
    producer.close()
    joiner = OnlineJoiner(JoinerConfig(
        bootstrap_servers=kafka_topics.bootstrap_servers, topic_prefix=kafka_topics.topic_prefix,
        state_dir=str(tmp_path / "joiner"), window_s=5.0, allowed_lateness_s=0.0,
        negative_rate=0.5))
    drain_joiner(joiner)
    return kafka_topics, gen


def test_ledger_accounts_for_every_event_of_a_clean_run(joined):
    kafka, gen = joined
    led = account(kafka, gen, 512, negative_rate=0.5, checkpoint_dir=None)
    assert led.events_in == 512 * 5 + led.clicks and led.clicks > 0
    assert led.lost == 0 and led.events_accounted == led.events_in
    assert led.items_sampled_out > 0 and led.items_as_examples > 0
    assert led.duplicate_examples == 0


def test_ledger_reports_loss_it_cannot_explain(joined, tmp_path):
    kafka, gen = joined
    wrong_draw = account(kafka, gen, 512, negative_rate=0.9, checkpoint_dir=None)
    assert wrong_draw.lost > 0  # items the recomputed draw says were kept are not on the topic
    never_sent = account(kafka, gen, 1024, negative_rate=0.5, checkpoint_dir=None)
    assert never_sent.requests_missing_from_topic == 512 and never_sent.lost >= 512 * 5
    untrained = account(kafka, gen, 512, negative_rate=0.5, checkpoint_dir=tmp_path / "no-trainer")
    assert untrained.examples_untrained == untrained.examples_on_topic > 0
