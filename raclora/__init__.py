"""raclora: RAC-LoRA and its relatives as a library (Malinovsky et al., arXiv:2410.08305).

What a researcher imports into their own code, with no module of the lab's scripts beside it:

- ``raclora.methods``: the method registry (LoRA, COLA, AsymmLoRA, RAC-LoRA, LoRA+, COLA+, ReLoRA, RandLoRA,
  PiSSA, DoRA and their chains, AdaLoRA) as small strategies: which factor trains, when to merge, what a merge
  re-draws, the optimizer's groups and learning-rate schedule;
- ``raclora.adalora``: AdaLoRA's budget schedule, importance scores, masking and orthogonality penalty (PEFT's);
- ``raclora.factors``: the factors' roles (which of A, B a sketch makes zero and which random), their
  initialisers and the scaling rules;
- ``raclora.peft_chain``: those methods on any Hugging Face PEFT LoRA model, DoRA's on its ``use_dora`` layers
  (``ChainController``, ``ChainCallback`` for ``transformers.Trainer``);
- ``raclora.errors``: the errors every layer raises (one line each).

The lab (main.py, config.py, models.py, lora.py, data.py, train.py, the engine and the studies) imports this
package; nothing here imports the lab.
"""
__version__ = "0.2.0"
