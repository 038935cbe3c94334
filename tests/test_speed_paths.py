"""Issue 24's faster paths give today's results: bit for bit where the arithmetic is unchanged (AdamW's multi-tensor
step, batches gathered into one buffer, dropout masks made in place), to 1e-10 in float64 where it changes (the fused
AdamW); and a stack still trains each run as it trains alone on every path."""
from __future__ import annotations

import os

import pytest
import torch

import models
from engine import stack
from engine.build import build_run
from test_stack import KW, METHOD_KW, SCALE, SEEDS, assert_run_is_alone, base, task  # noqa: F401  (fixtures)
from train import BEFORE, SPEED, speed, train



def old_seeded_dropout(self, x):
    """SeededDropout.forward as it was before issue 24: a bool mask, converted by the product."""
    if not self.training or self.p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= self.p
    return x * keep / (1.0 - self.p)


def old_stacked_dropout(self, h):
    """StackedDropout.forward as it was before issue 24 (every run's batch whole)."""
    if not self.training or self.p == 0.0:
        return h
    u = torch.empty_like(h)
    for row, g in zip(u, self.generators):
        row.uniform_(generator=g)
    return h * (u >= self.p) / (1.0 - self.p)


@pytest.fixture
def before(monkeypatch):
    """The loops as they were: every speed switch off and the dropout of before."""
    monkeypatch.setattr(models.SeededDropout, "forward", old_seeded_dropout)
    monkeypatch.setattr(stack.StackedDropout, "forward", old_stacked_dropout)
    with speed(BEFORE):
        yield


def alone(base, task, method="rac_lora", rank=2, seed=3, lr=3e-2):
    g = torch.Generator().manual_seed(seed)
    run = build_run(base, method, None if rank is None else "left", [rank], [g], [None if rank is None else SCALE * rank],
                    lr=lr, **METHOD_KW)
    return run.model, train(run.model, run.params, task, lr=lr, generator=g, **{**KW, **run.hooks})


def stacked(base, task, method="rac_lora", ranks=(1, 2, 4, 2), lr=3e-2):
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    run = build_run(base, method, "left", list(ranks), gens, [SCALE * r for r in ranks], stacked=True, lr=lr,
                    **METHOD_KW)
    return run.model, stack.train_stack(run.model, run.params, task, generators=gens, lr=lr, **{**KW, **run.hooks})


def curves(records):
    return [[{k: v for k, v in row.items() if k != "wall_s"} for row in r.curve] for r in records]


def test_the_defaults_are_the_fast_paths():
    assert SPEED.adamw == "foreach" and SPEED.gather
    assert BEFORE.adamw == "for-loop" and not BEFORE.gather
    with pytest.raises(ValueError, match="unknown AdamW"):
        with speed(adamw="sgd"):
            pass


@pytest.mark.parametrize("method", ["rac_lora", "lora_plus", "relora", "fpft"])
def test_plain_loop_equals_the_old_one_bit_for_bit(base, task, method, request):
    rank, lr = (None, 3e-3) if method == "fpft" else (2, 3e-2)
    new_model, new = alone(base, task, method, rank, lr=lr)
    request.getfixturevalue("before")
    old_model, old = alone(base, task, method, rank, lr=lr)
    assert curves([new]) == curves([old]) and (new.epochs, new.best_epoch, new.merges) == (old.epochs, old.best_epoch,
                                                                                             old.merges)
    for (k, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("method", ["rac_lora", "lora_plus", "relora"])
def test_stacked_loop_equals_the_old_one_bit_for_bit(base, task, method, request):
    new_model, new = stacked(base, task, method)
    request.getfixturevalue("before")
    old_model, old = stacked(base, task, method)
    assert curves(new) == curves(old)
    for (k, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_fused_adamw_equals_the_for_loop_to_1e10(base, task):
    """The fused AdamW rounds differently: the same run to 1e-10 in float64, plain and stacked; and a fused stack
    still equals its runs trained alone, fused too."""
    with speed(adamw="fused"):
        fused_model, fused = alone(base, task)
        fused_stack, fused_records = stacked(base, task)
    ref_model, ref = alone(base, task)
    assert (fused.epochs, fused.best_epoch) == (ref.epochs, ref.best_epoch)
    for a, b in zip(fused.curve, ref.curve):
        for k in ("train_loss", "val_loss", "val_acc", "test_acc"):
            assert a[k] == pytest.approx(b[k], abs=1e-10), k
    for (k, a), b in zip(fused_model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(fused_model.state_dict().values(),
                                                    ref_model.state_dict().values())), \
        "the fused step should round differently somewhere (else this test compares a path with itself)"
    with speed(adamw="fused"):
        for i, (rank, seed) in enumerate(zip((1, 2, 4, 2), SEEDS)):
            ref_i, rec_i = alone(base, task, rank=rank, seed=seed)
            assert_run_is_alone(fused_stack, i, fused_records[i], ref_i, rec_i, task)


def test_a_gathered_batch_is_overwritten_only_after_its_backward():
    """The batch buffer is reused: a step's input must stay what it was until that step's backward has run."""
    from train import batch_buffer, gather_batch

    x = torch.arange(12.0).view(6, 2)
    buf = batch_buffer(x, 3)
    first = gather_batch(x, torch.tensor([4, 0, 2]), buf)
    assert first.data_ptr() == buf.data_ptr() and first.tolist() == [[8, 9], [0, 1], [4, 5]]
    short = gather_batch(x, torch.tensor([5]), buf)
    assert short.shape == (1, 2) and short.tolist() == [[10, 11]]
    with speed(gather=False):
        assert batch_buffer(x, 3) is None and gather_batch(x, torch.tensor([1]), buf).data_ptr() != buf.data_ptr()


# --- divergence seen at the epoch's end (Speed.check "epoch"): no host read in the step -----------------------------
def poisoned_stack(base, task, poison_step=7, poisoned=(1,)):
    """A stack of three runs whose run(s) ``poisoned`` get a nan in their first layer after step ``poison_step``
    (the middle of epoch 2: 5 steps an epoch), so that the next step's loss is nan."""
    from engine.stack import StackedModel
    gens = [torch.Generator().manual_seed(s) for s in SEEDS[:3]]
    model = StackedModel(base, len(gens))
    marked = [gens[i] for i in poisoned]

    def poison(step, live):
        if step == poison_step:
            for g in marked:
                if g in live:
                    model.linears[0].weight.data[live.index(g)] = float("nan")
        return False

    records = stack.train_stack(model, list(model.parameters()), task, generators=gens, lr=3e-3, on_step_end=poison,
                                **KW)
    return model, records


@pytest.mark.parametrize("poisoned", [(1,), (0, 1, 2)])
def test_divergence_seen_at_the_epoch_end_records_what_the_step_check_records(base, task, poisoned):
    """The same records (status, step, epochs, curves) and the same kept weights, bit for bit, whether each step's
    loss is read back at once or the epoch's losses at its end; also when every run of the stack diverges."""
    with speed(check="step"):
        old_model, old = poisoned_stack(base, task, poisoned=poisoned)
    new_model, new = poisoned_stack(base, task, poisoned=poisoned)
    assert [(r.status, r.diverged_step) for r in new] == [(r.status, r.diverged_step) for r in old]
    assert [r.diverged_step for r in new] == [8 if i in poisoned else None for i in range(3)]
    assert curves(new) == curves(old) and [r.epochs for r in new] == [r.epochs for r in old]
    for (k, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_plain_run_that_diverges_is_recorded_alike_on_both_checks():
    from tests.test_train import fit, synthetic_task
    runs = {}
    for check in ("step", "epoch"):
        with speed(check=check):
            runs[check] = fit(synthetic_task(), lr=1e30, weight_decay=0.0, max_epochs=20)
    (old_model, old), (new_model, new) = runs["step"], runs["epoch"]
    assert new.status == old.status == "diverged" and new.diverged_step == old.diverged_step
    assert (new.epochs, new.curve, new.best_epoch) == (old.epochs, old.curve, old.best_epoch) == (0, [], 0)
    for (k, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="unknown divergence check"):
        with speed(check="never"):
            pass


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the tensor reads that make the host wait for the device: .item(), .tolist(), bool(tensor); not those
    of torch.optim (AdamW reads its step counts, which stay on the host unless ``capturable``, also on CUDA)."""
    import sys
    count = [0]
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if f"torch{os.sep}optim{os.sep}" not in sys._getframe(1).f_code.co_filename:
                count[0] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize("stacked_engine", [False, True])
def test_the_steps_read_nothing_back(base, host_reads, stacked_engine):
    """An epoch of twice the steps reads back from the device as often as one of half: nothing in the step does
    (on "step", the divergence test reads every step's loss)."""
    from engine.stack import StackedModel
    from models import set_generator
    from test_stack import noisy_task, plain_copy

    def reads(n, check):
        task = noisy_task(n=n)
        with speed(check=check):
            host_reads[0] = 0
            if stacked_engine:
                gens = [torch.Generator().manual_seed(s) for s in SEEDS]
                model = StackedModel(base, len(gens))
                stack.train_stack(model, list(model.parameters()), task, generators=gens, lr=3e-3,
                                  **{**KW, "max_epochs": 1})
            else:
                g = torch.Generator().manual_seed(0)
                model = plain_copy(base)
                set_generator(model, g)
                train(model, list(model.parameters()), task, lr=3e-3, generator=g, **{**KW, "max_epochs": 1})
            return host_reads[0]
    assert reads(320, "epoch") == reads(640, "epoch")  # 5 and 10 steps of 64
    assert reads(640, "step") - reads(320, "step") == 5
