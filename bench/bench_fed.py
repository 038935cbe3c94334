"""How fast the federated simulation is: rounds per minute with a round's clients as one stack and one
client after another, side by side, and the wall time of 100 clients x 100 rounds of Fed-RAC-LoRA at rank 1.

    python bench/bench_fed.py [--device auto] [--rounds 5] [--big-clients 100] [--big-rounds 100]

Prints figures; asserts nothing. The base model is main.py's default one, trained here on digits 0-4 (a
couple of minutes) unless results/checkpoints holds it. (The Flower engine of issue 13 is not built yet,
so there is no Flower column.)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config import Config  # noqa: E402
from fed.partition import partition  # noqa: E402
from fed.simulate import FedSettings, run_federated  # noqa: E402
from engine.runner import cpu_count, resolve_device  # noqa: E402
from sweep import Sweep  # noqa: E402


def settings(method: str, rounds: int) -> FedSettings:
    lora = method != "fedavg"
    return FedSettings(method=method, sketch="left" if lora else None, rank=1 if lora else None,
                       scale=1.0 if lora else None, seed=0, rounds=rounds, participation=1.0, local_epochs=1,
                       batch_size=128, lr=1e-3, weight_decay=0.01)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per method and engine (10 clients)")
    p.add_argument("--big-clients", type=int, default=100)
    p.add_argument("--big-rounds", type=int, default=100)
    args = p.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        results = ROOT / "results" if (ROOT / "results" / "checkpoints").exists() else Path(tmp)
        sweep = Sweep(Config(device=args.device, results_dir=str(results), progress=False), "bench")
        base, tasks = sweep.base_model(), sweep.tasks
    print(f"machine: {cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}", flush=True)
    shards = partition(tasks["B"].train.y, 10, "dirichlet", 0.5, seed=0)
    print(f"\n1. rounds per minute, 10 clients (Dirichlet 0.5), 1 local epoch, batch 128, MLP, rank 1, "
          f"{args.rounds} rounds each (central evaluation included)")
    for method in ("fedavg", "fedit", "ffa_lora", "flora", "fed_rac_lora"):
        line = []
        per = {}
        for engine in ("stack", "plain"):
            t0 = time.perf_counter()
            run_federated(base, tasks["B"], tasks["A"], shards, settings(method, args.rounds), engine=engine)
            per[engine] = (time.perf_counter() - t0) / args.rounds
            line.append(f"{engine} {60 / per[engine]:6.1f} rounds/min")
        print(f"   {method:13s} {'   '.join(line)}   stacked / one after another: {per['plain'] / per['stack']:.2f}x",
              flush=True)
    big = partition(tasks["B"].train.y, args.big_clients, "iid", 0.5, seed=0)
    print(f"\n2. {args.big_clients} clients (iid, {min(s.numel() for s in big)}-{max(s.numel() for s in big)} images "
          f"each) x {args.big_rounds} rounds of fed_rac_lora, rank 1, stacked")
    t0 = time.perf_counter()
    recs = run_federated(base, tasks["B"], tasks["A"], big, settings("fed_rac_lora", args.big_rounds))
    wall = time.perf_counter() - t0
    print(f"   wall time {wall:.1f} s ({wall / 60:.2f} min), {60 * args.big_rounds / wall:.1f} rounds/min; "
          f"final test accuracy on digits 5-9 {100 * recs[-1]['test_acc_b']:.2f} %, "
          f"largest aggregation error {max(r['aggregation_error'] for r in recs):.1e}")


if __name__ == "__main__":
    main()
