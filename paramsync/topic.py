"""The ``hw.params`` topic's partitions: one unsharded, N + 1 for N parameter-server shards
(layout: :mod:`paramsync.wire`)."""

from __future__ import annotations

from paramsync.wire import params_partitions

__all__ = ["ensure_params_partitions"]


def ensure_params_partitions(bootstrap_servers: str, topic: str, num_shards: int) -> int:
    """Makes sure ``topic`` has the partitions ``num_shards`` PS shards need; returns the count.

    Creates the topic when missing and adds partitions when it has too few (a topic that grew
    keeps its old partition 0 contents; shards bootstrap from the next snapshot anyway).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewPartitions, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    want = params_partitions(num_shards)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="hw-params-admin")
    try:
        if topic not in set(admin.list_topics()):
            try:
                admin.create_topics([NewTopic(topic, want, 1)])
                return want
            except TopicAlreadyExistsError:
                pass
        (meta,) = admin.describe_topics([topic])
        have = len(meta["partitions"])
        if have < want:
            try:
                admin.create_partitions({topic: NewPartitions(total_count=want)})
            except KafkaError as exc:
                raise RuntimeError(f"{topic} has {have} partitions; {num_shards} parameter shards "
                                   f"need {want} and adding them failed ({exc}); recreate the topic "
                                   f"with {want} partitions") from None
            have = want
        return have
    finally:
        admin.close()
