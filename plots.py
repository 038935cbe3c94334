"""The three figures, drawn only from results/runs.csv and results/curves.csv (never by training).

Error bars are the sample standard deviation over seeds; a point from a single seed has none.
Diverged runs have no result: they are left out (the summary table counts them).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

from methods import METHODS, display_order  # noqa: E402
from engine.results import atomic_path, group, mean_std, split_diverged  # noqa: E402

SKETCH_LABEL = {"left": "(Zero, Gaussian)", "right": "(Gaussian, Zero)"}  # the paper's (A init, B init)
SKETCH_STYLE = {"left": "-", "right": "--"}
COLORS = {name: f"C{i}" for i, name in enumerate(METHODS)}
FPFT_COLOR, BASE_COLOR = "black", "grey"


def label(method: str, sketch: str | None) -> str:
    if method == "fpft":
        return "FPFT"
    name = METHODS[method].label if method in METHODS else method
    return f"{name} {SKETCH_LABEL[sketch]}" if sketch in SKETCH_LABEL else name  # RandLoRA has no sketch


def draw_all(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike) -> list[Path]:
    """Write every figure the rows allow into ``plots_dir``; return the paths written."""
    runs = split_diverged(runs)[0]
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    tag = model_tag(runs)
    written = [rank_vs_accuracy(runs, plots_dir / "rank_vs_accuracy.png", tag),
               accuracy_vs_epoch(runs, curves, plots_dir / "accuracy_vs_epoch.png", tag),
               methods_rank1(runs, plots_dir / "methods_rank1.png", tag)]
    return [p for p in written if p is not None]


def model_tag(runs: list[dict]) -> str:
    """What the titles say about the model when it is not the paper's MLP: "ViT", "ViT, adapters on attention"."""
    configs = [json.loads(r["config"]) for r in runs if r.get("config")]
    models = sorted({c.get("model", "mlp") for c in configs})
    targets = sorted({" ".join(c.get("target_modules", ["all"])) for c in configs if "target_modules" in c})
    parts = [] if models in ([], ["mlp"]) else ["/".join("ViT" if m == "vit" else m for m in models)]
    if targets and targets != ["all"]:
        parts.append(f"adapters on {', '.join(targets)}")
    return ", ".join(parts)


def _method_order(item):
    (method, sketch), _ = item
    return (display_order(method), method, sketch != "right")


def _adapter_rows(runs):
    return [r for r in runs if r["method"] not in ("base", "fpft")]


def _reference_lines(ax, runs):
    """FPFT on task B (mean, band of ± std) and the base model's accuracy on task A, both dashed."""
    fpft = mean_std([r["test_acc_b"] for r in runs if r["method"] == "fpft"])
    if not math.isnan(fpft[0]):
        ax.axhline(100 * fpft[0], color=FPFT_COLOR, ls="--", lw=1.2,
                   label=f"FPFT on digits 5-9: {100 * fpft[0]:.1f}%")
        if not math.isnan(fpft[1]):
            ax.axhspan(100 * (fpft[0] - fpft[1]), 100 * (fpft[0] + fpft[1]), color=FPFT_COLOR, alpha=0.08)
    base = [r["test_acc_a"] for r in runs if r["method"] == "base"]
    if base:
        ax.axhline(100 * base[0], color=BASE_COLOR, ls=(0, (2, 2)), lw=1.5,
                   label=f"base model on digits 0-4 (task A): {100 * base[0]:.1f}%")


def _titled(tag: str, title: str) -> str:
    return f"{tag}: {title}" if tag else title


def rank_vs_accuracy(runs: list[dict], path: Path, tag: str = "") -> Path | None:
    rows = _adapter_rows(runs)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    for (method, sketch), rs in sorted(group(rows, ("method", "sketch")).items(), key=_method_order):
        by_rank = group(rs, ("rank",))
        ranks = sorted(k[0] for k in by_rank)
        stats = [mean_std([r["test_acc_b"] for r in by_rank[(k,)]]) for k in ranks]
        ax.errorbar(ranks, [100 * m for m, _ in stats], yerr=[0 if math.isnan(s) else 100 * s for _, s in stats],
                    color=COLORS.get(method), ls=SKETCH_STYLE.get(sketch, "-"), marker="o", capsize=3,
                    label=label(method, sketch))
    _reference_lines(ax, runs)
    all_ranks = sorted({r["rank"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ranks, [str(r) for r in all_ranks])
    ax.set_xlabel("adapter rank r")
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    ax.set_title(_titled(tag, "Accuracy on task B by rank (mean ± std over seeds)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def accuracy_vs_epoch(runs: list[dict], curves: list[dict], path: Path, tag: str = "") -> Path | None:
    rows = _adapter_rows(runs)
    if not rows:
        return None
    keep = {r["config_hash"] for r in runs}
    curves = [c for c in curves if c["config_hash"] in keep]
    by_run = group(curves, ("config_hash",))
    ranks = sorted({r["rank"] for r in rows})
    ncols = min(len(ranks), 2)
    nrows = math.ceil(len(ranks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False, sharey=True)
    fpft_runs = [r for r in runs if r["method"] == "fpft"]
    for i, (ax, rank) in enumerate(zip(axes.flat, ranks)):
        series = [(("fpft", None), fpft_runs)] + sorted(
            group([r for r in rows if r["rank"] == rank], ("method", "sketch")).items(), key=_method_order)
        for (method, sketch), rs in series:
            if not rs:
                continue
            epochs, m, s = _mean_curve([by_run.get((r["config_hash"],), []) for r in rs])
            color = FPFT_COLOR if method == "fpft" else COLORS.get(method)
            ls = "--" if method == "fpft" else SKETCH_STYLE.get(sketch, "-")
            ax.plot(epochs, 100 * m, color=color, ls=ls, label=label(method, sketch))
            ax.fill_between(epochs, 100 * (m - s), 100 * (m + s), color=color, alpha=0.12)
        ax.set_title(f"rank {rank}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        if i % ncols == 0:  # the panels share the y axis
            ax.set_ylabel("test accuracy on digits 5-9 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ranks):]:
        ax.set_visible(False)
    fig.suptitle(_titled(tag, "Test accuracy on task B per epoch (mean ± std over the seeds still running)"))
    fig.tight_layout()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=min(len(labels), 5),
               bbox_to_anchor=(0.5, 0.0))  # below the panels; savefig's tight bbox takes it in
    return _save(fig, path)


def _mean_curve(run_curves: list[list[dict]], key: str = "test_acc_b") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch, mean and std of test accuracy over the runs that reached it (early stopping ends runs)."""
    n = max(len(c) for c in run_curves)
    epochs, means, stds = [], [], []
    for e in range(1, n + 1):
        vals = [c[key] for rc in run_curves for c in rc if c["epoch"] == e]
        m, s = mean_std(vals)
        epochs.append(e), means.append(m), stds.append(0.0 if math.isnan(s) else s)
    return np.array(epochs), np.array(means), np.array(stds)


def methods_rank1(runs: list[dict], path: Path, tag: str = "") -> Path | None:
    """The paper's Table 3 as bars: every method x sketch at rank 1, with FPFT."""
    rows = [r for r in _adapter_rows(runs) if r["rank"] == 1]
    if not rows:
        return None
    bars = [(label("fpft", None), [r["test_acc_b"] for r in runs if r["method"] == "fpft"], FPFT_COLOR)]
    for (method, sketch), rs in sorted(group(rows, ("method", "sketch")).items(), key=_method_order):
        bars.append((label(method, sketch), [r["test_acc_b"] for r in rs], COLORS.get(method)))
    bars = [b for b in bars if b[1]]
    stats = [mean_std(v) for _, v, _ in bars]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 2), 5))
    x = np.arange(len(bars))
    means = [100 * m for m, _ in stats]
    errs = [0 if math.isnan(s) else 100 * s for _, s in stats]
    ax.bar(x, means, yerr=errs, capsize=4, color=[c for *_, c in bars], alpha=0.85)
    for xi, m, err in zip(x, means, errs):
        ax.text(xi, m + err + 1, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [b[0].replace(" (", "\n(") for b in bars], fontsize=8)
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    ax.set_ylim(0, 105)
    n_seeds = sorted({len(v) for _, v, _ in bars})
    ax.set_title(_titled(tag, f"Rank 1, every method and sketch (mean ± std over {'/'.join(map(str, n_seeds))} seeds)"))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --- the from-scratch study (scratch.py): drawn from results/scratch_runs.csv and scratch_curves.csv ---
FORM_LABEL = {"full": "full rank", "lowrank": "low-rank, U(±1/√r) init", "lowrank_ae": "low-rank, two default Linears",
              "lte": "LTE, {h} heads of rank r", "lora": "one LoRA head of rank {h}·r", "galore": "GaLore (rank-r Adam)"}
FORM_STYLE = {"lowrank": "-", "lowrank_ae": ":", "lte": "-", "lora": "--", "galore": "-."}


def draw_scratch(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike) -> list[Path]:
    """Per dataset and optimizer: test accuracy per epoch for each form (one line per rank, the full-rank
    model for reference), the two low-rank forms and the full model together, and final accuracy by rank."""
    runs = split_diverged(runs)[0]
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    keep = {r["config_hash"] for r in runs}
    by_run = group([c for c in curves if c["config_hash"] in keep], ("config_hash",))
    written = []
    for (dataset,), rows in sorted(group(runs, ("dataset",)).items()):
        opts = sorted({r["optimizer"] for r in rows if r["form"] != "galore"}) or ["adamw"]
        stem = f"scratch_{dataset}_{'+'.join(opts)}"
        heads = json.loads(rows[0]["config"]).get("lte_heads", "N")
        for form in ("lowrank", "lowrank_ae", "lte", "lora", "galore"):
            if any(r["form"] == form for r in rows):
                written.append(_scratch_epochs(rows, by_run, [form], heads, dataset,
                                               plots_dir / f"{stem}_{form}.png"))
        if any(r["form"] in ("lowrank", "lowrank_ae") for r in rows):
            written.append(_scratch_epochs(rows, by_run, ["lowrank", "lowrank_ae"], heads, dataset,
                                           plots_dir / f"{stem}_all.png"))
        written.append(_scratch_final(rows, heads, dataset, plots_dir / f"{stem}_final.png"))
    return [p for p in written if p is not None]


def _form_label(form: str, heads) -> str:
    return FORM_LABEL.get(form, form).format(h=heads)


def _full_line(ax, rows, by_run) -> None:
    full = [r for r in rows if r["form"] == "full"]
    if full:
        epochs, m, s = _mean_curve([by_run.get((r["config_hash"],), []) for r in full], key="test_acc")
        ax.plot(epochs, 100 * m, color="black", lw=2, label=f"full rank ({full[0]['trainable_params']:,} params)")
        ax.fill_between(epochs, 100 * (m - s), 100 * (m + s), color="black", alpha=0.1)


def _scratch_epochs(rows, by_run, forms: list[str], heads, dataset: str, path: Path) -> Path | None:
    ranks = sorted({r["rank"] for r in rows if r["form"] in forms})
    if not ranks:
        return None
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(10, 5.5))
    _full_line(ax, rows, by_run)
    for form in forms:
        for i, rank in enumerate(ranks):
            rs = [r for r in rows if r["form"] == form and r["rank"] == rank]
            if not rs:
                continue
            epochs, m, s = _mean_curve([by_run.get((r["config_hash"],), []) for r in rs], key="test_acc")
            color = cmap(i / max(1, len(ranks) - 1) * 0.9)
            name = f"r={rank}" if len(forms) == 1 else f"{_form_label(form, heads)}, r={rank}"
            ax.plot(epochs, 100 * m, color=color, ls=FORM_STYLE.get(form, "-"), label=name)
            ax.fill_between(epochs, 100 * (m - s), 100 * (m + s), color=color, alpha=0.1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test accuracy, {dataset}, 10 classes (%)")
    what = _form_label(forms[0], heads) if len(forms) == 1 else " vs ".join(_form_label(f, heads) for f in forms)
    seeds = sorted({len(v) for v in group([r for r in rows if r["form"] in forms], ("form", "rank")).values()})
    ax.set_title(f"Trained from scratch: {what}\n(mean ± std over {'/'.join(map(str, seeds))} seed(s))")
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
    all_ranks = sorted({r["rank"] for r in ranked})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ranks, [str(r) for r in all_ranks])
    ax.set_xlabel("rank r (per layer; LTE: per head)")
    ax.set_ylabel(f"final test accuracy, {dataset}, 10 classes (%)")
    ax.set_title("Trained from scratch: accuracy after the last epoch by rank (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Save as PNG atomically: a half-written file never replaces a good one."""
    try:
        if not fig.get_layout_engine() and not fig.legends:
            fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# --- the federated study (federated.py) ---------------------------------------------------------------
FED_COLORS = {"fedavg": "#222222", "fedit": "#1f77b4", "ffa_lora": "#2ca02c", "flora": "#9467bd",
              "fed_rac_lora": "#d62728"}
FED_LABELS = {"fedavg": "FedAvg (full)", "fedit": "FedIT", "ffa_lora": "FFA-LoRA", "flora": "FLoRA",
              "fed_rac_lora": "Fed-RAC-LoRA"}


def draw_federated(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike) -> list[Path]:
    """Accuracy by round, accuracy by communicated megabytes, aggregation error by round: a line per method,
    sketch and rank, mean over seeds with ± std (bands, or error bars on the megabyte axis)."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    keep = {r["config_hash"] for r in runs}
    by_run = group([c for c in curves if c["config_hash"] in keep], ("config_hash",))
    order = list(FED_COLORS)
    series = sorted(group(runs, ("method", "sketch", "rank")).items(),
                    key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9, str(kv[0][1]), kv[0][2] or 0))
    written = []
    for name, x_key, y_key, ylabel, title, log_y in (
            ("fed_accuracy_vs_round.png", "round", "test_acc_b", "test accuracy on digits 5-9 (%)",
             "Server model's accuracy by round", False),
            ("fed_accuracy_vs_mb.png", "communicated_mb", "test_acc_b", "test accuracy on digits 5-9 (%)",
             "Accuracy by megabytes communicated (all clients, up + down, float32)", False),
            ("fed_aggregation_error.png", "round", "aggregation_error",
             "||mean client update - applied update|| / ||mean client update||", "Aggregation error by round", True)):
        fig, ax = plt.subplots(figsize=(10, 5.5))
        for (method, sketch, rank), rs in series:
            rounds = [by_run.get((r["config_hash"],), []) for r in rs]
            n = min(len(c) for c in rounds)
            if n == 0:
                continue
            ys = np.array([[c[y_key] for c in cs[:n]] for cs in rounds], dtype=float)
            xs = np.array([[c[x_key] for c in cs[:n]] for cs in rounds], dtype=float).mean(0)
            scale = 1.0 if log_y else 100.0
            m, s = scale * ys.mean(0), scale * (ys.std(0, ddof=1) if len(rounds) > 1 else np.zeros(n))
            lbl = FED_LABELS.get(method, method) + (f" ({sketch})" if sketch else "") + (f" r={rank}" if rank else "")
            color, ls = FED_COLORS.get(method), SKETCH_STYLE.get(sketch, "-")
            if log_y:
                m = np.maximum(m, 1e-17)  # exact methods: float rounding, drawn at the floor of the axis
            ax.plot(xs, m, color=color, ls=ls, label=lbl)
            if not log_y:
                ax.fill_between(xs, m - s, m + s, color=color, alpha=0.12)
        ax.set_xlabel("communicated megabytes (log scale)" if x_key == "communicated_mb" else "round")
        if x_key == "communicated_mb":
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        n_seeds = sorted({len(rs) for _, rs in series})
        ax.set_title(f"{title} (mean ± std over {'/'.join(map(str, n_seeds))} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save(fig, plots_dir / name))
    return written


def draw_glue(runs: list[dict], curves: list[dict], plots_dir: str | os.PathLike) -> list[Path]:
    """glue.py's figures: the dev metric of every task and method (bars: mean over seeds, error bars: ± std,
    the dots: each seed), and the dev metric by epoch per task (a line per method, ± std band, merges marked)."""
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
    for j, m in enumerate(methods):
        for i, t in enumerate(tasks):
            vals = [100 * r["final_dev"] for r in by.get((t, m), [])]
            if not vals:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            mean, std = mean_std(vals)
            ax.bar(x, mean, width, color=color[m], alpha=0.8, label=label[m] if i == 0 else None,
                   yerr=None if math.isnan(std) else std, capsize=3)
            ax.plot([x] * len(vals), vals, "k.", ms=3)
    ax.set_xticks(range(len(tasks)))
    metrics = {r["task"]: r["metric"] for r in runs}
    ax.set_xticklabels([f"{t}\n({metrics[t]})" for t in tasks])
    ax.set_ylabel("dev metric at the last epoch (x100)")
    n_seeds = sorted({len(v) for v in by.values()})
    ax.set_title(f"GLUE dev metrics (mean ± std over {'/'.join(map(str, n_seeds))} seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    written.append(_save(fig, plots_dir / "glue_dev_metric.png"))

    keep = {r["config_hash"] for r in runs}
    by_run = group([c for c in curves if c["config_hash"] in keep], ("config_hash",))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
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
            ax.plot(epochs, mean, color=color[m], label=label[m])
            ax.fill_between(epochs, mean - std, mean + std, color=color[m], alpha=0.12)
            merged = [e for e, c in zip(epochs, cs[0][:n]) if c["merged"]]
            ax.plot(merged, [mean[epochs.index(e)] for e in merged], "|", color=color[m], ms=10)
        ax.set_xlabel("epoch (| : a merge)")
        ax.set_ylabel(f"dev {metrics[t]} (x100)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("GLUE dev metric by epoch (mean ± std over seeds)")
    written.append(_save(fig, plots_dir / "glue_dev_by_epoch.png"))
    return written
