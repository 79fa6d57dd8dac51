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


def test_diffusers_hooks_still_run_after_the_cache_dit_library_in_a_later_round(tiny_flux_dir: str) -> None:
    # cache_dit.disable_cache leaves FLUX's forward patched; the library therefore gets a pipeline of its own
    from ditserve.bench.runner import run_bench

    options = BenchOptions(model=tiny_flux_dir, steps=3, num_prompts=1, repeats=2, height=64, width=64, quick=True,
                           show_progress=False, only=("FirstBlockCache", "cache-dit DBCache"))
    records = {(r["system"], r["method"]): r for r in run_bench(options)["records"]}
    assert records[("cache-dit", "DBCache+TaylorSeer")]["status"] == "ok"
    assert records[("diffusers", "FirstBlockCache")]["status"] == "ok"
    assert records[("diffusers", "FirstBlockCache")]["samples"] == 2
