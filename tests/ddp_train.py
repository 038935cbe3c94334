"""RAC-LoRA through transformers' Trainer on a tiny random BERT, in one process or several (tests/test_ddp.py).

    python tests/ddp_train.py OUT --batch 8                                   # one process, batch 8
    torchrun --nproc_per_node 2 tests/ddp_train.py OUT --batch 4              # two processes, 4 each: 8 a step

The same computation either way: float64, every dropout probability 0, the data a fixed tensor, the sampler's
order seeded (data_seed), the model and the controller's generator seeded alike on every process. Each process
writes OUT/rank<r>.pt: its state dict before training (``start``) and after it (``weights``: every weight, the
base weights the merges changed included), the random factors it held at the start and after each merge
(``factors[k]``: after merge k, k = 0 the first draw), the global steps of the merges and of the whole run, and
the world size. Offline: the model is built from a config, nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from raclora.peft_chain import ChainCallback, ChainController

DT = torch.float64  # so that summing a gradient over 2 x 4 rows (DDP) instead of 8 moves the last bits only


class Pairs(torch.utils.data.Dataset):
    """``n`` sentences of ``length`` tokens: label 1 for tokens 50-99, 0 for tokens 0-49 (seeded, fixed)."""

    def __init__(self, n: int, length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids = torch.randint(0, 50, (n, length), generator=g) + 50 * self.labels[:, None]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": int(self.labels[i])}


def tiny_bert(seed: int = 0):
    """A 2-layer BERT of width 32 with random weights (seeded) and LoRA r=2 on query and value, float64, every
    dropout off (LoRA's too) so that one process and several compute the same thing."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, type_vocab_size=1, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False,
        task_type="SEQ_CLS"))
    return model.to(DT)


def weights(model) -> dict[str, torch.Tensor]:
    """A copy of every weight of the model (its state dict: base weights, LoRA factors, head)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FactorLog(TrainerCallback):
    """The controller's random factors (name -> tensor) at the start and after each merge; given to Trainer
    after the ChainCallback, so that its on_step_end sees the merge that step made."""

    def __init__(self, chain: ChainController):
        self.chain = chain
        self.draws = [self._factors()]

    def _factors(self) -> dict[str, torch.Tensor]:
        return {f.name: f.random_factor.detach().clone() for f in self.chain.factors}

    def on_step_end(self, args, state, control, **kwargs):
        if self.chain.merges == len(self.draws):  # the ChainCallback merged at this step
            self.draws.append(self._factors())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for rank<r>.pt")
    p.add_argument("--batch", type=int, required=True, help="per-process batch (the global batch: x processes)")
    p.add_argument("--examples", type=int, default=96, help="training examples (a multiple of the global batch)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--merge_every_steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    torch.set_num_threads(1)  # one thread per process, as torchrun's default: 2 processes on 2 cores

    launched = "WORLD_SIZE" in os.environ  # by torchrun; a plain `python` run has no process group to join
    if a.examples % (a.batch * int(os.environ.get("WORLD_SIZE", "1"))):
        p.error("--examples must be a multiple of the global batch (--batch x processes): no batch padded or dropped")
    model = tiny_bert()
    chain = ChainController(model, method="rac_lora", sketch="left", seed=0)  # the same seed on every process
    start = weights(model)
    merging, log = ChainCallback(chain, merge_every_steps=a.merge_every_steps), FactorLog(chain)
    args = TrainingArguments(
        output_dir=str(a.out / "trainer"), per_device_train_batch_size=a.batch, num_train_epochs=a.epochs,
        learning_rate=a.lr, lr_scheduler_type="constant", seed=0, data_seed=0, use_cpu=True,
        ddp_backend="gloo" if launched else None,  # gloo: DDP on CPUs (a GPU run would take nccl, the default)
        ddp_timeout=120,  # seconds: a process whose partner died fails instead of waiting 30 min
        # Trainer multiplies each process's loss by the number of processes when the model takes loss kwargs, for a
        # loss summed over the tokens and divided by their count across processes; a sequence classifier's loss is
        # a mean that ignores that count, so the default (True) makes the gradient N times larger under DDP
        average_tokens_across_devices=False,
        dataloader_drop_last=True, save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(a.examples), callbacks=[merging, log],
                      optimizers=(chain.optimizer(a.lr), None))
    trainer.train()

    rank, world = trainer.args.process_index, trainer.args.world_size
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save({"start": start, "weights": weights(model), "factors": log.draws, "merge_steps": merging.merge_steps,
                "global_step": trainer.state.global_step, "world_size": world}, a.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
