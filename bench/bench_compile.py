"""What torch.compile buys the training step of a stack, against the eager step: compile seconds, seconds per epoch,
fraction of the matrix-product limit (issue 24).

    python bench/bench_compile.py [--stacks 1 16] [--epochs 3] [--device auto] [--threads N]

Prints figures; asserts nothing. For each stack size R, a stack of R rank-1 rac_lora runs (left sketch, seeds 0..R-1,
the bench_sweep.py runs) trains task B of the MLP one epoch at a time (training only, no evaluation or merge), in one
loop with two steps, their epochs interleaved in this process:

- eager: the step of engine/stack.train_stack (model, per-run losses, backward, AdamW's step);
- compiled: the same with the model's per-run losses and AdamW's step under ``torch.compile`` (inductor). Each run's
  dropout masks are drawn outside the compiled graph, from its own generator in the eager step's order (a generator
  read inside the model breaks the graph into pieces), and handed to the layers; so both steps see the same masks.

The compile seconds are the first compiled epoch less a warm eager epoch (inductor's caches in /tmp make a second
invocation compile faster: both are printed when run twice). The limit is the eager epoch's matrix products replayed
back to back (bench/_limit.py); the losses of the two steps differ by float32 rounding (fused kernels), printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from _limit import measure_limit, median, side_by_side, sync  # noqa: E402
from bench_sweep import CFG, DATA, rank1_run  # noqa: E402
from data import load_tasks  # noqa: E402
from engine.runner import resolve_device  # noqa: E402
from engine.stack import StackedDropout  # noqa: E402
from train import adamw  # noqa: E402

_eager_dropout = StackedDropout.forward


def _dropout(self, h):
    """StackedDropout with its keep mask (1.0 / 0.0, drawn outside) in ``self.keep`` when set."""
    keep = getattr(self, "keep", None)
    return _eager_dropout(self, h) if keep is None else h * keep / (1.0 - self.p)


StackedDropout.forward = _dropout


def stack_epochs(task, device, runs: int, compiled: bool):
    """A fresh stack of ``runs`` runs and a function that trains it one epoch a call; returns (epoch function,
    list the function appends each epoch's last losses to)."""
    gens = [torch.Generator(device=device).manual_seed(s) for s in range(runs)]
    run = rank1_run(device, gens, stacked=True)
    model, objective = run.model, task.spec.objective
    drops = [m for m in model.modules() if isinstance(m, StackedDropout)]
    optimizer = adamw(run.params, CFG.lr, CFG.weight_decay)
    model.train()
    model.set_generators(gens)

    def losses(xb, yb, keeps):  # (R, b, in), (R * b,), masks -> (R,) per-run mean losses
        for d, k in zip(drops, keeps):
            d.keep = k
        per_run = objective.losses(model(xb).flatten(0, 1), yb).view(xb.shape[0], xb.shape[1]).mean(1)
        for d in drops:
            d.keep = None
        return per_run

    step = optimizer.step
    if compiled:
        losses, step = torch.compile(losses), torch.compile(step)
    x, y, n, b = task.train.x, task.train.y, len(task.train), CFG.batch_size
    buf = x.new_empty(runs * b, *x.shape[1:])
    last: list[torch.Tensor] = []

    def one_epoch():
        perms = torch.stack([torch.randperm(n, generator=g, device=device) for g in gens])
        for at in range(0, n, b):
            idx = perms[:, at:at + b]
            flat = idx.flatten()
            xb = torch.index_select(x, 0, flat, out=buf[:flat.numel()]).view(*idx.shape, *x.shape[1:])
            keeps = []
            if compiled:  # the draws the eager layers make, in their order: layer by layer, run by run
                for width, d in zip(CFG.hidden, drops):  # the MLP: a dropout after each hidden layer
                    u = torch.empty(runs, idx.shape[1], width, device=device, dtype=x.dtype)
                    for row, g in zip(u, gens):
                        row.uniform_(generator=g)
                    keeps.append(u.ge_(d.p))
            per_run = losses(xb, y.index_select(0, flat), keeps)
            optimizer.zero_grad(set_to_none=True)
            per_run.sum().backward()
            step()
        last.append(per_run.detach().clone())
        sync(device)
    return one_epoch, last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stacks", type=int, nargs="+", default=[1, 16], help="stack sizes R")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per step after the first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    task = load_tasks(DATA, CFG.val_size, CFG.split_seed, device)["B"]
    print(f"device: {device}  torch {torch.__version__}  threads: {torch.get_num_threads()}; task B, "
          f"{len(task.train)} images, batch {CFG.batch_size}, training epochs (no evaluation)")
    for runs in args.stacks:
        (eager, eager_last), (comp, comp_last) = (stack_epochs(task, device, runs, c) for c in (False, True))
        eager()
        t0 = time.perf_counter()
        eager()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        comp()
        compile_s = time.perf_counter() - t0 - warm
        limit = measure_limit(eager, device)
        secs = side_by_side({"eager": eager, "compiled": comp}, args.epochs)
        diff = max((a - c).abs().max().item() for a, c in zip(eager_last, comp_last))
        e, c = median(secs["eager"]), median(secs["compiled"])
        payback = f"paid back after {compile_s / (e - c):.0f} epochs" if c < e else "never paid back"
        print(f"R = {runs:3d}: limit {limit.seconds:.4f} s; eager {e:.4f} s ({100 * limit.fraction(e):.0f}%), "
              f"compiled {c:.4f} s ({100 * limit.fraction(c):.0f}%): {e / c:.2f}x; compile {compile_s:.1f} s, "
              f"{payback}", flush=True)
        print(f"          largest difference of the epochs' last per-run losses, eager - compiled: {diff:.2e}",
              flush=True)


if __name__ == "__main__":
    main()
