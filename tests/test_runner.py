"""The runner on a study of its own (no training): every planned run recorded once, resume, workers, and a
run whose recorded result is not finite trained again. A new study needs only its Study."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from engine.results import read_results, read_rows, write_rows
from engine.runner import Study, cpu_count, run_study

# a study declares its columns and their types; the store parses by them
COLUMNS = {"name": str, "seed": int, "test_acc": float, "trained_by": int, "config_hash": str, "code_fingerprint": str,
           "device": str, "hardware": str, "threads": int}
CURVES = {"config_hash": str, "epoch": int, "test_acc": float}


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
                       config_hash=key, device="cpu")
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
                 make_trainer=ToyTrainer, trainer_args=(0.5,), trainer=trainer, prefix="toy_", code=__name__,
                 run_columns=COLUMNS, curve_columns=CURVES)


def cfg(tmp_path, **kw):
    return SimpleNamespace(**{**dict(results_dir=str(tmp_path), resume=True, resume_any_code=False, workers=1, executor="local",
                                     stack_size=3, progress=False, report_to="none"), **kw})


PLAN = [dict(name=n, seed=s) for n in ("a", "b") for s in range(5)]


def test_every_run_once_then_resume_trains_nothing(tmp_path):
    rows = run_study(toy_study(PLAN), cfg(tmp_path), torch.device("cpu"))
    assert sorted(r["config_hash"] for r in rows) == sorted(f"{p['name']}-{p['seed']}" for p in PLAN)
    runs, curves = read_results(tmp_path, "toy_", COLUMNS, CURVES)
    assert len(runs) == 10 and len(curves) == 20
    before = read_rows(tmp_path / "toy_runs.csv", COLUMNS)
    again = run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path), torch.device("cpu"))
    assert [r["config_hash"] for r in again] == [f"{p['name']}-{p['seed']}" for p in PLAN]  # all recorded, in plan order
    assert Counting.calls == [] and read_rows(tmp_path / "toy_runs.csv", COLUMNS) == before
    rows = run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path, resume=False), torch.device("cpu"))
    assert len(Counting.calls) == 10 and len(rows) == 10 and len(read_rows(tmp_path / "toy_runs.csv", COLUMNS)) == 10


def test_workers_give_the_same_rows(tmp_path):
    import os

    alone = run_study(toy_study(PLAN), cfg(tmp_path / "alone"), torch.device("cpu"))
    pooled = run_study(toy_study(PLAN), cfg(tmp_path / "pool", workers=2), torch.device("cpu"))
    strip = lambda rows: sorted((r["config_hash"], r["test_acc"]) for r in rows)  # noqa: E731
    assert strip(alone) == strip(pooled)
    assert {r["trained_by"] for r in pooled} - {os.getpid()}  # trained in worker processes


def test_a_run_recorded_with_a_nan_result_is_trained_again(tmp_path):
    run_study(toy_study(PLAN), cfg(tmp_path), torch.device("cpu"))
    rows = read_rows(tmp_path / "toy_runs.csv", COLUMNS)
    rows[3]["test_acc"] = math.nan
    write_rows(tmp_path / "toy_runs.csv", rows, COLUMNS)
    run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path), torch.device("cpu"))
    assert Counting.calls == [PLAN[3]]
    assert all(math.isfinite(r["test_acc"]) for r in read_rows(tmp_path / "toy_runs.csv", COLUMNS))


def test_resume_skips_only_runs_of_the_same_code(tmp_path, capsys):
    from engine.provenance import code_fingerprint
    from engine.results import mixed_code_note

    run_study(toy_study(PLAN), cfg(tmp_path), torch.device("cpu"))
    rows = read_rows(tmp_path / "toy_runs.csv", COLUMNS)
    assert {r["code_fingerprint"] for r in rows} == {code_fingerprint(__name__)}
    rows[0]["code_fingerprint"], rows[1]["code_fingerprint"] = "0123456789ab", None  # other code; before fingerprints
    write_rows(tmp_path / "toy_runs.csv", rows, COLUMNS)
    assert "combine 3 versions of the code" in mixed_code_note(rows)
    run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path, resume_any_code=True), torch.device("cpu"))
    assert Counting.calls == [] and "2 of the recorded runs kept were made by other versions" in capsys.readouterr().out
    run_study(toy_study(PLAN, Counting(0.5)), cfg(tmp_path), torch.device("cpu"))
    assert Counting.calls == PLAN[:2]  # the default: runs of other code are trained again
    assert mixed_code_note(read_rows(tmp_path / "toy_runs.csv", COLUMNS)) is None


def test_rows_record_the_machine_that_trained_them(tmp_path):
    """Every runs row says where it was made (provenance): the worker's threads, not the parent's."""
    from engine.provenance import PROVENANCE_COLUMNS, cpu_model

    alone = run_study(toy_study(PLAN), cfg(tmp_path / "alone"), torch.device("cpu"))
    pooled = run_study(toy_study(PLAN), cfg(tmp_path / "pool", workers=2), torch.device("cpu"))
    for r in alone + pooled:
        assert set(PROVENANCE_COLUMNS) <= set(r) and r["hardware"] == cpu_model() and r["torch_version"] == torch.__version__
        assert r["blas"] and r["threads"] >= 1
    assert {r["threads"] for r in alone} == {torch.get_num_threads()}
    recorded = read_rows(tmp_path / "pool" / "toy_runs.csv", COLUMNS)
    assert {r["threads"] for r in recorded} == {max(1, cpu_count() // 2)}  # each of 2 workers: its share of the cores


def _lab(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_fingerprint_follows_every_imported_module(tmp_path):
    from engine.provenance import code_fingerprint, imported_closure

    root = _lab(tmp_path, {"study.py": "import helper\nX = 1\n", "helper.py": "from pkg.deep import Y\n",
                           "pkg/__init__.py": "", "pkg/deep.py": "Y = 1\n", "other.py": "Z = 1\n"})
    assert list(imported_closure("study", root)) == ["helper", "pkg.deep", "study"]
    before = code_fingerprint("study", root)
    (root / "pkg" / "deep.py").write_text("Y = 2\n")  # two imports away
    assert code_fingerprint("study", root) != before
    (root / "pkg" / "deep.py").write_text("Y = 1\r\n")  # line endings alone do not count
    assert code_fingerprint("study", root) == before
    (root / "other.py").write_text("Z = 2\n")  # not imported: not this study's code
    assert code_fingerprint("study", root) == before


def test_editing_any_module_a_study_imports_changes_its_fingerprint(tmp_path):
    """On a copy of the lab: every module in a study's import closure changes the study's fingerprint; the
    federated study's closure has the registry and RandLoRA, which its hand-kept list once left out."""
    import shutil

    from engine.provenance import ROOT, code_fingerprint, imported_closure, lab_modules

    for name, path in lab_modules().items():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    assert {"raclora.methods", "randlora", "fed.simulate", "data"} <= set(imported_closure("fed.study", tmp_path))
    for study in ("sweep", "fed.study"):
        before = code_fingerprint(study, tmp_path)
        assert before == code_fingerprint(study)  # the copy is the lab
        for name, path in imported_closure(study, tmp_path).items():
            text = path.read_text()
            path.write_text(text + "\n# an edit\n")
            assert code_fingerprint(study, tmp_path) != before, (study, name)
            path.write_text(text)
        assert code_fingerprint(study, tmp_path) == before
