"""Groups waiting requests into batches of compatible ones (same size, steps, guidance mode...).

First come, first served: the oldest waiting request always runs next, joined by later requests with the
same batch key, up to ``max_batch_size``. No request waits on purpose: under load the queue fills while a
batch runs, and batches form by themselves.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable

from ditserve.engine.request import Request
from ditserve.errors import EngineClosedError, QueueFullError, RequestAbortedError


class BatchScheduler:
    def __init__(self, batch_key: Callable[[Request], Hashable], max_batch_size: int,
                 max_queue: int | None = None) -> None:
        self._batch_key = batch_key
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def add(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(request)
            self._cond.notify()

    def next_batch(self, timeout: float | None = None) -> list[Request]:
        """Wait up to ``timeout`` for work; return the next batch (empty when none came or on close)."""
        with self._cond:
            self._drop_aborted()
            if not self._waiting and not self._closed:
                self._cond.wait(timeout)
                self._drop_aborted()
            if not self._waiting:
                return []
            head = self._waiting.popleft()
            key = self._batch_key(head)
            batch, rest = [head], deque()
            while self._waiting:
                candidate = self._waiting.popleft()
                if len(batch) < self.max_batch_size and self._batch_key(candidate) == key:
                    batch.append(candidate)
                else:
                    rest.append(candidate)
            self._waiting = rest
            return batch

    def _drop_aborted(self) -> None:
        kept: deque[Request] = deque()
        for request in self._waiting:
            if request.aborted:
                if not request.future.done():
                    request.future.set_exception(RequestAbortedError(f"request {request.request_id} was aborted"))
            else:
                kept.append(request)
        self._waiting = kept

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> list[Request]:
        """Stop accepting work; return what was still waiting (the engine fails those requests)."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
            return left
