"""PyFlink (apache-flink) feasibility check: Kafka connector present? keyed state + event-time
timers in a Python operator, and its rate, on a local mini-cluster (no Kafka: from_collection).

    /tmp/engine_venv_flink/bin/python scripts/engine_eval/flink_check.py [--requests 20000]

1. Lists the jars shipped in the pyflink wheel and looks for a Kafka connector / kafka-clients.
2. Tries to build a KafkaSource (needs org.apache.flink.connector.kafka.* on the classpath).
3. Runs the join shape on from_collection: key = request id, ValueState = pending request,
   an event-time timer at impression time + window emits it; prints requests/s and events/s.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--items", type=int, default=20)
    args = ap.parse_args()

    import pyflink
    root = os.path.dirname(pyflink.__file__)
    jars = sorted(os.path.basename(j) for j in glob.glob(f"{root}/**/*.jar", recursive=True))
    kafka_jars = [j for j in jars if "kafka" in j.lower()]
    out = {"pyflink_dir": root, "jars": len(jars), "kafka_jars": kafka_jars}

    from pyflink.common import Types, WatermarkStrategy, Duration
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.datastream.functions import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    try:
        from pyflink.datastream.connectors.kafka import KafkaSource
        KafkaSource.builder().set_bootstrap_servers("127.0.0.1:9092").set_topics("x").build()
        out["kafka_source"] = "built"
    except Exception as exc:  # py4j error: class not found
        out["kafka_source_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    window_ms, n, k = 60_000, args.requests, args.items
    rows = []
    for i in range(n):  # impression, then a click 1..30 s later for every 7th request
        t = 1_700_000_000_000 + i * 5
        rows.append((f"r{i}", "imp", k, t))
        if i % 7 == 0:
            rows.append((f"r{i}", "act", 1, t + 1000 + (i % 29000)))
    rows.sort(key=lambda r: r[3])
    rows.append(("__end__", "wm", 0, rows[-1][3] + 86_400_000))

    class Ts(TimestampAssigner):
        def extract_timestamp(self, value, record_timestamp):
            return value[3]

    class Join(KeyedProcessFunction):
        def open(self, ctx):
            self.st = ctx.get_state(ValueStateDescriptor(
                "p", Types.TUPLE([Types.INT(), Types.INT()])))

        def process_element(self, v, ctx):
            cur = self.st.value() or (0, 0)
            if v[1] == "imp":
                self.st.update((v[2], cur[1]))
                ctx.timer_service().register_event_time_timer(v[3] + window_ms)
            elif v[1] == "act":
                self.st.update((cur[0], cur[1] + v[2]))

        def on_timer(self, ts, ctx):
            cur = self.st.value()
            if cur:
                yield ctx.get_current_key(), cur[0], cur[1]
            self.st.clear()

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(1)
    src = env.from_collection(rows, type_info=Types.TUPLE(
        [Types.STRING(), Types.STRING(), Types.INT(), Types.LONG()]))
    src = src.assign_timestamps_and_watermarks(
        WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_seconds(35))
        .with_timestamp_assigner(Ts()))
    res = src.key_by(lambda r: r[0], key_type=Types.STRING()).process(
        Join(), output_type=Types.TUPLE([Types.STRING(), Types.INT(), Types.INT()]))
    t0 = time.perf_counter()
    got = list(res.execute_and_collect())
    dt = time.perf_counter() - t0
    events = sum(r[2] for r in rows)
    out.update({"joined": len(got), "requests": n, "messages": len(rows), "seconds": round(dt, 2),
                "messages_per_s": round(len(rows) / dt), "events_per_s": round(events / dt),
                "note": "includes JVM + mini-cluster start-up and Python worker start"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
