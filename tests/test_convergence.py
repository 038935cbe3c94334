"""convergence.py: the sketched-step reduction, the r/n rate and the Figure 1 counterexample outcomes.

Everything is float64 and seeded; the expected outcomes below are what this reconstruction shows at
seed 0 (see the module docstring of convergence.py for the problem and its choices).
"""
from __future__ import annotations

import csv
import importlib
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import convergence
from theory import central as cv
from lora import LoRALinear
from raclora.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
RAC = METHODS["rac_lora"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices run fastest on one thread (and many times faster when the cores are busy);
    module scope, so it is set before the module fixtures below and restored for other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_loss(w: torch.Tensor) -> torch.Tensor:
    """A non-quadratic smooth function of a 5x4 W, so that G = grad f is a generic matrix."""
    c = torch.arange(20, dtype=cv.DTYPE).reshape(5, 4) / 7
    return (torch.cos(w * c) + 0.3 * w ** 3).sum() + 0.5 * (w @ w.T).trace()


def make_adapter(rank: int, sketch: str, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(4, 5, bias=False, dtype=cv.DTYPE)  # W: (5, 4), not square: catches side mix-ups
    with torch.no_grad():
        base.weight.copy_(torch.randn(5, 4, generator=g, dtype=cv.DTYPE))
    adapter = LoRALinear(base, rank, scale, sketch, "gaussian")
    adapter.reset(g)
    return adapter, RAC.prepare([adapter]), g


def grad_at(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    return torch.autograd.grad(smooth_loss(w), w)[0]


# ---- the reduction the proofs rest on ----

# rank 5 (left) and 4 (right) are full: H = I, the link is a plain gradient step
@pytest.mark.parametrize("sketch,rank", [("left", 1), ("left", 2), ("left", 5),
                                         ("right", 1), ("right", 2), ("right", 4)])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_one_rac_link_with_exact_inner_step_is_the_sketched_step(sketch, rank, scale):
    adapter, params, g = make_adapter(rank, sketch, scale)
    w, r_factor = adapter.base.weight.detach().clone(), adapter.random_factor.detach().clone()
    gamma = 0.05
    expected = cv.sketched_step(w, grad_at(w), r_factor, sketch, gamma)
    cv.adapter_step_(adapter, params, smooth_loss, gamma, "sketch")
    assert RAC.end_of_epoch([adapter], 1, 1, g)  # merge + reset + re-sample, as a chain link ends
    torch.testing.assert_close(adapter.base.weight.detach(), expected, rtol=0, atol=1e-12)
    assert not (w - expected).abs().max() < 1e-3  # the step did move W
    assert adapter.zero_factor.abs().max() == 0  # next link starts from zero ...
    assert not torch.equal(adapter.random_factor.detach(), r_factor)  # ... with a fresh sketch


@pytest.mark.parametrize("sketch", ["left", "right"])
def test_plain_step_moves_w_by_the_scaled_gram_not_the_projection(sketch):
    adapter, params, g = make_adapter(2, sketch, 0.7)
    w, rf = adapter.base.weight.detach().clone(), adapter.random_factor.detach().clone()
    grad, eta = grad_at(w), 0.01
    cv.adapter_step_(adapter, params, smooth_loss, eta, "plain")
    moved = w + adapter.delta_weight().detach()
    expected = w - eta * 0.7 ** 2 * (rf @ rf.T @ grad if sketch == "left" else grad @ rf.T @ rf)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-12)


def test_sketch_rule_refuses_methods_that_train_both_factors():
    adapter, _, _ = make_adapter(1, "left", 1.0)
    params = METHODS["lora"].prepare([adapter])
    with pytest.raises(ValueError, match="only the zero factor"):
        cv.adapter_step_(adapter, params, smooth_loss, 0.1, "sketch")


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_gaussian_sketch_projection_has_expectation_r_over_n_identity(rank):
    n, draws = 8, 3000
    g = torch.Generator().manual_seed(rank)
    mean = torch.zeros(n, n, dtype=cv.DTYPE)
    for _ in range(draws):
        h = cv.projection(torch.randn(n, rank, generator=g, dtype=cv.DTYPE), "left")
        mean += h / draws
    torch.testing.assert_close(h @ h, h, rtol=0, atol=1e-12)  # a projection ...
    assert abs(h.trace() - rank) < 1e-10  # ... of rank r
    eig = torch.linalg.eigvalsh(mean)
    assert (eig - rank / n).abs().max() < 0.04  # lambda_min(E[H]) = r/n, Monte Carlo error ~0.01


# ---- the rate ----

@pytest.fixture(scope="module")
def rates():
    return cv.rate_runs(seed=0, links=1000)


def test_every_rank_reaches_the_optimum_of_both_problems(rates):
    assert len(rates) == 2 * (1 + len(cv.RATE_RANKS))
    for rec in rates:
        assert rec["status"] == "optimum", rec["label"]


def test_measured_rate_beats_theorem_bound_by_at_most_a_factor_3_in_log(rates):
    """Theorem 5.5 bounds E[f - f*]; a single run's log-slope must be at least as steep, and for these
    problems (f quadratic in the error near W*) it is about twice as steep, never over 3x."""
    for rec in rates:
        speed = math.log(rec["measured_rate"]) / math.log(rec["theory_rate"])
        assert 1.0 <= speed <= 3.0, (rec["problem"], rec["label"], speed)


def test_measured_rate_grows_with_rank(rates):
    for problem in ("linear regression", "logistic regression"):
        rac = [r for r in rates if r["problem"] == problem and r["method"] == "rac_lora"]
        progress = [1 - r["measured_rate"] for r in sorted(rac, key=lambda r: r["rank"])]
        assert all(b > 1.3 * a for a, b in zip(progress, progress[1:])), (problem, progress)


def test_full_rank_rac_lora_is_gradient_descent(rates):
    for problem in ("linear regression", "logistic regression"):
        gd = next(r["gaps"] for r in rates if r["problem"] == problem and r["method"] == "fpft")
        full = next(r["gaps"] for r in rates if r["problem"] == problem and r["rank"] == cv.N_FEATURES
                    and r["method"] == "rac_lora")
        # above 1e-8 of the start f - f* is not dominated by the rounding of f itself
        pairs = [(a, b) for a, b in zip(full, gd) if b > 1e-8 * gd[0]]
        assert len(pairs) > 50
        assert max(abs(a - b) / b for a, b in pairs) < 1e-6, problem


def test_full_rank_link_equals_gd_step_on_w():
    problem = cv.linear_regression(torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(problem.shape, generator=g, dtype=cv.DTYPE)
    w = w0.clone().requires_grad_(True)
    gd_step = (w - 0.1 * torch.autograd.grad(problem.loss(w), w)[0]).detach()
    base = nn.Linear(cv.N_FEATURES, cv.N_FEATURES, bias=False, dtype=cv.DTYPE)
    with torch.no_grad():
        base.weight.copy_(w0)
    adapter = LoRALinear(base, cv.N_FEATURES, 1.0, "left", "gaussian")
    adapter.reset(g)
    cv.adapter_step_(adapter, RAC.prepare([adapter]), problem.loss, 0.1, "sketch")
    RAC.end_of_epoch([adapter], 1, 1, g)
    torch.testing.assert_close(base.weight.detach(), gd_step, rtol=0, atol=1e-11)


# ---- the counterexample (Figure 1) ----

@pytest.fixture(scope="module")
def figure1():
    problem, records = cv.counterexample_runs(seed=0, steps=4000)
    return problem, {(r["gamma_name"], r["label"]): r for r in records}


def test_rac_lora_with_the_theory_step_reaches_the_optimum(figure1):
    _, runs = figure1
    for gamma_name in cv.STEP_FRACTIONS:
        gaps = runs[gamma_name, "RAC-LoRA, sketch step"]["gaps"]
        assert gaps[-1] <= 1e-8 * gaps[0], gamma_name
        assert runs[gamma_name, "FPFT (GD)"]["status"] == "optimum"


def test_asymmetric_lora_stalls_far_above_the_optimum(figure1):
    problem, runs = figure1
    for key in [("1/L", "AsymmLoRA, sketch step"), ("1/(10L)", "AsymmLoRA, sketch step"),
                ("1/(10L)", "AsymmLoRA")]:
        gaps = runs[key]["gaps"]
        assert runs[key]["status"] == "stalled", key
        assert gaps[-1] >= problem.info["rank1_bound"] > 1e-2 * gaps[0], key  # rank 1 forever


def test_lora_and_cola_blow_up_at_step_1_over_l(figure1):
    """At seed 0 both overflow. (Over seeds 0-9: COLA 10/10; LoRA 2/10, the others stall at or
    oscillate above the rank-1 floor.) Plain-step RAC-LoRA blows up too: the 1/L step on the factor
    is 1/L times ||B||^2 on W, which is why the theory's step is scaled by (B^T B)^+."""
    _, runs = figure1
    for label in ("LoRA", "COLA", "RAC-LoRA"):
        assert runs["1/L", label]["status"] == "diverged", label


def test_smaller_step_lora_stays_far_from_optimum_but_cola_reaches_it(figure1):
    """The paper says both converge far from the optimum at smaller steps. Here LoRA does (it is rank
    1 forever), but COLA, which merges and re-draws its random factor, reaches the optimum."""
    problem, runs = figure1
    lora = runs["1/(10L)", "LoRA"]
    assert lora["status"] == "stalled" and lora["gaps"][-1] >= problem.info["rank1_bound"]
    assert runs["1/(10L)", "COLA"]["status"] == "optimum"
    assert runs["1/(10L)", "RAC-LoRA"]["status"] == "optimum"


def test_runs_are_deterministic_given_the_seed():
    _, a = cv.counterexample_runs(seed=5, steps=60)
    _, b = cv.counterexample_runs(seed=5, steps=60)
    _, c = cv.counterexample_runs(seed=6, steps=60)
    assert [r["gaps"] for r in a] == [r["gaps"] for r in b]
    assert [r["gaps"] for r in a] != [r["gaps"] for r in c]


def test_classify():
    assert cv.classify([1.0, 0.5, 1e-9]) == "optimum"
    assert cv.classify([1.0, 2.0, math.inf]) == "diverged"
    assert cv.classify([1.0] + [0.5] * 20) == "stalled"
    assert cv.classify([1.0] + [0.5 - 0.01 * i for i in range(20)]) == "decreasing"
    assert cv.classify([1.0] + [0.5, 0.1] * 10) == "oscillating"


# ---- the command line ----

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "convergence.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_writes_csv_and_plots(tmp_path):
    res, plots = tmp_path / "res", tmp_path / "figs"
    out = run_cli("--seed", "3", "--steps", "40", "--links", "30", "--rounds", "5", "--results_dir", str(res),
                  "--plots_dir", str(plots))
    assert out.returncode == 0, out.stderr
    assert "RAC-LoRA, sketch step" in out.stdout and "RAC-LoRA r=8" in out.stdout and "fed_rac_lora" in out.stdout
    for name in ("counterexample", "rates", "federated"):  # res_: the results folder's name (figure_prefix)
        assert (plots / f"convergence_res_{name}.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(res / "convergence.csv")))
    assert len(rows) == len(cv.STEP_FRACTIONS) * len(cv.COUNTEREXAMPLE_RUNS) + 2 * (1 + len(cv.RATE_RANKS)) + 16
    assert {r["steps"] for r in rows if r["experiment"] == "federated"} == {"5"}
    assert {r["seed"] for r in rows} == {"3"}
    assert {r["steps"] for r in rows if r["experiment"] == "counterexample" and r["status"] != "diverged"} == {"40"}
    assert not list(res.glob("*.tmp"))  # atomic write left no temp file behind


@pytest.mark.parametrize("args", [
    ["--steps", "0"], ["--seed", "-1"], ["--links", "many"], ["--nope", "1"],
    ["--seed="], ["--steps", ""], ["--seed", "1e3"], ["--seed", "0x10"], ["--seed", "\u0663"], ["--seed", "-1e3"],
    ["--seed", str(2 ** 63)], ["--seed", str(2 ** 64)], ["--seed", "9" * 5000], ["--steps", "-" + "9" * 5000],
    ["--steps", str(10 ** 12)], ["--steps", str(convergence.MAX_STEPS + 1)], ["--links", str(convergence.MAX_LINKS + 1)],
    ["--seed", "1", "--seed", "2"], ["--steps=5", "--steps=5"], ["--se", "1", "--seed", "1"],
    ["--nope\nx"], ["--seed", "1\n2"], ["--seed", "\u2028"], ["\x00"], ["--s", "1"], ["--="],
])
def test_cli_rejects_bad_values_in_one_line(args, capsys, tmp_path, monkeypatch):
    """main() parses before it does anything, so this is the whole story of a bad command line."""
    monkeypatch.setattr(cv, "counterexample_runs", None)  # a value that got through fails at once, not in hours
    with pytest.raises(SystemExit) as exit_info:
        convergence.main(args + ["--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("convergence.py: error:") and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_import_does_nothing(tmp_path, monkeypatch, capsys):
    """Re-executing the module body writes no file, prints nothing, touches no global RNG or setting."""
    monkeypatch.chdir(tmp_path)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    for module in (cv, convergence):
        importlib.reload(module)
    assert capsys.readouterr() == ("", "")
    assert not list(tmp_path.iterdir())
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads


def test_cli_accepts_the_edges_of_each_range():
    args = convergence.parse_args(["--seed", str(2 ** 63 - 1), "--steps", str(convergence.MAX_STEPS), "--links", " 0007 "])
    assert (args.seed, args.steps, args.links) == (2 ** 63 - 1, convergence.MAX_STEPS, 7)
    assert convergence.parse_args(["--seed=+0"]).seed == 0
    assert "ends within the hour" in " ".join(convergence._parser().format_help().split())


@pytest.mark.parametrize("field", ["results_dir", "plots_dir"])
def test_cli_checks_output_folders_before_computing(field, capsys, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(cv, "counterexample_runs", None)  # any compute would raise TypeError
    for bad in [str(tmp_path / "a_file"), "", "/proc/convergence", "a\x00b"]:
        folders = {"results_dir": str(tmp_path / "r"), "plots_dir": str(tmp_path / "p"), field: bad}
        with pytest.raises(SystemExit) as exit_info:
            convergence.main([arg for name, value in folders.items() for arg in (f"--{name}", value)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"convergence.py: error: {field}"), err
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted:"), (signal.SIGTERM, 143, "terminated:")])
@pytest.mark.slow
def test_cli_ctrl_c_and_sigterm_end_in_one_line(sig, code, word, tmp_path):
    """Sent while it computes (its first line says it started): one line, no traceback, the exit
    status of the signal, and no file written or left half-written."""
    res, plots = tmp_path / "res", tmp_path / "figs"
    proc = subprocess.Popen([sys.executable, str(ROOT / "convergence.py"), "--steps", "200000", "--results_dir",
                             str(res), "--plots_dir", str(plots)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        select.select([proc.stdout], [], [], 60)  # the first line: computing has begun
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(word) and "nothing was written" in lines[0], err
    assert "Traceback" not in out + err
    assert not [p for d in (res, plots) for p in d.iterdir()]  # both folders checked (made), nothing in them


@pytest.mark.slow
def test_cli_interrupted_while_plotting_says_what_was_written(tmp_path, capsys, monkeypatch):
    """... and the next run removed the temporary file of a writer that was killed, not a live one's."""
    res, plots = tmp_path / "res", tmp_path / "figs"
    plots.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = plots / f"convergence_res_rates.png.{int(dead.stdout)}.x1y2.tmp"  # its writer has exited
    live = plots / f"convergence_res_rates.png.{os.getpid()}.x3y4.tmp"  # this process: alive
    stale.write_bytes(b"half"), live.write_bytes(b"half")

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convergence, "plot_rates", ctrl_c)  # the command line draws with theory.central's
    try:
        code = convergence.main(["--steps", "20", "--links", "20", "--results_dir", str(res), "--plots_dir", str(plots)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main()")
    err = capsys.readouterr().err
    assert code == 130 and len(err.strip().splitlines()) == 1 and err.strip().startswith("interrupted: wrote"), err
    assert "convergence.csv" in err and "convergence_res_counterexample.png" in err and "not the rest" in err
    assert (res / "convergence.csv").exists() and (plots / "convergence_res_counterexample.png").exists()
    assert not stale.exists() and live.exists()
    assert not (plots / "convergence_res_rates.png").exists()


# --- the federated case (theory/federated.py) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def federated():
    from theory.federated import federated_runs

    torch.set_num_threads(1)
    return {(r["problem"].split(",")[0], r["inner_steps"], r["method"]): r for r in federated_runs(0, 200)}


def test_with_one_local_step_fed_rac_lora_reaches_the_optimum_as_fedavg_does(federated):
    for method in ("fedavg", "fed_rac_lora"):
        assert federated[("least squares", 1, method)]["status"] == "optimum", method
    logistic = federated[("logistic", 1, "fed_rac_lora")]["gaps"]
    assert logistic[-1] < 1e-5 * logistic[0]  # still falling at 200 rounds: mu = 0.5 and r/n = 1/4 make it slower


def test_ffa_lora_stalls_in_its_fixed_subspace_and_fedit_short_of_the_optimum(federated):
    for problem in ("least squares", "logistic"):
        for tau in (1, 5):
            for method in ("ffa_lora", "fedit"):
                gaps = federated[(problem, tau, method)]["gaps"]
                assert gaps[-1] > 0.1 * gaps[0], (problem, tau, method)


def test_several_local_steps_bias_fedavg_and_fed_rac_lora_alike(federated):
    """Client drift: with 5 local steps neither reaches f*; on least squares both settle at the same point."""
    avg, rac = (federated[("least squares", 5, m)]["gaps"][-1] for m in ("fedavg", "fed_rac_lora"))
    assert avg > 1e-3 * federated[("least squares", 5, "fedavg")]["gaps"][0]
    assert rac == pytest.approx(avg, rel=1e-6)
