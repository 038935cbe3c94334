"""The suite's methods on any Hugging Face PEFT LoRA model: a controller that applies a method of the registry
(methods.py) to every LoRA layer of a ``PeftModel``, and a ``transformers`` Trainer callback that merges on
schedule. PEFT's own layers stay (so its ``nn.Linear`` and GPT-2 ``Conv1D`` wrappers work unchanged); the
controller only decides which factor is random and frozen, which starts at zero and trains, what a merge
does, and when the optimizer state is cleared.

    model = get_peft_model(base, LoraConfig(r=2, target_modules=[...], init_lora_weights=False))
    chain = ChainController(model, method="rac_lora", sketch="left", random_init="gaussian", seed=0)
    trainer = Trainer(model=model, ..., callbacks=[ChainCallback(chain, merge_every_epochs=1)])
    trainer.train()

Names follow PEFT's. A PEFT LoRA layer computes ``base(x) + scaling * lora_B(lora_A(x))``, with
``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r): the paper's A and B. The paper's sketches then
read (factors.ROLES):

| sketch | random, frozen (re-drawn at each merge) | starts at zero, trains |
|---|---|---|
| ``left`` | ``lora_B`` (B) | ``lora_A`` (A) |
| ``right`` | ``lora_A`` (A) | ``lora_B`` (B) |

Methods that train both factors (lora, cola, lora_plus, cola_plus, relora) train both; "random" then only
says which one is drawn and which starts at zero. A merge adds the layer's delta (PEFT's
``get_delta_weight``, in the base layer's own layout) into ``base_layer.weight``, re-zeroes the zero factor
and re-draws the random one from the controller's generator, so the model's function is unchanged by it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from raclora.factors import RANDOM_INITS, ROLES, FactorRoles, init_factor_
from raclora.methods import METHODS, get_method, merge_and_reset


class ChainError(ValueError):
    """A model or setting the controller cannot use; its message is one line."""


def lora_methods() -> list[str]:
    """The registry's methods that act on LoRA's two factors (RandLoRA, with its own layer, does not)."""
    return [name for name, m in METHODS.items() if m.adapter == "lora"]


class PeftFactors(FactorRoles):
    """One PEFT LoRA layer seen as the suite's adapter (what methods.Method drives: ``A``, ``B``,
    ``zero_factor``, ``random_factor``, ``adapter_parameters``, ``merge``, ``reset``)."""

    def __init__(self, name: str, layer: nn.Module, adapter: str, sketch: str, random_init: str):
        self.name, self.layer, self.adapter = name, layer, adapter
        self.random_init = random_init
        self.zero_name, self.random_name = ROLES[sketch]

    @property
    def A(self) -> nn.Parameter:  # (r, in)
        return self.layer.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # (out, r)
        return self.layer.lora_B[self.adapter].weight

    @property
    def scale(self) -> float:
        return self.layer.scaling[self.adapter]

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.B

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base layer's layout (transposed for a Conv1D)."""
        return self.layer.get_delta_weight(self.adapter)

    @torch.no_grad()
    def merge(self) -> None:
        self.layer.base_layer.weight += self.delta_weight()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None, resample_random: bool = True) -> None:
        init_factor_(self.zero_factor, "zero", None)
        if resample_random:
            init_factor_(self.random_factor, self.random_init, generator)


def _refuse_merged(name: str, module: nn.Module) -> None:
    if getattr(module, "merged", False):
        raise ChainError(f"LoRA layer {name} is merged by PEFT (merge_adapter): a chain merge would add its "
                         "delta a second time; call model.unmerge_adapter() first")


def lora_layers(model: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    """The PEFT LoRA layers of ``model`` that hold ``adapter``, in module order; ChainError for a layer type
    the controller does not handle (it handles PEFT's lora.Linear: nn.Linear and transformers' Conv1D)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        # every LoRA layer type keeps its rank per adapter in ``r`` (an Embedding's factors are not in lora_A)
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "r", {}):
            continue
        if type(module) is not LoraLinear:
            raise ChainError(f"LoRA layer {name} is a {type(module).__name__}; the controller handles PEFT's "
                             "lora.Linear (nn.Linear and Conv1D layers), not embeddings or convolutions: leave it "
                             "out of target_modules")
        _refuse_merged(name, module)
        if module.use_dora.get(adapter, False):
            raise ChainError(f"LoRA layer {name} uses DoRA, whose magnitude vector a merge would have to "
                             "recompute; make the LoraConfig with use_dora=False")
        out.append((name, module))
    return out


class ChainController:
    """A method of the registry on every LoRA layer of a PEFT model (``adapter``: PEFT's adapter name, by
    default the active one). On construction: the factors are drawn (zero factor zeroed, random factor from
    the generator, layer by layer in module order: the draws our own lora.wrap_linears makes) and only the
    method's factors require gradients. ``merge()`` merges and resets when the method merges; ``merges``
    counts them. ``generator`` (else a CPU generator seeded with ``seed``) supplies every re-draw."""

    def __init__(self, model: nn.Module, method: str = "rac_lora", sketch: str = "left",
                 random_init: str = "gaussian", seed: int = 0, adapter: str | None = None,
                 generator: torch.Generator | None = None):
        allowed = lora_methods()
        if method not in METHODS:
            raise ChainError(f"unknown method {method!r}; allowed: {', '.join(allowed)}")
        if method not in allowed:
            raise ChainError(f"method {method!r} does not act on LoRA's two factors (it has its own layer); "
                             f"allowed: {', '.join(allowed)}")
        if sketch not in ROLES:
            raise ChainError(f"unknown sketch {sketch!r}; allowed: {', '.join(ROLES)}")
        if random_init not in RANDOM_INITS:
            raise ChainError(f"unknown random_init {random_init!r}; allowed: {', '.join(RANDOM_INITS)}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ChainError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        active = _active_adapter(model)
        if adapter is not None and adapter != active:
            raise ChainError(f"adapter {adapter!r} is not the active one ({active!r}): its factors would get no "
                             f"gradient while {active!r} trains; call model.set_adapter({adapter!r}) first")
        adapter = active
        _check_init(model, adapter)
        layers = lora_layers(model, adapter)
        if not layers:
            raise ChainError(f"the model has no PEFT LoRA layers (adapter {adapter!r}); wrap it first with "
                             "peft.get_peft_model(model, LoraConfig(...))")
        self.model, self.method, self.adapter = model, get_method(method), adapter
        device = layers[0][1].lora_A[adapter].weight.device
        self.generator = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
        self.factors = [PeftFactors(name, layer, adapter, sketch, random_init) for name, layer in layers]
        ours = {id(p) for f in self.factors for p in f.adapter_parameters()}
        # what else PEFT leaves trainable (modules_to_save: a classifier head), trained as it is
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in ours]
        for f in self.factors:
            f.reset(self.generator)
        self.method.prepare(self.factors)
        self.merges = 0

    @property
    def resets_optimizer(self) -> bool:
        """Whether a merge also clears the optimizer state (ReLoRA)."""
        return self.method.resets_optimizer

    def training(self, **kw) -> tuple[list[dict], dict]:
        """methods.Method.training for these layers: (AdamW parameter groups, the hooks of train.train)."""
        return self.method.training(self.factors, self.generator, **kw)

    def optimizer(self, lr: float, weight_decay: float = 0.0, loraplus_ratio: float = 16.0) -> torch.optim.AdamW:
        """AdamW over the trained factors (LoRA+ and COLA+: B at ``loraplus_ratio`` x lr) and whatever else
        PEFT left trainable (``others``: modules_to_save, such as a classifier head), for a Trainer's
        ``optimizers=(chain.optimizer(lr), None)`` or a plain loop. (Trainer's own optimizer, made from
        every parameter that requires a gradient, also works, except for LoRA+'s second learning rate.)"""
        groups = self.method.optimizer_groups(self.factors, lr, loraplus_ratio)
        groups[0]["params"] = groups[0]["params"] + self.others
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, relora_every: int = 200,
                  relora_warmup: int = 20) -> torch.optim.lr_scheduler.LambdaLR:
        """The method's learning-rate schedule as a LambdaLR (for ``optimizers=(optimizer, scheduler)``):
        ReLoRA's jagged one (a cosine decay to 10 % over ``total_steps``, a linear re-warm-up over
        ``relora_warmup`` steps after every merge, as methods.Method.lr_lambda); constant for the others.
        With ReLoRA, merge every ``relora_every`` steps (ChainCallback(merge_every_steps=relora_every))."""
        factor = self.method.lr_lambda(total_steps, relora_every, relora_warmup)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor or (lambda step: 1.0))

    def merge(self, optimizer: torch.optim.Optimizer | None = None, clear_optimizer: bool = False) -> bool:
        """Merge every layer's delta into its base weight, re-zero the zero factor and re-draw the random one,
        if the method merges (returns whether it did); then clear ``optimizer``'s state if the method
        (ReLoRA) or ``clear_optimizer`` says so. A merge with every zero factor still zero (nothing trained
        since the last merge, e.g. ``merge()`` twice in a row) is a no-op: it adds nothing, re-draws nothing,
        is not counted and returns False. ChainError if PEFT merged a layer itself (merge_adapter)."""
        if not self.method.merges:
            return False
        if all(not f.zero_factor.any() for f in self.factors):  # nothing trained since the last merge: a no-op
            return False
        for f in self.factors:  # a layer PEFT merged meanwhile (merge_adapter) is refused
            _refuse_merged(f.name, f.layer)
        merge_and_reset(self.factors, self.generator)
        self.merges += 1
        if optimizer is not None and (clear_optimizer or self.resets_optimizer):
            optimizer.state.clear()
        return True

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Two saves of the model as it stands, neither changing it:

        - ``merged/``: every link merged (``merge_and_unload``): a plain transformers model for
          ``from_pretrained``;
        - ``base/`` + ``adapter/``: the base weights with the earlier links merged, and the last link's
          adapter in PEFT's format (safetensors) for ``PeftModel.from_pretrained(base, adapter)``.
        """
        folder = Path(folder)
        paths = {"merged": folder / "merged", "base": folder / "base", "adapter": folder / "adapter"}
        copy.deepcopy(self.model).merge_and_unload().save_pretrained(paths["merged"])
        copy.deepcopy(self.model).unload().save_pretrained(paths["base"])
        self.model.save_pretrained(paths["adapter"])  # adapter_model.safetensors + adapter_config.json
        return paths


# PEFT initialisations that the controller's own draw makes moot: it re-draws every factor (and PiSSA-style ones
# would have changed the base weights, which a chain must start from unchanged)
FREE_INITS = (True, False, "gaussian", "orthogonal")


def _check_init(model: nn.Module, adapter: str) -> None:
    """ChainError for a LoraConfig whose init_lora_weights moves part of the base weight into the factors (pissa,
    olora, corda, eva) or quantises it (loftq): the controller re-draws the factors and the chain's merges add
    to the base weight as it was, so the model would no longer start from the base model."""
    config = getattr(model, "peft_config", {}).get(adapter)
    init = getattr(config, "init_lora_weights", False)
    if init not in FREE_INITS:
        raise ChainError(f"init_lora_weights={init!r} changes the base weights (the residual of the factors it "
                         f"starts from), which the controller's chain cannot keep; make the LoraConfig with "
                         f"init_lora_weights=False (the controller draws the factors)")


def _active_adapter(model: nn.Module) -> str:
    name = getattr(model, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name if isinstance(name, str) else "default"


class ChainCallback:
    """Merges the controller's chain on a schedule during ``Trainer.train``: every ``merge_every_steps``
    optimizer steps or every ``merge_every_epochs`` epochs (one of the two). ``merge_steps`` and
    ``merge_epochs`` record the global step and the epoch (Trainer's state.epoch) of each merge it made.

    It keeps transformers' callback protocol (Trainer calls ``on_<event>(args, state, control, **kwargs)`` on
    every callback it was given) without subclassing ``TrainerCallback``: importing that loads transformers'
    whole Trainer (seconds, and warnings on stderr), which this module must not do to a user who only wants
    the controller. Every event but ``on_step_end`` and ``on_epoch_end`` is a no-op, as in TrainerCallback."""

    def __init__(self, chain: ChainController, merge_every_steps: int | None = None,
                 merge_every_epochs: int | None = None, clear_optimizer: bool = False):
        if (merge_every_steps is None) == (merge_every_epochs is None):
            raise ChainError("give one of merge_every_steps and merge_every_epochs")
        for name, value in (("merge_every_steps", merge_every_steps), ("merge_every_epochs", merge_every_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ChainError(f"{name} must be a positive integer, got {value!r}")
        self.chain, self.every_steps, self.every_epochs = chain, merge_every_steps, merge_every_epochs
        self.clear_optimizer = clear_optimizer
        self.epochs_done = 0
        self.merge_steps: list[int] = []
        self.merge_epochs: list[float] = []

    @property
    def merges(self) -> int:
        return len(self.merge_steps)

    def _merge(self, state, optimizer) -> None:
        if self.chain.merge(optimizer, self.clear_optimizer):
            self.merge_steps.append(state.global_step)
            self.merge_epochs.append(state.epoch)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.every_steps is not None and state.global_step % self.every_steps == 0:
            self._merge(state, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self.epochs_done += 1
        if self.every_epochs is not None and self.epochs_done % self.every_epochs == 0:
            self._merge(state, optimizer)

    def __getattr__(self, name: str):
        if name.startswith("on_"):  # any other Trainer event (on_train_begin, on_log, ...): nothing to do
            return _no_op
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _no_op(*args, **kwargs) -> None:
    return None


__all__ = ["ChainCallback", "ChainController", "ChainError", "PeftFactors", "lora_layers", "lora_methods"]
