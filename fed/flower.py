"""The federated study on Flower (flwr, Message API): a ServerApp and a ClientApp that run the methods of
fed/methods.py with the same code as the in-process simulation (fed/simulate.py), so the two give the same
numbers for the same seeds (float64: tests/test_flower.py).

- ``flwr run .`` (pyproject.toml names ``fed.flower:server_app`` and ``fed.flower:client_app``) runs it on
  the local simulation federation or on a deployed one (README, "Federated adaptation on Flower").
- The run config is pyproject.toml's ``[tool.flwr.app.config]`` (``--run-config "k=v ..."`` overrides it):
  federated.py's settings with dashes for underscores, one ``rank`` and one ``seed`` per run, checked by
  fed.config.FedConfig as federated.py checks its options, and the engine's keys (ENGINE_KEYS). Relative paths
  are taken from the folder the apps run in. The server says up front what it will do (and that it trains the
  base model first, when none is saved), evaluates centrally through the strategy's ``evaluate_fn`` (Flower's
  summary shows it), returns the global model as the strategy's arrays and saves it
  (results/fed_flower_models/<config_hash>.pt, a plain state dict: ``base-model`` loads it), writes
  results/fed_flower_runs.csv and fed_flower_curves.csv, and draws the round figures (plots/fed_flower_*.png).
- Failures end runs, in bounded time: the server waits ``node-timeout`` seconds for the federation's nodes and a
  round ``timeout`` seconds for its replies; a client that raised or a node gone fails the run with one line
  naming the round, the client and the node (RunFailed), unless ``tolerate`` allows the round to go on without
  it (its record's ``failed_clients`` says how many it lost). The suite's errors are logged as one line (OneLine).
  ``flwr run`` exits 0 whatever happened: ``python federated.py --engine flower`` (fed.deploy.run_on_flower)
  exits non-zero with that line.
- Each SuperNode holds one client: ``partition-id`` (and ``num-partitions`` = clients) in its node config,
  and optionally its own ``data-dir``. The client loads its data there (MNIST, or the texts for the gpt) and
  takes its shard of task B (fed.study.federation: from split_seed, or the speaking role of its partition id;
  every node computes the same split).

What travels, per round and participating client:
- down: the round's seed and config, and the method's "down" column (fed.simulate.apply_down): FedAvg's
  weights, FedIT's factors, FFA-LoRA's mean trained factor, FLoRA's stacked factors, Fed-RAC-LoRA's mean
  trained factor. A node that was not in sync (its first round, or it missed the last one) gets the server's
  whole state instead (W and the global factors). Each node keeps its copy of the server's state in its
  ``context.state`` between rounds.
- up: what the client trained: every weight (FedAvg), A and B (FedIT, FLoRA), the zero factor (FFA-LoRA,
  Fed-RAC-LoRA).
The server records, beside the formula's counts (fed.methods.communication), the numbers its messages held
(``sent_up_numbers``, ``sent_down_numbers``: means over the round's participants).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from raclora.errors import ConfigError, Diverged, EXPECTED, RunFailed
from data import Split, Task
from engine.build import config_model
from engine.provenance import code_fingerprint, provenance
from engine.results import figure_prefix, git_commit, read_results, upsert_runs
from engine.runner import resolve_device
from fed.config import app_run_config, FedConfig, from_argv, run_config_keys, SINGLE
from fed.methods import get_fed_method
from fed.simulate import apply_down, client_round, close_round, global_model_state, global_state, load_global_state, Server
from fed.study import CURVE_COLUMNS, describe, federation, FLOWER_COLUMNS, FLOWER_PREFIX, RUN_COLUMNS, run_rows, settings, trainable
from raclora.factors import ROLES
from plots import draw_federated
from raclora.files import atomic_write, atomic_write_via
from sweep import Sweep
from train import evaluate

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The run config (pyproject.toml's [tool.flwr.app.config], the app's defaults; Flower gives the apps every key
# of it in context.run_config, overridden by `flwr run --run-config "k=v"`) holds federated.py's settings with
# dashes for underscores, one rank and one seed per run, apart from those of how a command runs (COMMAND_ONLY), and
# the engine's own keys (ENGINE_KEYS). Its values are read from there and checked by FedConfig: no copy here.
ENGINE_KEYS = {
    "dtype": "float32 | float64: the weights' and the images' dtype, on server and clients",
    "base-model": "a state dict file of the model to adapt; empty: the suite's base model (main.py's, cached)",
    "records": "a JSON file for the rounds' records; empty: none",
    "timeout": "seconds a round waits for its clients' replies (Flower's round timeout)",
    "node-timeout": "seconds the server waits for the federation's clients SuperNodes to connect",
    "tolerate": "clients a round may lose (a failure reply, a node gone) and go on without; 0: any loss ends the run",
}
PATH_KEYS = ("data-dir", "results-dir", "plots-dir", "base-model", "records")
# Where the app's defaults (pyproject.toml) differ from federated.py's: Flower's default local federation has
# 2 SuperNodes, and a bare `flwr run .` is a short federation (tests check every other default equals FedConfig's)
FLOWER_OWN = ("clients", "rounds")


def resolve_path(value: str, root: Path | None = None) -> str:
    """A run-config path as the apps use it: absolute as given; relative to ``root`` (default: the folder the app
    runs in: for `flwr run .` on its local federation, the folder Flower started the local SuperLink from)."""
    if not value or Path(value).is_absolute():
        return value
    return os.path.normpath((root or Path.cwd()) / value)  # links kept: the folder as the user names it


def from_run_config(run_config: dict, root: Path | None = None) -> tuple:
    """(FedConfig, the run's spec {method, sketch, rank, seed}, the engine's options) from a Flower run config
    (missing keys: pyproject.toml's), with federated.py's checks: ConfigError (one line) on anything unknown or
    out of range. Relative paths are resolved (resolve_path)."""
    keys = run_config_keys()
    unknown = sorted(set(run_config) - set(keys) - set(ENGINE_KEYS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}; allowed: {', '.join([*keys, *ENGINE_KEYS])}")
    values = {**app_run_config(), **run_config}
    for key in PATH_KEYS:
        values[key] = resolve_path(str(values[key]), root)
    lists = {f.name for f in dataclasses.fields(FedConfig) if f.default_factory is not dataclasses.MISSING}
    argv = []
    for key, field in keys.items():
        if key in values:
            value = values[key]
            parts = [p.strip() for p in str(value).split(",")] if field in lists and field not in SINGLE else [str(value)]
            argv += [f"--{field}", *parts]
    cfg = from_argv(argv, prog="flwr run")
    if cfg.method == "all" or cfg.sketch == "both":
        raise ConfigError("the Flower engine runs one method and one sketch per run; "
                          f"got method {cfg.method!r}, sketch {cfg.sketch!r}")
    dtype = str(values["dtype"])
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    lora = get_fed_method(cfg.method).uses_sketch
    spec = dict(method=cfg.method, sketch=cfg.sketch if lora else None, rank=cfg.ranks[0] if lora else None,
                seed=cfg.seeds[0])
    for key in ("timeout", "node-timeout"):
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ConfigError(f"{key} must be a positive number of seconds, got {v!r}")
    tolerate = values["tolerate"]
    if isinstance(tolerate, bool) or not isinstance(tolerate, int) or not 0 <= tolerate < cfg.runs_per_stack():
        raise ConfigError(f"tolerate must be a whole number of clients from 0 to {cfg.runs_per_stack() - 1} (a round "
                          f"has {cfg.runs_per_stack()} clients and needs one reply), got {tolerate!r}")
    opts = dict(dtype=DTYPES[dtype], base_model=values["base-model"], records=values["records"],
                timeout=float(values["timeout"]), node_timeout=float(values["node-timeout"]), tolerate=tolerate)
    return cfg, spec, opts


def load_run_tasks(cfg, data_dir: str, dtype: torch.dtype, device, tasks: dict | None = None) -> dict:
    """Tasks A and B (the config's, config.AdaptedModelConfig.load_tasks from ``data_dir``, unless ``tasks``
    already holds them) with images in ``dtype`` (token ids stay int64)."""
    tasks = tasks if tasks is not None else dataclasses.replace(cfg, data_dir=data_dir).load_tasks(device)

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if x.is_floating_point() else x
    return {name: Task(**{k: Split(cast(getattr(t, k).x), getattr(t, k).y) for k in ("train", "val", "test")},
                       spec=t.spec) for name, t in tasks.items()}


def load_base(cfg, path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """The model ``cfg.model`` with the state dict saved at ``path``; ConfigError (one line) if it is missing,
    unreadable or not this model's."""
    model = config_model(cfg, None, device)
    if not Path(path).is_file():
        raise ConfigError(f"base-model {path!r} is not a file; give the path of a saved state dict "
                          "(an absolute path: the apps do not run in this folder), or leave it empty")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 (a corrupt or foreign file, whatever the library raises)
        raise ConfigError(f"base-model {path!r} is not a state dict of this {cfg.model} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model.to(dtype)


def sent_keys(server) -> list[str]:
    """What a client sends up: every weight (FedAvg), A and B (FedIT, FLoRA), the trained factor otherwise."""
    m = server.m
    if m.trains == "all":
        return [name for name, _ in server.model.named_parameters()]
    keys = ("A", "B") if m.trains == "both" else (ROLES[server.s.sketch][0],)
    return [f"{layer}.{k}" for layer in server.layers for k in keys]


def numbers(arrays: dict) -> int:
    return sum(int(t.numel()) for t in arrays.values())


# --- the server ------------------------------------------------------------------------------------------
class OneLine(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; the suite's own errors (a bad value, a run that
    failed) are one line that says what went wrong: the traceback of those is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, EXPECTED):
            record.msg, record.args, record.exc_info, record.exc_text = f"{type(exc).__name__}: {exc}", (), None, None
        return True


def _reason(reply) -> str:
    """A failure reply's reason on one line: the last line of the client's traceback."""
    return reply.error.reason.strip().splitlines()[-1][:300]


class FederatedRound(FedAvg):
    """Flower's FedAvg with the suite's rounds: ``configure_train`` picks the round's clients and seed as
    the in-process server does (fed.simulate.Server.next_round) and sends each the method's "down";
    ``aggregate_train`` applies the method's rule (fed.simulate.close_round) and evaluates centrally, and returns
    the global model (Flower's result arrays); ``evaluate`` is the strategy's ``evaluate_fn``: the round's central
    evaluation, so that Flower's summary shows it."""

    def __init__(self, server, tasks: dict, opts: dict):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=server.clients)
        self.server, self.tasks, self.timeout = server, tasks, opts["timeout"]
        self.node_timeout, self.tolerate = opts["node_timeout"], opts["tolerate"]
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.in_sync: dict[int, int] = {}  # node id -> the round whose starting state it holds
        self.gone: dict[int, str] = {}  # partition id -> why: lost (tolerated) in an earlier round, not asked again
        self.down, self.last_seed = None, None
        self.records: list[dict] = []
        self.round: dict = {}
        self.t0 = time.perf_counter()  # the records' elapsed_s: seconds since the strategy was made

    def _wait_for_nodes(self, grid) -> list[int]:
        """The federation's nodes once ``clients`` of them are connected; RunFailed (one line) after node_timeout."""
        want, deadline = self.server.clients, time.monotonic() + self.node_timeout
        while len(nodes := list(grid.get_node_ids())) < want:
            if time.monotonic() > deadline:
                raise RunFailed(f"only {len(nodes)} of the {want} SuperNodes this run needs (clients {want}: one per "
                                f"partition-id 0..{want - 1}) connected within node-timeout {self.node_timeout:g} s; "
                                f"start the missing SuperNodes (the local federation: flwr run --federation-config "
                                f"\"num-supernodes={want}\"), or run with clients={len(nodes)}")
            time.sleep(0.5)
        return nodes

    def _discover(self, grid) -> None:
        """Ask every node its partition: the federation must hold partitions 0..clients-1, once each."""
        nodes = self._wait_for_nodes(grid)
        asks = [Message(content=RecordDict({"config": ConfigRecord({"ask": "partition"})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        replies = list(grid.send_and_receive(asks, timeout=self.timeout))
        failed = [_reason(r) for r in replies if r.has_error()]
        if failed or len(replies) != len(nodes):
            raise RunFailed(f"{len(nodes) - len(replies) + len(failed)} of {len(nodes)} SuperNodes did not say their "
                            f"partition within timeout {self.timeout:g} s"
                            + (f": {failed[0]}" if failed else ""))
        found = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id for r in replies}
        want = self.server.clients
        if sorted(found) != list(range(want)) or len(found) != len(replies):
            raise ConfigError(f"the federation's nodes hold partitions {sorted(found)} (from {len(replies)} "
                              f"nodes); clients {want} needs partition-id 0..{want - 1}, one node each")
        self.node_of = found

    def configure_train(self, server_round, arrays, config, grid):
        if not self.node_of:
            self._discover(grid)
        chosen, round_seed = self.server.next_round()
        starts = [self.server.start_factors(round_seed, c, server_round) for c in chosen]
        messages, sent = [], []
        full = None
        for c in chosen:
            if c in self.gone:  # counted as lost again by aggregate_train, without a round's wait for it
                continue
            node = self.node_of[c]
            synced = self.in_sync.get(node) == server_round - 1 and self.down is not None
            if synced:
                payload, base = self.down, server_round - 1
            else:
                full = full if full is not None else global_state(self.server)
                payload, base = full, 0
            cfg = ConfigRecord({"server-round": server_round, "round-seed": round_seed, "from-round": base,
                                "last-seed": self.last_seed if synced else 0})
            messages.append(Message(content=RecordDict({"arrays": ArrayRecord(payload), "config": cfg}),
                                    message_type=MessageType.TRAIN, dst_node_id=node))
            sent.append(numbers(payload))
            self.in_sync[node] = server_round
        self.round = dict(chosen=chosen, seed=round_seed, starts=starts, sent_down=sent)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        chosen = self.round["chosen"]
        partition = {node: c for c, node in self.node_of.items()}
        good = {partition[r.metadata.src_node_id]: r.content for r in replies if not r.has_error()}
        lost = {}  # partition id -> why its reply is missing
        for r in replies:
            if r.has_error():
                lost[partition[r.metadata.src_node_id]] = _reason(r)
        for c in chosen:
            if c in self.gone:
                lost[c] = self.gone[c]
            elif c not in good and c not in lost:
                lost[c] = f"no reply within timeout {self.timeout:g} s (the node is gone or stalled)"
        for c in lost:
            self.in_sync.pop(self.node_of[c], None)
        if len(lost) > self.tolerate or not good:
            c, why = next(iter(sorted(lost.items())))
            raise RunFailed(f"round {server_round}: {len(good)} of {len(chosen)} clients replied; client (partition-id) "
                            f"{c} on node {self.node_of[c]}: {why}" + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else "")
                            + f"; tolerate is {self.tolerate}")
        for c, why in sorted(lost.items()):
            print(f"round {server_round}: going on without client {c} (node {self.node_of[c]}): {why}")
            self.gone.setdefault(c, f"lost in round {server_round} ({why})")
        kept = [(c, start) for c, start in zip(chosen, self.round["starts"]) if c in good]
        diverged = [m for m in (good[c]["metrics"] for c, _ in kept) if "diverged-step" in m]
        if diverged:  # a client's loss was not finite: the run ends here, as in process (fed.simulate.run_federated)
            raise Diverged(int(diverged[0]["diverged-step"]), float(diverged[0]["train-loss"]))
        states, losses, weights, sent_up = [], [], [], []
        for c, start in kept:
            content = good[c]
            got = content["arrays"].to_torch_state_dict()
            sent_up.append(numbers(got))
            states.append(self._client_state(got, start))
            losses.append(float(content["metrics"]["train-loss"]))
            weights.append(int(content["metrics"]["num-examples"]))
        rec, self.down = close_round(self.server, server_round, [c for c, _ in kept], [s for _, s in kept], states,
                                     losses, weights, self.tasks["B"], self.tasks["A"])
        self.last_seed = self.round["seed"]
        rec.update(sent_up_numbers=sum(sent_up) / len(sent_up),
                   sent_down_numbers=sum(self.round["sent_down"]) / max(1, len(self.round["sent_down"])),
                   failed_clients=len(lost), elapsed_s=time.perf_counter() - self.t0)
        self.records.append(rec)
        train = {k: float(rec[k]) for k in ("train_loss", "participants", "failed_clients", "up_numbers",
                                            "down_numbers", "sent_up_numbers", "sent_down_numbers", "aggregation_error")}
        return ArrayRecord(global_model_state(self.server)), MetricRecord(train)

    def evaluate(self, server_round: int, arrays) -> MetricRecord:
        """The strategy's evaluate_fn: the global model on task B's and task A's test splits (round 0: the model
        the federation starts from; later rounds: what close_round measured)."""
        if server_round == 0:
            model = self.server.model
            (loss_b, acc_b), (loss_a, acc_a) = (evaluate(model, self.tasks[k].test, self.tasks[k].spec.objective)
                                                for k in ("B", "A"))
            got = dict(test_acc_b=acc_b, test_loss_b=loss_b, test_acc_a=acc_a, test_loss_a=loss_a)
        else:
            got = self.records[-1]
        return MetricRecord({k: float(got[k]) for k in ("test_acc_b", "test_loss_b", "test_acc_a", "test_loss_a")})

    def _client_state(self, got: dict, start: dict) -> dict:
        """The client's adapter state as fed.simulate's aggregation reads it: what it sent, plus the
        random factor it did not send (the round's own, from its start)."""
        dtype = next(self.server.model.parameters()).dtype
        state = {k: v.to(dtype) for k, v in got.items()}
        for layer in self.server.layers:
            for k in ("A", "B"):
                state.setdefault(f"{layer}.{k}", start[layer][k])
        return state


def model_path(results_dir: str, config_hash: str) -> Path:
    """Where the server saves a run's final global model (a plain state dict: base-model reads it)."""
    return Path(results_dir) / "fed_flower_models" / f"{config_hash}.pt"


def server_main(grid, context) -> None:
    """The ServerApp: the base model, the Server of fed/simulate.py, ``rounds`` rounds through Flower, then the
    run's rows in results/fed_flower_*.csv, its final global model, its figures (and the records file, when
    asked). Says up front what it will do; a bad value or a failed run is one line (OneLine)."""
    t0 = time.perf_counter()
    cfg, spec, opts = from_run_config(dict(context.run_config))
    cfg.check_setup()
    device = resolve_device(cfg.device)
    commit = git_commit()
    print(f"Flower run {describe(spec)}: {cfg.rounds} rounds of {cfg.runs_per_stack()} of {cfg.clients} clients on "
          f"{cfg.model}; data from {cfg.data_dir}, results to {cfg.results_dir}, figures to {cfg.plots_dir}")
    if opts["base_model"]:
        tasks = load_run_tasks(cfg, cfg.data_dir, opts["dtype"], device)
        base = load_base(cfg, opts["base_model"], opts["dtype"], device)
    else:  # the suite's base model, trained or loaded as main.py does (the sweep has read the data already)
        sweep = Sweep(cfg.base_config(), commit)
        if not sweep.base_checkpoint().exists():
            print(f"base model: none saved in {sweep.base_checkpoint().parent}: training it first on task A (main.py's "
                  f"base model, up to {cfg.base_max_epochs} epochs; saved for later runs and main.py)")
        base = sweep.base_model().to(opts["dtype"])
        tasks = load_run_tasks(cfg, cfg.data_dir, opts["dtype"], device, tasks=sweep.tasks)
    s = settings(cfg, spec)
    server = Server(base, s, cfg.clients)
    strategy = FederatedRound(server, tasks, opts)
    diverged = None
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(global_state(server)), num_rounds=cfg.rounds,
                       timeout=opts["timeout"], evaluate_fn=strategy.evaluate)
    except Diverged as e:  # recorded as diverged with the rounds before it, as federated.py records one
        diverged = len(strategy.records) + 1
        print(f"Flower run diverged in round {diverged} ({e}); recorded as diverged")
    records = strategy.records
    wall = time.perf_counter() - t0
    row, curve = run_rows(cfg, commit, device.type, spec, records, wall, trainable(base, s), diverged)
    row["code_fingerprint"] = code_fingerprint(__name__)
    row.update(provenance(row["device"]))
    columns = {**CURVE_COLUMNS, **FLOWER_COLUMNS}
    upsert_runs(cfg.results_dir, [row], curve, prefix=FLOWER_PREFIX, run_columns=RUN_COLUMNS, curve_columns=columns)
    if opts["records"]:
        atomic_write(opts["records"], json.dumps(records))
    if diverged is None:
        saved = model_path(cfg.results_dir, row["config_hash"])
        saved.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_via(saved, lambda f: torch.save(result.arrays.to_torch_state_dict(), f))  # aggregate_train's
        runs, curves = read_results(cfg.results_dir, FLOWER_PREFIX, RUN_COLUMNS, columns)
        drawn = draw_federated([r for r in runs if r["settings_hash"] == row["settings_hash"]], curves, cfg.plots_dir,
                               figure_prefix(cfg.results_dir, FLOWER_PREFIX))
        last = records[-1]
        print(f"Flower run finished: {describe(spec)}, final accuracy on task B {100 * last['test_acc_b']:.2f} %, "
              f"test loss {last['test_loss_b']:.4f}, {wall:.1f} s; global model in {saved}; figures "
              f"{', '.join(p.name for p in drawn)} in {cfg.plots_dir}")


# --- the client --------------------------------------------------------------------------------------------
def _client_setup(context):
    """(cfg, spec, opts, partition id, tasks, shard, device) of this node."""
    cfg, spec, opts = from_run_config(dict(context.run_config))
    node = context.node_config
    if "partition-id" not in node:
        raise ConfigError("this SuperNode has no partition-id in its node config; start it with "
                          "--node-config \"partition-id=<i> num-partitions=<clients>\"")
    pid, parts = int(node["partition-id"]), int(node.get("num-partitions", cfg.clients))
    if parts != cfg.clients or not 0 <= pid < cfg.clients:
        raise ConfigError(f"node holds partition {pid} of {parts}; the run has clients {cfg.clients}")

    device = resolve_device(cfg.device)
    tasks, shards = _client_data(cfg, resolve_path(str(node.get("data-dir", cfg.data_dir))), opts["dtype"], device)
    return cfg, spec, opts, pid, tasks, shards[pid], device


_CLIENT_DATA: dict[tuple, tuple] = {}  # a process that serves several messages (Ray's actors) reads its data once


def _client_data(cfg, data_dir: str, dtype: torch.dtype, device) -> tuple[dict, list]:
    """(tasks, every client's shard: fed.study.federation) for this data and split, read once per process."""
    data_fields = ("model", "val_size", "split_seed", "gpt_context", "text_a", "text_b", "text_chars", "task_b_chars",
                   "clients", "partition", "dirichlet_alpha", "min_role_chars")
    key = (data_dir, dtype, str(device), *(getattr(cfg, k) for k in data_fields))
    if key not in _CLIENT_DATA:
        tasks = load_run_tasks(cfg, data_dir, dtype, device)
        _CLIENT_DATA.clear()  # one data set at a time
        _CLIENT_DATA[key] = federation(cfg, tasks)
    return _CLIENT_DATA[key]


def client_query(msg, context):
    cfg, _, _, pid, _, shard, _ = _client_setup(context)
    return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": cfg.clients,
                                                                "num-examples": int(shard.numel())})}), reply_to=msg)


def client_train(msg, context):
    """One round of local training: bring this node's copy of the server's state up to date with what came
    down, train from it (fed.simulate.client_round, the in-process client's code), send up what it trained."""
    cfg, spec, opts, pid, tasks, shard, device = _client_setup(context)
    conf = msg.content["config"]
    t, round_seed, base = int(conf["server-round"]), int(conf["round-seed"]), int(conf["from-round"])
    server = Server(config_model(cfg, None, device).to(opts["dtype"]), settings(cfg, spec), cfg.clients)
    came = msg.content["arrays"].to_torch_state_dict()
    if base == 0:  # the server's whole state
        load_global_state(server, {k: v.to(device) for k, v in came.items()})
    else:  # this node's copy from its last round, and the server's step of that round
        held = int(context.state["sync"]["round"]) if "sync" in context.state else None
        if held != base:
            raise RuntimeError(f"node of partition {pid} holds the state of round {held}, the server sent the "
                               f"update from round {base}")
        load_global_state(server, {k: v.to(device) for k, v in context.state["global"].to_torch_state_dict().items()})
        apply_down(server, {k: v.to(device) for k, v in came.items()}, int(conf["last-seed"]))
    context.state["global"] = ArrayRecord(global_state(server))
    context.state["sync"] = ConfigRecord({"round": t})
    metrics = {"partition-id": pid, "num-examples": int(shard.numel())}
    try:
        _, state, loss = client_round(server, pid, t, round_seed, tasks["B"], shard)
    except Diverged as e:  # the server ends the run and records it as diverged
        metrics.update({"train-loss": e.loss, "diverged-step": e.step})
        return Message(content=RecordDict({"arrays": ArrayRecord({}), "metrics": MetricRecord(metrics)}), reply_to=msg)
    up = {k: state[k].detach().cpu() for k in sent_keys(server)}
    metrics = MetricRecord({**metrics, "train-loss": float(loss)})
    return Message(content=RecordDict({"arrays": ArrayRecord(up), "metrics": metrics}), reply_to=msg)


logging.getLogger("flwr").addFilter(OneLine())
server_app = ServerApp()
server_app.main()(server_main)
client_app = ClientApp()
client_app.train()(client_train)
client_app.query()(client_query)
