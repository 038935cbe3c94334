"""A user's script of the shape in docs/huggingface.md, for tests/test_peft_save_resume.py: a tiny random
RoBERTa classifier (float64, built offline from a config and saved to ``base/``), LoRA on query and value,
a ChainController and ChainCallback under Trainer with checkpoints, optionally resumed from one.

    python tests/hf_chain_run.py BASE JOBS.json

runs each job of JOBS.json ({"out", "method", "schedule", "accumulation", "resume", "dtype"}) in turn, each
with a model, controller and Trainer of its own, and writes OUT/final.pt (every weight of the trained
PeftModel, the chain's merges and merge log) beside Trainer's checkpoints in OUT/. The tests run it as a fresh
process, so that a resume shares nothing with the run it continues but the checkpoint folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raclora.peft_chain import ChainCallback, ChainController

EXAMPLES, BATCH, EPOCHS = 32, 8, 3  # 4 optimizer steps an epoch (batch 4 x 2 with accumulation)
STEPS = EXAMPLES // BATCH * EPOCHS
SAVE_STEPS = 3  # the steps schedule: merges every 5 steps (5, 10), a checkpoint every 3 (3, 6, 9, 12)
# the epochs schedule: a merge and a checkpoint at each epoch's end (4, 8, 12)


class Pairs(torch.utils.data.Dataset):
    """Label 1 for sentences of tokens 50-99, 0 for tokens 0-49."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids = torch.randint(3, 50, (n, 8), generator=g) + 47 * self.labels[:, None]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": int(self.labels[i])}


def base_model(folder: Path, dtype=torch.float64):
    """The pretrained model the user starts from: built once from a config, saved, loaded from its folder."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=2, type_vocab_size=1,
                            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        RobertaForSequenceClassification(cfg).to(torch.float64).save_pretrained(folder)
    return RobertaForSequenceClassification.from_pretrained(folder, dtype=dtype)


def peft_model(folder: Path, dtype=torch.float64):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base_model(folder, dtype), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                         lora_dropout=0.1, init_lora_weights=False,
                                                         task_type="SEQ_CLS"))


def train(out: Path, base: Path, method: str = "rac_lora", schedule: str = "steps", accumulation: int = 1,
          resume: str | None = None, dtype: str = "float64"):
    """One run: the model, the chain, Trainer with a checkpoint every SAVE_STEPS steps; resumed from
    ``resume`` if given. Returns (model, chain, trainer)."""
    from transformers import Trainer, TrainingArguments

    model = peft_model(base, getattr(torch, dtype))
    chain = ChainController(model, method=method, sketch="left", seed=7)
    total = STEPS
    optimizer = chain.optimizer(lr=5e-3)
    scheduler = chain.scheduler(optimizer, total_steps=total, relora_every=5, relora_warmup=2)
    every = {"merge_every_steps": 5} if schedule == "steps" else {"merge_every_epochs": 1}
    args = TrainingArguments(output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH // accumulation,
                             gradient_accumulation_steps=accumulation, learning_rate=5e-3, save_strategy="steps" if schedule == "steps" else "epoch",
                             save_steps=SAVE_STEPS, logging_strategy="no", report_to=[], seed=3, use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(EXAMPLES, 1), callbacks=[ChainCallback(chain, **every)],
                      optimizers=(optimizer, scheduler))
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == total, trainer.state.global_step
    torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "merges": chain.merges, "merge_log": chain.merge_log}, out / "final.pt")
    return model, chain, trainer


if __name__ == "__main__":
    import json

    base, jobs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    for job in jobs:
        out = Path(job.pop("out"))
        out.mkdir(parents=True, exist_ok=True)
        train(out, base, **job)
