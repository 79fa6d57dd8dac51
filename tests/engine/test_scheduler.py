"""The step scheduler on its own: who joins a running batch, in which order, and the bound on waiting."""

from __future__ import annotations

import pytest

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.scheduler import SchedulingMode, StepScheduler
from ditserve.request import Request


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, steps: int, size: int = 64, name: str = "") -> Request:
    params = OmniDiffusionSamplingParams(num_inference_steps=steps, height=size, width=size, seed=0)
    return Request(prompt=name or f"{steps} steps at {size}", params=params, arrival_time=clock.now)


def step_key(request: Request) -> tuple[int, int]:
    return request.params.height, request.params.width


def cohort_key(request: Request) -> tuple[int, int, int]:
    return request.params.height, request.params.width, request.params.num_inference_steps


def scheduler(clock: FakeClock, mode: SchedulingMode = SchedulingMode.STEP, max_batch_size: int = 2,
              max_wait_s: float = 30.0) -> StepScheduler:
    return StepScheduler(step_key, cohort_key, max_batch_size, mode=mode, max_wait_s=max_wait_s, clock=clock)


def test_a_compatible_request_joins_the_running_batch_and_another_size_waits(clock: FakeClock) -> None:
    sched = scheduler(clock, max_batch_size=3)
    first = make(clock, 30)
    sched.add(first)
    assert sched.schedule(0).admit == [first]
    other_size, same_size = make(clock, 10, size=128), make(clock, 5)
    sched.add(other_size)
    sched.add(same_size)
    plan = sched.schedule(0)
    assert plan.admit == [same_size] and plan.drop == []
    assert sched.running_ids() == [first.request_id, same_size.request_id]
    sched.finish([first.request_id, same_size.request_id])
    assert sched.schedule(0).admit == [other_size]


def test_fewest_steps_first_when_slots_are_short(clock: FakeClock) -> None:
    sched = scheduler(clock, max_batch_size=2)
    running = make(clock, 50)
    sched.add(running)
    sched.schedule(0)
    long, short = make(clock, 30), make(clock, 10)
    sched.add(long)
    sched.add(short)
    assert sched.schedule(0).admit == [short]


def test_a_request_that_waited_too_long_goes_before_shorter_ones(clock: FakeClock) -> None:
    sched = scheduler(clock, max_batch_size=2, max_wait_s=5.0)
    sched.add(make(clock, 50))
    sched.schedule(0)
    old_long = make(clock, 30)
    sched.add(old_long)
    clock.now += 6.0
    sched.add(make(clock, 10))
    assert sched.schedule(0).admit == [old_long]


def test_an_aborted_running_request_is_dropped_before_the_next_step(clock: FakeClock) -> None:
    sched = scheduler(clock)
    request = make(clock, 20)
    sched.add(request)
    sched.schedule(0)
    request.abort()
    plan = sched.schedule(0)
    assert plan.drop == [request.request_id] and plan.admit == []
    assert sched.running_ids() == []


def test_request_scheduling_forms_cohorts_only_when_idle(clock: FakeClock) -> None:
    sched = scheduler(clock, SchedulingMode.REQUEST, max_batch_size=4)
    first, mate, other_steps = make(clock, 10), make(clock, 10), make(clock, 20)
    for request in (first, mate, other_steps):
        sched.add(request)
    assert sched.schedule(0).admit == [first, mate]
    late = make(clock, 10)
    sched.add(late)
    assert sched.schedule(0).admit == []  # the cohort runs alone to its end
    sched.finish([first.request_id, mate.request_id])
    assert sched.schedule(0).admit == [other_steps]


def test_no_request_waits_past_the_bound_behind_a_stream_of_short_work(clock: FakeClock) -> None:
    """An incompatible request waits at most max_wait_s plus the longest remaining run: simulate a stream of
    compatible 10-step requests arriving every step, each step taking one second."""
    max_wait_s, steps = 20.0, 10
    sched = scheduler(clock, max_batch_size=4, max_wait_s=max_wait_s)
    remaining: dict[str, int] = {}
    other = None
    for tick in range(200):
        sched.add(make(clock, steps, name=f"short {tick}"))
        if tick == 5:
            other = make(clock, 10, size=128, name="other size")
            sched.add(other)
        plan = sched.schedule(0)
        for request in plan.admit:
            remaining[request.request_id] = request.params.num_inference_steps
        if other is not None and other in plan.admit:
            waited = clock.now - other.arrival_time
            assert waited <= max_wait_s + steps
            assert waited >= max_wait_s  # it really had to wait for the drain: the stream never stopped
            return
        clock.now += 1.0
        done = [rid for rid in remaining if rid in sched.running_ids()]
        for rid in done:
            remaining[rid] -= 1
        sched.finish([rid for rid in done if remaining[rid] == 0])
    pytest.fail("the other-size request never started")
