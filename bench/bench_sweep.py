"""How fast the stacked sweep engine is: against a conventional DataLoader pipeline, per stack size,
against the hardware's matrix-product speed, for the whole Table 3, and in memory.

    python bench/bench_sweep.py [--model mlp|vit] [--device auto] [--epochs 3] [--stacks 1 4 16 64]
                                [--skip-table3] [--quick] [--sections 1 2 3 4 5] [--before]

Prints figures; asserts nothing. Sections:
  1. seconds per task-B epoch (rank 1, rac_lora, left): the conventional pipeline (torchvision MNIST,
     ToTensor + Normalize, DataLoader with shuffle and batch 128, with 0 and with 2 loader workers)
     and our engine (stacked, R = 1, and the plain one-run engine), measured in this process one after
     the other; every epoch includes the merge and the validation + test evaluation, in both;
  2. runs per minute (50 epochs a run) for R = 1, 4, 16, 64 stacked in one process, and for the same
     runs split over worker processes (one thread each), as the sweep's `workers` setting does;
  3. for every stack size: the matrix-product limit of a training epoch (bench/_limit.py: the epoch's matrix
     products, evaluation included, recorded and replayed back to back, same shapes and layouts) against the
     epoch's median seconds, and the fraction limit / achieved; with ``--before``, the loops as they were before
     issue 24 (train.BEFORE) too, their epochs interleaved with today's in this process, and the speed-up;
  4. peak memory of a 64-run stack training (a fresh process; RSS on CPU, CUDA allocator peak on GPU);
  5. (MLP only) wall time of the full Table 3 (every method and sketch at rank 1 plus FPFT, 3 seeds, 50 epochs
     with early stopping) through `python main.py`, with a fresh results folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_limit.py, also when imported as a module (the worker processes)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import Config  # noqa: E402
from data import MEAN, STD, load_tasks  # noqa: E402
from engine.build import build_run, config_model  # noqa: E402
from raclora.factors import lora_scale  # noqa: E402
from engine.stack import train_stack  # noqa: E402
from engine.runner import cpu_count, resolve_device  # noqa: E402
from train import Speed, speed, train  # noqa: E402
from _limit import measure_limit, median, side_by_side, speed_paths, sync as _sync  # noqa: E402

# the benchmarked model: --model sets BENCH_MODEL before any worker or child process starts, so they see it too
CFG = Config(method="rac_lora", sketch="left", ranks=[1], model=os.environ.get("BENCH_MODEL", "mlp"))
DATA = ROOT / "data"


def base_model(device):
    return config_model(CFG, torch.Generator(device=device).manual_seed(0), device)


def _seconds_per_epoch(train_epochs, device, epochs: int, warmup=None) -> float:
    """Seconds per epoch of ``train_epochs(n)`` over ``epochs`` epochs, after one warm-up epoch (run
    inside the context ``warmup`` if given)."""
    with warmup if warmup is not None else contextlib.nullcontext():
        train_epochs(1)
    _sync(device)
    t0 = time.perf_counter()
    train_epochs(epochs)
    _sync(device)
    return (time.perf_counter() - t0) / epochs


def stack_epoch_seconds(tasks, device, runs: int, epochs: int, warmup=None) -> float:
    """Seconds per epoch of a stack of ``runs`` rac_lora rank-1 runs (after one warm-up epoch)."""
    gens = [torch.Generator(device=device).manual_seed(s) for s in range(runs)]
    run = rank1_run(device, gens, stacked=True)
    kw = dict(lr=CFG.lr, weight_decay=CFG.weight_decay, batch_size=CFG.batch_size, patience=10 ** 6,
              generators=gens, **run.hooks)
    return _seconds_per_epoch(lambda n: train_stack(run.model, run.params, tasks["B"], max_epochs=n, **kw), device,
                              epochs, warmup)


def rank1_run(device, gens, stacked: bool):
    """The benchmarked run(s): rac_lora, left sketch, rank 1, from the seeded base model (build.build_run)."""
    return build_run(base_model(device), "rac_lora", "left", [1] * len(gens),
                     gens, [lora_scale(CFG.scaling, CFG.lora_alpha, 1)] * len(gens), random_init=CFG.random_init,
                     stacked=stacked, lr=CFG.lr, total_steps=1)


def plain_epoch_seconds(tasks, device, epochs: int) -> float:
    """Seconds per epoch of one run on the plain engine (train.train, what stack_size = 1 uses)."""
    g = torch.Generator(device=device).manual_seed(0)
    run = rank1_run(device, [g], stacked=False)
    kw = dict(lr=CFG.lr, weight_decay=CFG.weight_decay, batch_size=CFG.batch_size, patience=10 ** 6, generator=g,
              **run.hooks)
    return _seconds_per_epoch(lambda n: train(run.model, run.params, tasks["B"], max_epochs=n, **kw), device, epochs)


# --- 1. the conventional pipeline ---------------------------------------------------------------
def _shift_label(y: int) -> int:  # digits 5-9 -> classes 0-4 (a module-level function: loader workers pickle it)
    return y - 5


def conventional_epoch_seconds(device, loader_workers: int, epochs: int) -> list[float]:
    """A conventional pipeline written the usual way: torchvision MNIST with per-sample ToTensor +
    Normalize, a shuffling DataLoader with batch 128, the same model (rank-1 rac_lora, left) and the
    same per-epoch work (merge, then validation and test evaluation). Returns each epoch's seconds."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    # download=True: torchvision extracts the shipped .gz archives itself (data.py never extracts them);
    # the archives are there, so nothing is fetched
    train_set = datasets.MNIST(str(DATA), train=True, download=True, transform=tf, target_transform=_shift_label)
    test_set = datasets.MNIST(str(DATA), train=False, download=True, transform=tf, target_transform=_shift_label)
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(CFG.split_seed))
    val_idx, train_idx = perm[:CFG.val_size], perm[CFG.val_size:]
    five_up = lambda ds, idx: [int(i) for i in idx if ds.targets[int(i)] >= 5]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    common = dict(batch_size=CFG.batch_size, num_workers=loader_workers, pin_memory=device.type == "cuda")
    loaders = {
        "train": DataLoader(Subset(train_set, five_up(train_set, train_idx)), shuffle=True, generator=g, **common),
        "val": DataLoader(Subset(train_set, five_up(train_set, val_idx)), **common),
        "test": DataLoader(Subset(test_set, five_up(test_set, range(len(test_set)))), **common),
    }
    run = rank1_run(device, [g], stacked=False)
    model = run.model
    opt = torch.optim.AdamW(run.params, lr=CFG.lr, weight_decay=CFG.weight_decay)
    seconds = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for x, y in loaders["train"]:
            x, y = x.to(device).flatten(1), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        run.hooks["on_epoch_end"](epoch)  # the merge and re-sampling, as every engine does it
        model.eval()
        with torch.no_grad():
            for name in ("val", "test"):
                correct = 0
                for x, y in loaders[name]:
                    x, y = x.to(device).flatten(1), y.to(device)
                    correct += (model(x).argmax(1) == y).sum().item()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


# --- 2. worker processes ------------------------------------------------------------------------
def _worker(args):
    runs, epochs, threads, device_name, barrier = args
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    tasks = load_tasks(DATA, CFG.val_size, CFG.split_seed, device)
    barrier.wait()  # every worker starts its timed stack together
    return stack_epoch_seconds(tasks, device, runs, epochs)


def workers_runs_per_minute(total_runs: int, workers: int, epochs: int, device) -> float:
    """Runs per minute when ``total_runs`` are split evenly over ``workers`` processes training side by side."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        sizes = [total_runs // workers + (i < total_runs % workers) for i in range(workers)]
        threads = max(1, cpu_count() // workers)
        with ctx.Pool(workers) as pool:
            secs = pool.map(_worker, [(n, epochs, threads, device.type, barrier) for n in sizes])
    return sum(60.0 * n / (s * CFG.max_epochs) for n, s in zip(sizes, secs))


# --- 3. the matrix-product limit -----------------------------------------------------------------
def stack_epoch_fn(tasks, device, runs: int, setting: Speed):
    """A fresh stack of ``runs`` rac_lora rank-1 runs and a function that trains it one more epoch (train_stack, one
    epoch a call, merge and evaluation included) with the loops' switches ``setting`` (train.Speed)."""
    gens = [torch.Generator(device=device).manual_seed(s) for s in range(runs)]
    run = rank1_run(device, gens, stacked=True)
    kw = dict(lr=CFG.lr, weight_decay=CFG.weight_decay, batch_size=CFG.batch_size, patience=10 ** 6,
              generators=gens, **run.hooks)

    def one_epoch():
        with speed(setting):
            train_stack(run.model, run.params, tasks["B"], max_epochs=1, **kw)
        _sync(device)
    return one_epoch


def limit_section(tasks, device, runs: int, epochs: int, before: bool) -> None:
    """Print the matrix-product limit of one epoch of a ``runs``-run stack (bench/_limit.py: its products recorded
    in one epoch, replayed back to back) against the epoch's median seconds over ``epochs`` epochs; with
    ``before``, the loops as they were (train.BEFORE) too, their epochs interleaved with today's."""
    settings = speed_paths(before)
    paths = {name: stack_epoch_fn(tasks, device, runs, s) for name, s in settings.items()}
    for one_epoch in paths.values():
        one_epoch()  # warm-up
    limit = measure_limit(paths["after"], device)
    secs = {name: median(v) for name, v in side_by_side(paths, epochs).items()}
    print(f"   R = {runs:3d}: {limit.line(secs['after'])}", flush=True)
    if before:
        print(f"            before: {secs['before']:.4f} s -> {100 * limit.fraction(secs['before']):.0f}% of the limit; "
              f"speed-up {secs['before'] / secs['after']:.2f}x", flush=True)


# --- 4. memory ----------------------------------------------------------------------------------
def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(device_name: str, runs: int) -> None:
    """Run in a fresh process: print JSON with the resident memory after loading the data, and the
    peak during one epoch of a ``runs``-run stack (the kernel's peak counter is reset in between)."""
    device = torch.device(device_name)
    tasks = load_tasks(DATA, CFG.val_size, CFG.split_seed, device)
    out = {"rss_loaded_mib": _status_mib("VmRSS"), "peak_before_mib": _status_mib("VmHWM")}
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        out["cuda_data_mib"] = torch.cuda.memory_allocated() / 2 ** 20
    stack_epoch_seconds(tasks, device, runs, 1)
    out["rss_peak_mib"] = _status_mib("VmHWM")
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--model", default="mlp", choices=["mlp", "vit"], help="the model of models.py to time")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per measurement (after a warm-up epoch)")
    p.add_argument("--stacks", type=int, nargs="+", default=[1, 4, 16, 64], help="stack sizes R for section 2")
    p.add_argument("--skip-table3", action="store_true", help="leave out section 5 (a few minutes)")
    p.add_argument("--quick", action="store_true", help="one conventional epoch, no loader-workers variant")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="the sections to run")
    p.add_argument("--before", action="store_true", help="section 3: also time the loops as they were "
                                                         "(train.BEFORE), interleaved with today's in this process")
    p.add_argument("--memory-child", nargs=2, metavar=("DEVICE", "RUNS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    global CFG
    os.environ["BENCH_MODEL"] = args.model
    CFG = Config(method="rac_lora", sketch="left", ranks=[1], model=args.model)
    device = resolve_device(args.device)
    print(f"model: {CFG.model}; machine: {cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""), flush=True)
    tasks = load_tasks(DATA, CFG.val_size, CFG.split_seed, device)
    n = len(tasks["B"].train)

    if 1 in args.sections or 2 in args.sections:
        print(f"\n1. seconds per epoch, digits 5-9 ({n} training images), rank 1 rac_lora, with merge and val+test eval")
        conv = {}
        for w in ([0] if args.quick else [0, 2]):
            secs = conventional_epoch_seconds(device, w, 1 if args.quick else 2)
            conv[w] = min(secs)
            print(f"   conventional DataLoader pipeline, num_workers={w}: "
                  f"{', '.join(f'{s:.2f}' for s in secs)} s per epoch", flush=True)
        ours_stack = stack_epoch_seconds(tasks, device, 1, args.epochs)
        ours_plain = plain_epoch_seconds(tasks, device, args.epochs)
        best_conv = min(conv.values())
        print(f"   ours, stacked engine, R = 1: {ours_stack:.3f} s   ours, plain engine (stack_size 1): {ours_plain:.3f} s")
        print(f"   ratio, fastest conventional / ours: {best_conv / ours_stack:.1f}x (stacked R=1), "
              f"{best_conv / ours_plain:.1f}x (plain)", flush=True)

    if 2 in args.sections:
        print(f"\n2. runs per minute at {CFG.max_epochs} epochs a run, rank 1 rac_lora")
        per_epoch = {}
        for r in args.stacks:
            per_epoch[r] = stack_epoch_seconds(tasks, device, r, args.epochs)
            print(f"   R = {r:3d} stacked, one process: {per_epoch[r]:.3f} s per epoch, "
                  f"{60 * r / (per_epoch[r] * CFG.max_epochs):.1f} runs/min", flush=True)
        print(f"   one after another on the plain engine: {60 / (ours_plain * CFG.max_epochs):.1f} runs/min")
        if 16 in per_epoch:
            print(f"   16 stacked vs 16 one after another: {16 * ours_plain / per_epoch[16]:.2f}x (plain engine), "
                  f"{16 * per_epoch.get(1, ours_stack) / per_epoch[16]:.2f}x (stacked R = 1)")
        if device.type == "cpu" and cpu_count() > 1:
            w = cpu_count()
            for r in [r for r in args.stacks if r >= w]:
                rpm = workers_runs_per_minute(r, w, args.epochs, device)
                sequential = 60 / (ours_plain * CFG.max_epochs)
                print(f"   R = {r:3d} split over {w} worker processes ({max(1, cpu_count() // w)} thread each): "
                      f"{rpm:.1f} runs/min ({rpm / (60 * r / (per_epoch[r] * CFG.max_epochs)):.2f}x one process, "
                      f"{rpm / sequential:.2f}x one after another on the plain engine)", flush=True)

    if 3 in args.sections:
        print("\n3. the matrix-product limit of one epoch (its matrix products, eval included, replayed back to back) "
              "against the epoch's median seconds; no torch.compile (no compile time)")
        for r in args.stacks:
            limit_section(tasks, device, r, args.epochs, args.before)

    if 4 in args.sections:
        print("\n4. peak memory, one epoch of a 64-run stack (fresh process)")
        out = subprocess.run([sys.executable, __file__, "--memory-child", device.type, "64"], capture_output=True,
                             text=True, check=True).stdout
        mem = json.loads(out.strip().splitlines()[-1])
        line = (f"   resident after importing torch and loading MNIST: {mem['rss_loaded_mib']:.0f} MiB "
                f"(peak while loading {mem['peak_before_mib']:.0f} MiB); peak while training the 64-run stack: "
                f"{mem['rss_peak_mib']:.0f} MiB, {mem['rss_peak_mib'] - mem['rss_loaded_mib']:.0f} MiB above the loaded state")
        if "cuda_peak_mib" in mem:
            line += f"; CUDA peak allocated {mem['cuda_peak_mib']:.0f} MiB (data alone {mem['cuda_data_mib']:.0f} MiB)"
        print(line, flush=True)

    if 5 in args.sections and not args.skip_table3 and CFG.model == "mlp":
        print("\n5. full Table 3: python main.py --method all --sketch both --ranks 1 --seeds 0 1 2 (fresh results)")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "main.py"), "--method", "all", "--sketch", "both", "--ranks", "1",
                   "--seeds", "0", "1", "2", "--device", args.device, "--results_dir", f"{tmp}/results",
                   "--plots_dir", f"{tmp}/plots", "--progress", "false"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"   failed: {proc.stderr.strip().splitlines()[-1]}")
            else:
                print(f"   wall time {wall:.1f} s ({wall / 60:.2f} min), base model training included")
                print("\n".join("   " + line for line in proc.stdout.splitlines() if line.strip()
                                and not line.startswith(("wrote", "results in"))))


if __name__ == "__main__":
    main()
