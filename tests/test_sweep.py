"""How the runner groups the sweep's runs into stacks."""
from __future__ import annotations

from config import Config
from engine.runner import stacks as grouped
from sweep import run_plan, stack_key


def stacks(plan, stack_size, workers=1):
    return grouped(plan, stack_size, workers, stack_key)


def test_stacks_keep_one_method_and_sketch_and_respect_the_size():
    plan = run_plan(Config(method="all", sketch="both", ranks=[1, 2], seeds=[0, 1, 2]))
    groups = stacks(plan, stack_size=4)
    assert sorted(map(str, (s for g in groups for s in g))) == sorted(map(str, plan))  # every run once
    for g in groups:
        assert len({(s["method"], s["sketch"]) for s in g}) == 1
        assert 1 <= len(g) <= 4
    # 6 runs per adapter (method, sketch) at most 4 a stack: two stacks of 3 (7 methods with both sketches, DoRA's
    # three too; PiSSA's two have none); fpft's 3 seeds: one stack; randlora and adalora: no sketch, one rank per
    # stack: two of 3 each
    assert sorted(map(len, groups)) == [3] * (2 * 2 * (7 + 3) + 2 * 2 + 1 + 2 + 2)


def test_stack_size_one_is_one_run_at_a_time_and_workers_split_stacks():
    plan = run_plan(Config(method="rac_lora", ranks=[1, 2, 4, 8], seeds=[0, 1, 2], run_fpft=False))
    assert [len(g) for g in stacks(plan, 1)] == [1] * 12
    assert [len(g) for g in stacks(plan, 16)] == [12]
    assert sorted(len(g) for g in stacks(plan, 16, workers=2)) == [6, 6]
    assert sorted(len(g) for g in stacks(plan, 16, workers=5)) == [1, 2, 3, 3, 3]  # 12 -> 6+6 -> 3+3+6 -> ...
    fpft_too = run_plan(Config(method="rac_lora", ranks=[1, 2, 4, 8], seeds=[0, 1, 2]))  # 3 fpft + 12 adapter runs
    assert sorted(len(g) for g in stacks(fpft_too, 16, workers=2)) == [3, 6, 6]  # 12 > 8 = an even share
    assert sorted(len(g) for g in stacks(plan[:2], 16, workers=5)) == [1, 1]  # never below one run
