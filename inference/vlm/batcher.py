"""Micro-batching for the GPU worker: concurrent requests are grouped up to `max_batch_size`,
waiting at most `max_wait_s` after the first one arrives, then run as one batch."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_STOP = object()


class Batcher(Generic[T, R]):
    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], max_batch_size: int = 4, max_wait_s: float = 0.05):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._q: "queue.Queue[object]" = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vlm-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> "Future[R]":
        if self._closed:
            raise RuntimeError("batcher is closed")
        fut: Future[R] = Future()
        self._q.put((item, fut))
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the thread."""
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _collect(self, first: object) -> tuple[list[tuple[T, Future]], bool]:
        batch = [first]  # type: ignore[list-item]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                nxt = self._q.get(timeout=left)
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True  # type: ignore[return-value]
            batch.append(nxt)
        return batch, False  # type: ignore[return-value]

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            items = [b[0] for b in batch]
            futs = [b[1] for b in batch]
            try:
                results = list(self._run(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - delivered to every waiter, loop survives
                for f in futs:
                    f.set_exception(exc)
                continue
            for f, r in zip(futs, results):
                f.set_result(r)
