"""plots.py draws from result rows only: the committed docs/results CSVs, or a few rows built here, drawn into
tmp_path; the tests read the written files and the figures' axes (plots.keep_figures)."""
from __future__ import annotations

import ast
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import matplotlib.container
import matplotlib.ticker
import numpy as np
import pytest

import plots
import scratch
import sweep
from engine.results import figure_prefix, mean_std, read_rows, upsert_runs
from fed import study as fed_study

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"
OLD_NAMES = {"rank_vs_accuracy.png", "accuracy_vs_epoch.png", "methods_rank1.png", "fed_accuracy_vs_round.png",
             "fed_accuracy_vs_mb.png", "fed_aggregation_error.png"}
PNG = b"\x89PNG\r\n\x1a\n"


def mnist(name):
    return (read_rows(DOCS / f"{name}_runs.csv", sweep.RUN_COLUMNS),
            read_rows(DOCS / f"{name}_curves.csv", sweep.CURVE_COLUMNS))


def fed(name):
    return (read_rows(DOCS / f"{name}_runs.csv", fed_study.RUN_COLUMNS),
            read_rows(DOCS / f"{name}_curves.csv", fed_study.CURVE_COLUMNS))


def draw(fn, *args):
    """(paths written, {path: Figure}) of one drawing call; every figure is checked for labels and data."""
    with plots.keep_figures() as figures:
        paths = fn(*args)
    assert set(paths) == set(figures)
    for path, fig in figures.items():
        assert path.read_bytes()[:8] == PNG, path
        check_figure(fig, path)
    return paths, figures


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def check_figure(fig, path):
    """Every visible axis has an x label and a y label (panels sharing a y axis: one of them), and every
    panel shows data (a line of two or more points, a marker, a bar)."""
    for ax in panels(fig):
        if ax.get_ylabel() == "":
            assert any(o.get_ylabel() for o in ax.get_shared_y_axes().get_siblings(ax) if o is not ax), path
        if ax.get_xlabel() == "":  # a twin y-axis shares the x axis of its host, which is labelled
            assert any(o.get_xlabel() for o in ax.get_shared_x_axes().get_siblings(ax) if o is not ax), path
        assert visible_series(ax) or ax.patches, f"{path}: a panel with nothing drawn"


def visible_series(ax):
    """The labelled series one can see, as (label, number of points, marker): a line of two or more points,
    or points with a marker (errorbar's data line: its label is on its container)."""
    lines = [(ln.get_label(), ln) for ln in ax.get_lines()]
    lines += [(c.get_label(), c.lines[0]) for c in ax.containers
              if isinstance(c, matplotlib.container.ErrorbarContainer) and c.lines[0] is not None]
    out = []
    for label, line in lines:
        n, marker = len(line.get_xdata()), line.get_marker()
        if not label.startswith("_") and (n > 1 or (n == 1 and marker not in (None, "", " ", "None"))):
            out.append((label, n, marker))
    return out


def titles(fig):
    out = [ax.get_title() for ax in panels(fig)] + ([fig._suptitle.get_text()] if fig._suptitle is not None else [])
    return [t for t in out if t]


def by_name(figures, name):
    (fig,) = [f for p, f in figures.items() if p.name == name]
    return fig


def ticks_in_view(ax):
    """The x ticks the figure shows (the locator also returns some outside the view)."""
    lo, hi = sorted(ax.get_xlim())
    return [t for t in ax.xaxis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


# --- 1. figures named by model (and target set), federated ones by partition -----------------------------
def test_mlp_and_vit_figures_land_side_by_side(tmp_path):
    runs, curves = mnist("default")
    vit_runs, vit_curves = mnist("vit")
    targets = {r["config_hash"]: json.loads(r["config"])["target_modules"] for r in vit_runs}
    shared = [r for r in vit_runs if r["method"] in ("base", "fpft")]  # recorded once, by the sweep on every layer
    vit_all = [r for r in vit_runs if r["method"] in ("lora", "rac_lora") and targets[r["config_hash"]] == ["all"]]
    vit_attention = [r for r in vit_runs if r["method"] == "rac_lora" and targets[r["config_hash"]] == ["attention"]]
    mlp_paths, mlp = draw(plots.draw_all, runs, curves, tmp_path)
    vit_paths, vit = draw(plots.draw_all, shared + vit_all, vit_curves, tmp_path)
    att_paths, att = draw(plots.draw_all, shared + vit_attention, vit_curves, tmp_path)
    kinds = ["rank_vs_accuracy.png", "accuracy_vs_epoch.png", "methods_rank1.png", "params_vs_accuracy.png"]
    assert [p.name for p in mlp_paths] == [f"mlp_{k}" for k in kinds]
    assert [p.name for p in vit_paths] == [f"vit_{k}" for k in kinds]
    assert [p.name for p in att_paths] == [f"vit_attention_{k}" for k in kinds]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in mlp_paths + vit_paths + att_paths)
    assert not OLD_NAMES & {p.name for p in tmp_path.iterdir()}
    # what each figure shows is as before: the titles name the model, a series per method and sketch
    assert all("ViT" not in t for f in mlp.values() for t in titles(f))
    assert all(t.startswith("ViT: ") for f in vit.values() for t in titles(f) if "rank" not in t[:6])
    assert all(t.startswith("ViT, adapters on attention: ") for f in att.values() for t in titles(f)
               if "rank" not in t[:6])
    main = panels(by_name(vit, "vit_rank_vs_accuracy.png"))[0]
    shown = {label for label, *_ in visible_series(main)}
    assert shown - {f"FPFT on digits 5-9: {100 * mean_std([r['test_acc_b'] for r in shared if r['method'] == 'fpft'])[0]:.1f}%"} \
        == {plots.label(r["method"], r["sketch"]) for r in vit_all} == {
            "LoRA (Zero, Gaussian)", "LoRA (Gaussian, Zero)", "RAC-LoRA (Zero, Gaussian)", "RAC-LoRA (Gaussian, Zero)"}


def test_model_stem_names_the_model_and_the_target_set():
    def row(method="rac_lora", **cfg):
        return {"method": method, "config": json.dumps(cfg)}
    assert plots.model_stem([row(hidden=[64, 64])]) == "mlp"  # rows recorded before the model field existed
    assert plots.model_stem([row(model="mlp", target_modules=["all"])]) == "mlp"
    assert plots.model_stem([row(model="vit", target_modules=["all"])]) == "vit"
    assert plots.model_stem([row(model="vit", target_modules=["attention"])]) == "vit_attention"
    assert plots.model_stem([row(model="vit", target_modules=["blocks.0.attn.q", "blocks.0.attn.v"])]) == \
        "vit_blocks.0.attn.q-blocks.0.attn.v"
    assert plots.model_stem([row(model="mlp", target_modules=["0/1"])]) == "mlp_0-1"  # no folder in a name
    # the base model and FPFT do not depend on the target set: an attention sweep reuses them
    mixed = [row("base", model="vit", target_modules=["all"]), row(model="vit", target_modules=["attention"])]
    assert plots.model_stem(mixed) == "vit_attention"
    assert plots.model_tag(mixed) == "ViT, adapters on attention"


def test_federated_figures_are_named_by_partition(tmp_path, capsys):
    iid, iid_curves = fed("fed_iid")
    dirichlet, dirichlet_curves = fed("fed_dirichlet")
    a, _ = draw(plots.draw_federated, iid, iid_curves, tmp_path, fed_study.PREFIX)
    b, _ = draw(plots.draw_federated, dirichlet, dirichlet_curves, tmp_path, fed_study.PREFIX)
    kinds = ["accuracy_vs_round.png", "accuracy_vs_mb.png", "aggregation_error.png"]
    assert [p.name for p in a] == [f"fed_iid_{k}" for k in kinds]
    assert [p.name for p in b] == [f"fed_dirichlet_{k}" for k in kinds]
    assert len(list(tmp_path.iterdir())) == 6
    mixed, _ = draw(plots.draw_federated, iid + dirichlet, iid_curves + dirichlet_curves, tmp_path / "m",
                    fed_study.PREFIX)
    assert [p.name for p in mixed] == [f"fed_{k}" for k in kinds]  # two schemes together: no scheme in the name


# --- 1b. figures named by study and results folder (issue 21) -------------------------------------------------
def results_folder(folder: Path, prefix: str, name: str) -> Path:
    """docs/results/<name>_runs.csv and _curves.csv, byte for byte, in ``folder`` as the study of ``prefix``
    writes them (<prefix>runs.csv, <prefix>curves.csv): results recorded before the figures were named by study."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("runs", "curves"):
        shutil.copy(DOCS / f"{name}_{kind}.csv", folder / f"{prefix}{kind}.csv")
    return folder


def test_every_studys_figures_land_side_by_side_in_one_plots_folder(tmp_path, capsys):
    """One plots folder for all: main.py --plots_only on the default sweep (results/) and on Table 3's sweep in
    another results folder (table3/), both recorded before this naming (they used to write the same three
    mlp_*.png); the federated and from-scratch studies' figures from the shared results/ folder; glue.py's from
    results/ and from rank16/ (they used to write the same glue_*.png). Every figure keeps a file of its own: each
    study adds exactly its names (its prefix, then the results folder's name unless it is "results"), and no file
    written before changes by a byte."""
    import glue
    import main
    from engine.runner import report

    plots_dir, written = tmp_path / "plots", {}

    def landed(names):
        files = {p.name: p.read_bytes() for p in plots_dir.iterdir()}
        assert {n: files.get(n) for n in written} == written  # nothing drawn before was written over
        assert set(files) - set(written) == set(names)
        written.update({n: files[n] for n in names})

    def plots_only(folder, prefix, run_columns, curve_columns, draw, summary=lambda rows: ""):
        """runner.report, as each study's --plots_only calls it, on every run of the folder."""
        runs = read_rows(folder / f"{prefix}runs.csv", run_columns)
        report(SimpleNamespace(results_dir=str(folder), plots_dir=str(plots_dir)), None,
               {r["settings_hash"] for r in runs}, summary, draw, run_columns, curve_columns, prefix)

    mlp = ("rank_vs_accuracy.png", "accuracy_vs_epoch.png", "methods_rank1.png")
    for folder, name, args, more in (("results", "default", [], ("params_vs_accuracy.png",)),  # ranks 1 2 4 8
                                     ("table3", "table3", ["--method", "all", "--sketch", "both", "--ranks", "1"],
                                      ())):  # rank 1 only: no line of two sizes
        results = results_folder(tmp_path / folder, "", name)
        assert main.main(["--plots_only", *args, "--device", "cpu", "--results_dir", str(results),
                          "--plots_dir", str(plots_dir)]) == 0
        landed({("" if folder == "results" else f"{folder}_") + f"mlp_{k}" for k in mlp + more})
    shared = tmp_path / "results"  # one results folder for every study, as by default
    plots_only(results_folder(shared, fed_study.PREFIX, "fed_dirichlet"), fed_study.PREFIX, fed_study.RUN_COLUMNS,
               fed_study.CURVE_COLUMNS, plots.draw_federated)
    landed({f"fed_dirichlet_{k}.png" for k in ("accuracy_vs_round", "accuracy_vs_mb", "aggregation_error")})
    plots_only(results_folder(shared, scratch.PREFIX, "scratch_fashion_mnist_sgd_e100"), scratch.PREFIX,
               scratch.RUN_COLUMNS, scratch.CURVE_COLUMNS, plots.draw_scratch)
    landed({f"scratch_fashion_mnist_sgd_{k}.png" for k in ("lowrank", "lowrank_ae", "all", "final")})
    runs, curves = glue_rows([0, 1], 2)
    for folder in ("results", "rank16"):
        rows = [dict(r, settings_hash="s", epochs=2) for r in runs]
        upsert_runs(tmp_path / folder, rows, curves, glue.PREFIX, glue.RUN_COLUMNS, glue.CURVE_COLUMNS)
        plots_only(tmp_path / folder, glue.PREFIX, glue.RUN_COLUMNS, glue.CURVE_COLUMNS, glue.draw, glue.summary)
        landed({f"glue_{'' if folder == 'results' else folder + '_'}{k}.png" for k in ("dev_metric", "dev_by_epoch")})
    assert len(written) == 4 + 3 + 3 + 4 + 2 * 2
    out = capsys.readouterr().out
    assert out.count("wrote ") == len(written) and "rte (accuracy)" in out


def test_figure_names_start_with_the_studys_prefix_then_the_results_folders_name(tmp_path):
    """engine.results.figure_prefix, and the studies' prefixes it starts from: every lab module's PREFIX
    (read from the source: no list kept here) is distinct, as the results files they name must be."""
    assert figure_prefix("results", "") == figure_prefix(tmp_path / "results", "") == ""
    assert figure_prefix("./results", "fed_") == "fed_" and figure_prefix("results/table3", "") == "table3_"
    assert figure_prefix(tmp_path / "e100", "scratch_") == "scratch_e100_"
    assert figure_prefix(tmp_path / "my runs (2)", "glue_") == "glue_my-runs-2_"  # only safe characters
    from engine.provenance import lab_modules

    prefixes = {f"{name}.{node.targets[0].id}": ast.literal_eval(node.value) for name, path in lab_modules().items()
                for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", "").endswith("PREFIX") and isinstance(node.value, ast.Constant)}
    assert {"fed.study.PREFIX", "fed.study.FLOWER_PREFIX", "scratch.PREFIX", "glue.PREFIX",
            "convergence.PREFIX"} <= set(prefixes)
    assert len(set(prefixes.values())) == len(prefixes) and "" not in prefixes.values(), prefixes


# --- 2. a one-epoch (one-round) run: markers, never an empty figure -------------------------------------------
def test_a_one_epoch_run_draws_markers(tmp_path):
    runs, curves = mnist("default")
    first = [c for c in curves if c["epoch"] == 1]
    _, figures = draw(plots.draw_all, runs, first, tmp_path)
    fig = by_name(figures, "mlp_accuracy_vs_epoch.png")
    ranks = sorted({r["rank"] for r in runs if r["rank"]})
    assert len(panels(fig)) == len(ranks)
    for ax in panels(fig):
        series = visible_series(ax)
        assert {label for label, *_ in series} == {"FPFT", "RAC-LoRA (Zero, Gaussian)"}, ax.get_title()
        assert all(n == 1 and marker == "o" for _, n, marker in series)
        assert ticks_in_view(ax) == [1]


def test_a_curve_of_many_epochs_stays_a_line_with_its_band(tmp_path):
    runs, curves = mnist("default")
    _, figures = draw(plots.draw_all, runs, curves, tmp_path)
    ax = panels(by_name(figures, "mlp_accuracy_vs_epoch.png"))[0]
    assert all(n > 1 for _, n, _ in visible_series(ax))
    assert len(ax.collections) == 2  # FPFT's and RAC-LoRA's ± std bands


def test_a_figure_with_nothing_to_draw_is_skipped_with_a_note(tmp_path, capsys):
    runs, _ = mnist("default")
    paths, _ = draw(plots.draw_all, runs, [], tmp_path)  # no curve rows for these runs
    assert [p.name for p in paths] == ["mlp_rank_vs_accuracy.png", "mlp_methods_rank1.png",
                                       "mlp_params_vs_accuracy.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp_methods_rank1.png", "mlp_params_vs_accuracy.png",
                                                          "mlp_rank_vs_accuracy.png"]
    assert "no mlp_accuracy_vs_epoch.png: " in capsys.readouterr().out
    fed_runs, _ = fed("fed_iid")
    assert draw(plots.draw_federated, fed_runs, [], tmp_path / "f", fed_study.PREFIX)[0] == []
    assert not list((tmp_path / "f").iterdir())
    assert capsys.readouterr().out.count("no fed_iid_") == 3


def test_a_one_round_federated_run_draws_markers(tmp_path):
    runs, curves = fed("fed_dirichlet")
    _, figures = draw(plots.draw_federated, runs, [c for c in curves if c["round"] == 1], tmp_path)
    n_series = len({(r["method"], r["sketch"], r["rank"]) for r in runs})
    for path, fig in figures.items():
        series = visible_series(panels(fig)[0])
        assert len(series) == n_series and all(n == 1 and m == "o" for _, n, m in series), path.name


# --- 3. the task-A line has its own labelled axis --------------------------------------------------------------
@pytest.mark.parametrize("name,model", [("default", "mlp"), ("vit", "vit")])
def test_task_a_is_read_on_its_own_axis(tmp_path, name, model):
    runs, curves = mnist(name)
    if name == "vit":
        runs = [r for r in runs if json.loads(r["config"])["target_modules"] == ["all"]]
    _, figures = draw(plots.draw_all, runs, curves, tmp_path)
    fig = by_name(figures, f"{model}_rank_vs_accuracy.png")
    main, twin = fig.axes
    assert main.get_ylabel() == "test accuracy on digits 5-9 (%)"
    assert twin.get_ylabel() == "test accuracy on digits 0-4 (%)"
    assert main.get_shared_x_axes().joined(main, twin) and twin.yaxis.get_label_position() == "right"
    base_a = 100 * next(r["test_acc_a"] for r in runs if r["method"] == "base")

    def at(ax, y):
        return [ln for ln in ax.get_lines() if len(ln.get_ydata()) and np.allclose(ln.get_ydata(), y)]
    assert len(at(twin, base_a)) == 1 and not at(main, base_a)  # on the task-A axis, not the task-B one
    assert twin.get_ylim() == main.get_ylim()  # the same scale: the two can be compared
    assert main.get_ylim()[0] < base_a < main.get_ylim()[1]
    legend = [t.get_text() for t in main.get_legend().get_texts()]
    assert any(t.startswith("base model on digits 0-4 (task A, right axis)") for t in legend)
    assert any(t.startswith("FPFT on digits 5-9") for t in legend)


# --- 4. accuracy bars start near the data, and say so -----------------------------------------------------------
def bar_extent(ax):
    """(lowest, highest) of the bars' error bars (the bar tops where there is none), and the bar heights."""
    heights = [p.get_height() for p in ax.patches]
    lows, highs = list(heights), list(heights)
    for c in ax.containers:
        if isinstance(c, matplotlib.container.BarContainer) and c.errorbar is not None:
            for seg in c.errorbar.lines[2][0].get_segments():
                lows.append(min(seg[:, 1])), highs.append(max(seg[:, 1]))
    return min(lows), max(highs), heights


@pytest.mark.parametrize("name", ["table3", "default"])
def test_accuracy_bars_start_a_little_below_the_lowest_error_bar(tmp_path, name):
    runs, curves = mnist(name)
    _, figures = draw(plots.draw_all, runs, curves, tmp_path)
    ax = panels(by_name(figures, "mlp_methods_rank1.png"))[0]
    lo, hi, heights = bar_extent(ax)
    bottom, top = ax.get_ylim()
    assert 0 < bottom < lo and top > hi  # no error bar cut off
    assert lo - bottom <= 0.3 * (hi - lo) + 5  # near the data, not at 0
    assert f"axis starts at {bottom:g}%, not 0" in ax.get_ylabel()
    assert ax.get_ylabel().startswith("test accuracy on digits 5-9 (%)")
    rank1 = [r for r in runs if r["rank"] == 1 or r["method"] == "fpft"]
    assert len(heights) == len({(r["method"], r["sketch"]) for r in rank1})
    assert all(bottom < t.get_position()[1] < top for t in ax.texts)  # the value labels are inside
    if name == "default":  # FPFT 98.4 and RAC-LoRA 96.5: the axis starts in the nineties
        assert bottom >= 90


def test_bars_near_zero_keep_zero_and_no_note(tmp_path):
    rows = [{"method": m, "sketch": s, "rank": r, "seed": seed, "test_acc_b": v + 0.01 * seed, "test_acc_a": 0.5,
             "config_hash": f"{m}{seed}", "config": json.dumps({"model": "mlp"})}
            for m, s, r, v in (("fpft", None, None, 0.04), ("rac_lora", "left", 1, 0.02)) for seed in range(2)]
    _, figures = draw(plots.draw_all, rows, [], tmp_path)
    ax = panels(by_name(figures, "mlp_methods_rank1.png"))[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylabel() == "test accuracy on digits 5-9 (%)"
    assert ax.get_ylim()[1] > bar_extent(ax)[1]


def glue_rows(seeds, epochs):
    runs, curves = [], []
    for task, metric, level in (("rte", "accuracy", 0.7), ("cola", "mcc", 0.5)):
        for k, method in enumerate(("fpft", "lora", "rac_lora")):
            for seed in seeds:
                h = f"{task}-{method}-{seed}"
                final = level + 0.02 * k + 0.01 * seed
                runs.append({"task": task, "method": method, "seed": seed, "metric": metric, "config_hash": h,
                             "final_dev": final})
                curves += [{"config_hash": h, "task": task, "method": method, "seed": seed, "epoch": e,
                            "dev_metric": final - 0.01 * (epochs - e), "merged": e == 1} for e in range(1, epochs + 1)]
    return runs, curves


def test_glue_bars_start_near_the_data_and_one_epoch_curves_have_markers(tmp_path):
    runs, curves = glue_rows([0, 1, 2], 1)
    paths, figures = draw(plots.draw_glue, runs, curves, tmp_path, "glue_")
    assert [p.name for p in paths] == ["glue_dev_metric.png", "glue_dev_by_epoch.png"]
    ax = panels(by_name(figures, "glue_dev_metric.png"))[0]
    lo = min(min(ln.get_ydata()) for ln in ax.get_lines())  # every seed's dot is shown
    bottom, top = ax.get_ylim()
    assert 0 < bottom < min(lo, bar_extent(ax)[0]) and top > bar_extent(ax)[1]
    assert f"(axis starts at {bottom:g}, not 0)" in ax.get_ylabel()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"FPFT", "LoRA", "RAC-LoRA"}
    epochs = by_name(figures, "glue_dev_by_epoch.png")
    for ax in panels(epochs):
        series = visible_series(ax)
        assert len(series) == 3 and all(n == 1 and marker == "o" for _, n, marker in series)
        assert ticks_in_view(ax) == [1]


# --- 5. rounds are whole numbers on the axes -------------------------------------------------------------------
@pytest.mark.parametrize("last_round", [2, 3, 5])
def test_round_axes_have_integer_ticks(tmp_path, last_round):
    runs, curves = fed("fed_dirichlet")
    _, figures = draw(plots.draw_federated, runs, [c for c in curves if c["round"] <= last_round], tmp_path,
                      fed_study.PREFIX)
    for name in ("fed_dirichlet_accuracy_vs_round.png", "fed_dirichlet_aggregation_error.png"):
        ax = panels(by_name(figures, name))[0]
        assert ax.get_xlabel() == "round"
        ticks = ticks_in_view(ax)
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (name, ticks)
        assert isinstance(ax.xaxis.get_major_locator(), matplotlib.ticker.MaxNLocator)
    mb = panels(by_name(figures, "fed_dirichlet_accuracy_vs_mb.png"))[0]
    assert mb.get_xscale() == "log"  # megabytes are not whole: that axis is left alone


# --- 6. counts are pluralised -----------------------------------------------------------------------------------
COUNT = re.compile(r"\b(\d+(?:/\d+)*) (seed|run)(s?)\b")


def check_counts(figures):
    """Every count of seeds or runs in a title reads '1 seed', '3 seeds', '2/3 seeds'; returns the counts."""
    found = []
    for fig in figures.values():
        for t in titles(fig):
            assert "(s)" not in t, t
            for n, word, s in COUNT.findall(t):
                assert (s == "") == (n == "1"), t
                found.append(f"{n} {word}{s}")
    return found


def test_seed_counts_are_pluralised(tmp_path):
    runs, curves = mnist("default")
    one = [r for r in runs if r["seed"] == 0 or r["method"] == "base"]
    assert check_counts(draw(plots.draw_all, one, curves, tmp_path / "a")[1]) == ["1 seed"]
    assert check_counts(draw(plots.draw_all, runs, curves, tmp_path / "b")[1]) == ["3 seeds"]

    fruns, fcurves = fed("fed_iid")
    assert check_counts(draw(plots.draw_federated, [r for r in fruns if r["seed"] == 0], fcurves,
                             tmp_path / "c")[1]) == ["1 seed"] * 3
    assert check_counts(draw(plots.draw_federated, fruns, fcurves, tmp_path / "d")[1]) == ["3 seeds"] * 3

    sruns = read_rows(DOCS / "scratch_fashion_mnist_e20_runs.csv", scratch.RUN_COLUMNS)
    sruns = [r for r in sruns if r["optimizer"] != "sgd"]  # one study: the AdamW forms (and GaLore)
    scurves = read_rows(DOCS / "scratch_fashion_mnist_e20_curves.csv", scratch.CURVE_COLUMNS)
    counts = check_counts(draw(plots.draw_scratch, [r for r in sruns if r["seed"] == 0], scurves, tmp_path / "e")[1])
    assert counts and set(counts) == {"1 seed"}
    counts = check_counts(draw(plots.draw_scratch, sruns, scurves, tmp_path / "f")[1])
    assert counts and set(counts) == {"3 seeds"}

    gruns, gcurves = glue_rows([0], 2)
    assert check_counts(draw(plots.draw_glue, gruns, gcurves, tmp_path / "g")[1]) == ["1 seed"]
    gruns, gcurves = glue_rows([0, 1], 2)
    assert check_counts(draw(plots.draw_glue, gruns + glue_rows([2], 2)[0][:1], gcurves, tmp_path / "h")[1]) == \
        ["2/3 seeds"]


def test_error_bars_stay_mean_and_std_over_seeds(tmp_path):
    """The rank figure's error bars are the sample std over seeds, as before."""
    runs, curves = mnist("default")
    _, figures = draw(plots.draw_all, runs, curves, tmp_path)
    main = by_name(figures, "mlp_rank_vs_accuracy.png").axes[0]
    (container,) = [c for c in main.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    for seg in container.lines[2][0].get_segments():
        rank = round(seg[0][0])
        m, s = mean_std([r["test_acc_b"] for r in runs if r["method"] == "rac_lora" and r["rank"] == rank])
        assert math.isclose(seg[1][1] - seg[0][1], 2 * 100 * s, rel_tol=1e-6)
        assert math.isclose((seg[1][1] + seg[0][1]) / 2, 100 * m, rel_tol=1e-6)


def test_params_vs_accuracy_puts_each_method_at_its_trainable_counts(tmp_path):
    """The equal-trainable-count view: one line per method and sketch, a point per trainable count (its rank) at
    the mean over seeds, on a log x axis with labelled axes; FPFT's reference line beside them."""
    runs, curves = mnist("default")
    _, figures = draw(plots.draw_all, runs, curves, tmp_path)
    ax = panels(by_name(figures, "mlp_params_vs_accuracy.png"))[0]
    assert ax.get_xscale() == "log" and "trainable parameters" in ax.get_xlabel() and "%" in ax.get_ylabel()
    adapters = [r for r in runs if r["method"] not in ("base", "fpft")]
    line = next(c.lines[0] for c in ax.containers if c.get_label() == plots.label("rac_lora", "left"))
    counts = sorted({r["trainable_params"] for r in adapters})
    assert list(line.get_xdata()) == counts == [912 * r for r in (1, 2, 4, 8)]
    want = [100 * mean_std([r["test_acc_b"] for r in adapters if r["trainable_params"] == n])[0] for n in counts]
    assert list(line.get_ydata()) == pytest.approx(want)


def test_scratch_legends_count_heads_in_the_singular_for_one():
    from plots import _form_label, _gpt_config_label

    assert _form_label("lte", 1) == "LTE, 1 head of rank r"
    assert _form_label("lte", 4) == "LTE, 4 heads of rank r"
    assert _form_label("lte", "N") == "LTE, N heads of rank r"
    assert _form_label("lora", 4) == "one LoRA head of rank 4·r"
    assert _gpt_config_label("lte", 8, 1) == "LTE, 1 head of rank 8"
    assert _gpt_config_label("lora", 8, 4) == "one LoRA head of rank 4·8"
    assert _gpt_config_label("lowrank", 8, None) == "low-rank, U(±1/√r) init, r=8"


def test_where_adalora_s_rank_went_is_a_line_per_layer_from_the_initial_rank(tmp_path, capsys):
    """One panel per target rank; per adapted layer a line from the initial rank (epoch 0) through the mean over
    seeds of the rank it kept after each epoch (the curves' ranks); none without AdaLoRA curves."""
    config = json.dumps({"adalora_init_ratio": 1.5})
    kept = {0: ["2 3 3", "1 3 2", "1 3 2"], 1: ["3 2 3", "3 1 2", "2 1 3"]}  # seed -> per epoch, layers 1-3
    runs = [dict(method="adalora", sketch=None, rank=2, seed=s, config_hash=f"h{s}", config=config) for s in kept]
    curves = [dict(config_hash=f"h{s}", epoch=e + 1, ranks=text) for s, texts in kept.items()
              for e, text in enumerate(texts)]
    (path,), figures = draw(lambda *a: [plots.adalora_ranks(*a)], runs, curves, tmp_path / "ranks.png")
    (ax,) = panels(figures[path])
    assert ax.get_title() == "target rank 2, initial 3" and "rank kept" in ax.get_ylabel()
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["layer 1"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["layer 1"].get_ydata()) == [3, 2.5, 2, 1.5]
    assert list(lines["layer 2"].get_ydata()) == [3, 2.5, 2, 2]
    assert {"initial rank", "target (mean over layers)"} <= set(lines)
    no_ranks = [dict(c, ranks=None) for c in curves]
    assert plots.adalora_ranks(runs, no_ranks, tmp_path / "none.png") is None
    assert "no none.png" in capsys.readouterr().out
    assert plots.adalora_ranks([dict(r, method="lora") for r in runs], curves, tmp_path / "lora.png") is None
