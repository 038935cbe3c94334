"""What every command line (main.py, scratch.py, federated.py) shares: one-line errors, exit codes, Ctrl-C and SIGTERM,
output folders checked (and killed writers' temporary files removed) before any compute."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable
from engine.cluster import check_address
from engine.runner import cpu_count, resolve_device
from engine.tracking import require
from raclora.errors import ConfigError, EXPECTED, one_line
from raclora.files import clean_stale_tmp, prepare_output_dir


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: worker processes are stopped and finished runs are kept."""


def run_command(parse: Callable[[], object], body: Callable[[object], None], runs_csv: Callable[[object], Path]) -> int:
    """``cfg = parse()``, then ``body(cfg)``; returns the exit status.

    A bad setting, missing or corrupt data, an unreadable checkpoint or results file, a file the disk
    refuses: "error: ..." on one line, exit 2. Ctrl-C: say where the finished runs are kept, exit 130 (SIGTERM: 143). The
    heavy modules are imported only after parsing, so that --help and bad options answer at once.
    """
    try:
        cfg = parse()
        cfg.check_setup()  # the checks that need the data's and the model's sizes
        prepare_outputs(cfg)
        check_memory(cfg)
        require(cfg.report_to)  # the tracker's package is installed
        if getattr(cfg, "executor", "local") == "ray" and not cfg.plots_only:  # a Ray head node is there
            check_address(cfg.ray_address)
    except EXPECTED as e:
        return fail(e)


    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        body(cfg)
    except EXPECTED as e:
        return fail(e)
    except KeyboardInterrupt as e:
        print(f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}: finished runs are kept in "
              f"{runs_csv(cfg)}; run the same command again to continue where it stopped", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def prepare_outputs(cfg) -> None:
    """Check (and create) the config's output folders before any compute, and delete the temporary files
    that a writer killed mid-write left there (results, checkpoints, figures)."""
    for field in ("results_dir", "plots_dir"):
        if hasattr(cfg, field):
            folder = prepare_output_dir(field, getattr(cfg, field))
            for sub in (folder, folder / "checkpoints"):
                clean_stale_tmp(sub)


def check_memory(cfg) -> None:
    """Refuse, before any compute, a model and stack that this machine cannot hold (check_fits)."""
    if getattr(cfg, "plots_only", False):
        return

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        import torch

        check_fits(cfg, torch.cuda.mem_get_info(device)[0], 1, "the GPU")
    else:
        check_fits(cfg, available_memory(), (cfg.workers or cpu_count()) if device.type == "cpu" else 1,
                   "this machine")


def memory_need_bytes(sizes: tuple[int, int, int], runs_per_stack: int, processes: int) -> int:
    """Rough peak bytes a sweep needs, from one run's (parameters, activation floats of one evaluation pass,
    image floats): per run, every parameter six times in float32 (base copy, trained copy, gradient, AdamW's
    two moments, best-so-far snapshot) and the activations; times the runs of a stack and the worker
    processes, each of which also holds the images."""
    params, activations, images = sizes
    return processes * (runs_per_stack * 4 * (6 * params + activations) + 4 * images)


def check_fits(cfg, available_bytes: int, processes: int, where: str) -> None:
    """ConfigError when the model and stack asked for need more memory than ``available_bytes``."""
    need = memory_need_bytes(cfg.sizes(), cfg.runs_per_stack(), processes)
    if need > available_bytes:
        what = f"hidden {cfg.hidden}" if getattr(cfg, "model", "mlp") == "mlp" else f"the {cfg.model}"
        raise ConfigError(f"{what} needs about {need / 2 ** 30:.1f} GiB ({cfg.runs_per_stack()} runs "
                          f"per stack x {processes} process{'es' if processes > 1 else ''}) but {where} has "
                          f"{available_bytes / 2 ** 30:.1f} GiB available; use narrower layers, fewer runs at once "
                          f"(--stack_size; federated.py: --clients x --participation) or fewer --workers")


def available_memory() -> int:
    """Bytes of memory free for new work: MemAvailable from /proc/meminfo, else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _on_sigterm(signum, frame):
    raise Terminated()


def fail(e: Exception) -> int:

    print(f"error: {one_line(str(e))}", file=sys.stderr)
    return 2
