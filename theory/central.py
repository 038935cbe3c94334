"""The paper's convergence theory on small problems, central case (float64): the problems (the Figure 1
counterexample, least squares and logistic regression), the adapter's gradient and sketched steps, the chains'
runs, the rate fit, the CSV rows, the figures and the tables. convergence.py is its command line (and says what
each part shows); theory/federated.py the federated case.

The adapter maths (delta, merge, re-sampling) is lora.py's LoRALinear; which factor trains and when to merge is
raclora/methods.py's registry. Nothing here runs at import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.results import write_rows
from lora import LoRALinear
from raclora.files import atomic_write_via
from raclora.methods import Method, METHODS

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


def design(g: torch.Generator, n: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X: (num, n) with X^T X / num = V diag(linspace(1, 10, n)) V^T exactly (V random orthogonal)."""
    q, _ = torch.linalg.qr(torch.randn(num, n, generator=g, dtype=DTYPE))  # (num, n) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    eig = torch.linspace(1.0, 10.0, n, dtype=DTYPE)
    x = math.sqrt(num) * q @ torch.diag(eig.sqrt()) @ v.T
    return x, eig


def linear_regression(g: torch.Generator, n: int = N_FEATURES, num: int = N_SAMPLES) -> Problem:
    """f(W) = ||X W^T - Y||_F^2 / (2 num), Y = X W*^T + noise, W* ~ N(0, 1) (n x n, full rank).
    Hessian: W -> W Sigma with Sigma = X^T X / num, so L = 10, mu = 1 exactly."""
    x, eig = design(g, n, num)
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
    x, eig = design(g, n, num)
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


def save_figure(fig, path: str) -> None:
    """Save a matplotlib Figure as PNG atomically (raclora.files.atomic_write_via: a full disk is one line)."""
    atomic_write_via(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


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
    save_figure(fig, path)


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
    save_figure(fig, path)


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
