"""The loopback check of tests/conftest.py (tests that start Flower or bind a port skip in one line when
127.0.0.1 is down), and fed.deploy._bin finding Flower's console scripts beside the running interpreter
(an unactivated venv: its bin/ is not on PATH)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import tests.conftest as conftest


class _DeadSocket:
    """A socket.socket whose bind fails as it does when the loopback interface is down."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def settimeout(self, timeout):
        pass

    def bind(self, address):
        raise OSError(99, "Cannot assign requested address")


class _SilentSocket(_DeadSocket):
    """One that binds and listens, but that no connection reaches."""

    def bind(self, address):
        pass

    def listen(self, backlog):
        pass

    def getsockname(self):
        return ("127.0.0.1", 40000)


def test_a_loopback_that_is_down_is_one_line_and_skips(monkeypatch):
    monkeypatch.setattr(conftest.socket, "socket", _DeadSocket)
    problem = conftest.loopback_problem()
    assert problem == ("needs the loopback interface 127.0.0.1, which is down here "
                       "(OSError: [Errno 99] Cannot assign requested address)")
    with pytest.raises(pytest.skip.Exception) as e:
        conftest.skip_without_loopback(problem)
    assert str(e.value) == problem and "\n" not in str(e.value)


def test_a_connection_that_times_out_is_one_line(monkeypatch):
    """Bound, but nothing answers the connect within the timeout."""
    def no_answer(address, timeout=None):
        assert timeout == 2.0  # the check never waits longer
        raise TimeoutError("timed out")

    monkeypatch.setattr(conftest.socket, "socket", _SilentSocket)
    monkeypatch.setattr(conftest.socket, "create_connection", no_answer)
    assert conftest.loopback_problem() == ("needs the loopback interface 127.0.0.1, which is down here "
                                           "(TimeoutError: timed out)")


def test_the_loopback_check_passes_when_127_0_0_1_answers(loopback):
    assert conftest.loopback_problem() is None
    conftest.skip_without_loopback(None)  # no skip


def test_the_flower_runs_ask_for_the_loopback_check(request):
    """Every test of tests/test_flower.py that starts a federation gets the loopback fixture; the others do
    not."""
    items = {item.name: item for item in request.session.items if item.path.name == "test_flower.py"}
    if not items:
        pytest.skip("tests/test_flower.py is not collected in this run")
    starts_flower = {name for name, item in items.items()
                     if {"deployment", "simulation"} & set(item.function.__code__.co_names)}
    if not starts_flower:
        pytest.skip("no test of tests/test_flower.py that starts Flower is selected in this run")
    assert all("loopback" in items[name].fixturenames for name in starts_flower)
    assert not any("loopback" in item.fixturenames for name, item in items.items() if name not in starts_flower)


def test_flower_scripts_are_found_beside_the_interpreter_without_path(tmp_path, monkeypatch):
    """An unactivated venv: PATH holds none of its scripts; _bin still finds them beside sys.executable, and a
    federation's processes get that folder first on their PATH (Flower starts flower-superexec from PATH)."""
    from fed.deploy import Flower, _bin

    beside = Path(sys.executable).parent / "flwr"
    if not beside.is_file():
        pytest.skip(f"flwr is not installed beside {sys.executable}")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert _bin("flwr") == str(beside)
    with Flower(tmp_path / "flwr") as fl:  # starts nothing
        assert fl.env["PATH"].split(os.pathsep)[0] == str(beside.parent)
        assert str(empty) in fl.env["PATH"].split(os.pathsep)


def test_a_missing_flower_script_is_one_line_naming_where_it_looked(tmp_path, monkeypatch):
    import sysconfig

    from fed.deploy import _bin

    venv_bin, scripts, path = tmp_path / "venv" / "bin", tmp_path / "scripts", tmp_path / "path"
    for folder in (venv_bin, scripts, path):
        folder.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(scripts))
    monkeypatch.setenv("PATH", str(path))
    with pytest.raises(FileNotFoundError) as e:
        _bin("flwr")
    message = str(e.value)
    assert "\n" not in message and str(venv_bin) in message and str(scripts) in message and "PATH" in message
    # the sysconfig folder comes second, PATH last
    script = scripts / "flwr"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert _bin("flwr") == str(script)
    (path / "flwr").write_text("#!/bin/sh\n")
    (path / "flwr").chmod(0o755)
    assert _bin("flwr") == str(script)
    script.unlink()
    assert _bin("flwr") == str(path / "flwr")
