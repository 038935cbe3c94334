"""The library installs: `pip install .` and `pip install -e .` from a copy of the project, then a user's script in
another folder, beside its own models.py, lora.py and config.py, imports raclora and runs the PEFT controller.

The venv sees this interpreter's packages (--system-site-packages, --no-deps: nothing is downloaded), so what is
tested is the package's own build and layout, not pip's resolver.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

USERS_SCRIPT = '''
import sys

import models, lora, config  # the user's own modules, not the lab's
assert models.MINE and lora.MINE and config.MINE, "the user's modules were shadowed"

import torch
from torch import nn
from peft import LoraConfig, get_peft_model

import raclora
from raclora.methods import METHODS
from raclora.peft_chain import ChainController

net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
chain = ChainController(model, method="rac_lora", sketch="left", random_init="gaussian", seed=0)
opt = chain.optimizer(lr=1e-2)
x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
for _ in range(5):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
model.eval()
before = model(x)
assert chain.merge(opt)
assert torch.allclose(model(x), before, atol=1e-12), "a merge changed the function"
print("ok", raclora.__file__, len(METHODS))
'''


def _venv(tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own: this interpreter's pip and setuptools (requirements-dev.txt) serve it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    return venv / "bin" / "python"


def _copy_of_the_project(tmp_path):
    """What a fresh clone holds of the package: its source, pyproject.toml and the README it names."""
    src = tmp_path / "project"
    shutil.copytree(ROOT / "raclora", src / "raclora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def _users_folder(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    for name in ("models", "lora", "config"):
        (user / f"{name}.py").write_text(f"MINE = True  # the user's own {name}.py\n")
    (user / "script.py").write_text(textwrap.dedent(USERS_SCRIPT))
    return user


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_the_package_installs_and_the_peft_controller_runs_beside_a_users_own_modules(tmp_path, editable):
    python = _venv(tmp_path)
    project = _copy_of_the_project(tmp_path)
    target = ["-e", str(project)] if editable else [str(project)]
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *target],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    user = _users_folder(tmp_path)
    run = subprocess.run([python, "script.py"], cwd=user, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok "), run.stdout
    where = run.stdout.split()[1]
    assert str(ROOT) not in where  # the installed package, not the lab's folder
    assert (str(project) in where) == editable
    if not editable:  # what was installed: the raclora package alone, no module under a generic name
        files = subprocess.run([python, "-m", "pip", "show", "-f", "raclora"], capture_output=True, text=True,
                               timeout=120).stdout.split("Files:", 1)[1].split()
        tops = {f.split("/")[0] for f in files}
        assert tops <= {"raclora", "raclora-0.2.0.dist-info"}, tops
