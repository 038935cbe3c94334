"""How fast the federated simulation is: rounds per minute with a round's clients as one stack and one
client after another, side by side, and the wall time of 100 clients x 100 rounds of Fed-RAC-LoRA at rank 1.

    python bench/bench_fed.py [--device auto] [--rounds 5] [--big-clients 100] [--big-rounds 100]
                              [--flower-rounds 5] [--no-flower]

Prints figures; asserts nothing. The base model is main.py's default one, trained here on digits 0-4 (a
couple of minutes) unless results/checkpoints holds it. Part 3 runs the same config on Flower's local
simulation federation (fed/flower.py through `flwr run`, started and stopped by fed.deploy) and in this
process, side by side: rounds per minute and the float32 difference of their records.
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
from fed.deploy import Flower  # noqa: E402
from fed.flower import from_run_config  # noqa: E402
from fed.study import client_shards, settings as run_settings  # noqa: E402


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
    p.add_argument("--flower-rounds", type=int, default=5, help="rounds of part 3 (10 clients on Flower)")
    p.add_argument("--no-flower", action="store_true", help="skip part 3")
    args = p.parse_args()
    device = resolve_device(args.device)
    tmp = tempfile.TemporaryDirectory()
    results = ROOT / "results" if (ROOT / "results" / "checkpoints").exists() else Path(tmp.name)
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
    if not args.no_flower:
        flower(base, tasks, args.flower_rounds, Path(tmp.name))
    tmp.cleanup()


def flower(base, tasks, rounds: int, tmp: Path) -> None:
    """Part 3: one config on Flower's local simulation federation and in this process."""
    import json


    rc = {"method": "fed_rac_lora", "rank": 1, "seed": 0, "clients": 10, "rounds": rounds,
          "data-dir": str(ROOT / "data"), "results-dir": str(tmp / "flower_results"),
          "plots-dir": str(tmp / "flower_plots"), "base-model": str(tmp / "base.pt"), "records": str(tmp / "records.json"), "device": "cpu"}
    torch.save(base.state_dict(), rc["base-model"])
    cfg, spec, _ = from_run_config(rc)
    print(f"\n3. Flower's local simulation federation (Ray, 10 virtual SuperNodes, 1 CPU each) against this process, "
          f"fed_rac_lora rank 1, 10 clients (Dirichlet 0.5), {rounds} rounds, float32")
    t0 = time.perf_counter()
    with Flower(tmp / "flwr", timeout=3600) as fl:
        fl.simulation(clients=cfg.clients)
        run = fl.run(rc)
    total = time.perf_counter() - t0
    if run["status"] != "finished:completed":
        print(f"   the Flower run failed ({run['status']}):\n{run['log'][-3000:]}")
        return
    got = json.loads(Path(rc["records"]).read_text())
    steady = (got[-1]["elapsed_s"] - got[0]["elapsed_s"]) / max(1, len(got) - 1)
    s = run_settings(cfg, spec)
    shards = client_shards(cfg, tasks)
    per = {}
    for engine in ("stack", "plain"):
        t1 = time.perf_counter()
        want = run_federated(base, tasks["B"], tasks["A"], shards, s, engine=engine)
        per[engine] = (time.perf_counter() - t1) / rounds
        if engine == "stack":
            stacked = want
    print(f"   Flower: {60 / steady:6.1f} rounds/min after the first round ({total:.1f} s in all for {rounds} rounds, "
          f"start-up and the first round {got[0]['elapsed_s']:.1f} s of it)")
    for engine in ("stack", "plain"):
        print(f"   in process, {engine:5s}: {60 / per[engine]:6.1f} rounds/min   ({steady / per[engine]:.1f}x Flower's)")
    for name, key in (("digits 5-9", "test_acc_b"), ("digits 0-4", "test_acc_a")):
        diff = [abs(a[key] - b[key]) for a, b in zip(got, stacked)]
        print(f"   float32, Flower vs in process (stacked), test accuracy on {name}: largest difference over the "
              f"rounds {100 * max(diff):.3f} points, {sum(d > 0 for d in diff)} of {len(diff)} rounds differ")
    diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(got, stacked))
    print(f"   largest difference of the clients' mean training loss: {diff:.2e}; final accuracy Flower "
          f"{100 * got[-1]['test_acc_b']:.2f} %, in process {100 * stacked[-1]['test_acc_b']:.2f} %")
    print(f"   per client and round, up {got[-1]['sent_up_numbers']:.0f} numbers (formula {got[-1]['up_numbers']}), "
          f"down {got[-1]['sent_down_numbers']:.0f} + the seed (formula {got[-1]['down_numbers']}); the first round "
          f"sends the whole model down ({got[0]['sent_down_numbers']:.0f})")


if __name__ == "__main__":
    main()
