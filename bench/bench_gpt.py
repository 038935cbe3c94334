"""The character-level GPT's training speed, one run and stacked, against this machine's matrix-product rate;
and (``--to_loss``) how long its base model takes to reach a Shakespeare validation loss.

    python bench/bench_gpt.py [--steps 30] [--stacks 1 4 16] [--device auto] [--threads N] [--before]
                              [--methods fpft rac_lora]
    python bench/bench_gpt.py --to_loss 1.90 [--max_steps 6000] [--eval_every 250]

Prints figures; asserts nothing. The model is the gpt of models.py at its defaults (nanoGPT's laptop-CPU size:
4 layers, 4 heads, width 128, context 64), on Tiny Shakespeare's training windows (data.text_task), batch 12
sequences of 64 characters per run, AdamW at lr 1e-3, dropout 0 (nanoGPT's CPU recipe).

- tokens per second of training (forward, backward, AdamW step) for full training of one run, a stack of R
  full-training runs and a stack of R rac_lora runs (rank 4 on every Linear);
- the fraction of the matrix-product rate: the model's matrix-product FLOPs per token (6 x the Linear and head
  weights, plus the attention's 6 x 2 x layers x T x d for QK^T and AV, forward and backward), times the tokens
  per second, over the rate of one float32 (1024 x 1024) @ (1024 x 1024) product on the same threads;
- the matrix-product limit of the timed steps (bench/_limit.py: their matrix products recorded and replayed back to
  back at the real shapes) and the fraction limit / achieved; ``--before``: the loops as they were before issue 24
  (train.BEFORE) too, interleaved with today's in this process, and the speed-up;
- ``--to_loss L``: one full-training run of the base model from a seeded draw, steps of batch 12 over random
  windows of the training split (nanoGPT samples random offsets), evaluated every ``--eval_every`` steps on the
  whole held-out 10 % (nanoGPT's validation split; data.text_bounds' heldout), until its loss is <= L nats
  per character: prints the steps, the wall time and the loss curve. nanoGPT's README reports 1.88 after 2,000
  iterations in "about 3 minutes" on a laptop CPU.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_limit.py

import torch  # noqa: E402

from config import Config  # noqa: E402
from data import load_text, text_bounds, text_task, text_vocabulary, windows  # noqa: E402
from engine.build import build_run, config_model  # noqa: E402
from engine.runner import resolve_device  # noqa: E402
from models import set_generator  # noqa: E402
from train import Speed, adamw, batch_buffer, gather_batch, speed  # noqa: E402
from _limit import Limit, measure_limit, median, side_by_side, speed_paths, sync  # noqa: E402
from raclora.factors import lora_scale  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"
BATCH, LR = 12, 1e-3


def matmul_rate(device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a float32 n x n @ n x n product on this device and these threads."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def flops_per_token(cfg: Config, vocab: int) -> float:
    """Matrix-product FLOPs of one training token (forward + backward = 3 x forward's 2 FLOPs per weight)."""
    d, layers, t = cfg.gpt_dim, cfg.gpt_depth, cfg.gpt_context
    weights = layers * (4 * d * d + 2 * d * 4 * d) + d * vocab  # q k v o, fc1 fc2, head
    attention = layers * 2 * t * d  # QK^T and AV: T x d each, per token
    return 6 * (weights + attention)


def step_fn(cfg: Config, task, device: torch.device, method: str, runs: int, steps: int, setting: Speed):
    """A fresh run (or stack of ``runs``) and a function that takes training step ``i`` (forward, backward, AdamW
    step; train.adamw and train.gather_batch under the loops' switches ``setting``)."""
    g = torch.Generator(device=device).manual_seed(0)
    base = config_model(cfg, g, device, spec=task.spec)
    gens = [torch.Generator(device=device).manual_seed(s) for s in range(runs)]
    ranks = [None] * runs if method == "fpft" else [4] * runs
    scales = [None if r is None else lora_scale("alpha", 1.0, r) for r in ranks]
    run = build_run(base, method, None if method == "fpft" else "left", ranks, gens, scales,
                    stacked=runs > 1, lr=LR, total_steps=steps + 3)
    model = run.model
    if runs > 1:
        model.set_generators(gens)
    else:
        set_generator(model, gens[0])
    model.train()
    with speed(setting):
        opt = adamw(run.params, LR, 0.0)
        buf = batch_buffer(task.train.x, BATCH * runs)
    x, y = task.train.x, task.train.y
    objective = task.spec.objective
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).to(device)

    def step(i: int) -> None:
        with speed(setting):
            idx = order[(i * BATCH * runs) % (len(x) - BATCH * runs):][:BATCH * runs]
            xb, yb = gather_batch(x, idx, buf), gather_batch(y, idx)
            if runs > 1:
                xb, yb = xb.view(runs, BATCH, -1), yb.view(runs, BATCH, -1)
                loss = objective.losses(model(xb), yb).mean(1).sum()
            else:
                loss = objective.loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return step


def measure(cfg: Config, task, device: torch.device, method: str, runs: int, steps: int,
            before: bool) -> tuple[Limit, dict[str, float]]:
    """(the matrix-product limit of ``steps`` training steps, {path: their seconds}) after 3 warm-up steps; with
    ``before`` the loops as they were (train.BEFORE) too, the two paths' steps interleaved in this process."""
    settings = speed_paths(before)
    steppers = {name: step_fn(cfg, task, device, method, runs, steps, s) for name, s in settings.items()}
    for step in steppers.values():
        for i in range(3):
            step(i)
    counter = {name: 3 for name in steppers}

    def span(name: str):  # the next ``steps`` steps of path ``name``, as one piece of work
        def work():
            for _ in range(steps):
                steppers[name](counter[name])
                counter[name] += 1
            sync(device)
        return work
    limit = measure_limit(span("after"), device)
    seconds = side_by_side({name: span(name) for name in steppers}, 3)
    return limit, {name: median(v) for name, v in seconds.items()}


def to_loss(cfg: Config, device: torch.device, target: float, max_steps: int, eval_every: int) -> None:
    vocab = text_vocabulary(DATA)
    tokens = vocab.encode(load_text("shakespeare", DATA)).to(device)
    (a, b), (h0, h1) = text_bounds(len(tokens))["train"], text_bounds(len(tokens))["heldout"]
    train_tokens, heldout = tokens[a:b], windows(tokens[h0:h1], cfg.gpt_context)
    g = torch.Generator(device=device).manual_seed(0)
    task = text_task("shakespeare", cfg.gpt_context, DATA, device, vocabulary=vocab)
    model = config_model(cfg, g, device, spec=task.spec)
    set_generator(model, g)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    objective = task.spec.objective
    offsets = torch.Generator().manual_seed(1)
    span = torch.arange(cfg.gpt_context + 1, device=device)
    t0 = time.perf_counter()
    print(f"step  heldout loss (nats/char)  wall s   [target {target}, batch {BATCH} x {cfg.gpt_context}]")
    for step in range(1, max_steps + 1):
        model.train()
        start = torch.randint(0, len(train_tokens) - cfg.gpt_context - 1, (BATCH,), generator=offsets).to(device)
        chunk = train_tokens[start[:, None] + span]
        loss = objective.loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == max_steps:
            model.eval()
            with torch.no_grad():
                held = sum(objective.losses(model(heldout.x[i:i + 256]), heldout.y[i:i + 256]).sum().item()
                           for i in range(0, len(heldout), 256)) / len(heldout)
            wall = time.perf_counter() - t0
            print(f"{step:5d}  {held:.4f} ({held / math.log(2):.3f} bits)  {wall:7.1f}", flush=True)
            if held <= target:
                print(f"reached {held:.4f} <= {target} nats/char after {step} steps ({step * BATCH * cfg.gpt_context:,} "
                      f"training tokens) in {wall:.1f} s")
                return
    print(f"not reached in {max_steps} steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--stacks", type=int, nargs="+", default=[1, 4, 16], help="runs per stack (R)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--before", action="store_true", help="also time the loops as they were (train.BEFORE), "
                                                         "interleaved with today's in this process")
    p.add_argument("--methods", nargs="+", default=["fpft", "rac_lora"], choices=["fpft", "rac_lora"])
    p.add_argument("--to_loss", type=float, default=None, help="train the base model until this held-out loss")
    p.add_argument("--max_steps", type=int, default=6000)
    p.add_argument("--eval_every", type=int, default=250)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = Config(model="gpt", dropout=0.0)
    print(f"device: {device}  torch {torch.__version__}  threads: {torch.get_num_threads()}  gpt: "
          f"{cfg.gpt_depth} layers, {cfg.gpt_heads} heads, width {cfg.gpt_dim}, context {cfg.gpt_context}")
    if args.to_loss is not None:
        to_loss(cfg, device, args.to_loss, args.max_steps, args.eval_every)
        return
    task = text_task("shakespeare", cfg.gpt_context, DATA, device)
    rate = matmul_rate(device)
    per_token = flops_per_token(cfg, task.spec.classes)
    print(f"float32 1024^3 matrix product: {rate / 1e9:.1f} GFLOP/s; the gpt's matrix products: "
          f"{per_token / 1e6:.2f} MFLOP per training token")
    print(f"{'training':<28}{'R':>4}{'tokens/s':>12}{'per run':>10}{'of 1024^3 rate':>16}{'limit s':>10}"
          f"{'achieved s':>12}{'of limit':>10}" + (f"{'before s':>10}{'of limit':>10}{'speed-up':>10}" if args.before
                                                   else ""))
    for method in args.methods:
        for runs in args.stacks:
            limit, secs = measure(cfg, task, device, method, runs, args.steps, args.before)
            tps = args.steps * BATCH * runs * cfg.gpt_context / secs["after"]
            label = "full training" if method == "fpft" else "rac_lora r=4, every Linear"
            # an adapter run's backward skips the frozen weights' gradients: its FLOPs per token are about 2/3
            flops = per_token * (1.0 if method == "fpft" else 2 / 3)
            line = (f"{label:<28}{runs:>4}{tps:>12,.0f}{tps / runs:>10,.0f}{tps * flops / rate:>15.1%}"
                    f"{limit.seconds:>10.3f}{secs['after']:>12.3f}{limit.fraction(secs['after']):>10.0%}")
            if args.before:
                line += (f"{secs['before']:>10.3f}{limit.fraction(secs['before']):>10.0%}"
                         f"{secs['before'] / secs['after']:>9.2f}x")
            print(line, flush=True)
    print(f"limit: the matrix products of {args.steps} steps recorded and replayed back to back (bench/_limit.py); "
          f"achieved: the median of 3 spans of {args.steps} steps; no torch.compile (no compile time)")


if __name__ == "__main__":
    main()
