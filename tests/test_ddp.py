"""Multi-process training (issue 21): the ChainCallback under Trainer's DistributedDataParallel, on CPU (gloo).

tests/ddp_train.py trains RAC-LoRA (left sketch, r = 2 on query and value, a merge every 5 steps) on a tiny random
BERT, float64, every dropout off, twice: ``torchrun --nproc_per_node 2`` with a per-process batch of 4, and plain
``python`` (no process group at all) with a batch of 8. Both runs take the same 8 examples at every step, in the
same order:

- Trainer's sampler is a RandomSampler that accelerate replaces with its SeedableRandomSampler
  (``use_seedable_sampler``, on by default): epoch e's order is ``randperm`` seeded with data_seed + e, the same in
  every process and in both runs;
- accelerate then batches that order by the per-process batch (4) and gives process p the batches p, p + 2,
  p + 4, ... (BatchSamplerShard, ``split_batches=False``, the default): step s of the two processes reads
  positions 8s .. 8s + 7 of the order, the 8 examples that the one process reads at its step s with a batch of 8;
- 96 examples are 12 global batches exactly, so no process pads its last batch by going round again
  (``even_batches``), and dataloader_drop_last has nothing to drop; 3 epochs are 36 steps in both runs;
- DDP averages the two processes' gradients, each the mean over its 4 examples: the mean over the 8, as the one
  process computes it, up to the order of the float64 sums. That needs ``average_tokens_across_devices=False``
  in TrainingArguments (transformers 5.24): with the default, Trainer multiplies every process's loss by the
  number of processes, which is right for a loss it divides by the token count of all processes together but not
  for a sequence classifier's mean; the gradient is then twice as large, clipping and AdamW's eps make it another
  run (measured: 1.5e-2 the largest weight difference).

Asserted: the same merge steps; the same final weights (every one, the base weights the merges changed included)
in both processes bit for bit, and in the one-process run to 1e-10 (measured: 4.2e-16; the base weights moved by
more than 1e-3); both processes drew the same re-sampled factors at every merge, bit for bit, and the same as the
one process. The processes talk over 127.0.0.1 only; every process started is in a session of its own, killed
with its group whatever happens. About 22 s on 2 idle CPU cores (35 s beside other jobs), most of it importing
torch and transformers.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fed.deploy import free_port, live_in_groups

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "ddp_train.py"
BATCH, PROCESSES = 4, 2  # per process in the DDP run; the one-process run takes BATCH * PROCESSES
TIMEOUT = 240  # seconds for each run (about 30 s here)
TOL = 1e-10  # float64; measured 4.2e-16


def _env(port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    if Path("/sys/class/net/lo").exists():  # gloo's own sockets on the loopback interface, not the host's address
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:  # in a session of its own, so that its group (torchrun's workers) can be killed
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    """Waits for ``proc`` (TIMEOUT), then kills its process group, leftovers included; fails with its log's tail
    if it did not exit 0 in time."""
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _kill_group(proc)
    tail = log.read_text(errors="replace")[-4000:]
    assert code is not None, f"{proc.args} still running after {TIMEOUT} s:\n{tail}"
    assert code == 0, f"{proc.args} exited with {code}:\n{tail}"


def _descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (Linux /proc): torchrun's workers, each in a session of its own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, ...
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        out += (found := children.get(todo.pop(), []))
        todo += found
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """Stops ``proc`` and everything below it: SIGTERM first (torchrun then stops its workers itself), SIGKILL
    after 10 s to its group and to the groups of the processes found below it (torchrun's workers start sessions
    of their own, out of reach of a kill of torchrun's group, and would outlive it)."""
    groups = [proc.pid, *_descendants(proc.pid)]  # a worker's group is its own pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    for pid in live_in_groups(groups):  # one that left its group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _largest(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_train_the_same_weights_and_draw_the_same_factors_as_one(tmp_path):
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    env = _env(free_port())
    procs = []
    try:  # both at once (3 processes on 2 cores: the time is mostly imports)
        procs.append((_start([str(SCRIPT), str(one), "--batch", str(BATCH * PROCESSES)], tmp_path / "one.log", env),
                      tmp_path / "one.log"))
        procs.append((_start(["-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_addr",
                              "127.0.0.1", "--master_port", env["MASTER_PORT"], "--max_restarts", "0", str(SCRIPT),
                              str(ddp), "--batch", str(BATCH)], tmp_path / "ddp.log", env), tmp_path / "ddp.log"))
        for proc, log in procs:
            _finish(proc, log)
    finally:  # a run left behind when the other failed
        for proc, _ in procs:
            if proc.returncode is None:
                _kill_group(proc)

    single = torch.load(one / "rank0.pt")
    ranks = [torch.load(ddp / f"rank{r}.pt") for r in range(PROCESSES)]
    assert single["world_size"] == 1 and all(r["world_size"] == PROCESSES for r in ranks)
    assert single["global_step"] == 36 and all(r["global_step"] == 36 for r in ranks)
    want = list(range(5, 36, 5))
    assert single["merge_steps"] == want and all(r["merge_steps"] == want for r in ranks)

    # the weights: the merges moved the base weights, the two processes agree bit for bit, the one process to TOL
    base = [k for k in single["weights"] if "base_layer.weight" in k]
    assert base and min(_largest({k: single["weights"][k]}, {k: single["start"][k]}) for k in base) > 1e-3
    for r in ranks[1:]:
        assert all(torch.equal(r["weights"][k], ranks[0]["weights"][k]) for k in r["weights"])
    diff = _largest(single["weights"], ranks[0]["weights"])
    print(f"largest weight difference, 1 process vs {PROCESSES}: {diff:.3g}")
    assert diff <= TOL, diff

    # the random factors: re-drawn at every merge, the same bits in every process and in the one-process run
    draws = single["factors"]
    assert len(draws) == len(want) + 1
    assert all(not torch.equal(draws[i][k], draws[i + 1][k]) for i in range(len(want)) for k in draws[i])
    for r in ranks:
        assert len(r["factors"]) == len(draws)
        for i, (got, ref) in enumerate(zip(r["factors"], draws)):
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), f"draw {i} differs"
