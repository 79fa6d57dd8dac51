"""The step scheduler on its own: who becomes resident, who runs each step, in which order, and the bound on
waiting."""

from __future__ import annotations

import pytest

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.scheduler import RESIDENTS_PER_SLOT, SchedulingMode, StepScheduler
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
    assert sched.resident_ids() == [first.request_id, same_size.request_id]
    sched.finish([first.request_id, same_size.request_id])
    assert sched.schedule(0).admit == [other_size]


def test_fewest_steps_first_when_slots_are_short(clock: FakeClock) -> None:
    sched = scheduler(clock, max_batch_size=1)  # one batch slot, two residents
    sched.add(make(clock, 50))
    sched.schedule(0)
    long, short = make(clock, 30), make(clock, 10)
    sched.add(long)
    sched.add(short)
    assert sched.schedule(0).admit == [short]


def test_a_shorter_request_preempts_a_long_one_which_resumes_after_it(clock: FakeClock) -> None:
    sched = scheduler(clock, max_batch_size=1)
    long = make(clock, 50)
    sched.add(long)
    assert sched.schedule(0).run == [long.request_id]
    sched.advance({long.request_id: (5, 50)})
    short = make(clock, 10)
    sched.add(short)
    plan = sched.schedule(0)
    assert plan.admit == [short] and plan.run == [short.request_id]  # the long one is paused, not dropped
    assert sched.resident_ids() == [long.request_id, short.request_id]
    sched.finish([short.request_id])
    assert sched.schedule(0).run == [long.request_id]


def test_a_request_that_waited_too_long_goes_first(clock: FakeClock) -> None:
    sched = scheduler(clock, max_batch_size=1, max_wait_s=5.0)
    long = make(clock, 40)
    sched.add(long)
    sched.schedule(0)
    clock.now += 1.0
    shorter = make(clock, 30)
    sched.add(shorter)
    assert sched.schedule(0).run == [shorter.request_id]  # fewer remaining steps: the long one pauses
    clock.now += 4.5  # the long one has now waited 5.5 s since it arrived, the shorter one 4.5 s
    sched.add(make(clock, 10))
    plan = sched.schedule(0)
    assert plan.admit == []  # two residents already: the newcomer waits
    assert plan.run == [long.request_id]


def test_an_aborted_running_request_is_dropped_before_the_next_step(clock: FakeClock) -> None:
    sched = scheduler(clock)
    request = make(clock, 20)
    sched.add(request)
    sched.schedule(0)
    request.abort()
    plan = sched.schedule(0)
    assert plan.drop == [request.request_id] and plan.admit == []
    assert sched.resident_ids() == []


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
    """An incompatible request waits at most max_wait_s plus the time the residents need to finish: simulate a
    stream of compatible 10-step requests arriving every step, each step taking one second."""
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
        assert plan is not None
        for request in plan.admit:
            remaining[request.request_id] = request.params.num_inference_steps
        if other is not None and other in plan.admit:
            waited = clock.now - other.arrival_time
            # the residents (at most RESIDENTS_PER_SLOT per slot, each with at most `steps` left) drain first
            assert waited <= max_wait_s + RESIDENTS_PER_SLOT * steps
            assert waited >= max_wait_s  # it really had to wait for the drain: the stream never stopped
            return
        clock.now += 1.0
        for rid in plan.run:
            remaining[rid] -= 1
        sched.advance({rid: (steps - remaining[rid], steps) for rid in plan.run})
        sched.finish([rid for rid in plan.run if remaining[rid] == 0])
    pytest.fail("the other-size request never started")
