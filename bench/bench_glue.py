"""What glue.py's full protocol costs: one training step of a RoBERTa-base-sized classifier (random weights,
built from transformers' RobertaConfig defaults: no download) timed here, full fine-tuning and RAC-LoRA
through PEFT + peft_chain, and the protocol's step count from GLUE's training-set sizes.

    python bench/bench_glue.py [--batch 16] [--length 128] [--steps 3] [--tflops 100]

Prints figures; asserts nothing. The GPU estimate is arithmetic, not a measurement: the model's matrix
products per step (about 6 x parameters x tokens for full fine-tuning, 4x for LoRA: no weight gradients)
at a sustained ``--tflops``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glue import GlueConfig  # noqa: E402
from raclora.peft_chain import ChainController  # noqa: E402

# GLUE's training-set sizes (Wang et al., 2019, Table 1)
TRAIN_SIZES = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qqp": 363846, "stsb": 5749, "mnli": 392702,
               "qnli": 104743, "rte": 2490}


def step_seconds(model, optimizer, batch: int, length: int, steps: int) -> float:
    import torch

    ids = torch.randint(5, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))
    model.train()
    times = []
    for _ in range(steps + 1):  # the first one warms up
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification


    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tflops", type=float, default=100.0, help="sustained GPU throughput assumed for the estimate")
    args = p.parse_args()
    cfg = GlueConfig()
    torch.manual_seed(0)
    fpft = RobertaForSequenceClassification(RobertaConfig(num_labels=2))
    params = sum(q.numel() for q in fpft.parameters())
    t_fpft = step_seconds(fpft, torch.optim.AdamW(fpft.parameters(), lr=2e-5), args.batch, args.length, args.steps)
    torch.manual_seed(0)
    lora = get_peft_model(RobertaForSequenceClassification(RobertaConfig(num_labels=2)),
                          LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                                     task_type="SEQ_CLS", init_lora_weights=False))
    chain = ChainController(lora, "rac_lora", "left", seed=0)
    trainable = sum(q.numel() for q in lora.parameters() if q.requires_grad)
    t_lora = step_seconds(lora, chain.optimizer(cfg.lr), args.batch, args.length, args.steps)
    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"RoBERTa-base-sized classifier: {params:,} parameters; RAC-LoRA r={cfg.rank} on {cfg.target_modules}: "
          f"{trainable:,} trained (with the classifier head)")
    print(f"one step, batch {args.batch} x {args.length} tokens, here: full fine-tuning {t_fpft:.2f} s, "
          f"RAC-LoRA {t_lora:.2f} s")
    tasks = cfg.tasks
    epochs = cfg.epochs()
    steps = {t: -(-TRAIN_SIZES[t] // args.batch) * epochs for t in tasks}
    total = sum(steps.values())
    runs = len(cfg.selected_methods()) * len(cfg.seeds)
    tokens = args.batch * args.length
    flop_fpft, flop_lora = 6 * params * tokens, 4 * params * tokens
    per_seed_method = {"fpft": total * flop_fpft, "lora": total * flop_lora}
    flops = len(cfg.seeds) * (per_seed_method["fpft"] + (len(cfg.selected_methods()) - 1) * per_seed_method["lora"])
    print(f"the default protocol (python glue.py): tasks {' '.join(tasks)}, {cfg.chains} chains x "
          f"{cfg.epochs_per_chain} epochs = {epochs} epochs, {len(cfg.selected_methods())} methods x "
          f"{len(cfg.seeds)} seeds = {runs} runs per task; {total:,} steps per method and seed over the tasks "
          f"({', '.join(f'{t} {s:,}' for t, s in steps.items())})")
    cpu_h = len(cfg.seeds) * total * (t_fpft + (len(cfg.selected_methods()) - 1) * t_lora) / 3600
    print(f"   on this CPU: about {cpu_h:,.0f} hours ({cpu_h / 24 / 365:.1f} years)")
    print(f"   on a GPU sustaining {args.tflops:g} TFLOP/s: {flops:.2e} FLOP of matrix products, about "
          f"{flops / (args.tflops * 1e12) / 3600:,.0f} GPU-hours (sequences padded to {args.length} tokens; "
          f"GLUE's are shorter on average, dynamic padding makes it less)")
    small = ["mrpc", "rte", "stsb", "cola"]
    s_small = sum(-(-TRAIN_SIZES[t] // args.batch) * epochs for t in small)
    f_small = len(cfg.seeds) * s_small * (flop_fpft + (len(cfg.selected_methods()) - 1) * flop_lora)
    print(f"   the four small tasks alone ({' '.join(small)}): about {f_small / (args.tflops * 1e12) / 3600:,.0f} "
          f"GPU-hours")


if __name__ == "__main__":
    main()
