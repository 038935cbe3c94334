"""The Ray executor: a study's stacks as Ray tasks on a cluster (``--executor ray``), for runner.run_study.

Each stack is one Ray task that declares what it needs (``ray_cpus`` CPUs, one GPU when the study runs on CUDA);
Ray places it on any node with that much free. A task builds its study's trainer once per worker process (from
the study's picklable ``trainer_args``, put in Ray's object store once) and returns the stack's rows; only the
driver, this process, writes them to the results store, as each task ends, so the store's guarantees (atomic
rows, several writers, resume) are those of the local executor. A task whose worker process or node dies is
retried by Ray (``ray_retries`` times, system failures only: an exception in the study's own code is not
retried); its rows are written once, when it finally returns, so nothing is lost or written twice. A stack
whose retries are used up ends the sweep with one line; the stacks that finished are kept and a rerun resumes.

Ray is imported here, when a study asks for it, not by the runner's importers.
"""
from __future__ import annotations

import os
import socket
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from raclora.errors import ConfigError, RunFailed

RAY_QUIET = {  # set in this process before Ray starts: no usage reports, no accelerator warning per task
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
CONNECT_TIMEOUT_S = 3.0  # a host:port that does not accept a TCP connection in this time has no Ray head


def check_address(address: str) -> None:
    """ConfigError in one line, before any compute, for a ``ray_address`` that is malformed, or where no head node
    accepts a TCP connection; "auto" where no cluster runs on this machine ("" starts one: nothing to check)."""
    if address == "":
        return
    if address == "auto":
        address = running_cluster()
        if address is None:
            return  # this Ray has no way to tell without starting: connect says it, in one line
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"ray_address must be '', 'auto' or host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"no Ray head node answers at {address} ({type(e).__name__}); start one there with "
                          f"`ray start --head --port {port}`, or give --ray_address auto or ''") from None


def running_cluster() -> str | None:
    """The head node's address of the cluster ``ray start`` started on this machine (what "auto" joins), by Ray's
    own lookup (RAY_ADDRESS, its address file, its running GCS processes); ConfigError if there is none. None when
    this Ray version lacks that lookup (a private function of Ray's): then ray.init finds out."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die as lookup
    except ImportError:
        return None
    try:
        return lookup("auto")
    except ConnectionError:
        raise ConfigError("ray_address auto joins the Ray cluster running on this machine, and none runs here; "
                          "start one with `ray start --head`, or give --ray_address host:port or ''") from None


def connect(address: str) -> None:
    """Start Ray on this machine (``address`` "") or join a running cluster ("auto": the one ``ray start`` started
    on this machine; "host:port": its head node's GCS). A cluster that is not there is a ConfigError in one line:
    Ray itself would print a traceback."""
    import ray

    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_QUIET.items()})
    check_address(address)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level="ERROR", log_to_driver=True,
                 configure_logging=True)
    except ConnectionError as e:
        raise ConfigError(f"no Ray cluster to join at ray_address {address!r}: "
                          f"{' '.join(str(e).split())[:200]}") from None


@contextmanager
def session(address: str) -> Iterator[None]:
    """Ray for the block (connect), said in one line (its nodes, CPUs and GPUs); this driver disconnects after it,
    however it ends (a cluster it joined keeps running; one it started on this machine stops)."""
    import ray

    connect(address)
    try:
        have, alive = ray.cluster_resources(), sum(n["Alive"] for n in ray.nodes())
        where = f"the Ray cluster at {address}" if address else "a Ray instance started on this machine"
        tqdm.write(f"executor: {where}, {alive} node{'s' if alive != 1 else ''}, {int(have.get('CPU', 0))} CPUs, "
                   f"{int(have.get('GPU', 0))} GPUs")
        yield
    finally:
        ray.shutdown()


def slots(cpus: int, gpus: int) -> int:
    """How many stacks the cluster runs at once: its CPUs over each task's, or its GPUs over each task's."""
    import ray

    have = ray.cluster_resources()
    n = have.get("GPU", 0) // gpus if gpus else have.get("CPU", 0) // cpus
    return max(1, int(n))


def run_stacks(jobs: list[list[dict]], make_trainer: Callable, trainer_args: tuple, work: Callable,
               record: Callable[[list], None], progress: Callable[[int], None], *, cpus: int, gpus: int,
               retries: int) -> Counter:
    """Train every stack of ``jobs`` as a Ray task: ``work(trainer, specs)`` on a worker (runner.train), with the
    trainer ``make_trainer(*trainer_args, show_epochs=False)`` built once per worker process. ``record(results)``
    and ``progress(runs)`` run here, as each task ends, in the order they end. Returns how many stacks each node
    trained (by node id). On a failure (retries used up, Ctrl-C) the tasks still queued or running are cancelled
    and the error goes on: RunFailed in one line for a task that failed."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    task = ray.remote(_train_stack).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                            retry_exceptions=False)
    args = ray.put(trainer_args)  # once: every task reads the same copy (the base model's weights among them)
    pending = {task.remote(make_trainer, [args], work, specs, cpus): specs for specs in jobs}
    nodes: Counter = Counter()
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            specs = pending.pop(ref)
            try:
                results, node = ray.get(ref)
            except RayTaskError as e:  # the study's code raised on the worker: its own error, as run locally
                raise (e.cause if isinstance(e.cause, BaseException) else e) from None
            except RayError as e:  # the worker or its node died more often than ray_retries allow, or Ray could not
                # run the task at all (a node without this project's modules: the first line says which)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise RunFailed(f"a stack of {len(specs)} run{'s' if len(specs) != 1 else ''} failed on Ray "
                                f"({type(e).__name__}: {first}), with up to {retries} retr"
                                f"{'ies' if retries != 1 else 'y'}; the finished stacks are recorded, run again to "
                                f"resume") from None
            record(results)
            progress(len(results))
            nodes[node] += 1
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return nodes


_TRAINER: tuple[str, object] | None = None  # this Ray worker's trainer, with the id of the args it was built from


def _train_stack(make_trainer: Callable, args_box: list, work: Callable, specs: list[dict], threads: int):
    """One stack on a Ray worker: (its rows, the node's id). ``args_box`` holds the trainer arguments' object ref,
    in a list so that Ray passes the ref, not its value: the trainer is built from it only once per process."""
    import ray

    global _TRAINER
    torch.set_num_threads(threads)
    key = args_box[0].hex()
    if _TRAINER is None or _TRAINER[0] != key:
        _TRAINER = (key, make_trainer(*ray.get(args_box[0]), show_epochs=False))
    return work(_TRAINER[1], specs), ray.get_runtime_context().get_node_id()


def summary(nodes: Counter) -> str:
    """"ray: N stacks trained on K nodes (n1, n2, ...)": how the cluster shared the work."""
    total = sum(nodes.values())
    return (f"ray: {total} stack{'s' if total != 1 else ''} trained on {len(nodes)} node{'s' if len(nodes) != 1 else ''} "
            f"({', '.join(str(n) for n in nodes.values())})")
