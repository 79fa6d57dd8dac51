import pytest

from ditserve.bench.plan import RunSpec, full_plan, quick_plan
from ditserve.bench.runner import Bench, BenchOptions, Progress, interleave, select_plan


def test_an_unregistered_backend_is_listed_with_the_reason() -> None:
    bench = Bench(BenchOptions(quick=True))
    bench.prompts = ["a red circle"]
    bench.progress = Progress(0, enabled=False)
    record = bench._run_setting(RunSpec("ditserve", "Nope", "ours", {}, "no_such_backend"))
    assert record["status"] == "unavailable"
    assert "'no_such_backend' is not registered" in record["reason"]


def test_plans_start_with_both_baselines_and_alternate_ours_and_peers() -> None:
    for plan in (select_plan(BenchOptions(quick=True)), select_plan(BenchOptions())):
        assert [(s.system, s.group) for s in plan[:2]] == [("diffusers", "baseline"), ("ditserve", "baseline")]
        groups = [s.group for s in plan[2:6]]
        assert groups == ["ours", "peer", "ours", "peer"]
    assert len(select_plan(BenchOptions())) == len(full_plan())


def test_only_keeps_matching_settings_and_the_baselines() -> None:
    plan = select_plan(BenchOptions(quick=True, only=("teacache", "firstblock")))
    assert {s.method for s in plan} == {"uncached", "TeaCache", "FirstBlockCache"}


@pytest.mark.parametrize("plan", [quick_plan(), full_plan()])
def test_every_setting_is_distinct(plan: list[RunSpec]) -> None:
    assert len({spec.key() for spec in plan}) == len(plan)


def test_interleave_keeps_the_leftovers_of_the_longer_side() -> None:
    ours = [RunSpec("ditserve", f"o{i}", "ours") for i in range(2)]
    peers = [RunSpec("diffusers", f"p{i}", "peer") for i in range(3)]
    assert [s.method for s in interleave(ours, peers)] == ["o0", "p0", "o1", "p1", "p2"]
