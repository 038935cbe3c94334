"""The federated study on Flower (flwr, Message API): a ServerApp and a ClientApp that run the methods of
fed/methods.py with the same code as the in-process simulation (fed/simulate.py), so the two give the same
numbers for the same seeds (float64: tests/test_flower.py).

- ``flwr run .`` (pyproject.toml names ``fed.flower:server_app`` and ``fed.flower:client_app``) runs it on
  the local simulation federation or on a deployed one (README, "Federated adaptation on Flower").
- The run config (pyproject.toml's ``[tool.flwr.app.config]``, ``--run-config "k=v ..."``) holds
  federated.py's settings with dashes for underscores, one ``rank`` and one ``seed`` per run, plus
  ``dtype``, ``base-model`` (a state dict file; empty: the suite's base model, trained or loaded as main.py
  does) and ``records`` (a JSON file for the per-round records; empty: none). It is checked as federated.py
  checks its options; the server writes results/fed_flower_runs.csv and fed_flower_curves.csv.
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
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from raclora.errors import ConfigError, Diverged
from data import Split, Task
from engine.build import config_model
from engine.provenance import code_fingerprint, provenance
from engine.results import git_commit, upsert_runs
from engine.runner import resolve_device
from fed.config import from_argv
from fed.methods import get_fed_method
from fed.simulate import apply_down, client_round, close_round, global_state, load_global_state, Server
from fed.study import CURVE_COLUMNS, federation, FLOWER_COLUMNS, RUN_COLUMNS, run_rows, settings, trainable
from raclora.factors import ROLES
from raclora.files import atomic_write
from sweep import Sweep

PREFIX = "fed_flower_"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The run config: federated.py's settings (one method, sketch, rank and seed per run) and the engine's own
# keys; pyproject.toml's [tool.flwr.app.config] holds these defaults (tests check they agree).
RUN_CONFIG = {
    "method": "fed_rac_lora", "sketch": "left", "rank": 1, "seed": 0,
    "clients": 10, "partition": "dirichlet", "dirichlet-alpha": 0.5, "min-role-chars": 2000, "participation": 1.0,
    "rounds": 50, "local-epochs": 1, "lr": 0.001, "weight-decay": 0.01, "batch-size": 128, "target-accuracy": 0.9,
    "target-loss": 2.5, "scaling": "alpha", "lora-alpha": 1.0, "random-init": "gaussian", "target-modules": "all",
    "model": "mlp", "hidden": "64,64", "vit-patch": 7, "vit-dim": 32, "vit-depth": 2, "vit-heads": 2,
    "vit-mlp-dim": 64, "gpt-dim": 128, "gpt-depth": 4, "gpt-heads": 4, "gpt-context": 64, "dropout": 0.1,
    "text-a": "austen", "text-b": "shakespeare", "text-chars": 0, "task-b-chars": 0,
    "data-dir": "./data", "val-size": 5000, "split-seed": 0, "base-seed": 0, "base-max-epochs": 50, "base-lr": 0.0002,
    "results-dir": "./results",
    "device": "cpu",
    "dtype": "float32", "base-model": "", "records": "", "timeout": 3600,
}
ENGINE_KEYS = ("dtype", "base-model", "records", "timeout")
LIST_KEYS = {"hidden", "target-modules"}  # comma-separated in the run config
SINGLE = {"rank": "ranks", "seed": "seeds"}  # one value per run here, lists in FedConfig


def from_run_config(run_config: dict, check_paths: bool = True) -> tuple:
    """(FedConfig, the run's spec {method, sketch, rank, seed}, the engine's options) from a Flower run config,
    with federated.py's checks: ConfigError (one line) on anything unknown or out of range, or (with
    ``check_paths``) a relative path."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}; allowed: {', '.join(RUN_CONFIG)}")
    values = {**RUN_CONFIG, **run_config}
    argv = []
    for key, value in values.items():
        if key in ENGINE_KEYS:
            continue
        field = SINGLE.get(key, key.replace("-", "_"))
        parts = [p.strip() for p in str(value).split(",")] if key in LIST_KEYS else [str(value)]
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
    for key in ("data-dir", "results-dir", "base-model", "records"):
        if check_paths and values[key] and not str(values[key]).startswith("/"):
            raise ConfigError(f"{key} {values[key]!r} is relative, and the Flower apps run in Flower's own app "
                              f"folder: give an absolute path (--run-config \"{key}='/abs/path'\")")
    timeout = values["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    opts = dict(dtype=DTYPES[dtype], base_model=str(values["base-model"]), records=str(values["records"]),
                timeout=float(timeout))
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
    from pathlib import Path


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
class FederatedRound(FedAvg):
    """Flower's FedAvg with the suite's rounds: ``configure_train`` picks the round's clients and seed as
    the in-process server does (fed.simulate.Server.next_round) and sends each the method's "down";
    ``aggregate_train`` applies the method's rule (fed.simulate.close_round) and evaluates centrally."""

    def __init__(self, server, tasks: dict, timeout: float):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=server.clients)
        self.server, self.tasks, self.timeout = server, tasks, timeout
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.in_sync: dict[int, int] = {}  # node id -> the round whose starting state it holds
        self.down, self.last_seed = None, None
        self.records: list[dict] = []
        self.round: dict = {}
        self.t0 = time.perf_counter()  # the records' elapsed_s: seconds since the strategy was made

    def _discover(self, grid) -> None:
        """Ask every node its partition: the federation must hold partitions 0..clients-1, once each."""
        nodes = list(grid.get_node_ids())
        asks = [Message(content=RecordDict({"config": ConfigRecord({"ask": "partition"})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        replies = list(grid.send_and_receive(asks, timeout=self.timeout))
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed or len(replies) != len(nodes):
            raise RuntimeError(f"{len(nodes) - len(replies) + len(failed)} of {len(nodes)} nodes did not say "
                               f"their partition: {failed[:1]}")
        found = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id for r in replies}
        want = self.server.clients
        if sorted(found) != list(range(want)) or len(found) != len(replies):
            raise ConfigError(f"the federation's nodes hold partitions {sorted(found)} (from {len(replies)} "
                              f"nodes); clients {want} needs partition-id 0..{want - 1}, one node each")
        self.node_of = found

    def configure_train(self, server_round, arrays, config, grid):
        if not self.node_of:
            sample_nodes(grid, self.server.clients, self.server.clients)  # waits for every node to connect
            self._discover(grid)
        chosen, round_seed = self.server.next_round()
        starts = [self.server.start_factors(round_seed, c, server_round) for c in chosen]
        messages, sent = [], []
        full = None
        for c in chosen:
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
        failed = [r for r in replies if r.has_error()]
        chosen = self.round["chosen"]
        if failed or len(replies) != len(chosen):
            for r in failed:
                self.in_sync.pop(r.metadata.src_node_id, None)
            reasons = "; ".join(sorted({r.error.reason.strip().splitlines()[-1][:300] for r in failed}))
            raise RuntimeError(f"round {server_round}: {len(replies) - len(failed)} of {len(chosen)} clients "
                               f"replied ({reasons or 'timed out'})")
        by_client = {int(r.content["metrics"]["partition-id"]): r.content for r in replies}
        diverged = [m for m in (by_client[c]["metrics"] for c in chosen) if "diverged-step" in m]
        if diverged:  # a client's loss was not finite: the run ends here, as in process (fed.simulate.run_federated)
            raise Diverged(int(diverged[0]["diverged-step"]), float(diverged[0]["train-loss"]))
        states, losses, weights, sent_up = [], [], [], []
        for c, start in zip(chosen, self.round["starts"]):
            content = by_client[c]
            got = content["arrays"].to_torch_state_dict()
            sent_up.append(numbers(got))
            states.append(self._client_state(got, start))
            losses.append(float(content["metrics"]["train-loss"]))
            weights.append(int(content["metrics"]["num-examples"]))
        rec, self.down = close_round(self.server, server_round, chosen, self.round["starts"], states, losses,
                                     weights, self.tasks["B"], self.tasks["A"])
        self.last_seed = self.round["seed"]
        rec.update(sent_up_numbers=sum(sent_up) / len(sent_up),
                   sent_down_numbers=sum(self.round["sent_down"]) / len(chosen),
                   elapsed_s=time.perf_counter() - self.t0)
        self.records.append(rec)
        return None, MetricRecord({k: float(v) for k, v in rec.items()})

    def _client_state(self, got: dict, start: dict) -> dict:
        """The client's adapter state as fed.simulate's aggregation reads it: what it sent, plus the
        random factor it did not send (the round's own, from its start)."""
        dtype = next(self.server.model.parameters()).dtype
        state = {k: v.to(dtype) for k, v in got.items()}
        for layer in self.server.layers:
            for k in ("A", "B"):
                state.setdefault(f"{layer}.{k}", start[layer][k])
        return state


def server_main(grid, context) -> None:
    """The ServerApp: the base model, the Server of fed/simulate.py, ``rounds`` rounds through Flower, then the
    run's rows in results/fed_flower_*.csv (and the records file, when asked)."""
    t0 = time.perf_counter()
    cfg, spec, opts = from_run_config(dict(context.run_config))
    cfg.check_setup()
    device = resolve_device(cfg.device)
    commit = git_commit()
    if opts["base_model"]:
        tasks = load_run_tasks(cfg, cfg.data_dir, opts["dtype"], device)
        base = load_base(cfg, opts["base_model"], opts["dtype"], device)
    else:  # the suite's base model, trained or loaded as main.py does (the sweep has read the data already)

        sweep = Sweep(cfg.base_config(), commit)
        base = sweep.base_model().to(opts["dtype"])
        tasks = load_run_tasks(cfg, cfg.data_dir, opts["dtype"], device, tasks=sweep.tasks)
    s = settings(cfg, spec)
    server = Server(base, s, cfg.clients)
    strategy = FederatedRound(server, tasks, timeout=opts["timeout"])
    diverged = None
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(global_state(server)), num_rounds=cfg.rounds)
    except Diverged as e:  # recorded as diverged with the rounds before it, as federated.py records one
        diverged = len(strategy.records) + 1
        print(f"Flower run diverged in round {diverged} ({e}); recorded as diverged")
    records = strategy.records
    wall = time.perf_counter() - t0
    row, curve = run_rows(cfg, commit, device.type, spec, records, wall, trainable(base, s), diverged)
    row["code_fingerprint"] = code_fingerprint(__name__)
    row.update(provenance(row["device"]))
    upsert_runs(cfg.results_dir, [row], curve, prefix=PREFIX, run_columns=RUN_COLUMNS,
                curve_columns={**CURVE_COLUMNS, **FLOWER_COLUMNS})
    if opts["records"]:
        atomic_write(opts["records"], json.dumps(records))
    if diverged is None:
        last = records[-1]
        print(f"Flower run finished: {spec}, final accuracy on task B {100 * last['test_acc_b']:.2f} %, test loss "
              f"{last['test_loss_b']:.4f}, {wall:.1f} s")


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
    tasks, shards = _client_data(cfg, str(node.get("data-dir", cfg.data_dir)), opts["dtype"], device)
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


server_app = ServerApp()
server_app.main()(server_main)
client_app = ClientApp()
client_app.train()(client_train)
client_app.query()(client_query)
