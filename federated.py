"""Federated adaptation: `python federated.py [--field value ...]` (see --help).

The suite's base model (trained on digits 0-4 as main.py trains it, and cached alike) learns digits 5-9 from
clients that each hold a shard of task B's training images (iid, or Dirichlet label skew), under a federated
method of fed/methods.py (FedAvg, FedIT, FFA-LoRA, FLoRA, Fed-RAC-LoRA), in rounds simulated in this process
(fed/simulate.py; a round's clients train as one stack; the same rounds run on Flower: fed/flower.py,
`flwr run .`). Methods x sketches x ranks x seeds through the shared runner. Writes results/fed_runs.csv and
results/fed_curves.csv (every round: accuracy, communication, aggregation error), plots/fed_*.png, and prints
a summary table.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RUN_COLUMNS = ["method", "sketch", "rank", "seed", "status", "clients", "partition", "dirichlet_alpha",
               "participation", "rounds", "local_epochs", "lr", "trainable_params", "up_numbers", "down_numbers",
               "final_test_acc_b", "final_test_acc_a", "best_test_acc_b", "target_accuracy", "rounds_to_target",
               "mb_to_target", "total_mb", "max_aggregation_error", "wall_s", "config_hash", "settings_hash",
               "git_commit", "code_fingerprint", "device", "finished_at", "config"]
CURVE_COLUMNS = ["config_hash", "method", "sketch", "rank", "seed", "round", "participants", "train_loss",
                 "test_acc_b", "test_acc_a", "up_numbers", "down_numbers", "communicated_mb", "aggregation_error"]
# the Flower engine's curve rows also carry the numbers its messages held, per participating client (fed/flower.py)
FLOWER_COLUMNS = ["sent_up_numbers", "sent_down_numbers"]
PREFIX = "fed_"  # results/fed_runs.csv, results/fed_curves.csv (one row per run and round)
# The modules whose source determines this study's numbers (results.code_fingerprint)
CODE = ["data", "models", "lora", "train", "engine.build", "engine.stack", "fed.partition", "fed.methods",
        "fed.local", "fed.simulate", "federated"]


def plan(cfg) -> list[dict]:
    """Every run the config asks for: method x sketch x rank x seed (fedavg: no sketch, no rank)."""
    from fed.methods import get_fed_method

    out = []
    for method in cfg.selected_methods():
        if not get_fed_method(method).uses_sketch:  # full fine-tuning: no adapter
            out += [dict(method=method, sketch=None, rank=None, seed=s) for s in cfg.seeds]
            continue
        for sketch in cfg.selected_sketches():
            for rank in cfg.ranks:
                out += [dict(method=method, sketch=sketch, rank=rank, seed=s) for s in cfg.seeds]
    return out


def run_hash(cfg, device: str, method: str, sketch: str | None, rank: int | None, seed: int) -> str:
    from config import fed_settings_hash, stable_hash
    return stable_hash([fed_settings_hash(cfg, device, method), method, sketch, rank, seed])


class FedTrainer:
    """Runs federated runs from the base model; what one worker process holds."""

    def __init__(self, cfg, commit: str, base_state: dict, tasks=None, show_epochs: bool = True):
        from data import load_tasks
        from engine.build import config_model
        from engine.runner import resolve_device

        self.cfg, self.commit, self.show_epochs = cfg, commit, show_epochs
        self.device = resolve_device(cfg.device)
        self.tasks = tasks if tasks is not None else load_tasks(cfg.data_dir, cfg.val_size, cfg.split_seed,
                                                                self.device)
        self.base = config_model(cfg, None, self.device)
        self.base.load_state_dict(base_state)
        self.shards = client_shards(cfg, self.tasks)

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        from tqdm.auto import tqdm

        from fed.simulate import run_federated

        out = []
        for spec in specs:
            s = settings(self.cfg, spec)
            bar = tqdm(total=s.rounds, desc=describe(spec), leave=False, unit="round",
                       disable=not (self.cfg.progress and self.show_epochs))
            t0 = time.perf_counter()
            with bar:
                records = run_federated(self.base, self.tasks["B"], self.tasks["A"], self.shards, s,
                                        progress=lambda rec: bar.update(1))
            out.append(self.rows(spec, records, time.perf_counter() - t0, trainable(self.base, s)))
        return out

    def rows(self, spec: dict, records: list[dict], wall: float, trainable_params: int) -> tuple[dict, list[dict]]:
        return run_rows(self.cfg, self.commit, self.device.type, spec, records, wall, trainable_params)


def run_rows(cfg, commit: str, dev: str, spec: dict, records: list[dict], wall: float,
             trainable_params: int) -> tuple[dict, list[dict]]:
    """One run's fed_runs.csv row and fed_curves.csv rows from its round records (fed.simulate.run_federated's,
    or the Flower server's, which also carry the numbers its messages held: sent_up_numbers, sent_down_numbers)."""
    from config import fed_settings_hash
    from fed.simulate import megabytes

    key = run_hash(cfg, dev, **spec)
    total, curve = 0.0, []
    for r in records:  # every participating client's upload and download, cumulated over the rounds
        total += r["participants"] * megabytes(r["up_numbers"] + r["down_numbers"])
        curve.append(dict(config_hash=key, **spec, **{k: r[k] for k in r if k in CURVE_COLUMNS + FLOWER_COLUMNS},
                          communicated_mb=total))
    reached = next((c for c in curve if c["test_acc_b"] >= cfg.target_accuracy), None)
    last = records[-1]
    row = dict(**spec, status="finished", clients=cfg.clients, partition=cfg.partition,
               dirichlet_alpha=cfg.dirichlet_alpha, participation=cfg.participation, rounds=cfg.rounds,
               local_epochs=cfg.local_epochs, lr=cfg.lr, trainable_params=trainable_params,
               up_numbers=records[0]["up_numbers"], down_numbers=records[0]["down_numbers"],
               final_test_acc_b=last["test_acc_b"], final_test_acc_a=last["test_acc_a"],
               best_test_acc_b=max(r["test_acc_b"] for r in records), target_accuracy=cfg.target_accuracy,
               rounds_to_target=reached["round"] if reached else None,
               mb_to_target=reached["communicated_mb"] if reached else None, total_mb=total,
               max_aggregation_error=max(r["aggregation_error"] for r in records), wall_s=round(wall, 3),
               config_hash=key, settings_hash=fed_settings_hash(cfg, dev, spec["method"]),
               git_commit=commit, device=dev,
               finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               config=json.dumps(cfg.to_dict(), sort_keys=True))
    return row, curve


def settings(cfg, spec: dict):
    """The fed.simulate.FedSettings of one run."""
    from fed.simulate import FedSettings
    from lora import lora_scale

    rank = spec["rank"]
    return FedSettings(method=spec["method"], sketch=spec["sketch"], rank=rank,
                       scale=None if rank is None else lora_scale(cfg.scaling, cfg.lora_alpha, rank), seed=spec["seed"],
                       rounds=cfg.rounds, participation=cfg.participation, local_epochs=cfg.local_epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       random_init=cfg.random_init, targets=cfg.targets())


def trainable(base, s) -> int:
    """What one client trains (fed.simulate's client model, built once)."""
    from fed.simulate import Server, _client_run
    from models import count_trainable

    return count_trainable(_client_run(Server(base, s, 1)).model)


def client_shards(cfg, tasks) -> list:
    """Task B's training images split over the clients (fed.partition), from split_seed: the same for every run."""
    from fed.partition import partition

    return partition(tasks["B"].train.y, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.split_seed)


def describe(spec: dict) -> str:
    return " ".join(str(spec[k]) for k in ("method", "sketch", "rank") if spec[k] is not None) + f" seed {spec['seed']}"


def run_study(cfg, commit: str) -> list[dict]:
    """The base model (trained or loaded as main.py does), then every run of the plan not yet recorded
    (engine.runner.run_study); returns this study's fed_runs.csv rows."""
    from tqdm.auto import tqdm

    from engine.runner import Study, run_study as run
    from sweep import Sweep

    t0 = time.perf_counter()
    cfg.check_setup()
    sweep = Sweep(cfg.base_config(), commit)
    shards = client_shards(cfg, sweep.tasks)  # a split that cannot be made stops here, before any training
    tqdm.write(f"device: {sweep.device}; {cfg.clients} clients ({cfg.partition}"
               + (f", alpha {cfg.dirichlet_alpha}" if cfg.partition == "dirichlet" else "")
               + f"): {min(s.numel() for s in shards)}-{max(s.numel() for s in shards)} images each")
    base = sweep.base_model()
    state = {k: v.cpu() for k, v in base.state_dict().items()}
    dev = sweep.device.type
    study = Study(plan=plan(cfg), run_hash=lambda spec: run_hash(cfg, dev, **spec),
                  stack_key=lambda spec: tuple(spec.values()), make_trainer=FedTrainer, code=CODE,
                  trainer_args=(cfg, commit, state), trainer=FedTrainer(cfg, commit, base.state_dict(), sweep.tasks),
                  prefix=PREFIX, run_columns=RUN_COLUMNS, curve_columns=CURVE_COLUMNS)
    rows = run(study, cfg, sweep.device)
    tqdm.write(f"study finished in {time.perf_counter() - t0:.1f} s")
    return rows


def summary(rows: list[dict]) -> str:
    """One line per method, sketch and rank: mean ± std over seeds of the final accuracies, rounds and
    megabytes to the target accuracy, the numbers each client sends per round, the largest aggregation error."""
    import math

    from engine.results import format_table, group, mean_std, pct

    header = ["method", "sketch", "rank", "seeds", "final acc B %", "acc A %", "rounds to target", "MB to target",
              "trainable", "up / down per round", "max agg. error"]
    order = {m: i for i, m in enumerate(("fedavg", "fedit", "ffa_lora", "flora", "fed_rac_lora"))}
    lines = []
    for (method, sketch, rank), rs in sorted(group(rows, ("method", "sketch", "rank")).items(),
                                             key=lambda kv: (order.get(kv[0][0], 9), str(kv[0][1]), kv[0][2] or 0)):
        reached = [r["rounds_to_target"] for r in rs if r["rounds_to_target"] is not None]
        mb = [r["mb_to_target"] for r in rs if r["mb_to_target"] is not None]
        target = f"{100 * rs[0]['target_accuracy']:.0f}%"

        def cell(values, fmt):
            if not values:
                return f"not reached ({target})"
            m, s = mean_std(values)
            return (fmt.format(m) + ("" if math.isnan(s) else " ± " + fmt.format(s))
                    + ("" if len(values) == len(rs) else f" ({len(values)}/{len(rs)})"))
        lines.append([method, sketch or "-", "-" if rank is None else str(rank), str(len(rs)),
                      pct(*mean_std([r["final_test_acc_b"] for r in rs])),
                      pct(*mean_std([r["final_test_acc_a"] for r in rs])), cell(reached, "{:.1f}"),
                      cell(mb, "{:.2f}"), str(rs[0]["trainable_params"]),
                      f"{rs[0]['up_numbers']} / {rs[0]['down_numbers']}",
                      f"{max(r['max_aggregation_error'] for r in rs):.1e}"])
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    from config import FedConfig, from_argv
    from engine.cli import run_command

    def parse():
        return from_argv(argv, FedConfig, prog="federated.py",
                         description="Federated adaptation of the suite's base model. Every field can be overridden.")

    return run_command(parse, study, lambda cfg: Path(cfg.results_dir) / f"{PREFIX}runs.csv")


def study(cfg) -> None:
    """Train what the config asks for (unless --plots-only), print the table, draw the figures."""
    from config import FED_METHODS, fed_settings_hash
    from engine.results import git_commit
    from engine.runner import report, resolve_device
    from plots import draw_federated

    study_rows = None if cfg.plots_only else run_study(cfg, git_commit())
    device = resolve_device(cfg.device).type
    wanted = {fed_settings_hash(cfg, device, m) for m in FED_METHODS}
    report(cfg, study_rows, wanted, summary, draw_federated, PREFIX)


if __name__ == "__main__":
    sys.exit(main())
