"""Who runs at the next denoising step: a waiting queue, a resident set, and an admission policy.

Before every step the engine asks ``schedule()`` for a ``StepPlan``: the resident requests that were aborted
(dropped at once), the waiting requests admitted as residents (encoded, their latents prepared), and which
residents run this step.

Two modes (``SchedulingMode``):
- ``STEP``: a waiting request starts (becomes resident) at any step when its *step key* matches the residents'
  (same latent shape and kind of call; prompt, seed, step count and guidance may differ) and it would run at
  once. Each step runs up to ``max_batch_size`` residents, those with the fewest remaining steps first
  (shortest remaining work first, with preemption: a long request pauses, its state kept, while shorter ones
  run; at most ``RESIDENTS_PER_SLOT`` x ``max_batch_size`` residents), and a request leaves the step it
  finishes.
- ``REQUEST`` (and the cohort of a cache that decides for the whole batch, such as cache-dit): a batch forms only
  when no request is resident, from requests with equal *cohort keys* (same params but seed, prompt and output
  count), first come first served, and every step runs all of it until it has finished.

Starvation: a request that has waited ``max_wait_s`` since it arrived goes before every younger one, both to
become resident and to run (oldest first); a waiting request whose key differs from the residents' makes the
scheduler stop admitting, so the residents drain and it goes next. A request therefore starts within
``max_wait_s`` plus the time the residents at that moment need to finish.
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

#: how long a request may be passed over before it goes first (and the residents drain for it)
DEFAULT_MAX_WAIT_S = 30.0
#: resident requests (state in memory) per batch slot under step scheduling: room to pause long requests
#: while shorter ones run
RESIDENTS_PER_SLOT = 2


class SchedulingMode(enum.Enum):
    STEP = "step"
    REQUEST = "request"


@dataclass
class StepPlan:
    """What changes in the resident set before the next step, and who runs it."""

    admit: list[Request] = field(default_factory=list)
    #: ids of resident requests that were aborted
    drop: list[str] = field(default_factory=list)
    #: ids of the residents that run this step (None: all of them); the others keep their state, paused
    run: list[str] | None = None


#: a request's denoising steps still to run (all of them while it waits)
RemainingSteps = Callable[[Request], int]


class AdmissionPolicy(ABC):
    """Orders requests competing for slots (waiting ones for residency, residents for this step's batch)."""

    @abstractmethod
    def order(self, candidates: Sequence[Request], remaining: RemainingSteps, now: float) -> list[Request]: ...


class FirstComeFirstServed(AdmissionPolicy):
    def order(self, candidates: Sequence[Request], remaining: RemainingSteps, now: float) -> list[Request]:
        return sorted(candidates, key=lambda r: r.arrival_time)


class ShortestWorkFirst(AdmissionPolicy):
    """Fewest remaining denoising steps first (short work does not wait behind long work), except that requests
    that have waited ``max_wait_s`` since they arrived go first, oldest first: none is passed over forever."""

    def __init__(self, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s

    def order(self, candidates: Sequence[Request], remaining: RemainingSteps, now: float) -> list[Request]:
        def rank(request: Request) -> tuple[int, float, float]:
            if now - request.arrival_time >= self.max_wait_s:
                return (0, request.arrival_time, 0.0)
            return (1, remaining(request), request.arrival_time)

        return sorted(candidates, key=rank)


@dataclass
class _Resident:
    request: Request
    key: Hashable
    remaining: int


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
        self.max_residents = max_batch_size * RESIDENTS_PER_SLOT if mode is SchedulingMode.STEP else max_batch_size
        self._waiting: list[Request] = []
        self._residents: dict[str, _Resident] = {}
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        """Requests waiting (not resident)."""
        with self._cond:
            return len(self._waiting)

    def resident_ids(self) -> list[str]:
        with self._cond:
            return list(self._residents)

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
            if not self._waiting and not self._residents and not self._closed:
                self._cond.wait(timeout)
                self._drop_aborted_waiting()
            drop = [rid for rid, entry in self._residents.items() if entry.request.aborted]
            for rid in drop:
                del self._residents[rid]
            now = self.clock()
            admit = self._admit(now)
            if not admit and not drop and not self._residents:
                return None
            return StepPlan(admit=admit, drop=drop, run=self._run_set(now))

    def _admit(self, now: float) -> list[Request]:
        if self._residents:
            if self.mode is SchedulingMode.REQUEST or self._someone_waited_too_long(now):
                return []
            key = next(iter(self._residents.values())).key
        elif self._waiting:
            key = self._key(self._policy.order(self._waiting, self._steps_left, now)[0])
        else:
            return []
        candidates = [r for r in self._waiting if self._key(r) == key]
        chosen = self._policy.order(candidates, self._steps_left, now)[:self.max_residents - len(self._residents)]
        if self.mode is SchedulingMode.STEP:
            # a request starts only to run now: in a free slot, or preempting a resident it goes before
            residents = [entry.request for entry in self._residents.values()]
            first = self._policy.order([*residents, *chosen], self._steps_left, now)[:self.max_batch_size]
            chosen = [r for r in chosen if r in first]
        for request in chosen:
            self._waiting.remove(request)
            self._residents[request.request_id] = _Resident(request, key, request.params.num_inference_steps)
        return chosen

    def _run_set(self, now: float) -> list[str]:
        """The residents that run this step, in the order they became resident (a stable row order)."""
        if self.mode is SchedulingMode.REQUEST:
            return list(self._residents)
        residents = [entry.request for entry in self._residents.values()]
        chosen = {r.request_id for r in self._policy.order(residents, self._steps_left, now)[:self.max_batch_size]}
        return [rid for rid in self._residents if rid in chosen]

    def _steps_left(self, request: Request) -> int:
        entry = self._residents.get(request.request_id)
        return entry.remaining if entry is not None else request.params.num_inference_steps

    def _someone_waited_too_long(self, now: float) -> bool:
        """A waiting request that cannot join has waited ``max_wait_s``: let the residents drain for it."""
        key = next(iter(self._residents.values())).key
        return any(now - r.arrival_time >= self.max_wait_s for r in self._waiting if self._key(r) != key)

    def advance(self, progress: dict[str, tuple[int, int]]) -> None:
        """Steps done by the requests that ran: request id -> (steps done, steps in all)."""
        with self._cond:
            for rid, (done, total) in progress.items():
                entry = self._residents.get(rid)
                if entry is not None:
                    entry.remaining = total - done

    def finish(self, request_ids: Sequence[str]) -> None:
        """These requests are no longer resident (finished or failed)."""
        with self._cond:
            for rid in request_ids:
                self._residents.pop(rid, None)

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
        """Stop accepting work; return what was still waiting or resident (the engine fails those requests)."""
        with self._cond:
            self._closed = True
            left = self._waiting + [entry.request for entry in self._residents.values()]
            self._waiting = []
            self._residents.clear()
            self._cond.notify_all()
            return left
