"""The suite's methods on Hugging Face PEFT models (issue 14): peft_chain.ChainController and ChainCallback.

- equivalence: the suite's MLP adapted through PEFT + the controller equals our own engine (float64, same
  weights, factors, batch order and dropout masks, merges included), for every method that applies;
- per layer type the controller claims (nn.Linear, GPT-2's Conv1D): merge + reset keeps the function, only
  the declared factor has a gradient, the random factor is re-drawn at each merge (rac_lora) and never
  (asymmetric_lora);
- the Trainer callback end to end on a tiny random model; save and reload; one-line errors.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from raclora.peft_chain import ChainCallback, ChainController, ChainError, lora_methods
from raclora.methods import METHODS

DT = torch.float64
MLP_TARGETS = ["net.0", "net.3", "net.6"]  # the suite's MLP (784-16-16-5): its three Linear layers


def _mlp(dt=DT):
    from conftest import mlp

    return mlp([16, 16], 0.1, torch.Generator().manual_seed(2)).to(dt)


def _task(dt=DT):
    from data import Split, Task

    g = torch.Generator().manual_seed(8)

    def split(m):
        return Split(torch.randn(m, 784, generator=g, dtype=dt), torch.randint(0, 5, (m,), generator=g))
    return Task(split(200), split(60), split(60))


def _peft(model, rank, scale, targets=None, dora=False):
    """PEFT LoRA on the model's Linear layers, with PEFT's scaling (alpha / r) set to our scale (DoRA's layers if
    ``dora``)."""
    cfg = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=targets or MLP_TARGETS, lora_dropout=0.0,
                     init_lora_weights=False, use_dora=dora)
    return get_peft_model(model, cfg)


def test_the_mlp_targets_are_its_linear_layers():
    from models import target_linears

    assert [name for name, _ in target_linears(_mlp(), None)] == MLP_TARGETS


@pytest.mark.parametrize("sketch", ["left", "right"])
@pytest.mark.parametrize("method", lora_methods())
def test_peft_with_the_controller_equals_our_engine(method, sketch):
    """Same base weights, factors (one generator, drawn layer by layer), batch order and dropout masks: four
    epochs with a merge every epoch (every 7 steps for ReLoRA) give the same weights to 1e-10."""
    from engine.build import build_run
    from models import set_generator
    from train import train

    base, task = _mlp(), _task()
    rank, scale = 2, 0.5
    kw = dict(lr=1e-2, total_steps=4 * 4, merge_every=1, relora_every=7, relora_warmup=2)
    train_kw = dict(lr=1e-2, weight_decay=0.01, batch_size=64, max_epochs=4, patience=100)

    ours_g = torch.Generator().manual_seed(123)
    ours = build_run(base, method, sketch, [rank], [ours_g], [scale], **kw)
    rec_ours = train(ours.model, ours.params, task, generator=ours_g, **train_kw, **ours.hooks)

    peft_g = torch.Generator().manual_seed(123)
    model = _peft(copy.deepcopy(base), rank, scale, dora=METHODS[method].adapter == "dora")
    set_generator(model, peft_g)
    chain = ChainController(model, method, sketch, generator=peft_g)
    params, hooks = chain.training(**kw)
    rec_peft = train(model, params, task, generator=peft_g, **train_kw, **hooks)

    assert rec_peft.merges == rec_ours.merges == (0 if not chain.method.merges else 2 if method == "relora" else 4)
    for name in MLP_TARGETS:
        adapter, layer = ours.model.get_submodule(name), model.base_model.model.get_submodule(name)
        for ours_w, peft_w in ((adapter.base.weight, layer.base_layer.weight), (adapter.base.bias, layer.base_layer.bias),
                               (adapter.A, layer.lora_A["default"].weight), (adapter.B, layer.lora_B["default"].weight)):
            torch.testing.assert_close(peft_w, ours_w, rtol=0, atol=1e-10, msg=f"{method} {sketch} {name}")
        if chain.method.adapter == "dora":  # DoRA's magnitudes, PEFT's lora_magnitude_vector
            torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, adapter.m, rtol=0, atol=1e-10)
    assert [r["val_loss"] for r in rec_peft.curve] == pytest.approx([r["val_loss"] for r in rec_ours.curve], abs=1e-10)
    moved = model.base_model.model.get_submodule("net.0").base_layer.weight  # (train keeps the best epoch's weights)
    merged_by_best = any(r["merged"] for r in rec_peft.curve[:rec_peft.best_epoch])
    assert merged_by_best == (not torch.equal(moved, base.get_submodule("net.0").weight))


# --- per layer type: nn.Linear (the MLP) and GPT-2's Conv1D -------------------------------------------
def _gpt2(dt=DT, dora=False):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)).to(dt)
    cfg = LoraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False,
                     lora_dropout=0.0, use_dora=dora)
    return get_peft_model(model, cfg)


def _mlp_peft(dora=False):
    from models import set_generator

    model = _peft(_mlp(), 2, 0.5, dora=dora)
    set_generator(model, torch.Generator().manual_seed(0))  # the MLP's seeded dropout
    return model


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "conv1d":
        return {"input_ids": torch.randint(0, 100, (3, 10), generator=g)}
    return {"x": torch.randn(7, 784, generator=g, dtype=DT)}


def _out(model, kind, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits if kind == "conv1d" else model(inputs["x"])


LAYER_KINDS = [("linear", _mlp_peft), ("conv1d", _gpt2)]


@pytest.mark.parametrize("kind,make", LAYER_KINDS)
@pytest.mark.parametrize("sketch", ["left", "right"])
def test_a_merge_keeps_the_function_and_redraws_only_for_rac_lora(kind, make, sketch):
    from transformers.pytorch_utils import Conv1D

    inputs = _inputs(kind)
    for method in ("rac_lora", "asymmetric_lora"):
        model = make()
        chain = ChainController(model, method, sketch, seed=4)
        if kind == "conv1d":
            assert all(isinstance(f.layer.base_layer, Conv1D) for f in chain.factors)
        with torch.no_grad():  # a trained-looking zero factor, so that the delta is not zero
            for f in chain.factors:
                f.zero_factor.normal_(0, 0.1, generator=torch.Generator().manual_seed(9))
        before = _out(model, kind, inputs)
        randoms = [f.random_factor.detach().clone() for f in chain.factors]
        bases = [f.layer.base_layer.weight.detach().clone() for f in chain.factors]
        merged = chain.merge()
        after = _out(model, kind, inputs)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
        if method == "rac_lora":
            assert merged and chain.merges == 1
            assert all(not torch.equal(f.random_factor, r) for f, r in zip(chain.factors, randoms))
            assert all(not torch.equal(f.layer.base_layer.weight, b) for f, b in zip(chain.factors, bases))
            assert all(float(f.zero_factor.detach().abs().sum()) == 0.0 for f in chain.factors)
        else:
            assert not merged and chain.merges == 0
            assert all(torch.equal(f.random_factor, r) for f, r in zip(chain.factors, randoms))
            assert all(torch.equal(f.layer.base_layer.weight, b) for f, b in zip(chain.factors, bases))


@pytest.mark.parametrize("kind,make", LAYER_KINDS)
@pytest.mark.parametrize("method,sketch,trained", [("rac_lora", "left", {"A"}), ("rac_lora", "right", {"B"}),
                                                   ("asymmetric_lora", "left", {"A"}), ("cola", "left", {"A", "B"}),
                                                   ("lora", "right", {"A", "B"})])
def test_only_the_declared_factor_has_a_gradient(kind, make, method, sketch, trained):
    model = make()
    chain = ChainController(model, method, sketch, seed=0)
    with torch.no_grad():
        for f in chain.factors:
            f.zero_factor.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    model.train()
    out = model(**_inputs(kind)).logits if kind == "conv1d" else model(_inputs(kind)["x"])
    out.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    want = {n for n, p in model.named_parameters()
            if any(p is getattr(f, k) for f in chain.factors for k in trained)}
    assert with_grad == want and len(want) == len(chain.factors) * len(trained)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want


def test_relora_clears_the_optimizer_state_at_a_merge():
    model = _mlp_peft()
    chain = ChainController(model, "relora", "left", seed=0)
    opt = chain.optimizer(lr=1e-2)
    model(_inputs("linear")["x"]).sum().backward()
    opt.step()
    assert opt.state
    assert chain.merge(opt) and not opt.state


def test_lora_plus_gives_b_its_own_learning_rate():
    chain = ChainController(_mlp_peft(), "lora_plus", "left", seed=0)
    groups = chain.optimizer(lr=1e-3, loraplus_ratio=16.0).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(f.B) for f in chain.factors}


# --- the Trainer callback, end to end ---------------------------------------------------------------
class _Pairs(torch.utils.data.Dataset):
    """A tiny sequence task: label 1 for sentences of tokens 50-99, 0 for tokens 0-49."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids = torch.randint(0, 50, (n, 8), generator=g) + 50 * self.labels[:, None]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": int(self.labels[i])}


def _tiny_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, num_labels=2, type_vocab_size=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = RobertaForSequenceClassification(cfg)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value", "dense"], lora_dropout=0.0,
                                            init_lora_weights=False, task_type="SEQ_CLS"))


@pytest.mark.parametrize("schedule", [{"merge_every_steps": 5}, {"merge_every_epochs": 1}])
def test_the_trainer_callback_merges_on_schedule_and_the_loss_goes_down(tmp_path, schedule):
    from transformers import Trainer, TrainingArguments

    model = _tiny_classifier()
    chain = ChainController(model, "rac_lora", "left", seed=0)
    callback = ChainCallback(chain, **schedule)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, per_device_train_batch_size=16,
                             learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(320, 0), callbacks=[callback],
                      optimizers=(chain.optimizer(2e-3), None))
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 100
    want = list(range(5, 101, 5)) if "merge_every_steps" in schedule else [20, 40, 60, 80, 100]
    assert callback.merge_steps == want and chain.merges == callback.merges == len(want)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.15, losses


def test_relora_in_trainer_merges_clears_adamw_and_follows_its_jagged_schedule(tmp_path):
    """ReLoRA through Trainer: merges every 6 steps (ChainCallback), AdamW's state cleared at each merge (its
    step count restarts), and the learning rate of every step is the registry's lr_lambda."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from raclora.methods import get_method

    model = _tiny_classifier()
    chain = ChainController(model, "relora", "left", seed=0)
    opt = chain.optimizer(1e-3)
    sched = chain.scheduler(opt, total_steps=20, relora_every=6, relora_warmup=3)
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            counts = {int(st["step"]) for st in opt.state.values()} if opt.state else {0}
            seen.append((state.global_step, lr_scheduler.get_last_lr()[0], counts))

    callback = ChainCallback(chain, merge_every_steps=6)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=16,
                             learning_rate=1e-3, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=_Pairs(160, 0), callbacks=[Watch(), callback],
            optimizers=(opt, sched)).train()
    assert callback.merge_steps == [6, 12, 18] and chain.merges == 3
    lam = get_method("relora").lr_lambda(20, 6, 3)
    assert [lr for _, lr, _ in seen] == pytest.approx([1e-3 * lam(step) for step, _, _ in seen])
    # Watch runs before the merge of its step: AdamW's step count is the steps since the last merge
    assert [counts for _, _, counts in seen] == [{(step - 1) % 6 + 1} for step, _, _ in seen]


def test_the_saved_model_and_adapter_reload_to_the_same_outputs(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _gpt2()
    chain = ChainController(model, "rac_lora", "left", seed=0)
    with torch.no_grad():  # two links: a merge, then a trained-looking last link
        for f in chain.factors:
            f.zero_factor.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        chain.merge()
        for f in chain.factors:
            f.zero_factor.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    inputs = _inputs("conv1d")
    want = _out(model, "conv1d", inputs)
    paths = chain.save(tmp_path)
    assert (paths["adapter"] / "adapter_model.safetensors").exists()
    merged = GPT2LMHeadModel.from_pretrained(paths["merged"], dtype=DT)
    torch.testing.assert_close(_out(merged, "conv1d", inputs), want, rtol=0, atol=1e-10)
    relinked = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(paths["base"], dtype=DT), paths["adapter"])
    torch.testing.assert_close(_out(relinked, "conv1d", inputs), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(_out(model, "conv1d", inputs), want, rtol=0, atol=0)  # saving left it unchanged


# --- DoRA on PEFT's use_dora layers -----------------------------------------------------------------------
def _trained_looking(chain, seed):
    """Stand-in for training: the zero factor and DoRA's magnitudes moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in chain.factors:
            f.zero_factor.normal_(0, 0.1, generator=g)
            f.m.mul_(1 + 0.1 * torch.randn(f.m.shape, generator=g, dtype=f.m.dtype))


@pytest.mark.parametrize("kind,make", LAYER_KINDS)
@pytest.mark.parametrize("method,sketch", [("rac_dora", "left"), ("rac_dora", "right"), ("cola_dora", "left")])
def test_a_dora_chain_merge_keeps_the_function_and_restarts_the_magnitudes(kind, make, method, sketch):
    """A DoRA link merged into the base weight (PEFT's DoRA merge, on nn.Linear and GPT-2's Conv1D) keeps the
    model's function; the next link starts as its base layer (zero factor 0, m = the new weight's row norms); the
    controller starts a model as its base, and trains the method's factors and m only."""
    inputs = _inputs(kind)
    model = make(dora=True)
    with model.disable_adapter():  # (before the controller: leaving the block makes every adapter tensor trainable)
        base_out = _out(model, kind, inputs)
    chain = ChainController(model, method, sketch, seed=4)
    with torch.no_grad():
        for f in chain.factors:  # at the start each layer is its base layer: m = ||W0|| row by row
            torch.testing.assert_close(f.m, f._row_norms(f.layer.base_layer.weight), rtol=0, atol=0)
    torch.testing.assert_close(_out(model, kind, inputs), base_out, rtol=0, atol=1e-10)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    roles = {"rac_dora": [f"lora_{'A' if sketch == 'left' else 'B'}"], "cola_dora": ["lora_A", "lora_B"]}[method]
    assert trained == {n for n in trained if any(r in n for r in roles + ["lora_magnitude_vector"])}
    assert len(trained) == len(chain.factors) * (len(roles) + 1)
    _trained_looking(chain, 9)
    before = _out(model, kind, inputs)
    assert not torch.allclose(before, base_out, atol=1e-4)
    randoms = [f.random_factor.detach().clone() for f in chain.factors]
    assert chain.merge() and chain.merges == 1
    torch.testing.assert_close(_out(model, kind, inputs), before, rtol=0, atol=1e-10)
    for f, r in zip(chain.factors, randoms):
        assert float(f.zero_factor.detach().abs().sum()) == 0.0 and not torch.equal(f.random_factor, r)
        torch.testing.assert_close(f.m, f._row_norms(f.layer.base_layer.weight), rtol=0, atol=0)
    assert not chain.merge()  # nothing trained since: a no-op


def test_a_saved_dora_chain_reloads_to_the_same_outputs(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _gpt2(dora=True)
    chain = ChainController(model, "rac_dora", "left", seed=0)
    _trained_looking(chain, 5)  # two links: a merge, then a trained-looking last link
    chain.merge()
    _trained_looking(chain, 6)
    inputs = _inputs("conv1d")
    want = _out(model, "conv1d", inputs)
    paths = chain.save(tmp_path)
    merged = GPT2LMHeadModel.from_pretrained(paths["merged"], dtype=DT)
    torch.testing.assert_close(_out(merged, "conv1d", inputs), want, rtol=0, atol=1e-10)
    relinked = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(paths["base"], dtype=DT), paths["adapter"])
    torch.testing.assert_close(_out(relinked, "conv1d", inputs), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method,dora,needle", [("rac_dora", False, "make the LoraConfig with use_dora=True"),
                                               ("rac_lora", True, "make the LoraConfig with use_dora=False")])
def test_a_method_on_layers_of_the_other_kind_is_refused_in_one_line(method, dora, needle):
    with pytest.raises(ChainError) as e:
        ChainController(_mlp_peft(dora=dora), method, "left")
    assert needle in str(e.value) and "\n" not in str(e.value)


# --- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kw,needle", [
    (_mlp, {}, "no PEFT LoRA layers"),
    (_mlp_peft, {"method": "randlora"}, "does not act on LoRA's two factors"),
    (_mlp_peft, {"method": "nope"}, "unknown method 'nope'"),
    (_mlp_peft, {"sketch": "middle"}, "unknown sketch 'middle'"),
    (_mlp_peft, {"random_init": "uniform"}, "unknown random_init"),
    (_mlp_peft, {"seed": -1}, "seed must be"),
])
def test_bad_input_is_one_line(make, kw, needle):
    with pytest.raises(ChainError) as e:
        ChainController(make(), **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_bad_schedule_is_one_line():
    chain = ChainController(_mlp_peft(), "rac_lora", "left")
    for kw in ({}, {"merge_every_steps": 2, "merge_every_epochs": 1}, {"merge_every_steps": 0}):
        with pytest.raises(ChainError) as e:
            ChainCallback(chain, **kw)
        assert "\n" not in str(e.value)


# --- what the controller cannot do, refused in one line (issue 21) ----------------------------------------
def _one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initialisations_that_change_the_base_are_refused(init):
    model = get_peft_model(_mlp(torch.float32), LoraConfig(r=2, target_modules=MLP_TARGETS, init_lora_weights=init))
    with pytest.raises(ChainError) as e:
        ChainController(model, "rac_lora", "left")
    assert f"init_lora_weights={init!r} changes the base weights" in _one_line(e)


def test_lora_on_embeddings_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["wte", "c_attn"], fan_in_fan_out=True,
                                             init_lora_weights=False))
    with pytest.raises(ChainError) as e:
        ChainController(model, "rac_lora", "left")
    assert "is a Embedding" in _one_line(e) and "not embeddings or convolutions" in str(e.value)


def test_an_adapter_that_is_not_the_active_one_is_refused():
    model = _mlp_peft()
    model.add_adapter("other", LoraConfig(r=2, target_modules=MLP_TARGETS, init_lora_weights=False))
    with pytest.raises(ChainError) as e:
        ChainController(model, "rac_lora", "left", adapter="other")
    assert "adapter 'other' is not the active one ('default')" in _one_line(e)
    model.set_adapter("other")
    assert ChainController(model, "rac_lora", "left", adapter="other").adapter == "other"


def test_layers_merged_by_peft_are_refused_before_a_chain_merge():
    model = _mlp_peft()
    model.merge_adapter()
    with pytest.raises(ChainError) as e:
        ChainController(model, "rac_lora", "left")
    assert "merged by PEFT (merge_adapter)" in _one_line(e)
    model.unmerge_adapter()
    chain = ChainController(model, "rac_lora", "left")
    with torch.no_grad():
        for f in chain.factors:
            f.zero_factor.normal_(generator=torch.Generator().manual_seed(0))
    model.merge_adapter()  # W + delta in the base layer, then a chain merge would make it W + 2 delta
    with pytest.raises(ChainError) as e:
        chain.merge()
    assert "call model.unmerge_adapter() first" in _one_line(e) and chain.merges == 0


def test_a_second_merge_with_nothing_trained_is_a_no_op_that_does_not_count():
    model = _mlp_peft()
    chain = ChainController(model, "rac_lora", "left")
    with torch.no_grad():
        for f in chain.factors:
            f.zero_factor.normal_(generator=torch.Generator().manual_seed(0))
    assert chain.merge() and chain.merges == 1
    state = copy.deepcopy(model.state_dict())
    generator_state = chain.generator.get_state()
    assert chain.merge() is False and chain.merges == 1  # nothing trained since: nothing added, nothing re-drawn
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(chain.generator.get_state(), generator_state)
