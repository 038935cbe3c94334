"""The figures, drawn only from the results CSVs (results/runs.csv and curves.csv, and the other studies'
<prefix>runs.csv / <prefix>curves.csv), never by training.

Error bars are the sample standard deviation over seeds; a point from a single seed has none.
Diverged runs have no result: they are left out (the summary table counts them).
File names start with the ``prefix`` the caller gives (engine.runner.report: the study's own prefix and the
results folder's name, engine.results.figure_prefix: ``fed_``, ``glue_``, ``table3_``, ...), then say what the
runs are (``mlp_...``, ``vit_attention_...``, ``fed_dirichlet_...``), so that two studies, one study's results
folders, and studies of different models or partitions drawn into one plots folder never overwrite each other's
figures.
A figure with nothing to draw is not written (a line says so); a curve of a single point gets a marker.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

import models
from raclora.methods import METHODS, display_order
from raclora.files import atomic_write_via
from engine.results import group, mean_std, safe_name, split_diverged  # noqa: E402

SKETCH_LABEL = {"left": "(Zero, Gaussian)", "right": "(Gaussian, Zero)"}  # the paper's (A init, B init)
SKETCH_STYLE = {"left": "-", "right": "--"}
# the default cycle's ten colours, then Dark2's for the registry's methods after the tenth (C10 would be C0 again)
COLORS = {name: f"C{i}" if i < 10 else matplotlib.colors.to_hex(matplotlib.colormaps["Dark2"](i - 10))
          for i, name in enumerate(METHODS)}
FPFT_COLOR, BASE_COLOR = "black", "grey"


def label(method: str, sketch: str | None) -> str:
    if method == "fpft":
        return "FPFT"
    name = METHODS[method].label if method in METHODS else method
    return f"{name} {SKETCH_LABEL[sketch]}" if sketch in SKETCH_LABEL else name  # RandLoRA has no sketch


def draw_all(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write every figure the rows allow into ``plots_dir``; return the paths written.

    Named ``prefix``, then by model and target set (``model_stem``): mlp_rank_vs_accuracy.png,
    vit_attention_methods_rank1.png (table3_mlp_rank_vs_accuracy.png with prefix "table3_")."""
    runs = split_diverged(runs)[0]
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    tag, stem = model_tag(runs), prefix + model_stem(runs)
    written = [rank_vs_accuracy(runs, plots_dir / f"{stem}_rank_vs_accuracy.png", tag),
               accuracy_vs_epoch(runs, curves, plots_dir / f"{stem}_accuracy_vs_epoch.png", tag),
               methods_rank1(runs, plots_dir / f"{stem}_methods_rank1.png", tag),
               params_vs_accuracy(runs, plots_dir / f"{stem}_params_vs_accuracy.png", tag),
               adalora_ranks(runs, curves, plots_dir / f"{stem}_adalora_ranks.png", tag)]
    return [p for p in written if p is not None]


def _configs(runs: list[dict]) -> list[dict]:
    return [_config(r) for r in runs if r.get("config")]


def _config(row: dict) -> dict:
    """A runs row's settings (its config cell); {} when it has none, or one that is not a JSON object (the store
    never gives such a row: its config would have been cut or edited)."""
    try:
        config = json.loads(row.get("config") or "{}")
    except (TypeError, ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def _target_sets(runs: list[dict]) -> list[list[str]]:
    """The adapters' target sets. Only the adapter runs say one: the base model and FPFT runs do not depend
    on it (a sweep on attention reuses the base run recorded by a sweep on every layer)."""
    adapters = [r for r in runs if r.get("method") not in ("base", "fpft")]
    configs = _configs(adapters or runs)
    sets = {tuple(c.get("target_modules", ["all"])) for c in configs if "target_modules" in c}
    return [list(s) for s in sorted(sets, key=" ".join)]


def model_tag(runs: list[dict]) -> str:
    """What the titles say about the model when it is not the paper's MLP: "ViT", "ViT, adapters on attention"."""
    models = sorted({c.get("model", "mlp") for c in _configs(runs)})
    targets = [" ".join(t) for t in _target_sets(runs)]
    parts = [] if models in ([], ["mlp"]) else ["/".join("ViT" if m == "vit" else m for m in models)]
    if targets and targets != ["all"]:
        parts.append(f"adapters on {', '.join(targets)}")
    return ", ".join(parts)


def model_stem(runs: list[dict]) -> str:
    """The start of the figure names: the model, and the target set where model_tag names one ("mlp", "vit",
    "vit_attention", "vit_q-v"); rows recorded before the model field existed are the MLP's."""
    models = sorted({c.get("model", "mlp") for c in _configs(runs)}) or ["mlp"]
    targets = ["-".join(t) for t in _target_sets(runs)]
    parts = ["+".join(models)] + (["+".join(targets)] if targets and targets != ["all"] else [])
    return safe_name("_".join(parts))


def _plural(n: int, word: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _counted(counts, word: str) -> str:
    """How many seeds (runs, ...) the points average: '1 seed', '3 seeds', or '2/3 seeds' when they differ."""
    counts = sorted(set(counts))
    if len(counts) == 1:
        return _plural(counts[0], word)
    return f"{'/'.join(map(str, counts))} {word}s"


_kept: list[dict] = []


@contextlib.contextmanager
def keep_figures():
    """Within the block, every figure written is also recorded, {path: Figure}, for a caller (a test, a
    notebook) to look at its axes; the figures are closed as usual (their objects stay readable)."""
    figures: dict = {}
    _kept.append(figures)
    try:
        yield figures
    finally:
        _kept.remove(figures)


def _skip(path: Path, why: str) -> None:
    """No figure: say so rather than write an empty one."""
    print(f"no {Path(path).name}: {why}")


def _curve(ax, x, m, s, color=None, ls="-", label=None, band: bool = True, **kw) -> bool:
    """A mean curve with its ± std band; a single point gets a marker and an error bar (a line of one
    point is invisible). Points without a mean are left out. Returns whether anything was drawn."""
    x, m, s = (np.asarray(v, dtype=float) for v in (x, m, s))
    ok = np.isfinite(x) & np.isfinite(m)
    x, m, s = x[ok], m[ok], np.nan_to_num(s[ok])
    if len(x) == 0:
        return False
    if len(x) == 1:
        ax.errorbar(x, m, yerr=s if band else None, color=color, ls="none", marker="o", capsize=3, label=label,
                    **kw)
    else:
        ax.plot(x, m, color=color, ls=ls, label=label, **kw)
        if band:
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.12)
    return True


def _bar_axis(ax, lows, highs, ylabel: str, unit: str = "%") -> float:
    """Start the bar axis a little below the lowest bar minus its error bar (the differences between
    methods are a few points), say so in the axis label, and leave room above for the value labels.
    Bars that would lose less than a quarter of their height (data near 0) keep 0 as the start. Returns the
    offset of a value label above its bar."""
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 1.0)
    step = 1 if span < 10 else 5 if span < 50 else 10
    bottom = math.floor((lo - 0.15 * span) / step) * step
    if lo >= 0 and bottom < 0.25 * hi:
        bottom = 0
    top = hi + 0.12 * (hi - bottom)
    ax.set_ylim(bottom, top)
    ax.set_ylabel(ylabel if bottom <= 0 else f"{ylabel}\n(axis starts at {bottom:g}{unit}, not 0)")
    return 0.015 * (top - bottom)


def _rank_axis(ax, ranks, xlabel: str) -> None:
    """A log2 x axis with a tick at each rank of ``ranks`` (the rank sweeps' figures)."""
    ranks = sorted(set(ranks))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel(xlabel)


def _integer_ticks(axis) -> None:
    """Whole-number ticks (epochs, rounds), also when the axis holds a single one."""
    axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))


def _method_order(item):
    (method, sketch), _ = item
    return (display_order(method), method, sketch != "right")


def _adapter_rows(runs):
    """The adapter runs: neither the base model nor FPFT, and with a rank (a row edited into another method
    without one is none)."""
    return [r for r in runs if r["method"] not in ("base", "fpft") and r.get("rank") is not None]


TASK_A_LABEL = "test accuracy on digits 0-4 (%)"
TASK_B_LABEL = "test accuracy on digits 5-9 (%)"


@dataclass(frozen=True)
class Score:
    """What the adaptation figures show: the runs column of task B and of task A, the curves column per epoch,
    their axis labels, the factor a value is shown at (100: a percentage) and its unit, and the task's names."""
    b: str
    a: str
    curve: str
    b_label: str
    a_label: str
    curve_label: str
    scale: float
    unit: str
    task_b: str
    task_a: str

    def show(self, value: float) -> str:
        return f"{self.scale * value:.1f}%" if self.unit == "%" else f"{self.scale * value:.3f} {self.unit}"


ACCURACY = Score("test_acc_b", "test_acc_a", "test_acc_b", TASK_B_LABEL, TASK_A_LABEL, TASK_B_LABEL, 100.0, "%",
                 "digits 5-9", "digits 0-4")


def score_of(runs: list[dict]) -> Score:
    """ACCURACY for runs on images; for runs of a model that reads tokens (the gpt), the test loss in nats per
    character on the texts of tasks B and A (from the runs' configs) and the validation loss per epoch."""
    configs = _configs(runs)
    texts = sorted({(c.get("text_a", "?"), c.get("text_b", "?")) for c in configs
                    if c.get("model") in models.MODELS and "tokens" in models.MODELS[c["model"]][0].takes})
    if not texts:
        return ACCURACY
    a, b = ("/".join(sorted({t[i] for t in texts})) for i in (0, 1))
    return Score("test_loss_b", "test_loss_a", "val_loss", f"test loss on {b} (nats/char)",
                 f"test loss on {a} (nats/char)", f"validation loss on {b} (nats/char)", 1.0, "nats", b, a)


def _reference_lines(ax, runs, score: Score = ACCURACY):
    """FPFT on task B (mean, band of ± std), dashed, on the task-B axis ``ax``; the base model's accuracy on
    task A, dotted, on a twin y-axis of its own (labelled, same scale, so the two can be compared but
    neither is read off the other's axis). Returns the twin axis (None without a base run)."""
    k = score.scale
    fpft = mean_std([r.get(score.b) for r in runs if r["method"] == "fpft"])
    if not math.isnan(fpft[0]):
        ax.axhline(k * fpft[0], color=FPFT_COLOR, ls="--", lw=1.2, label=f"FPFT on {score.task_b}: {score.show(fpft[0])}")
        if not math.isnan(fpft[1]):
            ax.axhspan(k * (fpft[0] - fpft[1]), k * (fpft[0] + fpft[1]), color=FPFT_COLOR, alpha=0.08)
    base = [r[score.a] for r in runs if r["method"] == "base" and r.get(score.a) is not None]
    if not base:
        return None
    value = k * base[0]
    twin = ax.twinx()
    twin.axhline(value, color=BASE_COLOR, ls=(0, (2, 2)), lw=1.5,
                 label=f"base model on {score.task_a} (task A, right axis): {score.show(base[0])}")
    lo, hi = ax.get_ylim()
    pad = 0.05 * max(hi - lo, 1e-6)
    lo, hi = min(lo, value - pad), max(hi, value + pad)
    ax.set_ylim(lo, hi)
    twin.set_ylim(lo, hi)
    twin.set_ylabel(score.a_label, color=BASE_COLOR)
    twin.tick_params(axis="y", colors=BASE_COLOR)
    return twin


def _titled(tag: str, title: str) -> str:
    return f"{tag}: {title}" if tag else title


def rank_vs_accuracy(runs: list[dict], path: Path, tag: str = "") -> Path | None:
    rows = _adapter_rows(runs)
    if not rows:
        return None
    score = score_of(runs)
    fig, ax = plt.subplots(figsize=(10, 5))
    drawn = False
    for (method, sketch), rs in sorted(group(rows, ("method", "sketch")).items(), key=_method_order):
        by_rank = group(rs, ("rank",))
        stats = {k[0]: mean_std([r.get(score.b) for r in v]) for k, v in by_rank.items()}
        ranks = sorted(k for k, (m, _) in stats.items() if not math.isnan(m))
        if not ranks:
            continue
        ax.errorbar(ranks, [score.scale * stats[k][0] for k in ranks],
                    yerr=[0 if math.isnan(stats[k][1]) else score.scale * stats[k][1] for k in ranks],
                    color=COLORS.get(method), ls=SKETCH_STYLE.get(sketch, "-"), marker="o", capsize=3,
                    label=label(method, sketch))
        drawn = True
    if not drawn:
        plt.close(fig)
        return _skip(path, f"no adapter run has a {score.b_label.split(' (')[0]}")
    twin = _reference_lines(ax, runs, score)
    _rank_axis(ax, [r["rank"] for r in rows], "adapter rank r")
    ax.set_ylabel(score.b_label)
    ax.set_title(_titled(tag, f"{'Accuracy' if score is ACCURACY else 'Test loss'} on task B by rank "
                              f"(mean ± std over seeds)"))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # right of the twin axis's label
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.09 if twin else 1.01, 1.0))
    return _save(fig, path)


def params_vs_accuracy(runs: list[dict], path: Path, tag: str = "") -> Path | None:
    """Task B's score against the trainable parameters (log scale), one line per method and sketch through its
    ranks: methods compared at an equal trainable count rather than an equal rank. Drawn when some method has
    two ranks or more (else methods_rank1 shows it)."""
    rows = [r for r in _adapter_rows(runs) if r.get("trainable_params")]
    score = score_of(runs)
    lines = {}
    for (method, sketch), rs in sorted(group(rows, ("method", "sketch")).items(), key=_method_order):
        stats = {k[0]: mean_std([r.get(score.b) for r in v]) for k, v in group(rs, ("trainable_params",)).items()}
        points = sorted((n, m, d) for n, (m, d) in stats.items() if not math.isnan(m))
        if points:
            lines[(method, sketch)] = points
    if not any(len(points) > 1 for points in lines.values()):
        return _skip(path, "no method has runs of two or more sizes")
    fig, ax = plt.subplots(figsize=(10, 5))
    for (method, sketch), points in lines.items():
        ax.errorbar([n for n, _, _ in points], [score.scale * m for _, m, _ in points],
                    yerr=[0 if math.isnan(d) else score.scale * d for _, _, d in points], color=COLORS.get(method),
                    ls=SKETCH_STYLE.get(sketch, "-"), marker="o", capsize=3, label=label(method, sketch))
    twin = _reference_lines(ax, runs, score)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; each point one rank)")
    ax.set_ylabel(score.b_label)
    ax.set_title(_titled(tag, f"{'Accuracy' if score is ACCURACY else 'Test loss'} on task B by trainable "
                              f"parameters (mean ± std over seeds)"))
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.09 if twin else 1.01, 1.0))
    return _save(fig, path)


def accuracy_vs_epoch(runs: list[dict], curves: list[dict], path: Path, tag: str = "") -> Path | None:
    rows = _adapter_rows(runs)
    if not rows:
        return None
    keep = {r["config_hash"] for r in runs}
    curves = [c for c in curves if c["config_hash"] in keep]
    by_run = group(curves, ("config_hash",))
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = _rank_panels(ranks, sharey=True)
    ncols = axes.shape[1]
    fpft_runs = [r for r in runs if r["method"] == "fpft"]
    score = score_of(runs)
    drawn = False
    for i, (ax, rank) in enumerate(zip(axes.flat, ranks)):
        series = [(("fpft", None), fpft_runs)] + sorted(
            group([r for r in rows if r["rank"] == rank], ("method", "sketch")).items(), key=_method_order)
        for (method, sketch), rs in series:
            if not rs:
                continue
            epochs, m, s = _mean_curve([by_run.get((r["config_hash"],), []) for r in rs], score.curve)
            color = FPFT_COLOR if method == "fpft" else COLORS.get(method)
            ls = "--" if method == "fpft" else SKETCH_STYLE.get(sketch, "-")
            drawn |= _curve(ax, epochs, score.scale * m, score.scale * s, color=color, ls=ls,
                            label=label(method, sketch))
        ax.set_title(f"rank {rank}")
        _integer_ticks(ax.xaxis)
        ax.set_xlabel("epoch")
        if i % ncols == 0:  # the panels share the y axis
            ax.set_ylabel(score.curve_label)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return _skip(path, f"the curves file has no {score.curve} per epoch for these runs")
    _hide_unused(axes, len(ranks))
    what = "Test accuracy" if score is ACCURACY else "Validation loss"
    fig.suptitle(_titled(tag, f"{what} on task B per epoch (mean ± std over the seeds still running)"))
    fig.tight_layout()
    _legend_below(fig, axes, ncol=5)
    return _save(fig, path)


def _rank_panels(ranks: list, sharey: bool = False):
    """(figure, axes) with a panel per rank, two to a row (the per-rank figures)."""
    ncols = min(len(ranks), 2)
    nrows = math.ceil(len(ranks) / ncols)
    return plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False, sharey=sharey)


def _hide_unused(axes, used: int) -> None:
    """Hide the panels past the first ``used`` (a grid of two to a row with an odd count)."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)


def _legend_below(fig, axes, ncol: int) -> None:
    """One legend for the figure below its panels, every series once whichever panel has it (savefig's tight bbox
    takes it in)."""
    legend = {}
    for ax in axes.flat:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lbl, h)
    fig.legend(list(legend.values()), list(legend), fontsize=8, loc="upper center", ncol=min(len(legend), ncol),
               bbox_to_anchor=(0.5, 0.0))


def _mean_curve(run_curves: list[list[dict]], key: str = "test_acc_b") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch, mean and std of ``key`` (test accuracy) over the runs that reached it (early stopping ends runs);
    nan where no run has a value."""
    n = max((len(c) for c in run_curves), default=0)
    epochs, means, stds = [], [], []
    for e in range(1, n + 1):
        vals = [c.get(key) for rc in run_curves for c in rc if c["epoch"] == e]
        m, s = mean_std(vals)
        epochs.append(e), means.append(m), stds.append(0.0 if math.isnan(s) else s)
    return np.array(epochs, dtype=float), np.array(means, dtype=float), np.array(stds, dtype=float)


def methods_rank1(runs: list[dict], path: Path, tag: str = "") -> Path | None:
    """The paper's Table 3 as bars: every method x sketch at rank 1, with FPFT."""
    rows = [r for r in _adapter_rows(runs) if r["rank"] == 1]
    if not rows:
        return None
    score = score_of(runs)
    bars = [(label("fpft", None), [r.get(score.b) for r in runs if r["method"] == "fpft"], FPFT_COLOR)]
    for (method, sketch), rs in sorted(group(rows, ("method", "sketch")).items(), key=_method_order):
        bars.append((label(method, sketch), [r.get(score.b) for r in rs], COLORS.get(method)))
    kept = [(b, st) for b, st in ((b, mean_std(b[1])) for b in bars) if not math.isnan(st[0])]
    bars, stats = [b for b, _ in kept], [st for _, st in kept]
    if not bars:
        return _skip(path, f"no run at rank 1 has a {score.b_label.split(' (')[0]}")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 2), 5))
    x = np.arange(len(bars))
    means = [score.scale * m for m, _ in stats]
    errs = [0 if math.isnan(s) else score.scale * s for _, s in stats]
    ax.bar(x, means, yerr=errs, capsize=4, color=[c for *_, c in bars], alpha=0.85)
    offset = _bar_axis(ax, [m - e for m, e in zip(means, errs)], [m + e for m, e in zip(means, errs)], score.b_label,
                       "%" if score.unit == "%" else "")
    for xi, m, err in zip(x, means, errs):
        ax.text(xi, m + err + offset, f"{m:.1f}" if score.unit == "%" else f"{m:.3f}", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(x, [b[0].replace(" (", "\n(") for b in bars], fontsize=8)
    ax.set_xlabel("method (A init, B init), rank 1")
    n_seeds = [len([v for v in vals if v is not None and not math.isnan(v)]) for _, vals, _ in bars]
    ax.set_title(_titled(tag, f"Rank 1, every method and sketch (mean ± std over {_counted(n_seeds, 'seed')})"))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _layer_ranks(curve: dict) -> list[int] | None:
    """An epoch's ranks kept per adapted layer (the curves' ``ranks``: a count per layer, in module order)."""
    text = curve.get("ranks")
    try:
        return [int(v) for v in text.split()] if text else None
    except ValueError:  # (the store never gives such a cell: its row would fail its check)
        return None


def adalora_ranks(runs: list[dict], curves: list[dict], path: Path, tag: str = "") -> Path | None:
    """Where AdaLoRA's rank went: per target rank a panel, per adapted layer a line of the rank it keeps after each
    epoch (mean ± std over the seeds still training), beside the initial rank and the target (the budget's mean)."""
    rows = [r for r in _adapter_rows(runs) if r["method"] == "adalora"]
    if not rows:
        return None
    by_run = group([c for c in curves if c["config_hash"] in {r["config_hash"] for r in rows}], ("config_hash",))
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = _rank_panels(ranks)
    drawn, initial = False, {}
    for ax, rank in zip(axes.flat, ranks):
        per_run = [[(c["epoch"], _layer_ranks(c)) for c in sorted(by_run.get((r["config_hash"],), []),
                                                                   key=lambda c: c["epoch"])]
                   for r in rows if r["rank"] == rank]
        per_run = [[(e, k) for e, k in run if k is not None] for run in per_run]
        layers = max((len(k) for run in per_run for _, k in run), default=0)
        ratio = _config(next(r for r in rows if r["rank"] == rank)).get("adalora_init_ratio")
        if ratio is not None:
            initial[rank] = METHODS["adalora"].layer_rank(rank, ratio)
            ax.axhline(initial[rank], color="grey", ls=":", lw=1, label="initial rank")
        for layer in range(layers):
            runs_layer = [[{"epoch": e, "kept": k[layer]} for e, k in run if len(k) > layer] for run in per_run]
            epochs, m, s = _mean_curve(runs_layer, "kept")
            if rank in initial:  # every layer starts at the initial rank (epoch 0)
                epochs, m, s = np.r_[0, epochs], np.r_[initial[rank], m], np.r_[0, s]
            drawn |= _curve(ax, epochs, m, s, color=_layer_color(layer, layers), label=f"layer {layer + 1}",
                            marker=".")
        ax.axhline(rank, color="black", ls="--", lw=1, label="target (mean over layers)")
        ax.set_title(f"target rank {rank}" + (f", initial {initial[rank]}" if rank in initial else ""))
        _integer_ticks(ax.xaxis)
        _integer_ticks(ax.yaxis)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rank kept (triplets unmasked)")
        ax.set_ylim(bottom=-0.2)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return _skip(path, "the curves file has no AdaLoRA ranks per epoch for these runs")
    _hide_unused(axes, len(ranks))
    fig.suptitle(_titled(tag, "Where AdaLoRA's rank went: rank kept per adapted layer (module order), mean ± std "
                              "over the seeds"))
    fig.tight_layout()
    _legend_below(fig, axes, ncol=8)  # (a line per layer: the panels stay readable)
    return _save(fig, path)


def _layer_color(layer: int, layers: int):
    """A colour for each of ``layers`` lines: tab10's for up to 10, tab20's for up to 20 (no two alike), then
    viridis along the layers."""
    if layers <= 10:
        return f"C{layer}"
    if layers <= 20:
        return matplotlib.colormaps["tab20"](layer)
    return matplotlib.colormaps["viridis"](layer / (layers - 1))


# --- the from-scratch study (scratch.py): drawn from results/scratch_runs.csv and scratch_curves.csv ---
FORM_LABEL = {"full": "full rank", "lowrank": "low-rank, U(±1/√r) init", "lowrank_ae": "low-rank, two default Linears",
              "lte": "LTE, {h} of rank {r}", "lora": "one LoRA head of rank {n}·{r}", "galore": "GaLore (rank-r Adam)"}
FORM_STYLE = {"lowrank": "-", "lowrank_ae": ":", "lte": "-", "lora": "--", "galore": "-."}


def draw_scratch(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Per dataset and optimizer: test accuracy per epoch for each form (one line per rank, the full-rank
    model for reference), the two low-rank forms and the full model together, and final accuracy by rank.
    Named <prefix><dataset>_<optimizers>_<form>.png (scratch.py: scratch_mnist_sgd_lowrank.png). The gpt's runs
    (model "gpt") get their own figures instead (_scratch_gpt: test loss by step, by seconds, by rank)."""
    runs = split_diverged(runs)[0]
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    keep = {r["config_hash"] for r in runs}
    by_run = group([c for c in curves if c["config_hash"] in keep], ("config_hash",))
    written = []
    for (dataset,), rows in sorted(group([r for r in runs if r.get("model") == "gpt"], ("dataset",)).items()):
        opts = sorted({r["optimizer"] for r in rows if r["form"] != "galore"}) or ["adamw"]
        written += _scratch_gpt(rows, by_run, dataset, plots_dir / f"{prefix}{dataset}_{'+'.join(opts)}")
    for (dataset,), rows in sorted(group([r for r in runs if r.get("model") != "gpt"], ("dataset",)).items()):
        opts = sorted({r["optimizer"] for r in rows if r["form"] != "galore"}) or ["adamw"]
        stem = f"{prefix}{dataset}_{'+'.join(opts)}"
        counts = {_run_heads(r) for r in rows if r["form"] in ("lte", "lora")}
        heads = counts.pop() if len(counts) == 1 else "N"  # several head counts: the labels say N
        for form in ("lowrank", "lowrank_ae", "lte", "lora", "galore"):
            if any(r["form"] == form for r in rows):
                written.append(_scratch_epochs(rows, by_run, [form], heads, dataset,
                                               plots_dir / f"{stem}_{form}.png"))
        if any(r["form"] in ("lowrank", "lowrank_ae") for r in rows):
            written.append(_scratch_epochs(rows, by_run, ["lowrank", "lowrank_ae"], heads, dataset,
                                           plots_dir / f"{stem}_all.png"))
        written.append(_scratch_final(rows, heads, dataset, plots_dir / f"{stem}_final.png"))
    return [p for p in written if p is not None]


def _form_label(form: str, heads, rank="r") -> str:
    """A scratch form's legend (FORM_LABEL) for ``heads`` heads (LTE, LoRA) of rank ``rank`` (default: the letter r)."""
    return FORM_LABEL.get(form, form).format(h=_heads(heads), n=heads, r=rank)


def _heads(n) -> str:
    """"1 head", "4 heads", "N heads": a head count as the legends say it."""
    return f"{n} head" if str(n) == "1" else f"{n} heads"


def _run_heads(row: dict):
    """An lte or lora run's head count: its heads column, or (recorded before it) its config's lte_heads."""
    if row.get("heads") is not None:
        return row["heads"]
    heads = _config(row).get("lte_heads", "N")
    return heads[0] if isinstance(heads, list) and len(heads) == 1 else heads


GPT_COLORS = {"full": "Greys", "lowrank": "Blues", "lowrank_ae": "Purples", "lte": "Reds", "lora": "Oranges",
              "galore": "Greens"}  # a colour map per form; its shades tell the ranks and head counts apart


def _gpt_config_label(form: str, rank, heads) -> str:
    if form == "full":
        return "full rank"
    if form in ("lte", "lora"):  # the rank is in the label's own words
        return _form_label(form, heads, rank)
    return f"{FORM_LABEL.get(form, form)}, r={rank}"


def _scratch_gpt(rows, by_run, text: str, stem: Path) -> list[Path]:
    """The gpt trained from scratch: test loss (nats per character) by optimizer step and by training seconds,
    one mean ± std band per form, rank and head count, and the final loss by rank, one line per form and head
    count, the full-rank model for reference."""
    configs = sorted(group(rows, ("form", "rank", "heads")).items(),
                     key=lambda kv: (list(GPT_COLORS).index(kv[0][0]) if kv[0][0] in GPT_COLORS else 9,
                                     kv[0][1] or 0, kv[0][2] or 0))
    by_form = group(rows, ("form",))
    written = []
    for x_key, x_label, name in (("step", "optimizer steps", "loss_step"),
                                 ("wall_s", "training seconds (each run's share of its stack's; evaluations "
                                            "not counted)", "loss_wall")):
        fig, ax = plt.subplots(figsize=(10, 5.5))
        drawn = False
        for (form, rank, heads), rs in configs:
            mine = [k for k in configs if k[0][0] == form]
            shade = 0.45 + 0.5 * mine.index(((form, rank, heads), rs)) / max(1, len(mine) - 1)
            color = "black" if form == "full" else plt.get_cmap(GPT_COLORS.get(form, "viridis"))(shade)
            run_curves = [by_run.get((r["config_hash"],), []) for r in rs]
            _, xs, _ = _mean_curve(run_curves, key=x_key)
            _, m, sd = _mean_curve(run_curves, key="test_loss")
            drawn |= _curve(ax, xs, m, sd, color=color, ls=FORM_STYLE.get(form, "-"), lw=2 if form == "full" else 1,
                            label=f"{_gpt_config_label(form, rank, heads)} ({rs[0]['trainable_params']:,})")
        if not drawn:
            plt.close(fig)
            _skip(stem.with_name(f"{stem.name}_{name}.png"), "the curves file has no test_loss for these runs")
            continue
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"test loss, {text} (nats per character)")
        seeds = sorted({len(rs) for _, rs in configs})
        ax.set_title(f"The gpt trained from scratch (trainable parameters in brackets)\n(mean ± std over "
                     f"{_counted(seeds, 'seed')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save(fig, stem.with_name(f"{stem.name}_{name}.png")))
    ranked = [r for r in rows if r["form"] != "full"]
    if ranked:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        full = mean_std([r["final_test_loss"] for r in by_form.get(("full",), [])])
        if not math.isnan(full[0]):
            ax.axhline(full[0], color="black", lw=1.5, ls="--", label=f"full rank: {full[0]:.3f}")
        lines = group(ranked, ("form", "heads"))
        for i, ((form, heads), rs) in enumerate(sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))):
            by_rank = group(rs, ("rank",))
            ranks = sorted(k[0] for k in by_rank)
            stats = [mean_std([r["final_test_loss"] for r in by_rank[(k,)]]) for k in ranks]
            what = _form_label(form, heads)
            ax.errorbar(ranks, [m for m, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd in stats],
                        color=f"C{i % 10}", ls=FORM_STYLE.get(form, "-"), marker="o", capsize=3, label=what)
        _rank_axis(ax, [r["rank"] for r in ranked], "rank r (per layer; LTE: per head)")
        ax.set_ylabel(f"final test loss, {text} (nats per character)")
        ax.set_title("The gpt trained from scratch: test loss after the last step by rank (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        written.append(_save(fig, stem.with_name(f"{stem.name}_final_loss.png")))
    return written


def _full_line(ax, rows, by_run) -> bool:
    full = [r for r in rows if r["form"] == "full"]
    if full:
        epochs, m, s = _mean_curve([by_run.get((r["config_hash"],), []) for r in full], key="test_acc")
        return _curve(ax, epochs, 100 * m, 100 * s, color="black", lw=2,
                      label=f"full rank ({full[0]['trainable_params']:,} params)")
    return False


def _scratch_epochs(rows, by_run, forms: list[str], heads, dataset: str, path: Path) -> Path | None:
    ranks = sorted({r["rank"] for r in rows if r["form"] in forms})
    if not ranks:
        return None
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(10, 5.5))
    drawn = _full_line(ax, rows, by_run)
    for form in forms:
        for i, rank in enumerate(ranks):
            rs = [r for r in rows if r["form"] == form and r["rank"] == rank]
            if not rs:
                continue
            epochs, m, s = _mean_curve([by_run.get((r["config_hash"],), []) for r in rs], key="test_acc")
            color = cmap(i / max(1, len(ranks) - 1) * 0.9)
            name = f"r={rank}" if len(forms) == 1 else f"{_form_label(form, heads)}, r={rank}"
            drawn |= _curve(ax, epochs, 100 * m, 100 * s, color=color, ls=FORM_STYLE.get(form, "-"), label=name)
    if not drawn:
        plt.close(fig)
        return _skip(path, "the curves file has no test accuracy per epoch for these runs")
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test accuracy, {dataset}, 10 classes (%)")
    what = _form_label(forms[0], heads) if len(forms) == 1 else " vs ".join(_form_label(f, heads) for f in forms)
    seeds = sorted({len(v) for v in group([r for r in rows if r["form"] in forms], ("form", "rank")).values()})
    ax.set_title(f"Trained from scratch: {what}\n(mean ± std over {_counted(seeds, 'seed')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + (len(forms) > 1))
    return _save(fig, path)


def _scratch_final(rows, heads, dataset: str, path: Path) -> Path | None:
    ranked = [r for r in rows if r["form"] != "full"]
    if not ranked:
        return None
    fig, ax = plt.subplots(figsize=(10, 5.5))
    full = mean_std([r["final_test_acc"] for r in rows if r["form"] == "full"])
    if not math.isnan(full[0]):
        ax.axhline(100 * full[0], color="black", lw=1.5, ls="--", label=f"full rank: {100 * full[0]:.2f}%")
    for i, form in enumerate(("lowrank", "lowrank_ae", "lte", "lora", "galore")):
        by_rank = group([r for r in ranked if r["form"] == form], ("rank",))
        if not by_rank:
            continue
        ranks = sorted(k[0] for k in by_rank)
        stats = [mean_std([r["final_test_acc"] for r in by_rank[(k,)]]) for k in ranks]
        opt = by_rank[(ranks[0],)][0]["optimizer"]
        ax.errorbar(ranks, [100 * m for m, _ in stats], yerr=[0 if math.isnan(s) else 100 * s for _, s in stats],
                    color=f"C{i}", ls=FORM_STYLE.get(form, "-"), marker="o", capsize=3,
                    label=f"{_form_label(form, heads)} [{opt}]")
    _rank_axis(ax, [r["rank"] for r in ranked], "rank r (per layer; LTE: per head)")
    ax.set_ylabel(f"final test accuracy, {dataset}, 10 classes (%)")
    ax.set_title("Trained from scratch: accuracy after the last epoch by rank (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Save as PNG atomically: a half-written file never replaces a good one, and a disk that refuses it is one
    line (raclora.files.atomic_write_via)."""
    try:
        if not fig.get_layout_engine() and not fig.legends:
            fig.tight_layout()
        atomic_write_via(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
        for figures in _kept:
            figures[Path(path)] = fig
    finally:
        plt.close(fig)
    return path


# --- the federated study (federated.py) ---------------------------------------------------------------
FED_COLORS = {"fedavg": "#222222", "fedit": "#1f77b4", "ffa_lora": "#2ca02c", "flora": "#9467bd",
              "fed_rac_lora": "#d62728"}
FED_LABELS = {"fedavg": "FedAvg (full)", "fedit": "FedIT", "ffa_lora": "FFA-LoRA", "flora": "FLoRA",
              "fed_rac_lora": "Fed-RAC-LoRA"}


def draw_federated(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Accuracy by round, accuracy by communicated megabytes, aggregation error by round: a line per method,
    sketch and rank, mean over seeds with ± std (bands; a single round: a marker with an error bar). Runs of a
    text model (the gpt: score_of) add the test loss in nats per character by round and by megabytes
    (loss_vs_round, loss_vs_mb), and their accuracy is next-character accuracy on task B's text.

    Named <prefix><partition>_accuracy_vs_round.png etc. when the runs come from one partition scheme (iid,
    dirichlet, role; federated.py: fed_dirichlet_accuracy_vs_round.png), <prefix>accuracy_vs_round.png etc. when
    they mix schemes or do not say."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    runs = split_diverged(runs)[0]  # a diverged run's rounds stop short: counted in the summary, not drawn
    keep = {r["config_hash"] for r in runs}
    by_run = group([c for c in curves if c["config_hash"] in keep], ("config_hash",))
    order = list(FED_COLORS)
    series = sorted(group(runs, ("method", "sketch", "rank")).items(),
                    key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9, str(kv[0][1]), kv[0][2] or 0))
    stem = prefix + fed_stem(runs)
    written = []
    for name, x_key, y_key, ylabel, title, log_y in _fed_figures(runs):
        path = plots_dir / f"{stem}{name}.png"
        fig, ax = plt.subplots(figsize=(10, 5.5))
        drawn, n_seeds = False, []
        for (method, sketch, rank), rs in series:
            rounds = [by_run.get((r["config_hash"],), []) for r in rs]
            n = min(len(c) for c in rounds)
            if n == 0:
                continue
            ys = np.array([[np.nan if c[y_key] is None else c[y_key] for c in cs[:n]] for cs in rounds], dtype=float)
            xs = np.array([[np.nan if c[x_key] is None else c[x_key] for c in cs[:n]] for cs in rounds],
                          dtype=float).mean(0)
            scale = 100.0 if y_key.startswith("test_acc") else 1.0  # accuracies in %
            m, s = scale * ys.mean(0), scale * (ys.std(0, ddof=1) if len(rounds) > 1 else np.zeros(n))
            lbl = FED_LABELS.get(method, method) + (f" ({sketch})" if sketch else "") + (f" r={rank}" if rank else "")
            color, ls = FED_COLORS.get(method), SKETCH_STYLE.get(sketch, "-")
            if log_y:
                m = np.maximum(m, 1e-17)  # exact methods: float rounding, drawn at the floor of the axis
            if _curve(ax, xs, m, s, color=color, ls=ls, label=lbl, band=not log_y):
                drawn = True
                n_seeds.append(len(rs))
        if not drawn:
            plt.close(fig)
            _skip(path, f"the curves file has no {y_key} by {x_key} for these runs")
            continue
        ax.set_xlabel("communicated megabytes (log scale)" if x_key == "communicated_mb" else "round")
        if x_key == "communicated_mb":
            ax.set_xscale("log")
        else:
            _integer_ticks(ax.xaxis)  # rounds are whole
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (mean ± std over {_counted(n_seeds, 'seed')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save(fig, path))
    return written


def _fed_figures(runs: list[dict]) -> list[tuple]:
    """draw_federated's figures: (name, x column, y column, y label, title, log y) each; a text model's runs
    (score_of: the gpt's) also the test loss by round and by megabytes, their accuracy the next character's."""
    mb = "by megabytes communicated (all clients, up + down, float32)"
    score = score_of(runs)
    if score is ACCURACY:
        figures = [("accuracy_vs_round", "round", "test_acc_b", TASK_B_LABEL, "Server model's accuracy by round"),
                   ("accuracy_vs_mb", "communicated_mb", "test_acc_b", TASK_B_LABEL, f"Accuracy {mb}")]
    else:
        acc = f"next-character accuracy on {score.task_b} (%)"
        figures = [("loss_vs_round", "round", "test_loss_b", score.b_label, "Server model's test loss by round"),
                   ("loss_vs_mb", "communicated_mb", "test_loss_b", score.b_label, f"Test loss {mb}"),
                   ("accuracy_vs_round", "round", "test_acc_b", acc, "Server model's next-character accuracy by round"),
                   ("accuracy_vs_mb", "communicated_mb", "test_acc_b", acc, f"Next-character accuracy {mb}")]
    return [(*f, False) for f in figures] + [
        ("aggregation_error", "round", "aggregation_error",
         "||mean client update - applied update|| / ||mean client update||", "Aggregation error by round", True)]


def fed_stem(runs: list[dict]) -> str:
    """"dirichlet_" / "iid_" / "role_" when every run says the same partition scheme, else ""."""
    schemes = {_partition(r) for r in runs}
    return f"{safe_name(str(schemes.pop()))}_" if len(schemes) == 1 and None not in schemes else ""


def _partition(row: dict) -> str | None:
    if row.get("partition"):
        return row["partition"]
    return _config(row).get("partition")


def draw_glue(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """glue.py's figures: the dev metric of every task and method (bars: mean over seeds, error bars: ± std,
    the dots: each seed), and the dev metric by epoch per task (a line per method, ± std band, merges marked):
    <prefix>dev_metric.png and <prefix>dev_by_epoch.png (glue.py: glue_dev_metric.png, glue_dev_by_epoch.png)."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    tasks = sorted({r["task"] for r in runs})
    methods = sorted({r["method"] for r in runs}, key=display_order)
    by = group(runs, ("task", "method"))
    label = {m: ("FPFT" if m == "fpft" else METHODS[m].label) for m in methods}
    color = {m: ("#222222" if m == "fpft" else COLORS[m]) for m in methods}
    written = []
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) * max(1, len(methods)) / 3), 5))
    width = 0.8 / max(1, len(methods))
    lows, highs, n_seeds, labelled = [], [], [], set()
    for j, m in enumerate(methods):
        for i, t in enumerate(tasks):
            vals = [100 * r["final_dev"] for r in by.get((t, m), []) if r.get("final_dev") is not None]
            vals = [v for v in vals if not math.isnan(v)]
            if not vals:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            mean, std = mean_std(vals)
            err = 0.0 if math.isnan(std) else std
            ax.bar(x, mean, width, color=color[m], alpha=0.8, label=None if m in labelled else label[m],
                   yerr=None if math.isnan(std) else std, capsize=3)
            labelled.add(m)
            ax.plot([x] * len(vals), vals, "k.", ms=3)
            lows.append(min(mean - err, *vals)), highs.append(max(mean + err, *vals)), n_seeds.append(len(vals))
    metrics = {r["task"]: r["metric"] for r in runs}
    if lows:
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([f"{t}\n({metrics[t]})" for t in tasks])
        ax.set_xlabel("GLUE task (dev metric)")
        _bar_axis(ax, lows, highs, "dev metric at the last epoch (x100)", unit="")
        ax.set_title(f"GLUE dev metrics (mean ± std over {_counted(n_seeds, 'seed')})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save(fig, plots_dir / f"{prefix}dev_metric.png"))
    else:
        plt.close(fig)
        _skip(plots_dir / f"{prefix}dev_metric.png", "no run has a dev metric")

    keep = {r["config_hash"] for r in runs}
    by_run = group([c for c in curves if c["config_hash"] in keep], ("config_hash",))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
    drawn = False
    for ax, t in zip(axes[0], tasks):
        for m in methods:
            rs = by.get((t, m), [])
            cs = [by_run.get((r["config_hash"],), []) for r in rs]
            n = min((len(c) for c in cs), default=0)
            if n == 0:
                continue
            ys = 100 * np.array([[c["dev_metric"] for c in run[:n]] for run in cs], dtype=float)
            epochs = [c["epoch"] for c in cs[0][:n]]
            mean = ys.mean(0)
            std = ys.std(0, ddof=1) if len(cs) > 1 else np.zeros(n)
            if not _curve(ax, epochs, mean, std, color=color[m], label=label[m]):
                continue
            drawn = True
            merged = [e for e, c in zip(epochs, cs[0][:n]) if c["merged"]]
            ax.plot(merged, [mean[epochs.index(e)] for e in merged], "|", color=color[m], ms=10)
        _integer_ticks(ax.xaxis)
        ax.set_xlabel("epoch (| : a merge)")
        ax.set_ylabel(f"dev {metrics[t]} (x100)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        _skip(plots_dir / f"{prefix}dev_by_epoch.png", "the curves file has no dev metric per epoch for these runs")
        return written
    legend = {}
    for ax in axes[0]:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lbl, h)
    axes[0][-1].legend(list(legend.values()), list(legend), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("GLUE dev metric by epoch (mean ± std over seeds)")
    written.append(_save(fig, plots_dir / f"{prefix}dev_by_epoch.png"))
    return written
