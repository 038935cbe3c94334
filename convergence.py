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

3. Federated (theory/federated.py). Four clients with different data (least squares and logistic), every client
   in every round taking 1 or 5 gradient steps: FedAvg, FedIT, FFA-LoRA and Fed-RAC-LoRA at rank 2, for
   --rounds rounds: does Fed-RAC-LoRA reach FedAvg's optimum, and where do the others stop?

Outputs: results/convergence.csv (one row per run, with its seed and settings),
plots/convergence_counterexample.png, plots/convergence_rates.png, plots/convergence_federated.png (with a
--results_dir named other than "results", say r2: plots/convergence_r2_*.png, so that two never overwrite), and
three tables on stdout, each file
written whole (atomically) once everything is computed. --steps <= 1,000,000 and --links <= 500,000
keep a run under an hour (see MAX_STEPS); Ctrl-C or SIGTERM ends it with one line (exit 130 or 143).
The problems, steps, runs, figures and tables are theory/central.py's and theory/federated.py's; this file is
their command line. Nothing here runs at import.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from typing import Callable

import torch

from engine.cli import Terminated
from engine.results import figure_prefix, git_commit
from raclora.errors import ConfigError, one_line
from raclora.files import clean_stale_tmp, prepare_output_dir
from theory.central import (COUNTEREXAMPLE_RUNS, RATE_RANKS, STEP_FRACTIONS, counterexample_runs, format_tables,
                            plot_counterexample, plot_rates, rate_runs, write_csv)
from theory.federated import federated_runs, format_table, plot_federated

PREFIX = "convergence_"  # plots/convergence_*.png (engine.results.figure_prefix: after it, a results folder's name)
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
    """errors.one_line(text) (a newline in an argument cannot break the line), cut to ``limit`` characters."""
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
    p.add_argument("--plots_dir", default="plots", action=_Once,
                   help="where the convergence_*.png figures go (convergence_<results folder's name>_*.png for a "
                        "--results_dir not named results)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a Namespace, or one line "convergence.py: error: ..." on stderr and
    SystemExit(2) (--help: SystemExit(0)); never another exception. Touches no file."""
    return _parser().parse_args(argv)


def prepare_outputs(args: argparse.Namespace) -> None:
    """Check (and create) the output folders before any compute, and delete the temporary files that a
    writer killed mid-write left there; ConfigError in one line if a folder will not do."""
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

    problem, cx = counterexample_runs(args.seed, args.steps)
    rates = rate_runs(args.seed, args.links)
    fed = federated_runs(args.seed, args.rounds)
    figure = os.path.join(args.plots_dir, figure_prefix(args.results_dir, PREFIX))  # + the figure's name
    outputs = [(os.path.join(args.results_dir, "convergence.csv"),
                lambda path: write_csv(cx + rates + fed, path, args.seed, git_commit())),
               (f"{figure}counterexample.png", lambda path: plot_counterexample(cx, path)),
               (f"{figure}rates.png", lambda path: plot_rates(rates, path)),
               (f"{figure}federated.png", lambda path: plot_federated(fed, path))]
    for path, write in outputs:
        write(path)
        written.append(path)
    print(format_tables(problem, cx, rates))
    print()
    print(format_table(fed))
    print(f"seed {args.seed}; wrote {args.results_dir}/convergence.csv and {figure}*.png "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
