"""What every study's settings share: the shared fields, the declared help and checks of every field, the one
rule of what enters a run's hash, and the ``--field value`` command line.

A study declares its settings as a dataclass that subclasses ``StudyConfig`` (config.py: main.py's Config;
fed/config.py, scratch.py, glue.py: their own), each field with ``arg(default, help, ...)``:

    merge_every: int = arg(1, "epochs between merges", range=(1, 100_000), only={"kind": ("adapter",)})

``help`` is what ``--help`` prints; ``choices``, ``range`` and ``positive`` are checked when the config is made
(ConfigError, one line); ``hash`` and ``only`` say which runs' hashes the field enters (``settings_hash``).
Importing this module imports no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Callable, ClassVar

from raclora.errors import ConfigError

MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed takes a 64-bit integer; seeds are 0..2^63-1
MAX_WORKERS = 256
DEVICES = ("auto", "cpu", "cuda", "mps")
EXECUTORS = ("local", "ray")  # where the runner trains a study's stacks (engine/runner.py, engine/cluster.py)
REPORT_TO = ("none", "tensorboard")  # experiment trackers of every recorded run (engine/tracking.py)
_NOTHING = object()


def arg(default, help: str, *, choices: tuple | Callable[[], tuple] | None = None, item: str | None = None,
        range: tuple | None = None, positive: bool = False, hash: bool = True, only: dict | None = None):
    """A settings field: its default, its one-line help, its checks and its hash rule.

    choices: the allowed values (a tuple, or a function returning one: a registry read at check time), of the
    value or of each value of a list (``item`` names one in the error: "unknown task ..."); range: (lo, hi) of
    an integer (hi = inf: a number >= lo); positive: a number > 0;
    hash: False for fields that never change what a run computes (folders, resume, progress, what to run);
    only: {name: allowed values}: the field enters the hash of a run only when the run's context (settings_hash's
    keyword arguments) or, for a name it does not give, the config's own field has one of those values.
    """
    meta = dict(help=help, choices=choices, item=item, range=range, positive=positive, hash=hash, only=only or {})
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def override(cls, name: str, default=_NOTHING, **changes):
    """The field ``name`` of ``cls`` redeclared by a subclass with another default, help or check, the rest kept."""
    f = cls.__dataclass_fields__[name]
    meta = {**f.metadata, **changes}
    if default is _NOTHING:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return arg(default, **meta)


@dataclass
class StudyConfig:
    """The fields every study has. A study's config subclasses this; ``override`` changes a default there."""
    seeds: list[int] = arg([0, 1, 2], "one run per seed of everything else the study sweeps", hash=False)
    lr: float = arg(2e-4, "AdamW learning rate", positive=True)
    weight_decay: float = arg(0.01, "AdamW decoupled weight decay", range=(0, math.inf))
    batch_size: int = arg(128, "examples per step", range=(1, 65536))
    data_dir: str = arg("./data", "torchvision root: MNIST's raw files live in <data_dir>/MNIST/raw", hash=False)
    results_dir: str = arg("./results", "folder of the results CSVs (runs, curves) and checkpoints", hash=False)
    plots_dir: str = arg("./plots", "folder of the figures (PNG)", hash=False)
    device: str = arg("auto", "auto picks cuda, then mps, then cpu", choices=DEVICES, hash=False)
    resume: bool = arg(True, "skip runs already recorded under the same config hash and code fingerprint",
                       hash=False)
    resume_any_code: bool = arg(False, "with resume, also skip runs recorded by other versions of the code "
                                       "(said in one line)", hash=False)
    plots_only: bool = arg(False, "redraw the plots from the CSVs and exit, training nothing", hash=False)
    progress: bool = arg(True, "show progress bars", hash=False)
    report_to: str = arg("none", "tensorboard: also write each recorded run (curves, final metrics, settings) as a "
                                 "TensorBoard run in <results_dir>/tensorboard/<study>/<config_hash>/",
                         choices=REPORT_TO, hash=False)

    # what varies from run to run within one config (a sweep's method, kind of run, form), with the value a
    # hash takes when it is not given: the context that fields' ``only`` reads (settings_hash)
    RUN_KEYS: ClassVar[dict] = {}
    # the context values settings_hash adds to the hashed fields besides the device (fed, glue: the method)
    HASHED_CONTEXT: ClassVar[tuple[str, ...]] = ()
    # fields added after results were committed, at the value every older run had: at that value they stay out
    # of the hash, so that those runs keep their hashes
    ADDED_LATER: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first bad field and what it may be: the declared checks, then the study's own."""
        check_fields(self)
        check_seeds(self.seeds)
        self.check()

    def check(self) -> None:
        """A study's checks across fields (after every field passed its own)."""
    def check_setup(self) -> None:
        """The checks that need the data's and the model's sizes; run after parsing, before any compute."""
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_fields(cfg) -> None:
    """Every field's declared checks, in declaration order: finite numbers, choices (of a value, or of each value
    of a list), an integer's range, positive numbers. Lists' own rules (not empty, no repeats) are the study's
    ``check``: check_seeds, check_ranks."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if isinstance(value, float):
            training_dtype_number(f.name, value)
        choices = meta.get("choices")
        if choices is not None:
            allowed = choices() if callable(choices) else choices
            for v in value if isinstance(value, list) else [value]:
                choice(meta.get("item") or f.name, v, allowed)
        if meta.get("range") is not None:
            lo, hi = meta["range"]
            if not lo <= value <= hi:
                raise ConfigError(f"{f.name} must be >= {lo}, got {value}" if hi == math.inf else
                                  f"{f.name} must be an integer from {lo} to {hi}, got {value}")
        if meta.get("positive"):
            positive(f.name, value)


FLOAT32_MAX = struct.unpack("f", b"\xff\xff\x7f\x7f")[0]  # 3.4028234663852886e+38, torch.finfo(float32).max


def training_dtype_number(name: str, value: float) -> None:
    """A number setting must be finite, and stay what it says in float32, the dtype every study trains in:
    not beyond float32's largest (``1e308`` is finite in Python, inf in a float32 tensor, and a learning rate
    or scale of inf trains nothing but nan), and not a nonzero value that float32 rounds to 0."""
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{name} {value:g} is beyond float32's largest number ({FLOAT32_MAX:.4g}), the dtype "
                          f"the suite trains in; give a value of magnitude up to {FLOAT32_MAX:.4g}")
    if value != 0 and struct.unpack("f", struct.pack("f", value))[0] == 0:
        raise ConfigError(f"{name} {value:g} is 0 in float32, the dtype the suite trains in; give 0 or a "
                          f"magnitude of at least 1.4e-45")


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise ConfigError("seeds is empty: give at least one seed, e.g. --seeds 0 1 2")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed {seed} is out of range: seeds must be integers from 0 to 2^63-1 = {MAX_SEED}")
    no_repeats("seeds", seeds)


def check_ranks(ranks: list[int]) -> None:
    """Ranks are positive; the upper bound depends on the model's layers (each study's check_setup)."""
    if not ranks:
        raise ConfigError("ranks is empty: give at least one rank, e.g. --ranks 1 2 4 8")
    for r in ranks:
        if r < 1:
            raise ConfigError(f"rank {r} is out of range: ranks must be integers from 1 to the largest "
                              f"min(in, out) among the model's layers")
    no_repeats("ranks", ranks)


def no_repeats(name: str, values: list) -> None:
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} has repeated values {values}; give each at most once")


def check_workers(workers: int) -> None:
    if not 0 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be 0 (one per core on CPU, 1 on a GPU) or positive up to {MAX_WORKERS}, "
                          f"got {workers}")


def choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def positive(name: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")


# --- the one rule of a run's hash ---------------------------------------------------------------------------

def hashed_settings(cfg: StudyConfig, **context) -> dict:
    """The fields that change what a run computes in ``context`` (e.g. kind="adapter", method="rac_lora"): every
    field but those declared ``hash=False``, those whose ``only`` the context does not meet (a name of RUN_KEYS is
    read from the context, any other from the config's own field), and those still at the value they had
    before they existed (ADDED_LATER)."""
    unknown = set(context) - set(cfg.RUN_KEYS)
    if unknown:
        raise ValueError(f"{type(cfg).__name__} runs have no {', '.join(sorted(unknown))}; they have "
                         f"{', '.join(cfg.RUN_KEYS) or 'nothing that varies'}")
    context = {**cfg.RUN_KEYS, **context}
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not f.metadata.get("hash", True):
            continue
        if f.name in cfg.ADDED_LATER and value == cfg.ADDED_LATER[f.name]:
            continue
        if all((context[k] if k in context else getattr(cfg, k)) in allowed
               for k, allowed in f.metadata.get("only", {}).items()):
            out[f.name] = value
    return out


def settings_hash(cfg: StudyConfig, device: str, **context) -> str:
    """Hash of every field that changes a run in ``context`` (hashed_settings), with the resolved device type
    ("cpu", "cuda", ...: random streams differ by device) and the context values the study names in
    HASHED_CONTEXT."""
    d = hashed_settings(cfg, **context)
    d["device"] = device
    for k in cfg.HASHED_CONTEXT:
        d[k] = context[k]
    return stable_hash(d)


def stable_hash(obj) -> str:
    """First 12 hex digits of the SHA-256 of obj's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --- command line -------------------------------------------------------------------------------------------

def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)\Z", re.IGNORECASE)


def _parse_int(text: str) -> int:
    """A decimal integer in ASCII digits with an optional sign: Python's int() also takes other scripts' digits
    ("٣"), underscores ("1_000") and spaces, which a command line should not read as a number silently."""
    if not _INT.match(text):
        raise ValueError(text)
    return int(text)


def _parse_float(text: str) -> float:
    """A decimal number in ASCII (digits, point, exponent; inf and nan are parsed and then refused by the
    field checks with their own message), for the reasons of _parse_int."""
    if not _FLOAT.match(text):
        raise ValueError(text)
    return float(text)


_TYPES = {"int": _parse_int, "float": _parse_float, "str": str, "bool": _parse_bool,
          "list[int]": _parse_int, "list[float]": _parse_float, "list[str]": str}
_TYPE_WORDS = {_parse_int: "an integer in ASCII digits", _parse_float: "a number in ASCII digits", str: "a string",
               _parse_bool: "true or false"}


def from_argv(argv: list[str] | None, cls: type, prog: str, description: str = "", presets: dict | None = None):
    """``cls`` from its defaults plus ``--field value`` overrides; ConfigError on anything unknown.

    Fields are named with underscores or dashes (``--max_epochs`` or ``--max-epochs``); a bool flag alone
    (``--plots-only``) means true; ``--help`` prints each field's declared help. ``presets``: named sets of
    fields (the ``preset`` field picks one), applied unless the command line gives the same field too.
    """
    defaults = cls()
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.fields = cls
    for f in help_order(cls):
        kind = str(f.type)
        conv = _TYPES[kind]
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kw = dict(dest=f.name, type=_typed(f.name, conv), default=getattr(defaults, f.name), action=_Once,
                  help=f.metadata.get("help") or " ", metavar=kind.upper().replace("[", "_").replace("]", ""))
        if kind.startswith("list"):
            kw["nargs"] = "+"
        elif conv is _parse_bool:
            kw["nargs"] = "?"
            kw["const"] = True
        parser.add_argument(*names, **kw)
    args = vars(parser.parse_args(argv))
    given = args.pop(_Once.GIVEN, set())
    for name, value in (presets or {}).get(args.get("preset"), {}).items():  # a preset's fields, unless given too
        if name not in given:
            args[name] = value
    return cls(**args)


class _Once(argparse.Action):
    """Store the option's value, refusing a second occurrence (argparse would silently keep the last)."""
    GIVEN = "_options_given"

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.GIVEN, None)
        if given is None:
            given = set()
            setattr(namespace, self.GIVEN, given)
        if self.dest in given:
            hint = f" (a list takes all its values after one flag: --{self.dest} 1 2 4)" if self.nargs == "+" else ""
            raise ConfigError(f"--{self.dest} is given more than once; give each option once{hint}")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _typed(name: str, conv):
    def convert(text: str):
        try:
            return conv(text)
        except ValueError:
            raise ConfigError(f"--{name} expects {_TYPE_WORDS[conv]}, got {text!r}") from None
    return convert


def help_order(cls) -> list[dataclasses.Field]:
    """``cls``'s fields, the study's own first: those declared by the config class itself, then by each base class
    in turn (StudyConfig's shared fields last), each group in declaration order."""
    def owner(f: dataclasses.Field) -> int:
        return next(i for i, c in enumerate(cls.__mro__) if f.name in c.__dict__.get("__annotations__", {}))
    return sorted(dataclasses.fields(cls), key=owner)


def allowed_fields(cls) -> str:
    return ", ".join(f"--{f.name}" for f in help_order(cls))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors raised as ConfigError instead of usage + exit."""
    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            tokens = message.split(":", 1)[1].split()
            bad = " ".join(t for t in tokens if t.startswith("-")) or " ".join(tokens)
            raise ConfigError(f"unknown option {bad}; allowed: {allowed_fields(self.fields)} (see --help)")
        raise ConfigError(f"{message} (see --help)")

    def _get_value(self, action, arg_string):
        # argparse turns a ValueError from `type` into its own message; keep ours, which says what is allowed
        try:
            return action.type(arg_string) if callable(action.type) else arg_string
        except ConfigError:
            raise
