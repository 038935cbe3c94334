"""Seconds per training epoch on task B (rank 1, rac_lora, left sketch) and samples per second.

    python bench/bench_epoch.py [--epochs 5] [--device auto] [--threads N]

Prints figures; asserts nothing. The first epoch is a warm-up and is reported apart.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from config import Config  # noqa: E402
from data import load_tasks  # noqa: E402
from engine.build import build_run, config_model  # noqa: E402
from raclora.factors import lora_scale  # noqa: E402
from engine.runner import resolve_device  # noqa: E402
from train import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="timed epochs after one warm-up epoch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(method="rac_lora", sketch="left", ranks=[1])
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    tasks = load_tasks(cfg.data_dir if Path(cfg.data_dir).exists() else Path(__file__).parent.parent / "data",
                       cfg.val_size, cfg.split_seed, device)
    load_s = time.perf_counter() - t0
    g = torch.Generator(device=device).manual_seed(0)
    run = build_run(config_model(cfg, g, device), "rac_lora", "left", [1], [g],
                    [lora_scale(cfg.scaling, cfg.lora_alpha, 1)], random_init=cfg.random_init, lr=cfg.lr,
                    total_steps=1)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, patience=10 ** 6,
              generator=g, **run.hooks)
    warm = train(run.model, run.params, tasks["B"], max_epochs=1, **kw)
    rec = train(run.model, run.params, tasks["B"], max_epochs=args.epochs, **kw)
    n = len(tasks["B"].train)
    per_epoch = rec.wall_s / args.epochs
    print(f"device: {device}  torch {torch.__version__}  threads: {torch.get_num_threads()}")
    print(f"data load (MNIST -> tensors on device): {load_s:.2f} s")
    print(f"warm-up epoch: {warm.wall_s:.3f} s")
    print(f"seconds per epoch (rank 1, rac_lora, {n} images, batch {cfg.batch_size}, with val+test eval "
          f"and merge): {per_epoch:.3f} s over {args.epochs} epochs")
    print(f"training samples per second: {n / per_epoch:,.0f}")


if __name__ == "__main__":
    main()
