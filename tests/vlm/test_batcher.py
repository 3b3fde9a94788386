import threading
import time

import pytest

from inference.vlm import Batcher


def test_groups_up_to_max_batch_size():
    seen = []
    gate = threading.Event()

    def run(items):
        gate.wait(5)  # hold the first batch so the rest queue up
        seen.append(list(items))
        return [i * 10 for i in items]

    b = Batcher(run, max_batch_size=3, max_wait_s=0.2)
    futs = [b.submit(i) for i in range(7)]
    gate.set()
    assert [f.result(5) for f in futs] == [i * 10 for i in range(7)]
    b.close(5)
    assert all(len(s) <= 3 for s in seen) and sum(len(s) for s in seen) == 7
    assert [i for s in seen for i in s] == list(range(7))  # order kept
    assert max(len(s) for s in seen) == 3


def test_lone_request_waits_at_most_max_wait():
    sizes = []
    b = Batcher(lambda items: sizes.append(len(items)) or list(items), max_batch_size=8, max_wait_s=0.05)
    t0 = time.monotonic()
    assert b.submit("x").result(5) == "x"
    assert time.monotonic() - t0 < 1.0 and sizes == [1]
    b.close(5)


def test_concurrent_arrivals_within_wait_share_a_batch():
    sizes = []
    b = Batcher(lambda items: sizes.append(len(items)) or list(items), max_batch_size=8, max_wait_s=0.5)
    futs = [b.submit(i) for i in range(4)]
    assert [f.result(5) for f in futs] == [0, 1, 2, 3]
    assert sizes == [4]
    b.close(5)


def test_failure_reaches_every_waiter_and_batcher_survives():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("gpu fell over")
        return items

    b = Batcher(run, max_batch_size=2, max_wait_s=0.2)
    f1, f2 = b.submit(1), b.submit(2)
    for f in (f1, f2):
        with pytest.raises(RuntimeError, match="gpu fell over"):
            f.result(5)
    assert b.submit(3).result(5) == 3
    b.close(5)


def test_wrong_result_count_is_an_error_and_closed_rejects():
    b = Batcher(lambda items: [], max_batch_size=2, max_wait_s=0.01)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        b.submit(1).result(5)
    b.close(5)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(2)
