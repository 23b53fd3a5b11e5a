"""The streams commands as processes: `headwater broker` starts, serves, and stops on SIGTERM."""

import signal
import subprocess
import sys
import time

from streams.broker import free_port
from streams.kafka_io import KafkaConfig, admin_client, topic_names


def test_headwater_broker_serves_topics_and_stops_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "headwater", "broker", "--port", str(port),
                             "--topic-prefix", "clitest", "--partitions", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once topics exist
        assert line.strip() == f"bootstrap_servers=127.0.0.1:{port}", proc.stderr.read()
        admin = admin_client(KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}"))
        try:
            meta = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
        finally:
            admin.close()
        assert all(meta.get(t) == 2 for t in topic_names("clitest").all())
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            proc.kill()
