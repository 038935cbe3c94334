"""Property-based fuzzing of every command line (main, scratch, federated, glue, convergence): any argument list
gives a valid config or one clean error (one line, no traceback), never another exception; a config that parsed
holds only numbers that float32, the training dtype, holds as they are (issue 20: 1e308, 1e30, huge ranks,
other scripts' digits)."""
from __future__ import annotations

import contextlib
import dataclasses
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convergence
from config import Config, from_argv
from engine.settings import from_argv as parse
from engine.settings import FLOAT32_MAX
from fed.config import FedConfig
from glue import GlueConfig
from scratch import ScratchConfig
from raclora.errors import ConfigError

NASTY = ["nan", "NaN", "inf", "-inf", "+inf", "1e308", "1e-320", "0", "-0", "-1", "1", "2", "64", "65", "0.5",
         "1.5", "1e3", str(2 ** 63 - 1), str(2 ** 63), str(2 ** 64), "9" * 40, "9" * 5000, "", " ", "true", "false",
         "maybe", "lora", "rac_lora", "all", "both", "left", "cpu", "cuda", "mnist", "sgd", "galore", "/proc/x",
         "é", "\x00", "\n", "--", "-", "=", "-h", "--=", "1 2", "0x10", "1_000", "٣",
         # what found issue 20's cases: beyond float32, under it, huge ranks, digits of other scripts
         "1e30", "3.4e38", "3.5e38", "1e39", "-1e308", "1e-46", "1e-320", "65536", "65537", "1000000", str(10 ** 9),
         "١٢", "１２", "²", "߁", "1e308", "-1e30"]


def _flags(cls) -> list[str]:
    names = [f.name for f in dataclasses.fields(cls)] if cls is not None else ["seed", "steps", "links",
                                                                                "results_dir", "plots_dir"]
    return [f"--{n}" for n in names] + [f"--{n.replace('_', '-')}" for n in names if "_" in n] + \
        [f"--{n}={v}" for n in names[:4] for v in ("", "nan", "1")] + ["--nope", "--seed", "-x", "--plots-only"]


def argv_strategy(cls):
    token = st.one_of(st.sampled_from(_flags(cls)), st.sampled_from(NASTY),
                      st.text(max_size=12), st.integers(min_value=-2 ** 70, max_value=2 ** 70).map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr))
    return st.lists(token, max_size=12).filter(lambda argv: not {"-h", "--help"} & set(argv))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _numbers(cfg):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        yield from ((f.name, v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, float))


@pytest.mark.parametrize("cls,prog", [(Config, "main.py"), (ScratchConfig, "scratch.py"), (FedConfig, "federated.py"),
                                      (GlueConfig, "glue.py")])
def test_config_command_lines_give_a_config_or_one_clean_error(cls, prog):
    @FUZZ
    @given(argv_strategy(cls))
    def check(argv):
        try:
            cfg = parse(argv, cls, prog=prog)
            assert isinstance(cfg, cls)
            cfg.validate()  # a config that parsed is a valid one
            for name, v in _numbers(cfg):  # and holds numbers the training dtype holds as they are
                assert abs(v) <= FLOAT32_MAX and (v == 0 or abs(v) >= 1e-45), (name, v)
            if cls is not GlueConfig:  # glue's setup checks read a model folder: tests/test_glue_checks.py
                cfg.check_setup()  # the checks that need the data's and the model's sizes answer in one line too
        except ConfigError as e:
            message = str(e)
            assert message and len(message.splitlines()) == 1 and "Traceback" not in message
    check()


def test_convergence_command_line_gives_arguments_or_one_clean_error():
    @FUZZ
    @given(argv_strategy(None))
    def check(argv):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = convergence.parse_args(argv)
        except SystemExit as e:
            text = err.getvalue()
            assert e.code == 2 and text.startswith("convergence.py: error:"), (argv, text)
            assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, (argv, text)
        else:
            assert 0 <= args.seed <= 2 ** 63 - 1 and args.steps >= 1 and args.links >= 1
    check()


@pytest.mark.parametrize("argv", [["--seeds", "1\n2"], ["--method", "a\nb"], ["--hidden=\n"], ["\x1e0"]])
def test_a_line_break_in_a_value_stays_on_one_line(argv):
    with pytest.raises(ConfigError) as e:
        from_argv(argv)
    assert len(str(e.value).splitlines()) == 1
