"""The federated study as the runner runs it: its plan, its run hash, its trainer (a worker's), its rows.

federated.py is its command line; fed/flower.py runs the same runs on Flower and writes the same rows.
"""
from __future__ import annotations

import functools
import json
import time
from datetime import datetime, timezone

from tqdm.auto import tqdm

from data import load_text, Task, text_bounds, vocabulary
from engine.build import config_model
from engine.results import RECORD_COLUMNS, Index
from engine.runner import resolve_device, run_study as run, Study
from engine.settings import stable_hash
from fed.config import fed_settings_hash
from fed.methods import get_fed_method
from fed.partition import partition, role_partition, RoleShards
from fed.simulate import _client_run, FedSettings, megabytes, run_federated, Server
from models import count_trainable
from raclora.errors import DIVERGED, Diverged
from raclora.factors import lora_scale
from sweep import Sweep

RUN_COLUMNS = {"method": str, "sketch": str, "rank": int, "seed": int, "status": str, "diverged_round": int,
               "clients": int,
               "partition": str, "dirichlet_alpha": float, "min_role_chars": int, "participation": float, "rounds": int, "local_epochs": int,
               "lr": float, "model": str, "target_modules": str, "trainable_params": int, "up_numbers": int,
               "down_numbers": int, "final_test_acc_b": float, "final_test_acc_a": float, "best_test_acc_b": float,
               "final_test_loss_b": float, "final_test_loss_a": float, "best_test_loss_b": float,
               "target_accuracy": float, "target_loss": float, "rounds_to_target": int, "mb_to_target": float, "total_mb": float,
               "max_aggregation_error": float, **RECORD_COLUMNS}
CURVE_COLUMNS = {"config_hash": str, "method": str, "sketch": str, "rank": int, "seed": int,
                 "round": Index("rounds", diverged_at="diverged_round"),
                 "participants": int, "train_loss": float, "test_acc_b": float, "test_acc_a": float,
                 "test_loss_b": float, "test_loss_a": float, "up_numbers": int, "down_numbers": int, "communicated_mb": float, "aggregation_error": float}
# the Flower engine's curve rows also carry the numbers its messages held, per participating client (fed/flower.py)
FLOWER_COLUMNS = {"sent_up_numbers": float, "sent_down_numbers": float, "failed_clients": int}
FLOWER_PREFIX = "fed_flower_"  # the same on Flower (fed/flower.py, federated.py --engine flower)
PREFIX = "fed_"  # results/fed_runs.csv, results/fed_curves.csv (one row per run and round)


def plan(cfg) -> list[dict]:
    """Every run the config asks for: method x sketch x rank x seed (fedavg: no sketch, no rank)."""
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
    return stable_hash([fed_settings_hash(cfg, device, method), method, sketch, rank, seed])


class FedTrainer:
    """Runs federated runs from the base model; what one worker process holds."""
    def __init__(self, cfg, commit: str, base_state: dict, tasks=None, show_epochs: bool = True):

        self.cfg, self.commit, self.show_epochs = cfg, commit, show_epochs
        self.device = resolve_device(cfg.device)
        tasks = tasks if tasks is not None else cfg.load_tasks(self.device)
        self.base = config_model(cfg, None, self.device)
        self.base.load_state_dict(base_state)
        self.tasks, self.shards = federation(cfg, tasks)

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        out = []
        for spec in specs:
            s = settings(self.cfg, spec)
            bar = tqdm(total=s.rounds, desc=describe(spec), leave=False, unit="round",
                       disable=not (self.cfg.progress and self.show_epochs))
            t0 = time.perf_counter()
            diverged = None
            with bar:
                try:
                    records = run_federated(self.base, self.tasks["B"], self.tasks["A"], self.shards, s,
                                            progress=lambda rec: bar.update(1))
                except Diverged as e:  # recorded as diverged, with the rounds before it, as main.py records one
                    records, diverged = e.records, e.round
                    tqdm.write(f"{describe(spec)}: diverged in round {e.round} ({e}); recorded as diverged")
            out.append(self.rows(spec, records, time.perf_counter() - t0, trainable(self.base, s), diverged))
        return out

    def rows(self, spec: dict, records: list[dict], wall: float, trainable_params: int,
             diverged_round: int | None = None) -> tuple[dict, list[dict]]:
        return run_rows(self.cfg, self.commit, self.device.type, spec, records, wall, trainable_params,
                        diverged_round)


def run_rows(cfg, commit: str, dev: str, spec: dict, records: list[dict], wall: float,
             trainable_params: int, diverged_round: int | None = None) -> tuple[dict, list[dict]]:
    """One run's fed_runs.csv row and fed_curves.csv rows from its round records (fed.simulate.run_federated's,
    or the Flower server's, which also carry the numbers its messages held: sent_up_numbers, sent_down_numbers).
    ``diverged_round``: the round whose loss was not finite (status DIVERGED; ``records`` are the rounds before
    it, and the results the run never reached are empty)."""
    key = run_hash(cfg, dev, **spec)
    total, curve = 0.0, []
    for r in records:  # every participating client's upload and download, cumulated over the rounds
        total += r["participants"] * megabytes(r["up_numbers"] + r["down_numbers"])
        curve.append(dict(config_hash=key, **spec, **{k: r[k] for k in r if k in CURVE_COLUMNS or k in FLOWER_COLUMNS},
                          communicated_mb=total))
    reached = next((c for c in curve if reaches(cfg, c)), None)
    done = diverged_round is None
    last = records[-1] if done else {}
    row = dict(**spec, status="finished" if done else DIVERGED, diverged_round=diverged_round, clients=cfg.clients,
               partition=cfg.partition, dirichlet_alpha=cfg.dirichlet_alpha,
               min_role_chars=cfg.min_role_chars if cfg.partition == "role" else None, participation=cfg.participation, rounds=cfg.rounds,
               local_epochs=cfg.local_epochs, lr=cfg.lr, model=cfg.model,
               target_modules=" ".join(cfg.target_modules), trainable_params=trainable_params,
               up_numbers=records[0]["up_numbers"] if records else None,
               down_numbers=records[0]["down_numbers"] if records else None,
               final_test_acc_b=last.get("test_acc_b"), final_test_acc_a=last.get("test_acc_a"),
               best_test_acc_b=max(r["test_acc_b"] for r in records) if done else None,
               final_test_loss_b=last.get("test_loss_b"), final_test_loss_a=last.get("test_loss_a"),
               best_test_loss_b=min(r["test_loss_b"] for r in records) if done else None,
               target_accuracy=cfg.target_accuracy, target_loss=cfg.target_loss,
               rounds_to_target=reached["round"] if reached and done else None,
               mb_to_target=reached["communicated_mb"] if reached and done else None, total_mb=total,
               max_aggregation_error=max(r["aggregation_error"] for r in records) if done else None,
               wall_s=round(wall, 3),
               config_hash=key, settings_hash=fed_settings_hash(cfg, dev, spec["method"]),
               git_commit=commit, device=dev,
               finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               config=json.dumps(cfg.to_dict(), sort_keys=True))
    return row, curve


def settings(cfg, spec: dict):
    """The fed.simulate.FedSettings of one run."""
    rank = spec["rank"]
    return FedSettings(method=spec["method"], sketch=spec["sketch"], rank=rank,
                       scale=None if rank is None else lora_scale(cfg.scaling, cfg.lora_alpha, rank), seed=spec["seed"],
                       rounds=cfg.rounds, participation=cfg.participation, local_epochs=cfg.local_epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       random_init=cfg.random_init, targets=cfg.targets())


def trainable(base, s) -> int:
    """What one client trains (fed.simulate's client model, built once)."""
    return count_trainable(_client_run(Server(base, s, 1)).model)


def reaches(cfg, rec: dict) -> bool:
    """Whether a round's record reaches the summary's target: test loss at most target_loss on a text task (the
    record of a text model), test accuracy at least target_accuracy on images."""
    if cfg.takes_tokens():
        return rec["test_loss_b"] <= cfg.target_loss
    return rec["test_acc_b"] >= cfg.target_accuracy


def federation(cfg, tasks: dict) -> tuple[dict, list]:
    """(tasks, the clients' shards): task B's training examples split over the clients (fed.partition), the same
    for every run. iid and dirichlet split task B's own training examples (from split_seed); role makes the
    clients Shakespeare's speaking roles (role_partition), and task B's training split becomes their windows,
    one client after the other (its val and test splits, the central evaluation, unchanged)."""
    if cfg.partition != "role":
        return tasks, partition(tasks["B"].train.y, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.split_seed)
    roles = client_roles(cfg)
    b = tasks["B"]
    device = b.train.x.device
    train = type(b.train)(roles.train.x.to(device), roles.train.y.to(device))
    return {**tasks, "B": Task(train=train, val=b.val, test=b.test, spec=b.spec)}, roles.shards


def client_roles(cfg) -> RoleShards:
    """The role partition of task B's text (fed.partition.role_partition): its training split as
    config.load_tasks cuts it (text_chars, task_b_chars), windows of gpt_context characters."""
    return _client_roles(cfg.text_b, str(cfg.data_dir), cfg.gpt_context, cfg.text_chars, cfg.task_b_chars,
                         cfg.clients, cfg.min_role_chars)


@functools.lru_cache(maxsize=4)  # the study, its trainer and its summary line ask for the same partition
def _client_roles(name: str, data_dir: str, context: int, chars: int, train_chars: int, clients: int,
                  min_chars: int) -> RoleShards:
    text = load_text(name, data_dir)
    stop = text_bounds(len(text))["train"][1]
    for cap in (chars, train_chars):
        stop = min(stop, cap) if cap else stop
    return role_partition(text, vocabulary(data_dir), context, stop, clients, min_chars)


def client_shards(cfg, tasks) -> list:
    """The clients' shards of federation(cfg, tasks)."""
    return federation(cfg, tasks)[1]


def federation_in_words(cfg, shards: list) -> str:
    """One line on the clients: how many, the partition, their examples."""
    sizes = f"{min(s.numel() for s in shards)}-{max(s.numel() for s in shards)}"
    if cfg.partition == "role":
        return (f"{cfg.clients} clients: the largest of the {client_roles(cfg).kept} speaking roles of "
                f"{cfg.text_b} with at least {cfg.min_role_chars} training characters, {sizes} windows of "
                f"{cfg.gpt_context} characters each")
    what = f"windows of {cfg.gpt_context} characters" if cfg.takes_tokens() else "images"
    return (f"{cfg.clients} clients ({cfg.partition}" + (f", alpha {cfg.dirichlet_alpha}" if cfg.partition ==
            "dirichlet" else "") + f"): {sizes} {what} each")


def describe(spec: dict) -> str:
    return " ".join(str(spec[k]) for k in ("method", "sketch", "rank") if spec[k] is not None) + f" seed {spec['seed']}"


def run_study(cfg, commit: str) -> list[dict]:
    """The base model (trained or loaded as main.py does), then every run of the plan not yet recorded
    (engine.runner.run_study); returns this study's fed_runs.csv rows."""
    t0 = time.perf_counter()
    cfg.check_setup()
    sweep = Sweep(cfg.base_config(), commit)
    tasks, shards = federation(cfg, sweep.tasks)  # a split that cannot be made stops here, before any training
    tqdm.write(f"device: {sweep.device}; {federation_in_words(cfg, shards)}")
    base = sweep.base_model()
    state = {k: v.cpu() for k, v in base.state_dict().items()}
    dev = sweep.device.type
    study = Study(plan=plan(cfg), run_hash=lambda spec: run_hash(cfg, dev, **spec),
                  stack_key=lambda spec: tuple(spec.values()), make_trainer=FedTrainer, code=__name__,
                  trainer_args=(cfg, commit, state), trainer=FedTrainer(cfg, commit, base.state_dict(), sweep.tasks),
                  prefix=PREFIX, run_columns=RUN_COLUMNS, curve_columns=CURVE_COLUMNS)
    rows = run(study, cfg, sweep.device)
    tqdm.write(f"study finished in {time.perf_counter() - t0:.1f} s")
    return rows
