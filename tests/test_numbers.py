"""Numbers on the command line are read as they are written and must survive the training dtype (issue 20):
``federated.py --lr 1e308`` and ``glue.py --lora_alpha 1e308`` were 43-70-line overflow tracebacks; digits of other
scripts (``--ranks ١٢``) and underscores were read as numbers silently."""
from __future__ import annotations

import pytest

import federated
import glue
import main
import scratch
from engine.settings import FLOAT32_MAX


@pytest.mark.parametrize("cli,argv,needle", [
    (federated, ["--lr", "1e308"], "lr 1e+308 is beyond float32's largest number (3.403e+38)"),
    (federated, ["--weight_decay", "1e308"], "weight_decay 1e+308 is beyond float32's largest number"),
    (glue, ["--lora_alpha", "1e308"], "lora_alpha 1e+308 is beyond float32's largest number"),
    (glue, ["--fpft_lr", "3.5e38"], "fpft_lr 3.5e+38 is beyond float32's largest number"),
    (main, ["--lr", "1e-320"], "lr 9.99989e-321 is 0 in float32"),
    (main, ["--weight_decay=-1e39"], "weight_decay -1e+39 is beyond float32's largest number"),
    (scratch, ["--lr", "1e39"], "lr 1e+39 is beyond float32's largest number"),
    (main, ["--ranks", "١٢"], "--ranks expects an integer in ASCII digits, got '١٢'"),
    (main, ["--ranks", "１２"], "--ranks expects an integer in ASCII digits, got '１２'"),
    (main, ["--max_epochs", "1_000"], "--max_epochs expects an integer in ASCII digits, got '1_000'"),
    (federated, ["--lr", "١e-3"], "--lr expects a number in ASCII digits, got '١e-3'"),
    (main, ["--seeds", " 1"], "--seeds expects an integer in ASCII digits, got ' 1'"),
])
def test_numbers_the_training_dtype_cannot_hold_or_that_are_not_ascii_are_refused_in_one_line(cli, argv, needle,
                                                                                            capsys):
    assert cli.main(argv + ["--results_dir", "/nonexistent-never-made"]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_the_limits_are_float32s():
    import torch

    assert FLOAT32_MAX == torch.finfo(torch.float32).max
    from config import from_argv

    assert from_argv(["--lr", "3.4e38"]).lr == 3.4e38  # the largest magnitudes float32 holds stay allowed
    assert from_argv(["--lr", "1.5e-45"]).lr == 1.5e-45
    assert from_argv(["--lr", ".5", "--ranks", "+3", "1"]).ranks == [3, 1]
