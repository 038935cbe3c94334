"""The matrix-product limit of a piece of training, measured on the machine the bench runs on; shared by the benches.

The limit is the time the work's own matrix products take when nothing else runs: every matrix product of the
work (``aten::mm``, ``bmm``, ``addmm``, ``baddbmm``: forward and backward of every Linear and adapter product,
the attention's products, evaluation included) is recorded with its operands' shapes and strides, then the same
products are replayed back to back on random operands of those shapes and layouts. ``limit / achieved`` is the
fraction of the matrix-product speed that the work reaches (1.0: nothing but the products costs time).

    limit = measure_limit(lambda: train_one_epoch(), device)   # records the products of one call, replays them
    print(limit.line(achieved_seconds))
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median  # noqa: F401  (the benches' median, imported from here)
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train import BEFORE, SPEED  # the benches put the project's folder on the path before importing this module


class MatmulRecorder(TorchDispatchMode):
    """Records every matrix product that runs under it: (op, shapes and strides of its operands)."""
    # op -> the positions of its two multiplied operands (addmm's and baddbmm's first operand is the added one)
    OPS = {"aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2), "aten::baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.OPS:
            i, j = self.OPS[name]
            self.calls.append((func, name, [(tuple(a.shape), tuple(a.stride()), a.dtype) if torch.is_tensor(a) else a
                                            for a in args], kwargs or {}, (i, j)))
        return func(*args, **(kwargs or {}))


def flops_of(calls: list[tuple]) -> float:
    """Floating-point operations of the recorded products: 2 x m x k x n each (times the batch of a bmm)."""
    total = 0.0
    for _, _, args, _, (i, j) in calls:
        a, b = args[i][0], args[j][0]
        batch = a[0] if len(a) == 3 else 1
        total += 2.0 * batch * a[-2] * a[-1] * b[-1]
    return total


def _is_operand(a) -> bool:
    return isinstance(a, tuple) and len(a) == 3 and isinstance(a[0], tuple) and isinstance(a[2], torch.dtype)


def replay_seconds(calls: list[tuple], device: torch.device, repeats: int = 3) -> float:
    """Seconds to run the recorded products back to back (same ops, shapes, strides, dtypes), best of ``repeats``."""
    cache: dict[tuple, torch.Tensor] = {}

    def tensor(shape, stride, dtype):
        if (shape, stride, dtype) not in cache:
            size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
            cache[shape, stride, dtype] = torch.randn(size, device=device, dtype=dtype).as_strided(shape, stride)
        return cache[shape, stride, dtype]

    prepared = [(func, [tensor(*a) if _is_operand(a) else a for a in args], kw) for func, _, args, kw, _ in calls]
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for func, args, kw in prepared:
            func(*args, **kw)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class Limit:
    """The matrix products of one piece of work: how many, their FLOPs and the seconds they take replayed."""
    products: int
    flops: float
    seconds: float  # the matrix-product limit: no run of the work can take less

    def fraction(self, achieved_s: float) -> float:
        """The share of the matrix-product speed that ``achieved_s`` seconds for the same work reach."""
        return self.seconds / achieved_s

    def line(self, achieved_s: float) -> str:
        """'limit X s (P products, G GFLOP, R GFLOP/s replayed), achieved Y s (A GFLOP/s) -> F% of the limit'."""
        return (f"limit {self.seconds:.4f} s ({self.products} products, {self.flops / 1e9:.2f} GFLOP, "
                f"{self.flops / self.seconds / 1e9:.1f} GFLOP/s replayed), achieved {achieved_s:.4f} s "
                f"({self.flops / achieved_s / 1e9:.1f} GFLOP/s) -> {100 * self.fraction(achieved_s):.0f}% of the limit")


def measure_limit(work: Callable[[], object], device: torch.device, repeats: int = 3) -> Limit:
    """Run ``work()`` once with its matrix products recorded, then replay them: the Limit of one ``work()``."""
    rec = MatmulRecorder()
    with rec:
        work()
    return Limit(len(rec.calls), flops_of(rec.calls), replay_seconds(rec.calls, device, repeats))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU is always done)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each ``paths[name]()`` call, ``rounds`` times, the paths interleaved (one call of each per round),
    so that a machine shared with other work slows every path alike: compare them as ratios of one run."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, work in paths.items():
            t0 = time.perf_counter()
            work()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def speed_paths(before: bool, now=None) -> dict:
    """{path name: train.Speed} that a bench times: today's ("after": ``now``, default train.SPEED) and, with
    ``before``, the loops as they were before issue 24 (train.BEFORE) first."""
    now = SPEED if now is None else now
    return {"before": BEFORE, "after": now} if before else {"after": now}
