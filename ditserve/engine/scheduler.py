"""Who runs at the next denoising step: a waiting queue, a running set, and an admission policy.

Before every step the engine asks ``schedule()`` for a ``StepPlan``: the running requests that were aborted
(dropped at once, so their compute goes to the others) and the waiting requests admitted into the free slots.

Two modes (``SchedulingMode``):
- ``STEP``: a waiting request joins the running set at any step when its *step key* matches the running
  requests' (same latent shape and kind of call; prompt, seed, step count and guidance may differ) and leaves it
  the step it finishes. When there are more candidates than slots, the ``AdmissionPolicy`` chooses.
- ``REQUEST`` (and the cohort of a cache that decides for the whole batch, such as cache-dit): a batch forms only
  when the running set is empty, from requests with equal *cohort keys* (same params but seed, prompt and output
  count), first come first served, and runs until all of it has finished.

Starvation: a waiting request whose key differs from the running set's can only start once the running set has
drained. When such a request has waited ``max_wait_s``, no more requests are admitted into the running set, so
it drains within the remaining steps of its longest member and the waiting request goes next. The bound on any
request's wait is therefore ``max_wait_s`` plus the longest remaining run at that moment.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from ditserve.errors import EngineClosedError, QueueFullError, RequestAbortedError
from ditserve.request import Request

#: how long a waiting request may be passed over before the running set is left to drain for it
DEFAULT_MAX_WAIT_S = 30.0


class SchedulingMode(enum.Enum):
    STEP = "step"
    REQUEST = "request"


@dataclass
class StepPlan:
    """What changes in the running set before the next step."""

    admit: list[Request] = field(default_factory=list)
    #: ids of running requests that were aborted
    drop: list[str] = field(default_factory=list)


class AdmissionPolicy(ABC):
    """Orders the waiting requests that could be admitted; the first ones get the free slots."""

    @abstractmethod
    def order(self, candidates: Sequence[Request], now: float) -> list[Request]: ...


class FirstComeFirstServed(AdmissionPolicy):
    def order(self, candidates: Sequence[Request], now: float) -> list[Request]:
        return sorted(candidates, key=lambda r: r.arrival_time)


class ShortestWorkFirst(AdmissionPolicy):
    """Fewest denoising steps first (short work does not wait behind long work), except that a request that has
    waited ``max_wait_s`` goes before every younger one: no request is passed over forever."""

    def __init__(self, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s

    def order(self, candidates: Sequence[Request], now: float) -> list[Request]:
        def rank(request: Request) -> tuple[int, float, float]:
            aged = now - request.arrival_time >= self.max_wait_s
            return (0, request.arrival_time, 0.0) if aged else (1, request.params.num_inference_steps,
                                                                  request.arrival_time)

        return sorted(candidates, key=rank)


@dataclass
class _Running:
    request: Request
    key: Hashable


class StepScheduler:
    def __init__(self, step_key: Callable[[Request], Hashable], cohort_key: Callable[[Request], Hashable],
                 max_batch_size: int, max_queue: int | None = None, mode: SchedulingMode = SchedulingMode.STEP,
                 policy: AdmissionPolicy | None = None, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` must be the clock of the requests' ``arrival_time`` (a simulation passes its own)."""
        self.mode = mode
        self.clock = clock
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        if mode is SchedulingMode.STEP:
            self._key, self._policy = step_key, policy or ShortestWorkFirst(max_wait_s)
        else:
            self._key, self._policy = cohort_key, FirstComeFirstServed()
        self._waiting: list[Request] = []
        self._running: dict[str, _Running] = {}
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        """Requests waiting (not running)."""
        with self._cond:
            return len(self._waiting)

    def running_ids(self) -> list[str]:
        with self._cond:
            return list(self._running)

    def add(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(request)
            self._cond.notify()

    # ------------------------------------------------------------------ planning
    def schedule(self, timeout: float | None = None) -> StepPlan | None:
        """The next step's plan; waits up to ``timeout`` while there is nothing to run. None: nothing to do."""
        with self._cond:
            self._drop_aborted_waiting()
            if not self._waiting and not self._running and not self._closed:
                self._cond.wait(timeout)
                self._drop_aborted_waiting()
            drop = [rid for rid, entry in self._running.items() if entry.request.aborted]
            for rid in drop:
                del self._running[rid]
            admit = self._admit(self.clock())
            if not admit and not drop and not self._running:
                return None
            return StepPlan(admit=admit, drop=drop)

    def _admit(self, now: float) -> list[Request]:
        if self._running:
            if self.mode is SchedulingMode.REQUEST or self._someone_waited_too_long(now):
                return []
            key = next(iter(self._running.values())).key
            candidates = [r for r in self._waiting if self._key(r) == key]
        else:
            if not self._waiting:
                return []
            head = self._policy.order(self._waiting, now)[0]
            key = self._key(head)
            candidates = [r for r in self._waiting if self._key(r) == key]
        chosen = self._policy.order(candidates, now)[:self.max_batch_size - len(self._running)]
        for request in chosen:
            self._waiting.remove(request)
            self._running[request.request_id] = _Running(request, key)
        return chosen

    def _someone_waited_too_long(self, now: float) -> bool:
        """A waiting request that cannot join has waited ``max_wait_s``: let the running set drain for it."""
        key = next(iter(self._running.values())).key
        return any(now - r.arrival_time >= self.max_wait_s for r in self._waiting if self._key(r) != key)

    def finish(self, request_ids: Sequence[str]) -> None:
        """These requests left the running set (finished or failed)."""
        with self._cond:
            for rid in request_ids:
                self._running.pop(rid, None)

    def _drop_aborted_waiting(self) -> None:
        kept = []
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
        """Stop accepting work; return what was still waiting or running (the engine fails those requests)."""
        with self._cond:
            self._closed = True
            left = self._waiting + [entry.request for entry in self._running.values()]
            self._waiting = []
            self._running.clear()
            self._cond.notify_all()
            return left
