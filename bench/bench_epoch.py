"""Seconds per training epoch on task B (rank 1, rac_lora, left sketch, plain engine) against the epoch's
matrix-product limit, measured on this machine; samples per second.

    python bench/bench_epoch.py [--epochs 5] [--device auto] [--threads N] [--before] [--adamw fused]

Prints figures; asserts nothing. Every epoch includes the merge and the validation + test evaluation.

- the matrix-product limit (bench/_limit.py): the epoch's matrix products (forward and backward of every Linear and
  adapter product at the real shapes, evaluation included) recorded in one epoch and replayed back to back;
- the achieved seconds per epoch (median and best of ``--epochs`` epochs, after one warm-up epoch) and the fraction
  limit / achieved;
- ``--before``: the same for the loops as they were before issue 24 (train.BEFORE: every speed switch off), the two
  paths' epochs interleaved in this one process, and the speed-up as their ratio.

No torch.compile: the loops run eagerly, so there is no compile time to report.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _limit import measure_limit, median, side_by_side, speed_paths, sync  # noqa: E402
from config import Config  # noqa: E402
from data import load_tasks  # noqa: E402
from engine.build import build_run, config_model  # noqa: E402
from engine.runner import resolve_device  # noqa: E402
from raclora.factors import lora_scale  # noqa: E402
from train import SPEED, Speed, speed, train  # noqa: E402


def epoch_of(cfg: Config, task, device: torch.device, setting: Speed):
    """A fresh rank-1 rac_lora run (seed 0) and a function that trains it one more epoch (train.train, one epoch a
    call, merge and evaluation included) with the loops' switches ``setting``; it returns the epoch's Record."""
    g = torch.Generator(device=device).manual_seed(0)
    run = build_run(config_model(cfg, g, device), "rac_lora", "left", [1], [g],
                    [lora_scale(cfg.scaling, cfg.lora_alpha, 1)], random_init=cfg.random_init, lr=cfg.lr,
                    total_steps=1)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, patience=10 ** 6,
              generator=g, **run.hooks)

    def one_epoch():
        with speed(setting):
            record = train(run.model, run.params, task, max_epochs=1, **kw)
        sync(device)
        return record
    return one_epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per path after one warm-up epoch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--before", action="store_true", help="also time the loops as they were (train.BEFORE), "
                                                         "interleaved with today's in this process")
    p.add_argument("--adamw", default=None, choices=["foreach", "fused", "for-loop"],
                   help="AdamW's implementation on today's path (default: train.SPEED's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(method="rac_lora", sketch="left", ranks=[1])
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    tasks = load_tasks(cfg.data_dir if Path(cfg.data_dir).exists() else Path(__file__).parent.parent / "data",
                       cfg.val_size, cfg.split_seed, device)
    load_s = time.perf_counter() - t0
    task = tasks["B"]
    now = SPEED if args.adamw is None else replace(SPEED, adamw=args.adamw)
    settings = speed_paths(args.before, now)
    paths = {name: epoch_of(cfg, task, device, s) for name, s in settings.items()}
    warm = {}
    for name, one_epoch in paths.items():
        t0 = time.perf_counter()
        one_epoch()
        warm[name] = time.perf_counter() - t0
    limit = measure_limit(paths["after"], device)
    seconds = side_by_side(paths, args.epochs)
    n = len(task.train)
    print(f"device: {device}  torch {torch.__version__}  threads: {torch.get_num_threads()}")
    print(f"data load (MNIST -> tensors on device): {load_s:.2f} s")
    print(f"one epoch: rank 1, rac_lora, {n} images, batch {cfg.batch_size}, with val+test eval and merge; "
          f"{args.epochs} epochs per path after a warm-up epoch, paths interleaved")
    print(f"matrix-product limit of one epoch (its products replayed back to back): {limit.seconds:.4f} s, "
          f"{limit.products} products, {limit.flops / 1e9:.2f} GFLOP, {limit.flops / limit.seconds / 1e9:.1f} GFLOP/s")
    for name, secs in seconds.items():
        print(f"{name:>6} ({settings[name]}): warm-up {warm[name]:.3f} s; per epoch median {median(secs):.4f} s, "
              f"best {min(secs):.4f} s -> {100 * limit.fraction(median(secs)):.0f}% of the limit (median), "
              f"{median(secs) / limit.seconds:.1f}x the limit; {n / median(secs):,.0f} training samples/s")
    if args.before:
        print(f"speed-up before -> after: {median(seconds['before']) / median(seconds['after']):.2f}x (medians), "
              f"{min(seconds['before']) / min(seconds['after']):.2f}x (best)")
    print("compile time: none (eager loops, no torch.compile)")


if __name__ == "__main__":
    main()
