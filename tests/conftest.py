"""Shared fixtures: a small seeded MLP and inputs, the MNIST tasks loaded once per session, and the loopback
check (127.0.0.1) of the tests that start Flower or bind a port."""
from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch

from models import build_model

ROOT = Path(__file__).resolve().parent.parent


def assert_stack_forward_equals_each_copy(base, stacked, x, dtype=torch.float64) -> None:
    """Perturb every weight of ``stacked`` (a StackedModel of ``base``) so that its runs differ, then check
    that its output for run i equals a plain copy of ``base`` holding run i's weights (1e-12)."""
    with torch.no_grad():
        for p in stacked.parameters():  # three different models
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=dtype))
        out = stacked(x)
        for i in range(stacked.runs):
            ref = copy.deepcopy(base).eval()
            ref.load_state_dict(stacked.run_state(i))
            torch.testing.assert_close(out[i], ref(x), rtol=0, atol=1e-12)

# One torch thread in the test process: the suite's tensors are small, and two threads on a 2-core machine spin
# against any other load (a second pytest, a test's workers) and make small tests 10-30x slower (the fast lane:
# 2 min with one thread, 11 min with two beside another pytest run). Subprocesses choose their own.
torch.set_num_threads(1)


def mlp(hidden, dropout: float, generator, device="cpu"):
    """The suite's MLP for tasks A/B (models.build_model "mlp") with these hidden widths and dropout."""
    from data import DIGITS

    return build_model("mlp", dict(hidden=list(hidden), dropout=dropout), DIGITS.shape, DIGITS.classes, generator,
                       device)


@pytest.fixture
def base_model():
    """The 784-64-64-5 MLP with nn.Linear-style weights drawn from a seeded generator, in eval mode."""
    g = torch.Generator().manual_seed(1234)
    model = mlp([64, 64], 0.1, g, "cpu")
    with torch.no_grad():  # non-trivial biases too, so that a wrong merge cannot hide behind zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def inputs():
    return torch.randn(32, 784, generator=torch.Generator().manual_seed(99))


@pytest.fixture(scope="session")
def mnist_tasks():
    from data import load_tasks

    return load_tasks(ROOT / "data", 5000, 0, "cpu")


def loopback_problem(timeout: float = 2.0) -> str | None:
    """None when a socket bound on 127.0.0.1:0 accepts a connection within ``timeout`` seconds; else why not, in
    one line, as the reason to skip a test that needs the loopback interface."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.settimeout(timeout)
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname()[:2], timeout=timeout):
                server.accept()[0].close()
    except OSError as e:  # TimeoutError included
        detail = " ".join(str(e).split()) or "no message"
        return f"needs the loopback interface 127.0.0.1, which is down here ({type(e).__name__}: {detail})"
    return None


def skip_without_loopback(problem: str | None) -> None:
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def loopback():
    """Skips the test when 127.0.0.1 cannot be reached (checked once per session: a session fixture's skip is
    kept and raised again for every later test that asks for it)."""
    skip_without_loopback(loopback_problem())


def needs_loopback(item) -> bool:
    """A test marked ``loopback``, or one that starts a Flower federation on 127.0.0.1 or takes a port: its code
    names fed.deploy's Flower and calls its deployment() or simulation(), or it names free_port."""
    code = getattr(getattr(item, "function", None), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    return (item.get_closest_marker("loopback") is not None or "free_port" in names
            or ("Flower" in names and bool({"deployment", "simulation"} & names)))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_loopback(item) and "loopback" not in item.fixturenames:
            item.fixturenames.insert(0, "loopback")


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory):
    """One tiny main.py sweep (1 epoch), its folders, and its arguments: made once, copied by the tests that
    change it (test_robustness.py, test_disk_full.py)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("robust")
    args = ["--method", "lora", "--ranks", "1", "--seeds", "0", "1", "--max_epochs", "1", "--workers", "1",
            "--results_dir", out / "results", "--plots_dir", out / "plots", "--progress", "false"]
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, args
