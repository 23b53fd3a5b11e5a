"""The arbiter between the serving runtime's classes: urgent work goes first, lower classes age in."""

from __future__ import annotations

import threading
import time

from batching import Arbiter, Priority


def _wait_in_thread(arbiter: Arbiter, cls: int) -> tuple[threading.Thread, list[float]]:
    waited: list[float] = []
    t = threading.Thread(target=lambda: waited.append(arbiter.wait_turn(cls)))
    t.start()
    return t, waited


def test_no_wait_and_no_hold_counted_when_nothing_more_urgent_is_in_flight():
    arbiter = Arbiter(aging_s=5.0)
    with arbiter.busy(Priority.GENERATE):
        assert arbiter.wait_turn(Priority.RERANK) == 0.0
        assert arbiter.wait_turn(Priority.GENERATE) == 0.0
    assert arbiter.holds == 0 and arbiter.held_s == 0.0


def test_llm_work_is_held_while_dlrm_work_is_in_flight_and_goes_when_it_ends():
    arbiter = Arbiter(aging_s=5.0)
    with arbiter.busy(Priority.DLRM):
        t, waited = _wait_in_thread(arbiter, Priority.GENERATE)
        time.sleep(0.1)
        assert t.is_alive()  # held while the DLRM work runs
    t.join(2)
    assert not t.is_alive() and waited[0] >= 0.09 and arbiter.holds == 1
    assert arbiter.in_flight(Priority.DLRM) == 0


def test_dlrm_work_never_waits_on_llm_work():
    arbiter = Arbiter(aging_s=5.0)
    with arbiter.busy(Priority.RERANK), arbiter.busy(Priority.RANK), arbiter.busy(Priority.GENERATE):
        t0 = time.perf_counter()
        assert arbiter.wait_turn(Priority.DLRM) == 0.0
        with arbiter.busy(Priority.DLRM):  # marking DLRM work in flight does not block either
            pass
        assert time.perf_counter() - t0 < 0.05
    assert arbiter.holds == 0


def test_rerank_work_waits_less_than_generation_while_dlrm_work_is_in_flight():
    arbiter = Arbiter(aging_s=0.1)
    with arbiter.busy(Priority.DLRM):  # DLRM work that outlasts both waits
        rerank, rerank_waited = _wait_in_thread(arbiter, Priority.RERANK)
        rank, rank_waited = _wait_in_thread(arbiter, Priority.RANK)
        generate, generate_waited = _wait_in_thread(arbiter, Priority.GENERATE)
        for t in (rerank, rank, generate):
            t.join(2)
    # one ageing step per class between it and DLRM
    assert 0.09 <= rerank_waited[0] < 0.18
    assert 0.19 <= rank_waited[0] < 0.28
    assert 0.29 <= generate_waited[0] < 0.38
    assert arbiter.holds == 3


def test_a_waiting_lower_class_gets_its_turn_after_the_ageing_bound_under_continuous_urgent_load():
    """DLRM work that never pauses (one call always in flight, more coming and going, each
    waking the waiter) holds a generation step at most three ageing steps, not forever."""
    arbiter = Arbiter(aging_s=0.03)
    stop = threading.Event()

    def dlrm_load() -> None:
        with arbiter.busy(Priority.DLRM):
            while not stop.is_set():
                with arbiter.busy(Priority.DLRM):
                    time.sleep(0.002)

    load = threading.Thread(target=dlrm_load)
    load.start()
    try:
        time.sleep(0.01)
        waiter, waits = _wait_in_thread(arbiter, Priority.GENERATE)
        waiter.join(2)
        assert not waiter.is_alive()  # not starved
    finally:
        stop.set()
        load.join(2)
    assert 0.09 <= waits[0] < 0.3, waits
