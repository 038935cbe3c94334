"""The experiment: base model on task A, FPFT on task B, then method x sketch x rank x seed adapters.

Each run draws every random number (initial factors, re-sampled sketches, dropout masks, batch
order) from one torch.Generator seeded with the run's seed, and is written to the results files
as soon as it finishes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from statistics import mean
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import Config
from engine.settings import settings_hash, stable_hash
from raclora.errors import ConfigError
from data import Task, vocabulary
from engine.build import build_run, config_model
from raclora.factors import lora_scale
from raclora.methods import METHODS, display_order, get_method
from models import MODELS, count_trainable, generate, meta_model, model_settings, set_generator, target_linears
from raclora.errors import DIVERGED
from raclora.files import atomic_write_via
from engine.provenance import code_fingerprint
from engine.results import (RECORD_COLUMNS, Index, format_table, group, mean_std, pct, seeds_cell, split_diverged,
                            summary_table)
from engine.runner import Study, record_results, recorded_runs, resolve_device, run_study
from engine.stack import evaluate_stack, train_stack
from train import Record, evaluate, train


# runs.csv and curves.csv: their columns and types (the store parses by them)
RUN_COLUMNS = {"method": str, "sketch": str, "rank": int, "seed": int, "status": str, "trainable_params": int,
               "epochs": int, "best_epoch": int, "best_val_loss": float, "test_acc_b": float, "test_acc_a": float,
               "test_loss_b": float, "test_loss_a": float, "sample": str,
               "merges": int, "diverged_step": int, "model": str, "target_modules": str, "scaling": str,
               "lora_alpha": float, "random_init": str, "merge_every": int, "reset_optimizer_on_merge": bool,
               "lr": float, "weight_decay": float, "batch_size": int, "max_epochs": int, "patience": int,
               **RECORD_COLUMNS}
CURVE_COLUMNS = {"config_hash": str, "method": str, "sketch": str, "rank": int, "seed": int,
                 "epoch": Index("epochs"), "train_loss": float, "val_loss": float, "val_acc": float, "test_acc_b": float,
                 "merged": bool, "ranks": str}  # ranks: AdaLoRA's kept per adapted layer (module order), else empty

LAYER_DIMS_NOTE = "note: rank {r} exceeds min(in, out) = {m} of the {i}->{o} layer; its update there has rank at most {m}"


def run_plan(cfg: Config) -> list[dict]:
    """Every run the config asks for, in order: FPFT seeds, then method x sketch x rank x seed."""
    plan = [dict(method="fpft", sketch=None, rank=None, seed=s) for s in cfg.seeds] if cfg.run_fpft else []
    for method in cfg.selected_methods():
        # RandLoRA has no sketch (no zero/random factor pair): one run per rank and seed, sketch None
        for sketch in cfg.selected_sketches() if get_method(method).uses_sketch else [None]:
            for rank in cfg.ranks:
                for seed in cfg.seeds:
                    plan.append(dict(method=method, sketch=sketch, rank=rank, seed=seed))
    return plan


def _kind(method: str) -> str:
    """Which settings a run depends on: "base" and "fpft" ignore the adapter-only fields."""
    return method if method in ("base", "fpft") else "adapter"


def run_hash(cfg: Config, device: str, method: str, sketch: str | None, rank: int | None, seed: int) -> str:
    return stable_hash([settings_hash(cfg, device, kind=_kind(method), method=method), method, sketch, rank, seed])


class Sweep:
    """Runs the plan of ``cfg``; ``rows`` collects the runs.csv rows of this sweep (resumed ones too)."""

    def __init__(self, cfg: Config, commit: str):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.commit = commit
        self.results_dir = Path(cfg.results_dir)
        self.tasks = cfg.load_tasks(self.device)
        self.fingerprint = code_fingerprint(__name__)
        self.done = recorded_runs(cfg, "", self.fingerprint, RUN_COLUMNS, CURVE_COLUMNS)
        self.rows: list[dict] = []

    # --- the base model, trained once per setting and cached as a checkpoint ---
    def base_checkpoint(self) -> Path:
        """Where the base model of these settings is saved (base_model trains it when it is not there)."""
        return self.results_dir / "checkpoints" / f"base_{self.base_key()}.pt"

    def base_key(self) -> str:
        return run_hash(self.cfg, self.device.type, "base", None, None, self.cfg.base_seed)

    def base_model(self) -> torch.nn.Module:
        cfg, dev = self.cfg, self.device.type
        key, ckpt = self.base_key(), self.base_checkpoint()
        model = config_model(cfg, None, self.device)
        record, problem = load_checkpoint(ckpt, model, self.tasks["A"]) if ckpt.exists() else (None, None)
        if record is not None:
            tqdm.write(f"base model: loaded {ckpt} (checksum, finite weights and validation loss verified)")
        else:
            if problem:
                tqdm.write(f"base model: checkpoint {ckpt} {problem}; not used, training the base model again")
            g = torch.Generator(device=self.device).manual_seed(cfg.base_seed)
            model = config_model(cfg, g, self.device)
            set_generator(model, g)
            bar = _epoch_bar(cfg, f"base model ({cfg.text_a if cfg.takes_tokens() else 'digits 0-4'})")
            with bar:
                record = train(model, list(model.parameters()), self.tasks["A"], generator=g,
                               progress=lambda row: bar.update(1), **_train_kw(cfg))
            if record.status == DIVERGED:
                raise ConfigError(f"the base model diverged (its training loss was not finite at step "
                                  f"{record.diverged_step}); lower --lr (now {cfg.lr})")
            save_checkpoint(ckpt, model, record, cfg)
        if key not in self.done:
            spec = dict(method="base", sketch=None, rank=None, seed=cfg.base_seed)
            self.record([result_rows(cfg, dev, self.commit, spec, record, scores(model, self.tasks, cfg)[0],
                                     count_trainable(model))])
        else:
            self.rows.append(self.done[key])
        return model

    def record(self, results: list[tuple[dict, list[dict]]]) -> None:
        """Write finished runs (runs.csv row, curves.csv rows) to the results files, atomically."""
        self.rows.extend(record_results(self.results_dir, results, self.fingerprint, "", RUN_COLUMNS, CURVE_COLUMNS,
                                        self.cfg.report_to))


# --- checkpoints: a checkpoint proves itself before it is used ----------------------------------------
CHECKPOINT_FORMAT = 2  # 2: with a checksum of its tensors


def tensor_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, model: torch.nn.Module, record: Record, cfg) -> None:
    state = model.state_dict()
    atomic_write_via(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state,
                                                 "checksum": tensor_checksum(state),
                                                 "record": dataclasses.asdict(record), "config": cfg.to_dict()}, f))


def load_checkpoint(path: Path, model: torch.nn.Module, task: Task) -> tuple[Record | None, str | None]:
    """Load ``path`` into ``model`` if it proves itself: it reads, has every entry, its tensors match
    their checksum, every value is finite, and the model reproduces the validation loss recorded when
    it was saved (to 1e-5 relative). Returns (record, None), or (None, what is wrong) with ``model``
    left unusable: the caller trains a new one."""
    try:
        saved = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    except Exception as e:  # a damaged zip, a truncated file, a foreign pickle: torch raises many kinds
        return None, f"is unreadable ({type(e).__name__})"
    if not isinstance(saved, dict):
        return None, "is not a checkpoint of this program"
    missing = [k for k in ("state_dict", "record", "checksum") if k not in saved]
    if missing:
        return None, f"lacks its {', '.join(map(repr, missing))} entr{'ies' if len(missing) > 1 else 'y'}"
    state = saved["state_dict"]
    try:
        if tensor_checksum(state) != saved["checksum"]:
            return None, "does not match its checksum (its tensors were changed or damaged)"
        if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
            return None, "holds non-finite weights"
        model.load_state_dict(state)
        record = Record(**saved["record"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        return None, f"does not fit this model ({type(e).__name__})"
    val_loss = evaluate(model, task.val, task.spec.objective)[0]
    if not abs(val_loss - record.best_val_loss) <= 1e-5 * max(1.0, abs(record.best_val_loss)):
        return None, (f"gives validation loss {val_loss:.6g} where {record.best_val_loss:.6g} was recorded "
                      f"(made with other data or code)")
    return record, None


class Trainer:
    """Trains stacks of task-B runs from a base model; what one worker process holds."""

    def __init__(self, cfg: Config, commit: str, base_state: dict, tasks=None, show_epochs: bool = True):
        self.cfg, self.commit = cfg, commit
        self.device = resolve_device(cfg.device)
        self.tasks = tasks if tasks is not None else cfg.load_tasks(self.device)
        self.base = config_model(cfg, None, self.device)
        self.base.load_state_dict(base_state)
        self.show_epochs = show_epochs

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        """Train the runs of ``specs`` (one method and sketch): alone if there is one and
        stack_size is 1, else as one stack. Returns (runs.csv row, curves.csv rows) per run."""
        if len(specs) == 1 and self.cfg.stack_size == 1:
            return [self._alone(specs[0])]
        return self._stacked(specs)

    def _build(self, specs: list[dict], stacked: bool):
        """engine.build.build_run for these runs, with the config's scaling, initialiser and method settings."""
        cfg = self.cfg
        gens = [torch.Generator(device=self.device).manual_seed(s["seed"]) for s in specs]
        ranks = [s["rank"] for s in specs]
        method, settings = None if specs[0]["method"] == "fpft" else get_method(specs[0]["method"]), method_settings(cfg)
        # the scale of the layer's rank (AdaLoRA's initial rank, as PEFT's scaling / ranknum)
        scales = [None if r is None else lora_scale(cfg.scaling, cfg.lora_alpha, method.layer_rank(r, **settings))
                  for r in ranks]
        steps = cfg.max_epochs * math.ceil(len(self.tasks["B"].train) / cfg.batch_size)
        run = build_run(self.base, specs[0]["method"], specs[0]["sketch"], ranks, gens, scales,
                        random_init=cfg.random_init, stacked=stacked, targets=cfg.targets(), lr=cfg.lr,
                        total_steps=steps,
                        merge_every=cfg.merge_every, reset_optimizer_on_merge=cfg.reset_optimizer_on_merge,
                        **settings)
        return run, gens

    def _alone(self, spec: dict) -> tuple[dict, list[dict]]:
        cfg = self.cfg
        run, (g,) = self._build([spec], stacked=False)
        bar = _epoch_bar(cfg, _describe([spec]), disable=not self.show_epochs)
        with bar:
            record = train(run.model, run.params, self.tasks["B"], generator=g, progress=lambda row: bar.update(1),
                           **{**_train_kw(cfg), **run.hooks})
        return result_rows(cfg, self.device.type, self.commit, spec, record,
                           scores(run.model, self.tasks, cfg, [spec["seed"]])[0], count_trainable(run.model))

    def _stacked(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        cfg = self.cfg
        run, gens = self._build(specs, stacked=True)
        model = run.model
        bar = _epoch_bar(cfg, _describe(specs), disable=not self.show_epochs)

        def progress(epoch: int, live: int) -> None:
            bar.update(1)
            bar.set_postfix(training=f"{live}/{len(specs)} runs")

        with bar:
            records = train_stack(model, run.params, self.tasks["B"], generators=gens, progress=progress,
                                  **{**_train_kw(cfg), **run.hooks})
        got = scores(model, self.tasks, cfg, [s["seed"] for s in specs])
        return [result_rows(cfg, self.device.type, self.commit, spec, rec, score, model.trainable_count(i))
                for i, (spec, rec, score) in enumerate(zip(specs, records, got))]


def result_rows(cfg: Config, device: str, commit: str, spec: dict, record: Record, score: dict,
                trainable: int) -> tuple[dict, list[dict]]:
    """A finished run's runs.csv row and curves.csv rows. ``score``: its test figures (scores); ``trainable``:
    base and fpft every parameter, adapters the trained factors."""
    method, sketch, rank, seed = spec["method"], spec["sketch"], spec["rank"], spec["seed"]
    key = run_hash(cfg, device, method, sketch, rank, seed)
    if record.status == DIVERGED:  # no result: left out of every mean, counted as diverged
        score = dict.fromkeys(score)
    row = dict(method=method, sketch=sketch, rank=rank, seed=seed, status=record.status, trainable_params=trainable,
               epochs=record.epochs, best_epoch=record.best_epoch, best_val_loss=record.best_val_loss,
               **score, merges=record.merges, diverged_step=record.diverged_step,
               wall_s=round(record.wall_s, 3),
               config_hash=key, settings_hash=settings_hash(cfg, device, kind=_kind(method), method=method),
               git_commit=commit, device=device,
               finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               config=json.dumps(cfg.to_dict(), sort_keys=True), model=cfg.model,
               target_modules=" ".join(cfg.target_modules),
               **{k: getattr(cfg, k) for k in ("scaling", "lora_alpha", "random_init", "merge_every",
                                               "reset_optimizer_on_merge", "lr", "weight_decay",
                                               "batch_size", "max_epochs", "patience")})
    curve = [dict(config_hash=key, method=method, sketch=sketch, rank=rank, seed=seed, epoch=c["epoch"],
                  train_loss=c["train_loss"], val_loss=c["val_loss"], val_acc=c["val_acc"],
                  test_acc_b=c["test_acc"] if method != "base" else None, merged=c["merged"], ranks=c.get("ranks"))
             for c in record.curve]
    return row, curve


def method_settings(cfg: Config) -> dict:
    """The config's value of every setting a method of the registry reads (Method.settings): Method.training's
    keyword arguments (LoRA+'s ratio, ReLoRA's schedule), derived from the registry."""
    return {name: getattr(cfg, name) for m in METHODS.values() for name in m.settings}


def _train_kw(cfg: Config) -> dict:
    return dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs,
                patience=cfg.patience, reset_optimizer_on_merge=cfg.reset_optimizer_on_merge)


def scores(model: torch.nn.Module, tasks, cfg: Config, seeds: list[int] | None = None) -> list[dict]:
    """Each run's test figures on tasks A and B (mean loss in nats, and the metric: accuracy, next-character
    accuracy), for one model (``seeds`` None or one seed) or a stack (one seed per run), and, for a text, the
    run's sample (``sample_chars`` characters after ``sample_prompt``, drawn from a generator seeded with the
    run's seed, as JSON text)."""
    seeds = [cfg.base_seed] if seeds is None else seeds
    stacked = getattr(model, "example_dim", 0) == 1
    out = [dict() for _ in seeds]
    for t in ("A", "B"):
        task = tasks[t]
        if stacked:
            losses, metrics = (v.tolist() for v in evaluate_stack(model, task.test, task.spec.objective))
        else:
            loss, metric = evaluate(model, task.test, task.spec.objective)
            losses, metrics = [loss], [metric]
        for row, loss, metric in zip(out, losses, metrics):
            row[f"test_loss_{t.lower()}"], row[f"test_acc_{t.lower()}"] = loss, metric
    texts = samples(model, cfg, seeds)
    for row, text in zip(out, texts):
        row["sample"] = None if text is None else json.dumps(text, ensure_ascii=False)
    return out


def samples(model: torch.nn.Module, cfg: Config, seeds: list[int]) -> list[str | None]:
    """The text each run writes after cfg.sample_prompt (models.generate): None for a model of images, or when
    sample_chars is 0."""
    if not cfg.takes_tokens() or not cfg.sample_chars:
        return [None] * len(seeds)
    vocab = vocabulary(cfg.data_dir)
    device = next(model.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    tokens = generate(model, vocab.encode(cfg.sample_prompt), cfg.sample_chars, gens, cfg.gpt_context)
    return [vocab.decode(t) for t in tokens]


def _epoch_bar(cfg: Config, desc: str, disable: bool = False):
    return tqdm(total=cfg.max_epochs, desc=desc, leave=False, disable=disable or not cfg.progress, unit="epoch")


def _describe(specs: list[dict]) -> str:
    s = specs[0]
    if s["method"] == "fpft":
        head = "fpft"
    else:
        ranks = sorted({x["rank"] for x in specs})
        head = f"{s['method']} {s['sketch']} r={','.join(map(str, ranks))}"
    seeds = sorted({x["seed"] for x in specs})
    return f"{head} seed{'s' if len(seeds) > 1 else ''} {_span(seeds)}"


def _span(values: list[int]) -> str:
    return f"{values[0]}-{values[-1]}" if len(values) > 2 and values == list(range(values[0], values[-1] + 1)) \
        else ",".join(map(str, values))


def stack_key(spec: dict) -> tuple:
    """Runs of one method and sketch share a stack (ranks and seeds mixed), but a method whose stacks hold one rank
    (Method.one_rank_stacks: RandLoRA, AdaLoRA) gets a stack per rank."""
    one_rank = spec["method"] != "fpft" and get_method(spec["method"]).one_rank_stacks
    return (spec["method"], spec["sketch"]) + ((spec["rank"],) if one_rank else ())


def run_sweep(cfg: Config, commit: str) -> list[dict]:
    """Base model, then every run of the plan, in stacks (runner.run_study); returns this sweep's runs.csv rows."""
    t0 = time.perf_counter()
    cfg.check_setup()  # the command line has run it; a caller from Python gets the same checks
    sweep = Sweep(cfg, commit)
    b = sweep.tasks["B"]
    what = f"windows of {cfg.gpt_context} characters of {cfg.text_b}" if cfg.takes_tokens() else "images"
    tqdm.write(f"device: {sweep.device}; task B: {len(b.train)} train / {len(b.val)} val / {len(b.test)} test {what}")
    spec = cfg.task_spec()
    shapes = [(m.in_features, m.out_features) for _, m in
              target_linears(meta_model(cfg.model, model_settings(cfg), spec.shape, spec.classes), cfg.targets())]
    narrowest = min(shapes, key=lambda io: min(io))
    low_rank = any(get_method(m).low_rank for m in cfg.selected_methods())  # RandLoRA is full rank
    if low_rank and max(cfg.ranks) > min(narrowest):  # legal (the published sweep uses 8 on the 64->5 layer): say so once
        tqdm.write(LAYER_DIMS_NOTE.format(r=max(cfg.ranks), m=min(narrowest), i=narrowest[0], o=narrowest[1]))
    base = sweep.base_model()
    state = {k: v.cpu() for k, v in base.state_dict().items()}
    study = Study(plan=run_plan(cfg), run_hash=lambda spec: run_hash(cfg, sweep.device.type, **spec),
                  stack_key=stack_key, make_trainer=Trainer, code=__name__, trainer_args=(cfg, commit, state),
                  run_columns=RUN_COLUMNS, curve_columns=CURVE_COLUMNS,
                  trainer=Trainer(cfg, commit, base.state_dict(), sweep.tasks))
    rows = sweep.rows + run_study(study, cfg, sweep.device)
    tqdm.write(f"sweep finished in {time.perf_counter() - t0:.1f} s")
    return rows


def summary(rows: list[dict]) -> str:
    """The end-of-sweep table (engine.results.summary_table), or for runs on texts the table in nats per character
    (text_summary)."""
    text = [r for r in rows if r.get("model") in MODELS and "tokens" in MODELS[r["model"]][0].takes]
    return text_summary(text) if text else summary_table(rows)


def _nats(values: list[float]) -> str:
    m, s = mean_std(values)
    return "-" if math.isnan(m) else f"{m:.4f} ± " + ("-" if math.isnan(s) else f"{s:.4f}")


def text_summary(rows: list[dict]) -> str:
    """One line per (method, sketch, rank), mean ± std over the seeds that finished: test loss on task B in nats
    and bits per character (nats / ln 2), the loss on task A after adapting (forgetting), next-character
    accuracy on B; then the samples of the base model, FPFT and RAC-LoRA (its rank of lowest loss on B) from the
    same prompt and generator seed."""
    header = ["method", "sketch", "rank", "trainable", "seeds", "test loss B (nats)", "bits/char B",
              "test loss A (nats)", "next-char acc B %", "epochs", "wall s/run"]
    lines = []
    groups = group(rows, ("method", "sketch", "rank"))
    order = sorted(groups.items(), key=lambda kv: (display_order(kv[0][0]), kv[0][0], str(kv[0][1]), kv[0][2] or 0))
    for (method, sketch, rank), rs in order:
        ok, diverged = split_diverged(rs)
        b = [r["test_loss_b"] for r in ok]
        lines.append([method, sketch or "-", "-" if rank is None else str(rank), str(rs[0]["trainable_params"]),
                      seeds_cell(ok, diverged), _nats(b), _nats([v / math.log(2) for v in b if v is not None]),
                      _nats([r["test_loss_a"] for r in ok]), pct(*mean_std([r["test_acc_b"] for r in ok])),
                      f"{mean(r['epochs'] for r in ok):.1f}" if ok else "-", f"{mean(r['wall_s'] for r in rs):.1f}"])
    config = json.loads(rows[0].get("config") or "{}")
    out = [f"task A: {config.get('text_a', '?')}, task B: {config.get('text_b', '?')} (next character, test splits)",
           format_table(header, lines)]
    picks = [("base model", [r for r in rows if r["method"] == "base"]),
             ("FPFT", [r for r in rows if r["method"] == "fpft"])]
    rac = [(mean_std([r["test_loss_b"] for r in split_diverged(rs)[0]])[0], key, rs) for key, rs in groups.items()
           if key[0] == "rac_lora"]
    rac = [t for t in rac if not math.isnan(t[0])]
    if rac:
        _, (_, sketch, rank), rs = min(rac, key=lambda t: t[0])
        picks.append((f"RAC-LoRA {sketch} r={rank}", rs))
    shown = []
    for name, rs in picks:
        rs = sorted((r for r in rs if r.get("sample")), key=lambda r: r["seed"])
        if rs:
            shown.append(f"--- {name} (seed {rs[0]['seed']}) ---\n{json.loads(rs[0]['sample'])}")
    if shown:
        out.append(f"samples from the prompt {config.get('sample_prompt', '?')!r}, each from a generator seeded with "
                   f"its run's seed (temperature 1):\n" + "\n".join(shown))
    return "\n\n".join(out)
