"""Federated adaptation: `python federated.py [--field value ...]` (see --help).

The suite's base model (trained on digits 0-4 as main.py trains it, and cached alike) learns digits 5-9 from
clients that each hold a shard of task B's training images (iid, or Dirichlet label skew), or (`--model gpt
--partition role`) a GPT trained on Austen learns Shakespeare from his speaking roles, under a federated
method of fed/methods.py (FedAvg, FedIT, FFA-LoRA, FLoRA, Fed-RAC-LoRA), in rounds simulated in this process
(fed/simulate.py; a round's clients train as one stack; the same rounds run on Flower: fed/flower.py,
`flwr run .`). Methods x sketches x ranks x seeds through the shared runner. Writes results/fed_runs.csv and
results/fed_curves.csv (every round: accuracy, loss, communication, aggregation error), plots/fed_*.png, and prints
a summary table.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from engine.cli import run_command
from engine.results import format_table, git_commit, group, mean_std, pct, seeds_cell, split_diverged
from engine.runner import report, resolve_device
from fed.config import fed_settings_hash, from_argv
from fed.methods import FED_METHODS
from fed.deploy import run_on_flower
from fed.study import CURVE_COLUMNS, FLOWER_COLUMNS, FLOWER_PREFIX, PREFIX, RUN_COLUMNS, run_study
from models import MODELS
from plots import draw_federated


def on_text(rows: list[dict]) -> bool:
    """Whether the runs are a text model's (the gpt's: tokens in, next-character prediction)."""
    return any("tokens" in MODELS[r["model"]][0].takes for r in rows if r.get("model") in MODELS)


def summary(rows: list[dict]) -> str:
    """One line per method, sketch and rank: mean ± std over seeds of the final accuracies (a text model: the
    final test losses in nats per character, then the next-character accuracy), rounds and megabytes to the
    target (accuracy; a text model: target_loss), the numbers each client sends per round, the largest
    aggregation error."""
    text = on_text(rows)
    scores = ["final loss B", "loss A", "acc B %"] if text else ["final acc B %", "acc A %"]
    header = ["method", "sketch", "rank", "seeds", *scores, "rounds to target", "MB to target",
              "trainable", "up / down per round", "max agg. error"]
    order = {m: i for i, m in enumerate(FED_METHODS)}
    lines = []
    for (method, sketch, rank), runs in sorted(group(rows, ("method", "sketch", "rank")).items(),
                                               key=lambda kv: (order.get(kv[0][0], 9), str(kv[0][1]), kv[0][2] or 0)):
        rs, diverged = split_diverged(runs)  # a diverged run is counted in the seeds column, left out of the rest
        reached = [r["rounds_to_target"] for r in rs if r["rounds_to_target"] is not None]
        mb = [r["mb_to_target"] for r in rs if r["mb_to_target"] is not None]
        target = f"{runs[0]['target_loss']} nats" if text else f"{100 * runs[0]['target_accuracy']:.0f}%"

        def cell(values, fmt):
            if not values:
                return f"not reached ({target})" if rs else "-"
            m, s = mean_std(values)
            return (fmt.format(m) + ("" if math.isnan(s) else " ± " + fmt.format(s))
                    + ("" if len(values) == len(rs) else f" ({len(values)}/{len(rs)})"))
        first = rs[0] if rs else runs[0]

        def nats(key):
            m, s = mean_std([r[key] for r in rs])
            return "-" if math.isnan(m) else f"{m:.4f}" + ("" if math.isnan(s) else f" ± {s:.4f}")
        accs = [pct(*mean_std([r[k] for r in rs])) for k in (("final_test_acc_b",) if text else
                                                            ("final_test_acc_b", "final_test_acc_a"))]
        lines.append([method, sketch or "-", "-" if rank is None else str(rank), seeds_cell(rs, diverged),
                      *([nats("final_test_loss_b"), nats("final_test_loss_a")] if text else []), *accs,
                      cell(reached, "{:.1f}"),
                      cell(mb, "{:.2f}"), str(first["trainable_params"]),
                      "-" if first["up_numbers"] is None else f"{first['up_numbers']} / {first['down_numbers']}",
                      f"{max(r['max_aggregation_error'] for r in rs):.1e}" if rs else "-"])
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: from_argv(argv), study, lambda cfg: Path(cfg.results_dir) / f"{PREFIX}runs.csv")


def study(cfg) -> None:
    """Train what the config asks for (unless --plots-only), in this process or each run on a Flower federation
    of its own (--engine flower), print the table, draw the figures."""
    flower = cfg.engine == "flower"
    run = run_on_flower if flower else run_study
    study_rows = None if cfg.plots_only else run(cfg, git_commit())
    device = resolve_device(cfg.device).type
    wanted = {fed_settings_hash(cfg, device, m) for m in FED_METHODS}
    report(cfg, study_rows, wanted, summary, draw_federated, RUN_COLUMNS,
           {**CURVE_COLUMNS, **FLOWER_COLUMNS} if flower else CURVE_COLUMNS, FLOWER_PREFIX if flower else PREFIX)


if __name__ == "__main__":
    sys.exit(main())
