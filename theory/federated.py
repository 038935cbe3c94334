"""The federated case of the convergence theory (convergence.py --rounds): heterogeneous clients, gradient steps, float64.

K clients hold different data: client i's least-squares (or logistic) problem has its own design X_i and its
own ground truth W*_i = W* + SPREAD * N(0, 1), so the clients' optima differ and the global objective
f(W) = mean_i f_i(W) has an optimum none of them has. Each round every client starts from the server's state,
takes ``local_steps`` gradient steps of size gamma = 1/L_max (L_max: the largest client smoothness) on its own
f_i, and the server aggregates:

- fedavg: W_i, averaged;
- fedit: both factors of W = s B A trained (plain steps, scaled by 1 / (s ||B_0||_2)^2 so that the first step
  is as safe as gamma on W), each averaged: mean(B_i) mean(A_i);
- ffa_lora: B drawn once and fixed, A trained from zero with the sketched step (convergence.adapter_step_'s
  "sketch" rule, on W: -gamma H grad f_i, H the projection onto B's columns), A averaged;
- fed_rac_lora: B redrawn every round, A from zero with the sketched step, A averaged and merged into W
  (W <- W + s B mean(A_i)): a randomized sketched step of FedAvg.

With one local step, FedAvg is gradient descent on f and Fed-RAC-LoRA is the sketched descent of the paper's
Theorem 5.5 on f; with several, client drift biases both. FFA-LoRA can only reach the best W in B's column
space; FedIT is LoRA's rank-r parametrisation, averaged inexactly once clients take several steps.
"""
from __future__ import annotations

import math

import torch

from theory.central import design, save_figure, classify, DTYPE, NOISE, Problem, projection
from raclora.factors import init_factor_

CLIENTS = 4
N = 8  # W is N x N
SAMPLES = 128  # rows of each client's X
SPREAD = 1.0  # std of each client's shift of the ground truth
RANK = 2
LOCAL_STEPS = (1, 5)
RIDGE = 0.5  # logistic problem's L2 weight
METHOD_ORDER = ("fedavg", "fedit", "ffa_lora", "fed_rac_lora")


def heterogeneous(kind: str, g: torch.Generator) -> tuple[Problem, list, float]:
    """(the global problem, the clients' losses, L_max) of ``kind`` "least squares" or "logistic"."""
    w_star = torch.randn(N, N, generator=g, dtype=DTYPE)
    losses, designs = [], []
    for _ in range(CLIENTS):
        x, eig = design(g, N, SAMPLES)
        w_i = w_star + SPREAD * torch.randn(N, N, generator=g, dtype=DTYPE)
        if kind == "least squares":
            y = x @ w_i.T + NOISE * torch.randn(SAMPLES, N, generator=g, dtype=DTYPE)
            losses.append(lambda w, x=x, y=y: ((x @ w.T - y) ** 2).sum() / (2 * SAMPLES))
        else:
            labels = torch.multinomial(torch.softmax(x @ w_i.T, dim=1), 1, generator=g).squeeze(1)
            losses.append(lambda w, x=x, t=labels: torch.nn.functional.cross_entropy(x @ w.T, t)
                          + 0.5 * RIDGE * (w ** 2).sum())
        designs.append((x, eig))

    def f(w):
        return sum(loss(w) for loss in losses) / CLIENTS

    sigma = sum(x.T @ x for x, _ in designs) / (CLIENTS * SAMPLES)  # the global least-squares Hessian factor
    eig = torch.linalg.eigvalsh(sigma)
    w = torch.zeros(N, N, dtype=DTYPE)  # Newton: exact for least squares in one step, a few for logistic
    for _ in range(30):
        grad = torch.autograd.functional.jacobian(f, w)
        if grad.norm() < 1e-13:
            break
        hess = torch.autograd.functional.hessian(f, w).reshape(N * N, N * N)
        w = w - torch.linalg.solve(hess, grad.reshape(-1)).reshape(N, N)
    if torch.autograd.functional.jacobian(f, w).norm() > 1e-11:
        raise RuntimeError(f"Newton's method did not find the {kind} optimum; f* would be wrong")
    if kind == "least squares":
        big_l, mu, l_max = float(eig.max()), float(eig.min()), max(float(e.max()) for _, e in designs)
    else:
        big_l, mu = float(eig.max()) / 2 + RIDGE, RIDGE
        l_max = max(float(e.max()) for _, e in designs) / 2 + RIDGE
    return Problem(f"{kind}, {CLIENTS} heterogeneous clients", f, float(f(w)), (N, N), L=big_l, mu=mu), losses, l_max


def _grad(loss, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().requires_grad_(True)
    return torch.autograd.grad(loss(w), w)[0]


def run(method: str, problem: Problem, losses: list, l_max: float, rounds: int, local_steps: int,
        factor_seed: int) -> list[float]:
    """Gaps f(W_t) - f* for t = 0..rounds (W_t the server's effective weight); inf once it overflows."""
    gamma, scale = 1.0 / l_max, 1.0
    g = torch.Generator().manual_seed(factor_seed)
    w = torch.zeros(N, N, dtype=DTYPE)

    def draw_b():
        return init_factor_(torch.empty(N, RANK, dtype=DTYPE), "gaussian", g)

    b = draw_b()  # fedit's initial B, ffa_lora's fixed B
    a = torch.zeros(RANK, N, dtype=DTYPE)
    fedit_gamma = gamma / (scale * float(torch.linalg.matrix_norm(b, 2))) ** 2
    gaps = [float(problem.loss(w)) - problem.f_opt]
    for _ in range(rounds):
        if method == "fedavg":
            clients = []
            for loss in losses:
                wi = w.clone()
                for _ in range(local_steps):
                    wi = wi - gamma * _grad(loss, wi)
                clients.append(wi)
            w = sum(clients) / CLIENTS
        elif method == "fedit":
            heads, tails = [], []
            for loss in losses:
                ai, bi = a.clone(), b.clone()
                for _ in range(local_steps):
                    grad = _grad(loss, scale * bi @ ai)  # G = grad f_i(W), W = s B A
                    ai, bi = ai - fedit_gamma * scale * bi.T @ grad, bi - fedit_gamma * scale * grad @ ai.T
                heads.append(ai)
                tails.append(bi)
            a, b = sum(heads) / CLIENTS, sum(tails) / CLIENTS
            w = scale * b @ a
        elif method in ("ffa_lora", "fed_rac_lora"):
            if method == "fed_rac_lora":
                b = draw_b()
            h = projection(b, "left")  # the sketched step on A moves W by -gamma H grad f_i (convergence.py)
            start = w.clone()
            clients = []
            for loss in losses:
                wi = start.clone()
                for _ in range(local_steps):
                    wi = wi - gamma * h @ _grad(loss, wi)
                clients.append(wi)
            w = sum(clients) / CLIENTS  # = start + s B mean(A_i): the mean of A is exact
        else:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHOD_ORDER)}")
        gaps.append(float(problem.loss(w)) - problem.f_opt)
        if not math.isfinite(gaps[-1]):
            gaps[-1] = math.inf
            break
    return gaps


def federated_runs(seed: int, rounds: int) -> list[dict]:
    """Every method at each LOCAL_STEPS on both heterogeneous problems; one record per run (convergence.py's
    CSV fields)."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for kind in ("least squares", "logistic"):
        problem, losses, l_max = heterogeneous(kind, g)
        factor_seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        for tau in LOCAL_STEPS:
            for method in METHOD_ORDER:
                gaps = run(method, problem, losses, l_max, rounds, tau, factor_seed)
                records.append(dict(experiment="federated", problem=problem.name, label=f"{method}, {tau} local",
                                    method=method, step_rule="plain" if method in ("fedavg", "fedit") else "sketch",
                                    rank=N if method == "fedavg" else RANK, gamma=1.0 / l_max, gamma_name="1/L_max",
                                    inner_steps=tau, gaps=gaps, status=classify(gaps), L=problem.L, mu=problem.mu))
    return records


def plot_federated(records: list[dict], path: str) -> None:
    """One panel per problem and number of local steps: f - f* of the server's model by round, log y."""
    from matplotlib.figure import Figure


    panels = list(dict.fromkeys((r["problem"], r["inner_steps"]) for r in records))
    fig = Figure(figsize=(6 * len(panels) // 2, 8))
    axes = fig.subplots(2, len(panels) // 2, squeeze=False).flat
    colors = {"fedavg": "black", "fedit": "C0", "ffa_lora": "C2", "fed_rac_lora": "C3"}
    for ax, (name, tau) in zip(axes, panels):
        runs = [r for r in records if r["problem"] == name and r["inner_steps"] == tau]
        floor = 1e-14 * runs[0]["gaps"][0]
        for rec in runs:
            gaps = [max(v, floor) for v in rec["gaps"] if math.isfinite(v)]
            ax.plot(range(len(gaps)), gaps, color=colors[rec["method"]], ls="--" if rec["method"] == "fedavg" else "-",
                    label=f"{rec['method']} ({rec['status']})")
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("f(W_t) - f*")
        ax.set_title(f"{name}\n{tau} local step{'s' if tau > 1 else ''} per round")
        ax.legend(fontsize=8)
    fig.suptitle(f"Federated: {CLIENTS} clients with different data, rank {RANK} of n = {N}, gamma = 1/L_max")
    fig.tight_layout()
    save_figure(fig, path)


def format_table(records: list[dict]) -> str:
    lines = [f"Federated ({CLIENTS} heterogeneous clients, rank {RANK} of n = {N}, gamma = 1/L_max; every client in "
             f"every round)", f"{'problem':42} {'local':>5} {'method':13} {'start':>9} {'final f-f*':>11}  status"]
    for r in records:
        lines.append(f"{r['problem']:42} {r['inner_steps']:5d} {r['method']:13} {r['gaps'][0]:9.3g} "
                     f"{r['gaps'][-1]:11.3g}  {r['status']}")
    return "\n".join(lines)
