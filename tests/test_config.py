"""Config defaults, command-line overrides and range checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from config import Config, from_argv
from engine.settings import settings_hash
from raclora.errors import ConfigError


def test_defaults_match_the_experiment():
    c = Config()
    assert (c.method, c.sketch, c.ranks, c.seeds) == ("rac_lora", "left", [1, 2, 4, 8], [0, 1, 2])
    assert (c.lr, c.weight_decay, c.batch_size, c.max_epochs, c.patience) == (2e-4, 0.01, 128, 50, 10)
    assert (c.scaling, c.lora_alpha, c.merge_every, c.reset_optimizer_on_merge) == ("alpha", 1.0, 1, False)


def test_overrides_parse_types_and_lists():
    c = from_argv(["--method", "all", "--ranks", "1", "4", "--seeds", "0", "1", "2", "--max_epochs", "5",
                   "--lr", "1e-3", "--reset-optimizer-on-merge", "true", "--plots-only"])
    assert c.method == "all" and c.ranks == [1, 4] and c.seeds == [0, 1, 2] and c.max_epochs == 5
    assert c.lr == 1e-3 and c.reset_optimizer_on_merge is True and c.plots_only is True
    assert c.selected_methods() == ["lora", "cola", "asymmetric_lora", "rac_lora", "lora_plus", "cola_plus",
                                    "relora", "randlora", "pissa", "cola_pissa", "dora", "cola_dora", "rac_dora",
                                    "adalora"]
    assert from_argv(["--sketch", "both"]).selected_sketches() == ["left", "right"]


@pytest.mark.parametrize("argv,needle", [
    (["--method", "vera"], "unknown method 'vera'; allowed: lora, cola, asymmetric_lora, rac_lora, lora_plus, cola_plus, relora, randlora, pissa, cola_pissa, dora, cola_dora, rac_dora, adalora, all"),
    (["--ranks", "0"], "rank 0 is out of range"),
    (["--ranks", "-2"], "rank -2 is out of range"),
    (["--ranks", "65"], "from 1 to 64"),
    (["--ranks", "1.5"], "--ranks expects an integer"),
    (["--lr", "fast"], "--lr expects a number"),
    (["--lr", "0"], "lr must be positive"),
    (["--batch_size", "-1"], "batch_size must be an integer from 1 to 65536, got -1"),
    (["--sketch", "up"], "unknown sketch 'up'"),
    (["--scaling", "r"], "unknown scaling 'r'"),
    (["--random_init", "ones"], "unknown random_init 'ones'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--seeds", "0", "1", "0"], "seeds has repeated values"),
    (["--hidden", "0", "64"], "hidden must be one or more widths from 1 to 1048576"),
    (["--hidden", "99999999999999999"], "hidden must be one or more widths from 1 to 1048576"),  # was a traceback
    (["--resume", "maybe"], "--resume expects true or false"),
    (["--stack_size", "0"], "stack_size must be an integer from 1 to 1024"),
    (["--workers", "-1"], "workers must be 0 (one per core on CPU, 1 on a GPU) or positive up to 256"),
    # not numbers, or out of range (each of these trained, or gave a traceback, before)
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--lora_alpha", "inf"], "lora_alpha must be a finite number, got inf"),
    (["--weight_decay", "inf"], "weight_decay must be a finite number, got inf"),
    (["--weight_decay", "nan"], "weight_decay must be a finite number, got nan"),
    (["--dropout", "nan"], "dropout must be a finite number, got nan"),
    (["--loraplus_ratio=-inf"], "loraplus_ratio must be a finite number"),
    (["--seeds", str(2 ** 63)], "seed 9223372036854775808 is out of range: seeds must be integers from 0 to 2^63-1"),
    (["--seeds", "-1"], "seed -1 is out of range"),
    (["--base_seed", str(2 ** 64)], "base_seed must be an integer from 0 to 9223372036854775807"),
    (["--split_seed", str(2 ** 63)], "split_seed must be an integer from 0 to 9223372036854775807"),
    (["--val_size", "59999"], "val_size must be an integer from 1 to 50000 (at least 10000 of the 60000 training"),
    (["--max_epochs", str(10 ** 12)], "max_epochs must be an integer from 1 to 100000"),
    (["--seeds", "9" * 5000], "--seeds expects an integer"),  # past int()'s digit limit: still one line
    (["--ranks", "1", "--ranks", "2"], "--ranks is given more than once; give each option once (a list takes all"),
    (["--lr", "1e-3", "--lr=2e-3"], "--lr is given more than once"),
    (["--plots-only", "--plots_only", "false"], "--plots_only is given more than once"),
    (["--no_such_key", "1"], "unknown option --no_such_key"),
    # AdaLoRA's schedule (AdaLoraConfig's checks, and the lab's fractions)
    (["--adalora_warmup", "1.5"], "adalora_warmup must be a fraction in [0, 1), got 1.5"),
    (["--adalora_final", "nan"], "adalora_final must be a finite number, got nan"),
    (["--adalora_warmup", "0.6", "--adalora_final", "0.4"], "adalora_warmup + adalora_final must be below 1"),
    (["--adalora_beta1", "1"], "adalora_beta1 must be in (0, 1), got 1.0"),
    (["--adalora_beta2", "0"], "adalora_beta2 must be in (0, 1), got 0.0"),
    (["--adalora_orth_weight", "-0.1"], "adalora_orth_weight must be a number >= 0, got -0.1"),
    (["--adalora_orth_weight", "inf"], "adalora_orth_weight must be a finite number, got inf"),
    (["--adalora_init_ratio", "1"], "adalora_init_ratio must make each initial rank ceil(ratio x rank) exceed"),
    (["--adalora_init_ratio", "inf"], "adalora_init_ratio must be a finite number, got inf"),
    (["--adalora_interval", "0"], "adalora_interval must be an integer from 1 to"),
])
def test_bad_values_are_rejected_with_what_is_allowed(argv, needle):
    with pytest.raises(ConfigError) as e:
        from_argv(argv).check_setup()
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_the_allowed_fields():
    with pytest.raises(ConfigError) as e:
        from_argv(["--methd", "lora"])
    assert "--method" in str(e.value) and "--max_epochs" in str(e.value)


def test_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        from_argv(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    import dataclasses
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in out
    assert "AdamW learning rate" in out and "(default: 0.0002)" in out


def test_settings_hash_ignores_names_and_paths_but_not_settings():
    a = settings_hash(Config(), "cpu")
    assert settings_hash(Config(method="lora", ranks=[1], seeds=[5], results_dir="/x"), "cpu") == a
    assert settings_hash(Config(lr=1e-3), "cpu") != a
    assert settings_hash(Config(), "cuda") != a
    # the base model does not depend on adapter settings
    assert settings_hash(Config(scaling="alpha/r"), "cpu", kind="base") == settings_hash(Config(), "cpu", kind="base")
    assert settings_hash(Config(scaling="alpha/r"), "cpu") != a


def test_method_names_come_from_the_registry_and_the_registry_imports_no_torch():
    import subprocess
    import sys

    from raclora.methods import METHODS
    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match=f"unknown method 'x'; allowed: {', '.join(METHODS)}, all$"):
        Config(method="x")
    code = "import sys, raclora.methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_method_settings_are_config_fields_and_enter_only_their_methods_hashes():
    import dataclasses

    from raclora.methods import METHODS as REGISTRY

    fields = {f.name for f in dataclasses.fields(Config)}
    for m in REGISTRY.values():
        assert set(m.settings) <= fields, m.name
        for name in m.settings:
            value = getattr(Config(), name)  # another valid value: a fraction halved, the rest doubled
            changed = Config(**{name: value / 2 if isinstance(value, float) and value < 1 else value * 2})
            assert settings_hash(changed, "cpu", kind="adapter", method=m.name) != settings_hash(Config(), "cpu", kind="adapter", method=m.name)
            others = [o for o in REGISTRY if name not in REGISTRY[o].settings]
            assert all(settings_hash(changed, "cpu", kind="adapter", method=o) == settings_hash(Config(), "cpu", kind="adapter", method=o)
                       for o in others)


def test_the_committed_results_keep_their_hashes():
    """Every row in docs/results is found again by resume: its config, read back, hashes to its config_hash
    (a new setting must stay out of the hashes, or every recorded run would be orphaned)."""
    import glob
    import json

    import scratch
    import sweep
    from engine.results import read_rows
    from fed import study as fed_study
    from fed.config import FedConfig
    from scratch import ScratchConfig
    from sweep import run_hash
    from tests.conftest import ROOT

    checked = 0
    for path in glob.glob(str(ROOT / "docs" / "results" / "*runs.csv")):
        name = Path(path).name
        columns = (scratch if name.startswith("scratch_") else fed_study if name.startswith("fed_") else sweep).RUN_COLUMNS
        for r in read_rows(path, columns):
            if "form" in r:  # older rows recorded lte_heads as one number: today a list the plan sweeps
                config = json.loads(r["config"])
                heads = config.pop("lte_heads")
                cfg = ScratchConfig(**config, lte_heads=heads if isinstance(heads, list) else [heads])
                heads = r["heads"] if isinstance(heads, list) else heads
                got = scratch.run_hash(cfg, r["device"], r["form"], r["rank"], r["seed"],
                                       heads if r["form"] in ("lte", "lora") else None)
            elif "clients" in r:
                cfg = FedConfig(**json.loads(r["config"]))
                got = fed_study.run_hash(cfg, r["device"], r["method"], r["sketch"], r["rank"], r["seed"])
            else:
                cfg = Config(**json.loads(r["config"]))
                got = run_hash(cfg, r["device"], r["method"], r["sketch"], r["rank"], r["seed"])
            assert got == r["config_hash"], (path, r["config_hash"])
            checked += 1
    assert checked > 100


def test_the_table2_preset_sets_the_papers_protocol_and_yields_to_explicit_flags():
    from config import PRESETS

    c = from_argv(["--preset", "table2", "--method", "cola"])
    assert (c.merge_every, c.max_epochs, c.patience) == (10, 100, 100)  # 10 chains x 10 epochs, no early stop
    lora = from_argv(["--preset", "table2", "--method", "lora"])
    assert lora.max_epochs == c.max_epochs == 10 * c.merge_every  # LoRA: the same epochs in one piece
    shorter = from_argv(["--preset", "table2", "--max_epochs", "20", "--merge_every", "2"])
    assert (shorter.merge_every, shorter.max_epochs, shorter.patience) == (2, 20, 100)
    # a preset only sets fields: the same fields given by hand make the same runs (the same hashes)
    by_hand = from_argv(["--method", "cola", *[a for k, v in PRESETS["table2"].items() for a in (f"--{k}", str(v))]])
    assert settings_hash(c, "cpu", kind="adapter", method="cola") == settings_hash(by_hand, "cpu", kind="adapter", method="cola")
    with pytest.raises(ConfigError, match="unknown preset 'glue'; allowed: none, table2"):
        from_argv(["--preset", "glue"])


def test_model_fields_enter_only_their_models_hash():
    mlp, vit = Config(), Config(model="vit")
    assert settings_hash(mlp, "cpu") == settings_hash(Config(vit_dim=64), "cpu")  # the MLP ignores vit_*
    assert settings_hash(vit, "cpu") == settings_hash(Config(model="vit", hidden=[8]), "cpu")  # the ViT ignores hidden
    assert settings_hash(vit, "cpu") != settings_hash(Config(model="vit", vit_dim=64), "cpu")
    assert settings_hash(vit, "cpu") != settings_hash(mlp, "cpu")
    attention = Config(model="vit", target_modules=["attention"])
    assert settings_hash(attention, "cpu") != settings_hash(vit, "cpu")
    assert settings_hash(attention, "cpu", kind="fpft") == settings_hash(vit, "cpu", kind="fpft")  # FPFT has no adapters
