"""The paper's convergence theory, made visible on small problems (float64, CPU, well under a minute).

    python convergence.py [--seed N] [--steps N] [--links N] [--rounds N] [--results_dir results] [--plots_dir plots]

1. Counterexample (the paper's Figure 1). f(W) = 1/2 vec(W - W*)^T M vec(W - W*) over 3x3 W with
   M = diag(10, 1, ..., 1), so L = 10, mu = 1, f* = 0. W* ~ N(0, 1) entrywise (seeded, printed),
   W0 = 0, rank 1, scale 1, left sketch (B random N(0, 1) as lora.py's "gaussian", A zero). FPFT,
   LoRA, COLA, AsymmLoRA and RAC-LoRA take plain gradient steps of size gamma in {1/L, 1/(10L)};
   AsymmLoRA and RAC-LoRA also run with the theory's "sketch" step (see ``adapter_step_``). The
   chains (COLA, RAC-LoRA) merge and re-initialise every K = 10 steps.
2. Rate (Section 6.1, Appendix A). Least squares and L2-regularised multinomial logistic regression
   with an n x n weight matrix (n = 8), solved by RAC-LoRA with one exact sketched step per chain link
   (see ``adapter_step_``), ranks r in {1, 2, 4, n}, and by gradient descent, all at gamma = 1/L.
   Theorem 5.5 (PL case): E[f(W_t) - f*] <= (1 - gamma * mu * lambda_min)^t (f(W_0) - f*), with
   lambda_min = lambda_min(E[H]) = r/n because H projects onto a uniformly random r-dim subspace.

3. Federated (fed/theory.py). Four clients with different data (least squares and logistic), every client
   in every round taking 1 or 5 gradient steps: FedAvg, FedIT, FFA-LoRA and Fed-RAC-LoRA at rank 2, for
   --rounds rounds: does Fed-RAC-LoRA reach FedAvg's optimum, and where do the others stop?

Outputs: results/convergence.csv (one row per run, with its seed and settings),
plots/convergence_counterexample.png, plots/convergence_rates.png, plots/convergence_federated.png, and
three tables on stdout, each file
written whole (atomically) once everything is computed. --steps <= 1,000,000 and --links <= 500,000
keep a run under an hour (see MAX_STEPS); Ctrl-C or SIGTERM ends it with one line (exit 130 or 143).
The adapter maths (delta, merge, re-sampling) is lora.py's LoRALinear; which factor trains and when
to merge is methods.py's registry. Nothing here runs at import.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRALinear
from methods import METHODS, Method
from engine.results import atomic_path, git_commit, write_rows

DTYPE = torch.float64  # theory work: tight tolerances
SKETCH = "left"  # B random, A zero and trained: the paper's (Zero, Gaussian), lora.py's default
RANDOM_INIT = "gaussian"  # N(0, 1) random factor, as the published RAC-LoRA code
SCALE = 1.0  # factor in front of B @ A (the sketch step rule below is invariant to it)
CHAIN_K = 10  # counterexample: gradient steps per chain link before merge + re-initialise
STEP_FRACTIONS = {"1/L": 1.0, "1/(10L)": 0.1}  # counterexample step sizes, as fractions of 1/L
N_FEATURES = 8  # rate problems: W is n x n, so either sketch side has lambda_min = r/n
N_SAMPLES = 512  # rate problems: rows of X
RATE_RANKS = (1, 2, 4, N_FEATURES)
LOGISTIC_RIDGE = 0.5  # L2 weight of the logistic problem; it is also its strong-convexity constant mu
NOISE = 0.1  # std of the least-squares label noise (so f* > 0)
OPTIMUM_TOL = 1e-8  # "reached the optimum": final gap <= OPTIMUM_TOL * initial gap
DIVERGED = 1e6  # "diverged": overflowed, or final gap > DIVERGED * initial gap
FIT_WINDOW = (1e-10, 1e-2)  # rate fit uses links whose gap / initial gap lies in this range

# Counterexample runs: (label, method name or "fpft", step rule). "plain": p -= gamma * grad, as the
# issue asks for every method; "sketch": the theory's step (see adapter_step_), only defined when the
# method trains the zero factor alone. Both are shown for AsymmLoRA and RAC-LoRA.
COUNTEREXAMPLE_RUNS = [
    ("FPFT (GD)", "fpft", "plain"),
    ("LoRA", "lora", "plain"),
    ("COLA", "cola", "plain"),
    ("AsymmLoRA", "asymmetric_lora", "plain"),
    ("AsymmLoRA, sketch step", "asymmetric_lora", "sketch"),
    ("RAC-LoRA", "rac_lora", "plain"),
    ("RAC-LoRA, sketch step", "rac_lora", "sketch"),
]


@dataclass(frozen=True)
class Problem:
    """A smooth objective over one weight matrix, with its optimum and constants.

    loss(W) -> scalar tensor (differentiable); f_opt = f*. L: smoothness, mu: PL / strong-convexity
    constant. Gaps f - f* are float64 differences: their rounding floor (~1e-16 f*) lies far below
    the 1e-10 of the start that any test or fit looks at.
    """
    name: str
    loss: Callable[[torch.Tensor], torch.Tensor]
    f_opt: float
    shape: tuple[int, int]  # (out, in) of W
    L: float
    mu: float
    info: dict = field(default_factory=dict)  # what to print about the problem


def counterexample(g: torch.Generator) -> Problem:
    """The Figure 1 quadratic; W* ~ N(0, 1) drawn from ``g``. M acts entrywise: M[0,0] = 10, else 1."""
    w_star = torch.randn(3, 3, generator=g, dtype=DTYPE)
    sigma = torch.linalg.svdvals(w_star)
    if sigma[-1] < 1e-3:
        raise ValueError(f"W* is near singular (sigma_min={sigma[-1]:.1e}); choose another --seed")
    m = torch.ones(3, 3, dtype=DTYPE)
    m[0, 0] = 10.0  # vec index 0 is W[0, 0] for row- or column-major vec alike

    def loss(w):
        return 0.5 * (m * (w - w_star) ** 2).sum()

    # Any rank-1 W has f >= 1/2 ||W - W*||_F^2 >= 1/2 (sigma_2^2 + sigma_3^2) (M >= I, Eckart-Young):
    # LoRA and AsymmLoRA from W0 = 0 at rank 1 can never go below it.
    bound = 0.5 * float(sigma[1] ** 2 + sigma[2] ** 2)
    return Problem("quadratic 3x3", loss, 0.0, (3, 3), L=10.0, mu=1.0,
                   info={"W*": w_star, "rank1_bound": bound})


def _design(g: torch.Generator, n: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X: (num, n) with X^T X / num = V diag(linspace(1, 10, n)) V^T exactly (V random orthogonal)."""
    q, _ = torch.linalg.qr(torch.randn(num, n, generator=g, dtype=DTYPE))  # (num, n) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    eig = torch.linspace(1.0, 10.0, n, dtype=DTYPE)
    x = math.sqrt(num) * q @ torch.diag(eig.sqrt()) @ v.T
    return x, eig


def linear_regression(g: torch.Generator, n: int = N_FEATURES, num: int = N_SAMPLES) -> Problem:
    """f(W) = ||X W^T - Y||_F^2 / (2 num), Y = X W*^T + noise, W* ~ N(0, 1) (n x n, full rank).
    Hessian: W -> W Sigma with Sigma = X^T X / num, so L = 10, mu = 1 exactly."""
    x, eig = _design(g, n, num)
    w_star = torch.randn(n, n, generator=g, dtype=DTYPE)
    y = x @ w_star.T + NOISE * torch.randn(num, n, generator=g, dtype=DTYPE)  # (num, n)
    w_opt = torch.linalg.solve(x.T @ x, x.T @ y).T  # least-squares solution, (n, n)

    def loss(w):
        return ((x @ w.T - y) ** 2).sum() / (2 * num)

    return Problem("linear regression", loss, float(loss(w_opt)), (n, n), L=float(eig.max()),
                   mu=float(eig.min()))


def logistic_regression(g: torch.Generator, n: int = N_FEATURES, num: int = N_SAMPLES,
                        ridge: float = LOGISTIC_RIDGE) -> Problem:
    """Multinomial logistic regression, n classes x n features, labels drawn from softmax(X W*^T)
    (so not separable), f(W) = mean cross-entropy + ridge/2 ||W||_F^2.

    L = lambda_max(Sigma)/2 + ridge (the softmax Hessian diag(p) - p p^T has norm <= 1/2);
    mu = ridge exactly: adding one vector to every class row leaves the cross-entropy unchanged, so
    the Hessian's smallest eigenvalue is the ridge everywhere. f* comes from Newton's method."""
    x, eig = _design(g, n, num)
    w_star = torch.randn(n, n, generator=g, dtype=DTYPE)
    labels = torch.multinomial(torch.softmax(x @ w_star.T, dim=1), 1, generator=g).squeeze(1)

    def loss(w):
        return F.cross_entropy(x @ w.T, labels) + 0.5 * ridge * (w ** 2).sum()

    def grad(w):  # (n, n)
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(loss(w), w)[0]

    w = torch.zeros(n, n, dtype=DTYPE)
    for _ in range(30):  # Newton from 0: f is ridge-strongly convex and smooth
        if grad(w).norm() < 1e-14:
            break
        hess = torch.autograd.functional.hessian(loss, w).reshape(n * n, n * n)
        w = w - torch.linalg.solve(hess, grad(w).reshape(-1)).reshape(n, n)
    if grad(w).norm() > 1e-12:
        raise RuntimeError("Newton's method did not find the logistic optimum; f* would be wrong")
    return Problem("logistic regression", loss, float(loss(w)), (n, n), L=float(eig.max()) / 2 + ridge,
                   mu=ridge)


# ---------------------------------------------------------------- the sketched step ----------

def projection(r_factor: torch.Tensor, sketch: str) -> torch.Tensor:
    """H of the theory for the random factor. left: B (out, r) -> B (B^T B)^+ B^T, (out, out);
    right: A (r, in) -> A^T (A A^T)^+ A, (in, in). An orthogonal projection onto an r-dim subspace."""
    if sketch == "left":
        return r_factor @ torch.linalg.pinv(r_factor.T @ r_factor) @ r_factor.T
    return r_factor.T @ torch.linalg.pinv(r_factor @ r_factor.T) @ r_factor


def sketched_step(w: torch.Tensor, grad: torch.Tensor, r_factor: torch.Tensor, sketch: str,
                  gamma: float) -> torch.Tensor:
    """W - gamma * H grad (left sketch) or W - gamma * grad H (right sketch): the iteration the
    proofs analyse. Written from the formula, independently of LoRALinear, to test against it."""
    h = projection(r_factor, sketch)
    return w - gamma * (h @ grad if sketch == "left" else grad @ h)


def adapter_step_(adapter: LoRALinear, params: list[nn.Parameter], loss: Callable, gamma: float,
                  rule: str) -> float:
    """One gradient step on the trained factors of ``adapter``; returns f before the step.

    rule "plain": p -= gamma * dL/dp. For RAC-LoRA's trained factor at zero (left sketch,
      dL/dA = s B^T G, G = grad f(W)) this moves W by -gamma s^2 B B^T G: not a projection, and its
      size grows with ||B||^2, so a step that is safe for f (gamma = 1/L) can be unsafe here.
    rule "sketch": the trained factor's gradient is preconditioned by the pseudo-inverse of the
      random factor's Gram matrix: A -= gamma (s^2 B^T B)^+ dL/dA (left), B -= gamma dL/dB (s^2 A A^T)^+
      (right). The W step is then -gamma B (B^T B)^+ B^T G = -gamma H G (left) or -gamma G H (right),
      for any scale s. From A = 0 this A is the exact minimiser of the inner problem
      min_A <G, s B A> + ||s B A||_F^2 / (2 gamma) (the L-smooth upper model at gamma = 1/L; the
      minimum-norm one if B is rank deficient), so one link with one such step is exactly
      ``sketched_step`` - the reduction Theorem 5.5 rests on. From any A the W step is the same
      -gamma H G, so K such steps in one link are K sketched steps sharing one H. Only defined when
      the sole trained factor is the zero one.
    """
    w = adapter.base.weight + adapter.delta_weight()  # (out, in), the effective weight
    value = loss(w)
    grads = torch.autograd.grad(value, params)  # (one per trained factor, its shape)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if rule == "sketch":
                if p is not adapter.zero_factor or len(params) != 1:
                    raise ValueError("the sketch step rule needs a method that trains only the zero factor")
                rf = adapter.random_factor
                if adapter.sketch == "left":  # p = A (r, in), rf = B (out, r)
                    g = torch.linalg.pinv(adapter.scale ** 2 * rf.T @ rf, hermitian=True) @ g
                else:  # p = B (out, r), rf = A (r, in)
                    g = g @ torch.linalg.pinv(adapter.scale ** 2 * rf @ rf.T, hermitian=True)
            elif rule != "plain":
                raise ValueError(f"unknown step rule {rule!r}; allowed: plain, sketch")
            p -= gamma * g
    return float(value.detach())


# ---------------------------------------------------------------- runs ----------

def run_adapter(problem: Problem, method: Method, rank: int, gamma: float, steps: int, k: int,
                rule: str, g: torch.Generator, sketch: str = SKETCH) -> list[float]:
    """Train a LoRALinear on ``problem`` for ``steps`` gradient steps; the method's registry entry
    says which factors train and whether to merge + re-sample (every ``k`` steps).
    Returns gaps f(W_t) - f* for t = 0..steps (W_t the effective weight); stops early, with inf last,
    if the iterate overflows."""
    out_f, in_f = problem.shape
    base = nn.Linear(in_f, out_f, bias=False, dtype=DTYPE)
    with torch.no_grad():
        base.weight.zero_()  # W0 = 0
    adapter = LoRALinear(base, rank, SCALE, sketch, RANDOM_INIT)
    adapter.reset(g)  # zero factor 0, random factor drawn from g
    params = method.prepare([adapter])
    gaps = []
    for t in range(1, steps + 1):
        gaps.append(adapter_step_(adapter, params, problem.loss, gamma, rule) - problem.f_opt)  # at W_{t-1}
        if not math.isfinite(gaps[-1]):
            gaps[-1] = math.inf
            return gaps
        method.end_of_epoch([adapter], t, k, g)  # merge + reset + re-sample when the method says
    with torch.no_grad():
        final = float(problem.loss(adapter.base.weight + adapter.delta_weight())) - problem.f_opt
    return gaps + [final if math.isfinite(final) else math.inf]


def run_gd(problem: Problem, gamma: float, steps: int) -> list[float]:
    """Full-parameter gradient descent (the FPFT reference): W <- W - gamma grad f(W)."""
    w = torch.zeros(problem.shape, dtype=DTYPE)  # W0 = 0
    gaps = []
    for _ in range(steps):
        w.requires_grad_(True)
        value = problem.loss(w)
        gaps.append(float(value.detach()) - problem.f_opt)  # at the iterate before the step
        if not math.isfinite(gaps[-1]):
            gaps[-1] = math.inf
            return gaps
        w = (w - gamma * torch.autograd.grad(value, w)[0]).detach()
    final = float(problem.loss(w)) - problem.f_opt
    return gaps + [final if math.isfinite(final) else math.inf]


def classify(gaps: list[float]) -> str:
    """optimum: final <= OPTIMUM_TOL * start; diverged: overflowed or final > DIVERGED * start;
    stalled: the last 10% of steps vary by < 1%; decreasing: still going down monotonically;
    oscillating: otherwise."""
    if not math.isfinite(gaps[-1]) or gaps[-1] > DIVERGED * gaps[0]:
        return "diverged"
    if gaps[-1] <= OPTIMUM_TOL * gaps[0]:
        return "optimum"
    tail = gaps[-max(10, len(gaps) // 10):]
    if max(tail) <= 1.01 * min(tail):
        return "stalled"
    if all(b <= a for a, b in zip(tail, tail[1:])):
        return "decreasing"
    return "oscillating"


def fit_rate(gaps: list[float], window: tuple[float, float] = FIT_WINDOW) -> float:
    """Measured contraction per link: exp(slope) of a least-squares line through log(gap) over the
    links whose gap / initial gap lies in ``window``; nan if fewer than 10 such links."""
    lo, hi = window
    pts = [(t, math.log(v)) for t, v in enumerate(gaps) if lo * gaps[0] < v < hi * gaps[0]]
    if len(pts) < 10:
        return math.nan
    t = torch.tensor([p[0] for p in pts], dtype=DTYPE)
    y = torch.tensor([p[1] for p in pts], dtype=DTYPE)
    tc = t - t.mean()
    return math.exp(float((tc * (y - y.mean())).sum() / (tc ** 2).sum()))


def _factor_seed(g: torch.Generator) -> int:
    """A seed for the factor draws, itself drawn from the run's generator (so every run of one
    experiment starts from the same first random factor)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=g))


def counterexample_runs(seed: int, steps: int) -> tuple[Problem, list[dict]]:
    """Every COUNTEREXAMPLE_RUNS entry at every STEP_FRACTIONS step size; one record per run."""
    g = torch.Generator().manual_seed(seed)
    problem = counterexample(g)
    factor_seed = _factor_seed(g)
    records = []
    for gamma_name, frac in STEP_FRACTIONS.items():
        gamma = frac / problem.L
        for label, name, rule in COUNTEREXAMPLE_RUNS:
            if name == "fpft":
                gaps = run_gd(problem, gamma, steps)
            else:
                gaps = run_adapter(problem, METHODS[name], 1, gamma, steps, CHAIN_K, rule,
                                   torch.Generator().manual_seed(factor_seed))
            records.append(dict(experiment="counterexample", problem=problem.name, label=label,
                                method=name, step_rule=rule, rank=1 if name != "fpft" else 3,
                                gamma=gamma, gamma_name=gamma_name, inner_steps=CHAIN_K, gaps=gaps,
                                status=classify(gaps), L=problem.L, mu=problem.mu))
    return problem, records


def rate_runs(seed: int, links: int) -> list[dict]:
    """RAC-LoRA (one sketch step per link) at each rank in RATE_RANKS, and GD, at gamma = 1/L, on
    both rate problems; each record carries the measured and theoretical contraction factors."""
    records = []
    g = torch.Generator().manual_seed(seed)
    for build in (linear_regression, logistic_regression):
        problem = build(g)
        n = problem.shape[0]
        factor_seed = _factor_seed(g)
        gamma = 1.0 / problem.L
        runs = [("GD", "fpft", n, run_gd(problem, gamma, links))]
        for r in RATE_RANKS:
            runs.append((f"RAC-LoRA r={r}", "rac_lora", r,
                         run_adapter(problem, METHODS["rac_lora"], r, gamma, links, 1, "sketch",
                                     torch.Generator().manual_seed(factor_seed))))
        for label, name, r, gaps in runs:
            records.append(dict(experiment="rate", problem=problem.name, label=label, method=name,
                                step_rule="sketch" if name != "fpft" else "plain", rank=r, gamma=gamma,
                                gamma_name="1/L", inner_steps=1, gaps=gaps, status=classify(gaps),
                                L=problem.L, mu=problem.mu, lambda_min=r / n,
                                theory_rate=1 - gamma * problem.mu * r / n, measured_rate=fit_rate(gaps)))
    return records


# ---------------------------------------------------------------- outputs ----------

CSV_FIELDS = ["experiment", "problem", "label", "method", "step_rule", "sketch", "random_init", "scale",
              "rank", "gamma", "gamma_name", "inner_steps", "steps", "seed", "L", "mu", "lambda_min",
              "start_gap", "final_gap", "min_gap", "status", "theory_rate", "measured_rate", "git_commit"]


def write_csv(records: list[dict], path: str, seed: int, commit: str) -> None:
    """One row per run with its seed, settings and summary, written atomically (results.write_rows)."""
    rows = []
    for rec in records:
        gaps, adapted = rec["gaps"], rec["method"] not in ("fpft", "fedavg")
        rows.append({**rec, "sketch": SKETCH if adapted else None, "random_init": RANDOM_INIT if adapted else None,
                     "scale": SCALE if adapted else None, "steps": len(gaps) - 1, "seed": seed,
                     "start_gap": gaps[0], "final_gap": gaps[-1], "min_gap": min(gaps), "git_commit": commit})
    write_rows(path, rows, CSV_FIELDS)


def _save(fig, path: str) -> None:
    """Save a matplotlib Figure as PNG atomically (results.atomic_path)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_counterexample(records: list[dict], path: str) -> None:
    """Two panels (one per step size): f(W_t) - f* against gradient step, log y. Reads records only."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, len(STEP_FRACTIONS), sharey=True)
    styles = ["-", "--", "-.", ":"]  # COLA and plain RAC-LoRA nearly coincide at small steps
    for ax, gamma_name in zip(axes, STEP_FRACTIONS):
        for i, rec in enumerate(r for r in records if r["gamma_name"] == gamma_name):
            gaps = [v for v in rec["gaps"] if math.isfinite(v)]
            label = f"{rec['label']} ({rec['status']})"
            # f* = 0 exactly here, so values down to 1e-30 are real; clip only for the log axis
            ax.plot(range(len(gaps)), [min(max(v, 1e-32), 1e30) for v in gaps], label=label,
                    ls=styles[i % len(styles)], lw=2.2 if "RAC" in rec["label"] else 1.4)
        ax.set_yscale("log")
        ax.set_ylim(1e-30, 1e6)
        ax.set_xlabel("gradient step t")
        ax.set_title(f"step size gamma = {gamma_name}  (K = {CHAIN_K} steps per chain link)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("f(W_t) - f*")
    fig.suptitle("Counterexample: 3x3 quadratic, M = diag(10, 1, ..., 1), rank 1")
    _save(fig, path)


def plot_rates(records: list[dict], path: str) -> None:
    """One panel per problem: f - f* per chain link for each rank (solid) beside the theorem's
    bound (f0 - f*) (1 - gamma mu r/n)^t (dotted, same colour); GD dashed black, on top (it
    coincides with r = n). Curves end where f - f* reaches the rounding floor, 1e-14 of the start."""
    from matplotlib.figure import Figure

    problems = list(dict.fromkeys(r["problem"] for r in records))
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, len(problems))
    for ax, name in zip(axes, problems):
        runs = [r for r in records if r["problem"] == name]
        for i, rec in sorted(enumerate(runs), key=lambda ir: ir[1]["method"] == "fpft"):  # GD last
            gaps = rec["gaps"]
            end = next((t for t, v in enumerate(gaps) if v <= 1e-14 * gaps[0]), len(gaps))
            gd = rec["method"] == "fpft"
            ax.plot(range(end), gaps[:end], color="black" if gd else f"C{i}", label=rec["label"],
                    ls="--" if gd else "-")
            if not gd:
                ax.plot(range(len(gaps)), [gaps[0] * rec["theory_rate"] ** t for t in range(len(gaps))],
                        color=f"C{i}", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_ylim(1e-14 * runs[0]["gaps"][0], 10 * runs[0]["gaps"][0])
        ax.set_xlabel("chain link t (one sketched step each; GD: iteration)")
        ax.set_ylabel("f(W_t) - f*")
        ax.set_title(f"{name}: measured (solid), bound (dotted)")
        ax.legend(fontsize=8)
    fig.suptitle(f"RAC-LoRA, one sketched step per link, ranks r of n = {N_FEATURES}, gamma = 1/L; "
                 "Theorem 5.5 bound (f0 - f*)(1 - gamma mu r/n)^t")
    _save(fig, path)


def format_tables(problem: Problem, cx: list[dict], rates: list[dict]) -> str:
    w = problem.info["W*"]
    lines = ["Counterexample: W* = " + str([[round(float(v), 4) for v in row] for row in w]),
             f"  any rank-1 W has f - f* >= {problem.info['rank1_bound']:.4g} (LoRA, AsymmLoRA floor)",
             f"{'step':8} {'run':24} {'start':>9} {'final f-f*':>11} {'min f-f*':>10}  status"]
    for r in cx:
        lines.append(f"{r['gamma_name']:8} {r['label']:24} {r['gaps'][0]:9.3g} {r['gaps'][-1]:11.3g} "
                     f"{min(r['gaps']):10.3g}  {r['status']}"
                     + (f" (overflow at step {len(r['gaps']) - 1})" if math.isinf(r["gaps"][-1]) else ""))
    lines += ["", "Rate per chain link at gamma = 1/L (theory: 1 - gamma mu r/n, Theorem 5.5; "
              "speed-up = ln(measured) / ln(theory), >= 1 means at least as fast as the bound)",
              f"{'problem':20} {'run':16} {'r/n':>6} {'theory':>8} {'measured':>9} {'speed-up':>8}  final f-f*"]
    for r in rates:
        speed = math.log(r["measured_rate"]) / math.log(r["theory_rate"])
        lines.append(f"{r['problem']:20} {r['label']:16} {r['lambda_min']:6.3f} {r['theory_rate']:8.5f} "
                     f"{r['measured_rate']:9.5f} {speed:8.2f}  {r['gaps'][-1]:.2e}")
    for name in dict.fromkeys(r["problem"] for r in rates):
        gd = next(r["gaps"] for r in rates if r["problem"] == name and r["method"] == "fpft")
        full = next(r["gaps"] for r in rates if r["problem"] == name and r["rank"] == N_FEATURES
                    and r["method"] != "fpft")
        # above 1e-8 of the start: below it, logistic f - f* is mostly rounding of f itself
        diff = max(abs(a - b) / b for a, b in zip(full, gd) if b > 1e-8 * gd[0])
        lines.append(f"{name}: RAC-LoRA r=n vs GD, max relative difference of f - f* = {diff:.1e}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line ----------

MAX_SEED = 2 ** 63 - 1  # a signed 64-bit integer: torch.Generator.manual_seed overflows at 2**64, and
# the CSV's seed column then reads back as an int64 anywhere
# --steps and --links are bounded so that a run ends within the hour. Measured on a 2-core CPU (one
# thread, idle machine): the defaults, 4000 steps and 1500 links, take 5.7 s and 4.6 s, i.e. 1.4 ms per
# step (14 counterexample runs) and 3.0 ms per link (10 rate runs), linear in both (10x the defaults:
# 96 s, 30 MB more memory). At the limits: ~23 min of steps plus ~25 min of links.
MAX_STEPS = 1_000_000
MAX_LINKS = 500_000
MS_PER_STEP, MS_PER_LINK = 1.4, 3.0  # the measurements above, for the help text and error messages
# --rounds: 16 federated runs (2 problems x 2 local-step counts x 4 methods, 4 clients each) took 6.6 s for
# 200 rounds on the same CPU, about 33 ms per round of all 16
MAX_ROUNDS = 50_000
MS_PER_ROUND = 33
_SHOWN = 40  # at most this many characters of a bad value are echoed back


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        self.given = set()  # the options seen so far (_Once)
        return super().parse_known_args(args, namespace)

    def error(self, message):  # one line, no usage block, exit status 2
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str, limit: int = 400) -> str:
    """config.one_line(text) (a newline in an argument cannot break the line), cut to ``limit`` characters."""
    from config import one_line

    text = one_line(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(text: str) -> str:
    return repr(text) if len(text) <= _SHOWN else f"{text[:_SHOWN]!r}... ({len(text)} characters)"


def _int_in(low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a decimal integer (ASCII digits, optional sign) in low..high. Checked as text
    first, so that a 5000-digit argument is "out of range", not int()'s 4300-digit ValueError."""
    allowed = f"an integer in {low}..{high:,}{why}"

    def convert(text: str) -> int:
        number = re.fullmatch(r"\s*([+-]?)([0-9]+)\s*", text)  # [0-9]: ASCII digits only
        if not number:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {_shown(text)}")
        if len(number[2].lstrip("0")) > len(str(max(abs(low), abs(high)))):
            raise argparse.ArgumentTypeError(f"{_shown(text)} is out of range: expected {allowed}")
        value = int(number[1] + number[2])
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {allowed}")
        return value
    return convert


class _Once(argparse.Action):
    """Store the option's value, refusing a second occurrence (argparse would silently keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.dest in parser.given:
            raise argparse.ArgumentError(self, "given more than once; give each option once")
        parser.given.add(self.dest)
        setattr(namespace, self.dest, values)


def _parser() -> _Parser:
    p = _Parser(prog="convergence.py", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=_int_in(0, MAX_SEED, " (2^63 - 1)"), default=0, action=_Once,
                   help="seeds W*, the data and every factor draw; 0..2^63 - 1 (a signed 64-bit integer)")
    steps_why = (f" (at ~{MS_PER_STEP} ms per step on a 2-core CPU the limit takes ~{MAX_STEPS * MS_PER_STEP / 6e4:.0f}"
                 " min: bounded so that a run ends within the hour)")
    links_why = (f" (at ~{MS_PER_LINK} ms per link on a 2-core CPU the limit takes ~{MAX_LINKS * MS_PER_LINK / 6e4:.0f}"
                 " min: bounded so that a run ends within the hour)")
    p.add_argument("--steps", type=_int_in(1, MAX_STEPS, steps_why), default=4000, action=_Once,
                   help=f"gradient steps per counterexample run, 1..{MAX_STEPS:,}{steps_why}")
    p.add_argument("--links", type=_int_in(1, MAX_LINKS, links_why), default=1500, action=_Once,
                   help=f"chain links (= GD steps) per rate run, 1..{MAX_LINKS:,}{links_why}")
    p.add_argument("--rounds", type=_int_in(1, MAX_ROUNDS, f" (at ~{MS_PER_ROUND} ms per round the limit takes ~"
                                                           f"{MAX_ROUNDS * MS_PER_ROUND / 6e4:.0f} min)"),
                   default=400, action=_Once,
                   help=f"server rounds per federated run (fed/theory.py), 1..{MAX_ROUNDS:,}")
    p.add_argument("--results_dir", default="results", action=_Once, help="where convergence.csv goes")
    p.add_argument("--plots_dir", default="plots", action=_Once, help="where the convergence_*.png figures go")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a Namespace, or one line "convergence.py: error: ..." on stderr and
    SystemExit(2) (--help: SystemExit(0)); never another exception. Touches no file."""
    return _parser().parse_args(argv)


def prepare_outputs(args: argparse.Namespace) -> None:
    """Check (and create) the output folders before any compute, and delete the temporary files that a
    writer killed mid-write left there; config.ConfigError in one line if a folder will not do."""
    from config import ConfigError
    from engine.results import clean_stale_tmp, prepare_output_dir

    for name in ("results_dir", "plots_dir"):
        try:
            clean_stale_tmp(prepare_output_dir(name, getattr(args, name)))
        except ConfigError:
            raise
        except ValueError as e:  # a path no system takes (a NUL byte, an unencodable character)
            raise ConfigError(f"{name} {_shown(getattr(args, name))} is not a usable path ({e})") from None


def main(argv: list[str] | None = None) -> int:
    """Parse, check the output folders, compute, write; the exit status. Ctrl-C: one line, 130;
    SIGTERM: one line, 143 (nothing is half-written: every file is written whole at the end)."""
    from engine.cli import Terminated
    from config import ConfigError

    parser = _parser()
    args = parser.parse_args(argv)
    written: list[str] = []
    on_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    try:
        try:
            prepare_outputs(args)
        except ConfigError as e:
            parser.error(str(e))
        run(args, written)
    except KeyboardInterrupt as e:
        word = "terminated" if isinstance(e, Terminated) else "interrupted"
        if written:
            done = f"wrote {', '.join(written)}, not the rest (each file is written whole)"
        else:
            done = ("nothing was written (convergence.csv and the figures are written at the end, each whole: "
                    "earlier ones are as they were)")
        print(f"\n{word}: {done}; run the same command again to compute them", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _on_sigterm(signum, frame):
    from engine.cli import Terminated

    raise Terminated()


def run(args: argparse.Namespace, written: list[str]) -> None:
    """Compute both experiments and write their outputs; appends each path to ``written`` once it is."""
    # Tiny matrices: one thread is fastest, and spares us OpenMP spin-waits when the cores are busy
    # (2 threads measured ~1000x slower per 512x8 matmul under load).
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"seed {args.seed}: counterexample ({args.steps} steps x {len(STEP_FRACTIONS) * len(COUNTEREXAMPLE_RUNS)} "
          f"runs), then rates ({args.links} links x {2 * (1 + len(RATE_RANKS))} runs), then federated ({args.rounds} "
          f"rounds x 16 runs)", flush=True)
    from fed.theory import federated_runs, format_table, plot_federated

    problem, cx = counterexample_runs(args.seed, args.steps)
    rates = rate_runs(args.seed, args.links)
    fed = federated_runs(args.seed, args.rounds)
    outputs = [(os.path.join(args.results_dir, "convergence.csv"),
                lambda path: write_csv(cx + rates + fed, path, args.seed, git_commit())),
               (os.path.join(args.plots_dir, "convergence_counterexample.png"),
                lambda path: plot_counterexample(cx, path)),
               (os.path.join(args.plots_dir, "convergence_rates.png"), lambda path: plot_rates(rates, path)),
               (os.path.join(args.plots_dir, "convergence_federated.png"), lambda path: plot_federated(fed, path))]
    for path, write in outputs:
        write(path)
        written.append(path)
    print(format_tables(problem, cx, rates))
    print()
    print(format_table(fed))
    print(f"seed {args.seed}; wrote {args.results_dir}/convergence.csv and {args.plots_dir}/convergence_*.png "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
