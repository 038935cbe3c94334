"""The runner on a study of its own (no training): every planned run recorded once, resume, workers, and a
run whose recorded result is not finite trained again. A new study needs only its Study."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from engine.results import read_results, read_rows, write_rows
from engine.runner import Study, run_study

COLUMNS = ["name", "seed", "test_acc", "trained_by", "config_hash", "code_fingerprint"]  # test_acc: a float column of results.py
CURVES = ["config_hash", "epoch", "test_acc"]


class ToyTrainer:
    """Trains nothing: a run's value is a function of its spec; says which process made it."""

    def __init__(self, offset: float, show_epochs: bool = True):
        self.offset = offset

    def run(self, specs):
        import os

        out = []
        for s in specs:
            key = f"{s['name']}-{s['seed']}"
            row = dict(name=s["name"], seed=s["seed"], test_acc=self.offset + s["seed"], trained_by=os.getpid(),
                       config_hash=key)
            out.append((row, [dict(config_hash=key, epoch=e, test_acc=e * s["seed"]) for e in (1, 2)]))
        return out


class Counting(ToyTrainer):
    """A ToyTrainer that lists the runs it was asked to train (this process only)."""
    calls: list = []

    def __init__(self, offset: float, show_epochs: bool = True):
        super().__init__(offset, show_epochs)
        Counting.calls = []

    def run(self, specs):
        Counting.calls.extend(specs)
        return super().run(specs)


def toy_study(plan, trainer=None):
    return Study(plan=plan, run_hash=lambda s: f"{s['name']}-{s['seed']}", stack_key=lambda s: (s["name"],),
                 make_trainer=ToyTrainer, trainer_args=(0.5,), trainer=trainer, prefix="toy_", code=["tests.test_runner"],
                 run_columns=COLUMNS, curve_columns=CURVES)


def cfg(tmp_path, **kw):
    return SimpleNamespace(**{**dict(results_dir=str(tmp_path), resume=True, resume_any_code=False, workers=1,
                                     stack_size=3, progress=False), **kw})


PLAN = [dict(name=n, seed=s) for n in ("a", "b") for s in range(5)]


def test_every_run_once_then_resume_trains_nothing(tmp_path):
    rows = run_study(toy_study(PLAN), cfg(tmp_path), torch.device("cpu"))
    assert sorted(r["config_hash"] for r in rows) == sorted(f"{p['name']}-{p['seed']}" for p in PLAN)
    runs, curves = read_results(tmp_path, "toy_")
    assert len(runs) == 10 and len(curves) == 20
    before = read_rows(tmp_path / "toy_runs.csv")
    again = run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path), torch.device("cpu"))
    assert [r["config_hash"] for r in again] == [f"{p['name']}-{p['seed']}" for p in PLAN]  # all recorded, in plan order
    assert Counting.calls == [] and read_rows(tmp_path / "toy_runs.csv") == before
    rows = run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path, resume=False), torch.device("cpu"))
    assert len(Counting.calls) == 10 and len(rows) == 10 and len(read_rows(tmp_path / "toy_runs.csv")) == 10


def test_workers_give_the_same_rows(tmp_path):
    import os

    alone = run_study(toy_study(PLAN), cfg(tmp_path / "alone"), torch.device("cpu"))
    pooled = run_study(toy_study(PLAN), cfg(tmp_path / "pool", workers=2), torch.device("cpu"))
    strip = lambda rows: sorted((r["config_hash"], r["test_acc"]) for r in rows)  # noqa: E731
    assert strip(alone) == strip(pooled)
    assert {r["trained_by"] for r in pooled} - {os.getpid()}  # trained in worker processes


def test_a_run_recorded_with_a_nan_result_is_trained_again(tmp_path):
    run_study(toy_study(PLAN), cfg(tmp_path), torch.device("cpu"))
    rows = read_rows(tmp_path / "toy_runs.csv")
    rows[3]["test_acc"] = math.nan
    write_rows(tmp_path / "toy_runs.csv", rows, COLUMNS)
    run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path), torch.device("cpu"))
    assert Counting.calls == [PLAN[3]]
    assert all(math.isfinite(r["test_acc"]) for r in read_rows(tmp_path / "toy_runs.csv"))


def test_resume_skips_only_runs_of_the_same_code(tmp_path, capsys):
    from engine.results import code_fingerprint, mixed_code_note

    run_study(toy_study(PLAN), cfg(tmp_path), torch.device("cpu"))
    rows = read_rows(tmp_path / "toy_runs.csv")
    assert {r["code_fingerprint"] for r in rows} == {code_fingerprint(["tests.test_runner"])}
    rows[0]["code_fingerprint"], rows[1]["code_fingerprint"] = "0123456789ab", None  # other code; before fingerprints
    write_rows(tmp_path / "toy_runs.csv", rows, COLUMNS)
    assert "combine 3 versions of the code" in mixed_code_note(rows)
    run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path, resume_any_code=True), torch.device("cpu"))
    assert Counting.calls == [] and "2 of the recorded runs kept were made by other versions" in capsys.readouterr().out
    run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path), torch.device("cpu"))
    assert Counting.calls == PLAN[:2]  # the default: runs of other code are trained again
    assert mixed_code_note(read_rows(tmp_path / "toy_runs.csv")) is None


def test_the_fingerprint_follows_the_source(tmp_path, monkeypatch):
    from engine.results import code_fingerprint

    (tmp_path / "toy_code_a.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_fingerprint(["toy_code_a", "engine.runner"])
    assert code_fingerprint(["toy_code_a", "engine.runner"]) == before
    (tmp_path / "toy_code_a.py").write_text("X = 2\n")
    assert code_fingerprint(["toy_code_a", "engine.runner"]) != before
    (tmp_path / "toy_code_a.py").write_text("X = 1\r\n")  # line endings alone do not count
    assert code_fingerprint(["toy_code_a", "engine.runner"]) == before


def test_every_studys_code_list_names_real_modules():
    """The fingerprinted modules exist (a renamed or moved module must be renamed here too)."""
    from engine.results import code_fingerprint
    import scratch
    import sweep

    for code in (sweep.CODE, scratch.CODE):
        assert len(code_fingerprint(code)) == 12
