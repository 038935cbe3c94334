"""One runner for every study: plan -> run hash -> resume -> stacks -> worker processes -> rows.

A study (the adaptation sweep of sweep.py, the from-scratch study of scratch.py) supplies a ``Study``:
its plan, what identifies a run, which runs may share a stack, and how to build the object that trains
one stack. The runner skips the runs already recorded under the same hash, groups the rest into stacks,
trains them in this process, on worker processes or as tasks on a Ray cluster (engine/cluster.py:
``executor``), and writes each finished stack's rows to the results store (results.upsert_runs), from this
process alone, as soon as it is done.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from raclora.errors import ConfigError, DataError
from engine import cluster
from engine.provenance import code_fingerprint, provenance
from engine.results import Columns, figure_prefix, mixed_code_note, read_results, read_runs, same_code, upsert_runs
from engine.tracking import catch_up, track


@dataclass
class Study:
    """What a study supplies; the runner does the rest."""
    plan: list[dict]  # every run asked for, in order; a spec is a dict of what names the run
    run_hash: Callable[[dict], str]  # spec -> the config_hash its row is recorded under
    stack_key: Callable[[dict], tuple]  # runs with the same key may share a stack
    make_trainer: Callable  # make_trainer(*trainer_args, show_epochs) -> object with .run(specs) -> rows
    code: str  # the study's module: it and what it imports make the code fingerprint (provenance.code_fingerprint)
    trainer_args: tuple  # picklable: worker processes build their own trainer from them
    run_columns: Columns  # the runs rows' columns and types (ending with results.RECORD_COLUMNS)
    curve_columns: Columns  # the curve rows'
    trainer: object | None = None  # this process's trainer, if already built (it may hold the loaded data)
    prefix: str = ""  # results/<prefix>runs.csv and <prefix>curves.csv
    balance: bool = True  # split stacks so that no worker idles (stacks()); False: one stack per key chunk
    order: Callable[[list[dict]], object] | None = None  # sort key of the stacks; None: biggest first on workers


def run_study(study: Study, cfg, device: torch.device) -> list[dict]:
    """Train every run of ``study.plan`` not yet recorded (``cfg.resume``) and return the runs rows of
    the whole plan: those already recorded, in plan order, then the new ones as they finish. A recorded
    run counts only if the same code made it (its code_fingerprint), unless ``cfg.resume_any_code``.
    Every run recorded is tracked as ``cfg.report_to`` asks (engine.tracking), those recorded before too.
    Uses cfg.results_dir, stack_size, workers, executor (local worker processes, or Ray: engine.cluster and its
    ray_address, ray_cpus, ray_retries), resume, resume_any_code, progress and report_to."""
    results_dir = Path(cfg.results_dir)
    fingerprint = code_fingerprint(study.code)
    done = recorded_runs(cfg, study.prefix, fingerprint, study.run_columns, study.curve_columns)
    tracked = catch_up(results_dir, study.prefix, study.run_columns, study.curve_columns, cfg.report_to)
    if tracked:
        tqdm.write(f"{cfg.report_to}: {tracked} recorded run{'s' if tracked != 1 else ''} tracked in "
                   f"{results_dir / 'tensorboard'}")
    rows, todo = [], []
    for spec in study.plan:
        key = study.run_hash(spec)
        if key in done:
            rows.append(done[key])
        else:
            todo.append(spec)
    tqdm.write(f"{len(todo)} run{'s' if len(todo) != 1 else ''} to train, {len(rows)} already recorded "
               f"(code fingerprint {fingerprint})")
    others = sum(not same_code(r, fingerprint, False) for r in rows)
    if others:
        tqdm.write(f"note: {others} of the recorded runs kept were made by other versions of the code "
                   f"(--resume_any_code)")
    on_ray = cfg.executor == "ray" and bool(todo)  # Ray is started (or joined) only when there is work for it
    gpus = 1 if device.type == "cuda" else 0  # a stack on a GPU takes one (a Ray task declares it)
    with cluster.session(cfg.ray_address) if on_ray else nullcontext():
        slots = cluster.slots(cfg.ray_cpus, gpus) if on_ray else (cpu_count() if device.type == "cpu" else 1)
        workers = cfg.workers or slots
        jobs = stacks(todo, cfg.stack_size, workers if study.balance else 1, study.stack_key)
        workers = min(workers, len(jobs))
        if study.order is not None:
            jobs.sort(key=study.order)
        elif workers > 1 or on_ray:
            jobs.sort(key=len, reverse=True)  # biggest first: the small ones fill the gaps at the end

        def record(results: list[tuple[dict, list[dict]]]) -> None:
            rows.extend(record_results(results_dir, results, fingerprint, study.prefix, study.run_columns,
                                       study.curve_columns, cfg.report_to))

        bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not cfg.progress)
        with bar:
            if on_ray:
                nodes = cluster.run_stacks(jobs, study.make_trainer, study.trainer_args, train, record, bar.update,
                                           cpus=cfg.ray_cpus, gpus=gpus, retries=cfg.ray_retries)
                tqdm.write(cluster.summary(nodes))
            elif workers <= 1:
                trainer = study.trainer or study.make_trainer(*study.trainer_args, show_epochs=True)
                for specs in jobs:
                    record(train(trainer, specs))
                    bar.update(len(specs))
            else:
                threads = max(1, cpu_count() // workers)
                tqdm.write(f"{workers} worker processes, {threads} thread{'s' if threads > 1 else ''} each")
                with worker_pool(workers, threads, _init_worker, (study.make_trainer, study.trainer_args)) as pool:
                    for results in pool.imap_unordered(_work, jobs):
                        record(results)
                        bar.update(len(results))
    return rows


def train(trainer, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """``trainer.run(specs)``, each runs row stamped with the machine that trained it (provenance), in the
    process that trained it: a worker's threads are not the parent's."""
    results = trainer.run(specs)
    for row, _ in results:
        row.update(provenance(row["device"]))
    return results


def report(cfg, study_rows: list[dict] | None, wanted: set[str], summary: Callable[[list[dict]], str],
           draw: Callable[[list[dict], list[dict], str, str], list], run_columns: Columns, curve_columns: Columns,
           prefix: str = "") -> None:
    """The end of every study: the summary table, one line if the rows mix code versions, the figures, and
    where the results are. The table shows ``study_rows`` (this invocation's runs; None with --plots-only:
    every run recorded under the current settings); the figures show every run recorded under the current
    settings (``wanted``: their settings hashes), so comparisons built up over several invocations appear
    together; their names start with results.figure_prefix (the study's prefix, the results folder's name), which
    ``draw(runs, curves, plots_dir, name_prefix)`` puts first. DataError when no recorded run was made with these
    settings."""
    runs_csv = Path(cfg.results_dir) / f"{prefix}runs.csv"
    runs, curves = read_results(cfg.results_dir, prefix, run_columns, curve_columns)
    plot_rows = [r for r in runs if r["settings_hash"] in wanted]
    if not plot_rows:
        raise DataError(f"no runs in {runs_csv} were made with these settings; run the study first, "
                        f"or give --plots-only the same overrides the study was run with")
    print()
    print(summary(study_rows if study_rows is not None else plot_rows))
    note = mixed_code_note(plot_rows)
    if note:
        print(note)
    for path in draw(plot_rows, curves, cfg.plots_dir, figure_prefix(cfg.results_dir, prefix)):
        print(f"wrote {path}")
    print(f"results in {runs_csv} and {Path(cfg.results_dir) / f'{prefix}curves.csv'}")


def recorded_runs(cfg, prefix: str, fingerprint: str, run_columns: Columns,
                  curve_columns: Columns | None = None) -> dict[str, dict]:
    """{config_hash: row} of the runs that resume may skip: landed in <prefix>runs.csv and made by the
    code of ``fingerprint`` (any code with ``cfg.resume_any_code``), with all their curve rows (given
    ``curve_columns``: results.read_runs); {} without ``cfg.resume``."""
    recorded = (read_runs(Path(cfg.results_dir) / f"{prefix}runs.csv", run_columns, curve_columns)
                if cfg.resume else [])
    return {r["config_hash"]: r for r in recorded if same_code(r, fingerprint, cfg.resume_any_code)}


def record_results(results_dir, results: list[tuple[dict, list[dict]]], fingerprint: str, prefix: str,
                   run_columns: Columns, curve_columns: Columns, report_to: str = "none") -> list[dict]:
    """Stamp finished runs with ``fingerprint`` (and the machine, if not yet) and write them (runs row, curve rows) to the results
    store (results.upsert_runs), then track them as ``report_to`` asks (engine.tracking: one TensorBoard run each);
    returns their runs rows."""
    for row, _ in results:
        row["code_fingerprint"] = fingerprint
        for k, v in provenance(row["device"]).items():  # rows trained in this process (runner.train stamps the rest)
            row.setdefault(k, v)
    upsert_runs(results_dir, [r for r, _ in results], [c for _, cs in results for c in cs], prefix=prefix,
                run_columns=run_columns, curve_columns=curve_columns)
    track(results_dir, prefix, results, run_columns, curve_columns, report_to)
    return [r for r, _ in results]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda, then mps, then cpu; an explicit device that is not available is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' is not available on this machine; allowed here: auto, cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' is not available on this machine; allowed here: auto, cpu")
    return torch.device(name)


def stacks(plan: list[dict], stack_size: int, workers: int, key: Callable[[dict], tuple]) -> list[list[dict]]:
    """Group runs into stacks: runs with the same ``key(spec)`` may share one, at most ``stack_size``
    runs, sizes as even as possible. With several workers, the biggest stack is halved while there
    are fewer stacks than workers or it holds more than a worker's even share of the runs, so that
    no worker idles while another trains a big stack."""
    groups: dict[tuple, list[dict]] = {}
    for spec in plan:
        groups.setdefault(key(spec), []).append(spec)
    out = [chunk for specs in groups.values() for chunk in even_chunks(specs, stack_size)]
    share = math.ceil(len(plan) / workers)  # runs per worker if the work were spread evenly
    while out and (len(out) < workers or max(map(len, out)) > share) and max(map(len, out)) > 1:
        big = max(range(len(out)), key=lambda i: len(out[i]))
        s = out.pop(big)
        out[big:big] = [s[:len(s) // 2], s[len(s) // 2:]]
    return out


def even_chunks(items: list, size: int) -> list[list]:
    """``items`` cut into the fewest pieces of at most ``size``, their lengths as even as possible."""
    k = math.ceil(len(items) / size)
    return [items[i * len(items) // k:(i + 1) * len(items) // k] for i in range(k)]


# --- worker processes ---------------------------------------------------------------------------
_WORKER = None  # this worker process's trainer (Study.make_trainer(*Study.trainer_args, show_epochs=False))


def _init_worker(make_trainer: Callable, args: tuple) -> None:
    global _WORKER
    _WORKER = make_trainer(*args, show_epochs=False)


def _work(specs: list[dict]) -> list[tuple[dict, list[dict]]]:
    return train(_WORKER, specs)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal this process gets when its parent dies
PARENT_POLL_S = 0.5  # the fallback watcher's period, where prctl is not available


def _die_with_parent(parent: int, use_prctl: bool = True) -> str:
    """Make this worker process end at once when ``parent`` (the process that started it) dies, however
    it dies (SIGKILL included, where no handler of the parent's can run): otherwise an orphaned worker
    trains on until its job ends and only then finds the parent gone. Returns how: "prctl" or "poll".

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG). The kernel sends it
    when the parent *thread* that forked this process ends, not the parent process: worker_pool's Pool
    starts its workers from the parent's main thread, which lives as long as the process. (A Pool only
    starts workers from its handler thread to replace one that died, or with maxtasksperchild, which we
    do not use: such a replacement would be killed when the pool shuts down, by then with no job left.)
    Elsewhere, a daemon thread polls os.getppid() every PARENT_POLL_S seconds. Either way, a parent
    that died before this ran (the process start takes seconds) is seen here: we exit at once.
    """
    import sys

    how = "poll"
    if use_prctl and sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
            prctl.restype = ctypes.c_int
            if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):  # no libc symbol: fall back to polling
            pass
    if os.getppid() != parent:  # the parent died before the death signal was armed: its job is gone
        os._exit(1)
    if how == "poll":
        import threading

        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    return how


def _watch_parent(parent: int, period: float = PARENT_POLL_S) -> None:
    """Exit this process at once (no clean-up: the parent that would read the results is gone) when
    its parent process is no longer ``parent`` (an orphan is re-parented to init or a subreaper)."""
    while os.getppid() == parent:
        time.sleep(period)
    os._exit(1)


def _start_worker(parent: int, from_main_thread: bool, threads: int, init, initargs: tuple) -> None:
    _die_with_parent(parent, use_prctl=from_main_thread)  # first: the rest (loading data) takes seconds
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    # tqdm's default lock holds a multiprocessing RLock, and in a spawned process that is a named
    # semaphore registered with the parent's resource tracker: a worker stopped by pool.terminate()
    # (Ctrl-C, SIGTERM) never unregisters it, and the tracker then prints "leaked semaphore objects"
    # after the one-line message. Workers draw no bars: a thread lock is all they need.
    import threading

    import tqdm.std

    tqdm.std.tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    init(*initargs)


@contextmanager
def worker_pool(workers: int, threads: int, init, initargs: tuple):
    """``workers`` spawned processes of ``threads`` torch threads each, ignoring Ctrl-C, set up by
    ``init(*initargs)``. If the body raises (Ctrl-C, SIGTERM as cli.Terminated, a failed job) the workers
    are stopped at once and the exception goes on; what the body already recorded is kept. If this
    process dies without a chance to stop them (SIGKILL, a crash), they die with it (_die_with_parent).

    main.py, scratch.py and federated.py call it from the main thread: the workers are started here, by the calling
    thread, and on Linux their death signal is tied to that thread's life (see _die_with_parent); from
    another thread, which may end before the pool does, the workers poll for their parent instead. No
    maxtasksperchild, so the Pool never starts workers from its own handler thread."""
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    pool = mp.get_context("spawn").Pool(workers, _start_worker, (os.getpid(), main_thread, threads, init, initargs))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()  # every job is done: let the workers exit on their own
    pool.join()
