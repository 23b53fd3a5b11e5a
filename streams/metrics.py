"""Prometheus metrics of the streams processes (module level: one registration per process)."""

from prometheus_client import Counter, Gauge

EVENTS_IN = Counter("hw_stream_events_in_total",
                    "input events consumed (impression items and actions)", ["kind"])
EXAMPLES_OUT = Counter("hw_stream_examples_out_total", "training examples produced", ["label"])
NEGATIVES_DROPPED = Counter("hw_stream_negatives_dropped_total",
                            "negatives dropped by downsampling")
DLQ = Counter("hw_stream_dlq_total", "messages routed to the dead-letter topic", ["reason"])
LATE = Counter("hw_stream_late_actions_total", "actions too late to join, routed to hw.late",
               ["reason"])
REPLAYED_RESOLVED = Counter(
    "hw_stream_joiner_replayed_resolved_total",
    "re-read actions the previous owner had already joined or sent late (not sent late again)")
PENDING = Gauge("hw_stream_pending_requests", "impression requests waiting for their window")
REBUILDS = Counter("hw_stream_joiner_rebuilds_total",
                   "times the joiner rebuilt its state from the input (start, rebalances)")
ASSIGNED = Gauge("hw_stream_assigned_partitions", "input partitions this joiner owns")
WATERMARK = Gauge("hw_stream_watermark_ms", "the joiner's event-time watermark")
PRODUCED = Counter("hw_stream_produced_events_total", "events produced by sources", ["source"])


def dlq_reason(reason: str) -> str:
    """A bounded label set for the DLQ counter (the full reason travels in the message)."""
    for key in ("undecodable", "version", "unknown event", "topic", "dense", "reserved"):
        if key in reason:
            return key.replace(" ", "_")
    return "invalid"
