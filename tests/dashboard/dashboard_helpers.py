"""Helpers shared by the dashboard tests (a uniquely named module, not conftest)."""

import time
import urllib.request

from streams.broker import free_port  # noqa: F401 (the dashboard tests import it from here)


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
