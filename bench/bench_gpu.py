"""The GPU check of issue 24: the paper's Table 3 with 20 seeds, end to end, and the GPT's training tokens per second.

    python bench/bench_gpu.py [--device auto] [--seeds 20] [--stack_size 64] [--gpt_stacks 1 4 16]

Prints figures; asserts nothing. Runs on whatever device it is given (``auto``: CUDA when there is one), so that it
can be tried on a CPU with fewer seeds (``--seeds 2``); its goal figure is for one modern GPU:

1. wall time of ``python main.py --method all --sketch both --ranks 1 --seeds 0 .. N-1`` in a fresh results folder
   (the base model, FPFT and every method and sketch at rank 1; each method's seeds one stack), the goal being under
   a minute on one GPU at N = 20; its summary table follows;
2. the GPT's training tokens per second (bench/bench_gpt.py: full training of the base model's size, one run and
   stacks), with the matrix-product limit and the fraction it reaches.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 60.0  # issue 24: Table 3 x 20 seeds under a minute on one modern GPU


def device_line(device: str) -> str:
    code = ("import torch, sys; sys.path.insert(0, '.'); from engine.runner import resolve_device; "
            f"d = resolve_device({device!r}); print(d, torch.cuda.get_device_name(d) if d.type == 'cuda' else "
            "f'{torch.get_num_threads()} threads', 'torch', torch.__version__)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def table3(device: str, seeds: int, stack_size: int) -> None:
    print(f"\n1. Table 3 x {seeds} seeds: main.py --method all --sketch both --ranks 1 (fresh results folder)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "main.py", "--method", "all", "--sketch", "both", "--ranks", "1",
               "--seeds", *map(str, range(seeds)), "--stack_size", str(stack_size), "--device", device,
               "--results_dir", f"{tmp}/results", "--plots_dir", f"{tmp}/plots", "--progress", "false"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"   failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        return
    verdict = "under" if wall < GOAL_S else "over"
    print(f"   wall time {wall:.1f} s ({verdict} the {GOAL_S:.0f} s goal), base model training and start-up included")
    print("\n".join("   " + line for line in proc.stdout.splitlines()
                    if line.strip() and not line.startswith(("wrote", "results in"))))


def gpt(device: str, stacks: list[int]) -> None:
    print(f"\n2. the GPT's training speed (bench/bench_gpt.py --stacks {' '.join(map(str, stacks))})", flush=True)
    proc = subprocess.run([sys.executable, "bench/bench_gpt.py", "--device", device, "--stacks", *map(str, stacks)],
                          cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout if proc.returncode == 0 else f"failed (exit {proc.returncode}): {proc.stderr[-500:]}"
    print("\n".join("   " + line for line in out.splitlines() if line.strip()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seeds", type=int, default=20, help="seeds of Table 3 (0 .. N-1)")
    p.add_argument("--stack_size", type=int, default=64, help="runs a stack (main.py's stack_size)")
    p.add_argument("--gpt_stacks", type=int, nargs="+", default=[1, 4, 16], help="stack sizes of the GPT's bench")
    p.add_argument("--skip", choices=["table3", "gpt"], nargs="*", default=[], help="sections to leave out")
    args = p.parse_args()
    if not 1 <= args.seeds <= 1000 or not 1 <= args.stack_size <= 1024:
        p.error("--seeds must be in 1..1000 and --stack_size in 1..1024")
    print(f"device: {device_line(args.device)}", flush=True)
    if "table3" not in args.skip:
        table3(args.device, args.seeds, args.stack_size)
    if "gpt" not in args.skip:
        gpt(args.device, args.gpt_stacks)


if __name__ == "__main__":
    main()
