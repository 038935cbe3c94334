"""The GPT (models.GPT, nanoGPT's shape over token sequences): no position sees a later token, the target presets
select the layers PEFT wraps, dropout draws from the run's generator, a sequence longer than the context is refused
in one line, the image models refuse a token task, the memory estimate reads it, it learns a sequence, and the
stacked engine (stacked embeddings, positions and causal attention) equals runs alone in float64 for every method,
sketch and FPFT on a next-token task, as do a federated round's clients stacked and alone."""
from __future__ import annotations

import copy

import pytest
import torch

from config import Config
from data import DIGITS, NEXT_TOKEN, Split, Task, TaskSpec
from engine.build import build_run
from engine.stack import StackedEmbedding, StackedModel, StackedPositions, train_stack
from fed.local import train_client, train_clients
from lora import wrap_linears
from models import (TARGET_PRESETS, build_model, check_model, check_task, count_trainable, set_generator, sizes,
                    target_linears)
from raclora.errors import ConfigError
from raclora.methods import METHODS
from tests.test_stack import DT, assert_run_is_alone
from train import evaluate, logits_of, train
from tests.conftest import assert_stack_forward_equals_each_copy

V, T = 11, 8  # vocabulary, tokens per sequence
SPEC = TaskSpec(shape=(T,), classes=V, objective=NEXT_TOKEN)
TINY = dict(dim=16, depth=2, heads=2, context=T, dropout=0.1)  # fc1: 16 -> 64
# 96 training sequences, batch 32: 3 steps an epoch; ReLoRA merges every 2 steps, so mid-epoch and at epoch ends.
# Noisy sequences and a large step: most methods' runs stop early at different epochs and leave the stack
KW = dict(weight_decay=0.01, batch_size=32, max_epochs=6, patience=1)
METHOD_KW = dict(total_steps=18, merge_every=1, loraplus_ratio=4.0, relora_every=2, relora_warmup=1,
                 adalora_interval=2)
SEEDS, RANKS, SCALE = [3, 4, 5], [1, 2, 4], 0.5


def gpt(generator, settings=TINY, dtype=DT):
    return build_model("gpt", settings, SPEC.shape, SPEC.classes, generator, "cpu").to(dtype)


def sequences(m: int, g: torch.Generator, noise: float) -> Split:
    """m sequences of a Markov chain: after token v comes (3 v + 1) mod V, or with probability ``noise`` any
    token; inputs (m, T) int64 ids, targets the next token at every position."""
    s = torch.empty(m, T + 1, dtype=torch.long)
    s[:, 0] = torch.randint(0, V, (m,), generator=g)
    for t in range(T):
        anything = torch.randint(0, V, (m,), generator=g)
        s[:, t + 1] = torch.where(torch.rand(m, generator=g) < noise, anything, (3 * s[:, t] + 1) % V)
    return Split(s[:, :-1].contiguous(), s[:, 1:].contiguous())


def token_task(seed: int = 0, n: int = 96, noise: float = 0.8) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(sequences(n, g, noise), sequences(32, g, noise), sequences(32, g, noise), SPEC)


@pytest.fixture(scope="module")
def base():
    model = gpt(torch.Generator().manual_seed(11))
    with torch.no_grad():  # non-trivial LayerNorm, so that a wrong stacked form cannot hide
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=DT))
    return model


@pytest.fixture(scope="module")
def task():
    return token_task()


def test_shapes_names_and_presets():
    model = gpt(torch.Generator().manual_seed(0), dtype=torch.float32).eval()
    x = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    assert model(x).shape == (3, T, V)
    torch.testing.assert_close(model(x[:, :5]), model(x)[:, :5])  # shorter than the context: its first positions
    names = [n for n, _ in target_linears(model, None)]
    block = [f"attn.{p}" for p in "qkvo"] + ["fc1", "fc2"]
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in block] + ["head"]
    assert [n for n, _ in target_linears(model, ["attention"])] == [n for n in names if ".attn." in n]
    assert [n for n, _ in target_linears(model, ["mlp"])] == [n for n in names if n.endswith(("fc1", "fc2"))]
    assert (model.blocks[0].fc1.out_features, model.head.out_features, model.embed.weight.shape) == (64, V, (V, 16))
    assert model.head.weight is not model.embed.weight  # untied: adapters on the head leave the embedding alone


@pytest.mark.parametrize("preset", list(TARGET_PRESETS))
def test_peft_wraps_the_layers_the_presets_select(preset):
    """PEFT's LoRA with the preset's names (all: PEFT's own "all-linear") wraps exactly target_linears' layers."""
    peft = pytest.importorskip("peft")
    model = gpt(torch.Generator().manual_seed(0))
    names = "all-linear" if TARGET_PRESETS[preset] is None else list(TARGET_PRESETS[preset])
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=names))
    layers = [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(layers) == sorted(n for n, _ in target_linears(model, [preset]))


def test_lora_on_the_gpt_agrees_with_peft(base):
    """PEFT's LoRA on every Linear, fed our factors: the same output (float64)."""
    peft = pytest.importorskip("peft")
    rank, alpha = 2, 1.5
    ours = copy.deepcopy(base).eval()
    g = torch.Generator().manual_seed(3)
    adapters = wrap_linears(ours, rank, alpha, "left", "gaussian", g, None)
    with torch.no_grad():
        for a in adapters:
            a.A.normal_(generator=g)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules="all-linear", lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    for (name, _), a in zip(target_linears(base, None), adapters):
        with torch.no_grad():
            layers[name].lora_A["default"].weight.copy_(a.A)
            layers[name].lora_B["default"].weight.copy_(a.B)
    x = torch.randint(0, V, (5, T), generator=g)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_no_position_sees_a_later_token(base, dtype):
    """Changing the token at position t leaves the logits before t unchanged, bit for bit, and changes every
    position from t on; alone and in a stack of two different runs."""
    plain = copy.deepcopy(base).to(dtype).eval()
    stacked = StackedModel(plain, 2).eval()
    with torch.no_grad():
        for p in stacked.parameters():  # two different models
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=dtype))
    x = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(2))
    for model in (plain, stacked):
        out = model(x)  # (N, T, V) or (R, N, T, V)
        for t in range(T):
            changed = x.clone()
            changed[:, t] = (x[:, t] + 1) % V
            moved = model(changed)
            assert torch.equal(moved[..., :t, :], out[..., :t, :]), t
            assert (moved[..., t:, :] != out[..., t:, :]).any(-1).all(), t


def test_a_sequence_longer_than_the_context_is_refused_in_one_line(base):
    for model in (base, StackedModel(base, 2)):
        with pytest.raises(ValueError, match=r"^sequences of 9 tokens are longer than the gpt's context of 8 "
                                             r"tokens \(gpt_context\)$"):
            model(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="^the task's sequences of 9 tokens are longer than gpt_context 8$"):
        build_model("gpt", TINY, (9,), V, None, "cpu")


@pytest.mark.parametrize("name,takes", [("mlp", "images or vectors of floats"), ("vit", "images")])
def test_the_mlp_and_the_vit_refuse_a_token_task(name, takes):
    words = "the task's examples are token sequences"
    with pytest.raises(ConfigError, match=f"^the {name} takes {takes} and {words}$"):
        check_model(Config(model=name), SPEC, words)
    check_task(name, DIGITS, "main.py's tasks are MNIST images")
    check_model(Config(model="gpt", ranks=[1]), SPEC, words)  # the gpt takes it


def test_the_memory_estimate_reads_the_gpt_on_a_token_task():
    params, activations, inputs = sizes("gpt", TINY, SPEC, examples=(96, 32))
    assert params == count_trainable(gpt(torch.Generator().manual_seed(0)))
    assert inputs == (96 + 32) * T * 2  # int64 token ids: two 4-byte numbers each
    b, d, heads, depth = 32, 16, 2, 2  # one pass over the 32 test sequences (eval_batch is 64)
    # embedding, positions, dropout; per block ln1, q k v o, attention out, drop1, ln2, fc1 (4d), fc2, drop2 and the
    # (b, heads, T, T) attention map; the final LayerNorm and the head; each twice (output and temporary)
    assert activations == 2 * (3 * b * T * d + depth * (14 * b * T * d + b * heads * T * T) + b * T * d + b * T * V)


def test_dropout_draws_from_the_runs_generator(base):
    x = torch.randint(0, V, (6, T), generator=torch.Generator().manual_seed(1))

    def out(seed):
        model = copy.deepcopy(base).train()
        set_generator(model, torch.Generator().manual_seed(seed))
        return model(x)
    state = torch.get_rng_state()
    first, again, other = out(1), out(1), out(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    gpt(torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # building and dropout never draw from the global RNG


def test_evaluation_in_passes_equals_one_pass(base):
    """logits_of cuts a split into eval_batch sequences and joins them on the examples' dimension."""
    x = torch.randint(0, V, (13, T), generator=torch.Generator().manual_seed(4))
    plain, stacked = copy.deepcopy(base).eval(), StackedModel(base, 2).eval()
    for model in (plain, stacked):
        whole = model(x)
        model.eval_batch = 5
        torch.testing.assert_close(logits_of(model, x), whole, rtol=0, atol=1e-12)


def test_stacked_forward_equals_each_copy(base):
    x = torch.randint(0, V, (10, T), generator=torch.Generator().manual_seed(1))
    model = StackedModel(base, 3).eval()
    assert isinstance(model.body.embed, StackedEmbedding) and isinstance(model.body.pos, StackedPositions)
    assert_stack_forward_equals_each_copy(base, model, x, DT)


def alone(base, task, method, sketch, rank, seed, lr):
    g = torch.Generator().manual_seed(seed)
    run = build_run(base, method, sketch, [rank], [g], [None if rank is None else SCALE * rank], lr=lr, **METHOD_KW)
    return run.model, train(run.model, run.params, task, lr=lr, generator=g, **{**KW, **run.hooks})


def rate(method: str, sketch: str | None) -> float:
    """A large step, so that runs stop early; a third of it where a step moves more (the right sketch trains B
    against a Gaussian A; LoRA+ trains B faster, ReLoRA re-warms often), and float64 rounding would be amplified
    past the tolerance."""
    m = METHODS.get(method)
    slow = m is not None and bool(m.step_merges or m.b_lr_ratio)
    if method == "adalora":  # its factors start at N(0, 0.02^2) and E at 0: a larger step, or no run stops early
        return 3e-1
    return 3e-2 / 3 ** (slow + (sketch == "right"))


@pytest.mark.parametrize("method,sketch", [("fpft", None)] + [
    (m, s) for m in METHODS for s in (["left", "right"] if METHODS[m].uses_sketch else [None])])
def test_every_method_stacked_equals_alone(base, task, method, sketch):
    ranks = [None] * 3 if method == "fpft" else [2] * 3 if METHODS[method].one_rank_stacks else RANKS
    lr = rate(method, sketch)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    run = build_run(base, method, sketch, ranks, gens, [None if r is None else SCALE * r for r in ranks],
                    stacked=True, lr=lr, **METHOD_KW)
    records = train_stack(run.model, run.params, task, generators=gens, lr=lr, **{**KW, **run.hooks})
    assert len({r.epochs for r in records}) > 1, "the runs should leave the stack at different epochs"
    embed = run.model.body.embed.weight  # (R, V, d)
    assert embed.requires_grad == (method == "fpft")  # an adapted stack keeps the base's tables frozen
    if method != "fpft":
        assert all(torch.equal(table, base.embed.weight) for table in embed)
    for i, (rank, seed) in enumerate(zip(ranks, SEEDS)):
        ref, rec = alone(base, task, method, sketch, rank, seed, lr)
        assert_run_is_alone(run.model, i, records[i], ref, rec, task)


@pytest.mark.parametrize("method", ["fpft", "rac_lora"])
def test_a_round_of_clients_stacked_equals_each_client_alone(method):
    """fed/local.py on token sequences: unequal shards, client i of the stack = client i alone (float64)."""
    base, k = gpt(torch.Generator().manual_seed(2)), 3
    data = sequences(90, torch.Generator().manual_seed(5), 0.5)
    shards = list(torch.randperm(90, generator=torch.Generator().manual_seed(6)).split([20, 30, 40]))
    kw = dict(objective=NEXT_TOKEN, epochs=2, batch_size=16, lr=1e-2, weight_decay=0.01)
    ranks = [None] * k if method == "fpft" else [2] * k
    init = lambda: [torch.Generator().manual_seed(100 + c) for c in range(k)]  # noqa: E731 (factor draws)
    stacked = build_run(base, method, "left", ranks, init(), [0.5] * k, stacked=True, lr=1e-2, total_steps=1)
    states, losses = train_clients(stacked.model, stacked.params, data.x, data.y, shards,
                                   [torch.Generator().manual_seed(c) for c in range(k)], **kw)
    for c, g in enumerate(init()):
        run = build_run(base, method, "left", ranks[:1], [g], [0.5], lr=1e-2, total_steps=1)
        loss = train_client(run.model, run.params, data.x, data.y, shards[c], torch.Generator().manual_seed(c), **kw)
        for name, want in run.model.state_dict().items():
            torch.testing.assert_close(states[c][name], want, rtol=0, atol=1e-10, msg=f"client {c} {name}")
        assert losses[c] == pytest.approx(loss, abs=1e-10)


def test_a_tiny_gpt_learns_a_sequence():
    """After token v always comes (3 v + 1) mod V: a few epochs take the next-token loss near zero."""
    task = token_task(seed=1, n=128, noise=0.0)
    model = gpt(torch.Generator().manual_seed(0), dict(TINY, dropout=0.0), torch.float32)
    before = evaluate(model, task.val, NEXT_TOKEN)
    record = train(model, list(model.parameters()), task, lr=1e-2, weight_decay=0.0, batch_size=32, max_epochs=15,
                   patience=15, generator=torch.Generator().manual_seed(1))
    after = evaluate(model, task.val, NEXT_TOKEN)
    assert record.curve[-1]["train_loss"] < record.curve[0]["train_loss"]
    assert after[0] < 0.1 * before[0] and after[1] > 0.95, (before, after)
