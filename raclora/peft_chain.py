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

import base64
import binascii
import copy
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raclora.factors import RANDOM_INITS, ROLES, FactorRoles, init_factor_, magnitude_scaled, row_norms
from raclora.files import atomic_write
from raclora.methods import METHODS, get_method

CONFIG_NAME = "chain_config.json"  # ChainConfig, beside PEFT's adapter_config.json
STATE_NAME = "chain_state.json"  # merges so far, their steps, the generator that draws the next random factors
STATE_FORMAT = 1


class ChainError(ValueError):
    """A model or setting the controller cannot use; its message is one line."""


def lora_methods() -> list[str]:
    """The registry's methods that act on LoRA's two factors as a sketch starts them, DoRA's with its magnitudes (on
    PEFT's ``use_dora`` layers); RandLoRA and AdaLoRA, with layers of their own, and PiSSA, whose factors start from
    the base weight, do not."""
    return [name for name, m in METHODS.items() if m.adapter in ("lora", "dora") and m.init == "sketch"]


@dataclass
class ChainConfig:
    """What a chain is, in PEFT's configuration style (a dataclass with ``to_dict``, ``save_pretrained`` and
    ``from_pretrained``): the method of the registry, its sketch, the random factor's initialiser, the seed of
    the generator that draws every random factor, and the merge schedule (one of ``merge_every_steps`` and
    ``merge_every_epochs``, or neither for a chain merged by hand). It is saved as ``chain_config.json`` beside
    PEFT's ``adapter_config.json`` by every save of a chained model, and read back on load: a checkpoint of
    another chain is refused, and ``ChainController.from_pretrained`` continues the chain it describes.

    It is not a PEFT ``PeftConfig`` of its own type: PEFT's ``PeftType`` is a closed enum (``register_peft_method``
    accepts only names already in it), so a registered type would mean patching PEFT's enum, and an adapter
    saved with it would load only where this package is imported. The chain's adapter stays a plain LoRA
    adapter (``peft_type: LORA``) that any PEFT loads to the same outputs, and this file adds what LoRA's
    config has no field for."""

    method: str = field(default="rac_lora", metadata={"help": "a method of the registry that acts on LoRA's factors"})
    sketch: str = field(default="left", metadata={"help": "left: lora_B random and frozen; right: lora_A"})
    random_init: str = field(default="gaussian", metadata={"help": "the random factor's initialiser"})
    seed: int = field(default=0, metadata={"help": "seed of the generator that draws every random factor"})
    merge_every_steps: int | None = field(default=None, metadata={"help": "optimizer steps between merges"})
    merge_every_epochs: int | None = field(default=None, metadata={"help": "epochs between merges"})

    def __post_init__(self):
        allowed = lora_methods()
        if self.method not in METHODS:
            raise ChainError(f"unknown method {self.method!r}; allowed: {', '.join(allowed)}")
        if self.method not in allowed:
            why = {"randlora": "it has its own layer",
                   "adalora": "it has its own layers and rank allocator: use PEFT's AdaLoraConfig and "
                              "AdaLoraModel.update_and_allocate without it"}.get(METHODS[self.method].adapter,
                                                             "its factors start from the base weight: use PEFT's "
                                                             "LoraConfig(init_lora_weights='pissa') without it")
            raise ChainError(f"method {self.method!r} does not act on LoRA's two factors as a sketch starts them "
                             f"({why}); allowed: {', '.join(allowed)}")
        if self.sketch not in ROLES:
            raise ChainError(f"unknown sketch {self.sketch!r}; allowed: {', '.join(ROLES)}")
        if self.random_init not in RANDOM_INITS:
            raise ChainError(f"unknown random_init {self.random_init!r}; allowed: {', '.join(RANDOM_INITS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ChainError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        for name in ("merge_every_steps", "merge_every_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ChainError(f"{name} must be a positive integer, got {value!r}")
        if self.merge_every_steps is not None and self.merge_every_epochs is not None:
            raise ChainError("give one of merge_every_steps and merge_every_epochs, not both")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CONFIG_NAME
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ChainConfig:
        """The config saved in ``folder``; ChainError (one line) for a missing, unreadable or invalid file."""
        data = _read_json(Path(folder) / CONFIG_NAME, "the chain's configuration")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ChainError(f"{Path(folder) / CONFIG_NAME}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
        return cls(**data)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChainError(f"{path} is missing: the folder was not saved from a chained model ({what} is "
                         f"written by every save of a model that a ChainController drives)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChainError(f"{path} cannot be read as JSON ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         f"{what} is damaged; use another checkpoint") from None
    if not isinstance(data, dict):
        raise ChainError(f"{path} is not a JSON object: {what} is damaged; use another checkpoint")
    return data


class PeftFactors(FactorRoles):
    """One PEFT LoRA layer seen as the suite's adapter (what methods.Method drives: ``A``, ``B``,
    ``zero_factor``, ``random_factor``, ``adapter_parameters``, ``merge``, ``reset``); on a ``use_dora`` layer
    (``dora``) also DoRA's magnitudes ``m`` (PEFT's ``lora_magnitude_vector``), which a merge folds into the base
    weight and a reset re-starts as the new base weight's row norms (lora.DoRALinear's chain)."""

    def __init__(self, name: str, layer: nn.Module, adapter: str, sketch: str, random_init: str, dora: bool = False):
        self.name, self.layer, self.adapter, self.dora = name, layer, adapter, dora
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

    @property
    def m(self) -> nn.Parameter:  # (out,): DoRA's magnitudes
        return self.layer.lora_magnitude_vector[self.adapter].weight

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.A, self.B, self.m) if self.dora else (self.A, self.B)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base layer's layout (transposed for a Conv1D)."""
        return self.layer.get_delta_weight(self.adapter)

    def _row_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's norm of a weight in the base layer's layout: one per output (factors.row_norms of its (out, in)
        view, as PEFT's get_weight_norm takes it)."""
        return row_norms(_out_in(weight, self.layer.fan_in_fan_out))

    def untouched(self) -> bool:
        """Whether the layer adds nothing to its base weight: the zero factor is zero (DoRA: and m is the base
        weight's row norms)."""
        if self.zero_factor.any():
            return False
        return not self.dora or torch.equal(self.m, self._row_norms(self.layer.base_layer.weight))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + delta; DoRA: W0 <- m / ||W0 + delta|| * (W0 + delta), PEFT's merge of a use_dora layer."""
        weight = self.layer.base_layer.weight
        if not self.dora:
            weight += self.delta_weight()
            return
        fio = self.layer.fan_in_fan_out  # the lab's DoRA weight (factors.magnitude_scaled) in PEFT's layout
        weight.copy_(_out_in(magnitude_scaled(_out_in(weight + self.delta_weight(), fio), self.m), fio))

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None, resample_random: bool = True) -> None:
        """The zero factor zeroed, the random one re-drawn (if asked); DoRA: m re-started as the base weight's row
        norms, so the layer is its base layer again."""
        init_factor_(self.zero_factor, "zero", None)
        if self.dora:
            self.m.copy_(self._row_norms(self.layer.base_layer.weight))
        if resample_random:
            t = self.random_factor
            if generator is None or generator.device == t.device:
                init_factor_(t, self.random_init, generator)
            else:  # drawn where the generator is (the CPU), then copied to the factor's device
                t.copy_(init_factor_(torch.empty(t.shape, dtype=t.dtype, device=generator.device),
                                     self.random_init, generator))


def _out_in(t: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A base layer's weight in (out, in) layout and back: transposed for a Conv1D (PEFT's ``fan_in_fan_out``), as
    PEFT's ``transpose`` does."""
    return t.T if fan_in_fan_out else t


def _refuse_merged(name: str, module: nn.Module) -> None:
    if getattr(module, "merged", False):
        raise ChainError(f"LoRA layer {name} is merged by PEFT (merge_adapter): a chain merge would add its "
                         "delta a second time; call model.unmerge_adapter() first")


def lora_layers(model: nn.Module, adapter: str, dora: bool = False) -> list[tuple[str, nn.Module]]:
    """The PEFT LoRA layers of ``model`` that hold ``adapter``, in module order; ChainError for a layer type
    the controller does not handle (it handles PEFT's lora.Linear: nn.Linear and transformers' Conv1D), and for
    a layer whose ``use_dora`` is not ``dora`` (the method's: a DoRA method needs PEFT's DoRA layers, another
    method plain ones)."""
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
        if module.use_dora.get(adapter, False) and not dora:
            raise ChainError(f"LoRA layer {name} uses DoRA, whose magnitudes only the DoRA methods drive (dora, "
                             "cola_dora, rac_dora); make the LoraConfig with use_dora=False, or use one of those")
        if dora and not module.use_dora.get(adapter, False):
            raise ChainError(f"LoRA layer {name} has no DoRA magnitudes, which the DoRA methods train; make the "
                             "LoraConfig with use_dora=True")
        out.append((name, module))
    return out


class ChainController:
    """A method of the registry on every LoRA layer of a PEFT model (``adapter``: PEFT's adapter name, by
    default the active one). On construction: the factors are drawn (zero factor zeroed, random factor from
    the generator, layer by layer in module order: the draws our own lora.wrap_linears makes) and only the
    method's factors require gradients. ``merge()`` merges and resets when the method merges; ``merges``
    counts them. ``generator`` (else a CPU generator seeded with ``seed``, whatever device the model is on)
    supplies every re-draw. ``config`` (a ChainConfig) may replace method, sketch, random_init and seed.

    Every save of the model keeps the whole chain. The controller takes over the model's ``save_pretrained``
    and ``load_adapter`` (the routes of ``Trainer``'s checkpoints, ``trainer.save_model()``, resume and
    ``load_best_model_at_end``): a save writes PEFT's adapter as usual plus the adapted layers' base weights
    (the earlier links merged into them) into ``adapter_model.safetensors`` and, beside it,
    ``chain_config.json`` (ChainConfig) and ``chain_state.json`` (merges so far, the steps and epochs they
    were made at, the generator's state). So ``PeftModel.from_pretrained(base, folder)`` and
    ``AutoPeftModelFor*.from_pretrained(folder)`` on the untouched base give the trained model (PEFT loads
    the saved base weights into the adapted layers, which are keys of the model), and
    ``trainer.train(resume_from_checkpoint=...)`` continues the chain where it was: ``load_adapter`` restores
    the base weights, the factors, the merges and the generator, and sets the gradients as the method says.

    Why the base weights and not the links: a chain's earlier links are in the adapted layers' base weights
    once merged, so those weights are what the chain is; saving them keeps every save a plain PEFT LoRA
    adapter of fixed shape (a stack of the links would grow with each merge and no LoRA layer could load
    it), and the saved model is exactly the one in memory. The cost is an out x in matrix per adapted layer
    in each saved adapter (RoBERTa-base, query and value: 14.2 M numbers, 57 MB in float32, beside 0.3 M
    for the factors)."""

    def __init__(self, model: nn.Module, method: str = "rac_lora", sketch: str = "left",
                 random_init: str = "gaussian", seed: int = 0, adapter: str | None = None,
                 generator: torch.Generator | None = None, config: ChainConfig | None = None,
                 draw: bool = True):
        config = config if config is not None else ChainConfig(method, sketch, random_init, seed)
        if not isinstance(config, ChainConfig):
            raise ChainError(f"config must be a ChainConfig, got {type(config).__name__}")
        active = _active_adapter(model)
        if adapter is not None and adapter != active:
            raise ChainError(f"adapter {adapter!r} is not the active one ({active!r}): its factors would get no "
                             f"gradient while {active!r} trains; call model.set_adapter({adapter!r}) first")
        adapter = active
        _check_init(model, adapter)
        method = get_method(config.method)
        layers = lora_layers(model, adapter, dora=method.adapter == "dora")
        if not layers:
            raise ChainError(f"the model has no PEFT LoRA layers (adapter {adapter!r}); wrap it first with "
                             "peft.get_peft_model(model, LoraConfig(...))")
        self.model, self.config, self.adapter = model, config, adapter
        self.method = method
        # a CPU generator: the same draws on every device and in every process (Trainer moves the model to its GPU
        # after the controller is built; a GPU's generator would also differ between GPU models)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
        self.factors = [PeftFactors(name, layer, adapter, config.sketch, config.random_init, method.adapter == "dora")
                        for name, layer in layers]
        ours = {id(p) for f in self.factors for p in f.adapter_parameters()}
        # what else PEFT leaves trainable (modules_to_save: a classifier head), trained as it is
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in ours]
        if draw:
            for f in self.factors:
                f.reset(self.generator)
        self.method.prepare(self.factors)
        self.merge_log: list[tuple[int | None, float | None]] = []  # (global step, epoch) of each merge
        self._take_save_routes()

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | os.PathLike) -> ChainController:
        """The controller of a chain saved in ``folder``, on ``model`` already loaded from it
        (``PeftModel.from_pretrained(base, folder, is_trainable=True)``): the config and state are read back,
        the factors are kept as loaded (not re-drawn), and training continues the chain."""
        folder = Path(folder)
        chain = cls(model, config=ChainConfig.from_pretrained(folder), draw=False)
        chain._restore(_read_state(folder / STATE_NAME))
        return chain

    @property
    def merges(self) -> int:
        """Merges made so far (restored on resume)."""
        return len(self.merge_log)

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

    def merge(self, optimizer: torch.optim.Optimizer | None = None, clear_optimizer: bool = False,
              step: int | None = None, epoch: float | None = None) -> bool:
        """Merge every layer's delta into its base weight, re-zero the zero factor and re-draw the random one,
        if the method merges (returns whether it did); then clear ``optimizer``'s state if the method
        (ReLoRA) or ``clear_optimizer`` says so. A merge with every zero factor still zero (nothing trained
        since the last merge, e.g. ``merge()`` twice in a row) is a no-op: it adds nothing, re-draws nothing,
        is not counted and returns False. ChainError if PEFT merged a layer itself (merge_adapter).
        ``step`` and ``epoch`` (the callback's) are recorded with the merge."""
        if not self.method.merges:
            return False
        if all(f.untouched() for f in self.factors):  # nothing trained since the last merge: a no-op
            return False
        for f in self.factors:  # a layer PEFT merged meanwhile (merge_adapter) is refused
            _refuse_merged(f.name, f.layer)
        self.method.merge_and_reset(self.factors, self.generator)
        self.merge_log.append((step, epoch))
        if optimizer is not None and (clear_optimizer or self.resets_optimizer):
            optimizer.state.clear()
        return True

    # --- saving and loading --------------------------------------------------------------------------------
    def state(self) -> dict:
        """What continues the chain beyond its weights (chain_state.json)."""
        g = self.generator.get_state()
        return {"format": STATE_FORMAT, "adapter": self.adapter, "layers": [f.name for f in self.factors],
                "merges": self.merges, "merge_log": [list(m) for m in self.merge_log],
                "generator": {"device": self.generator.device.type,
                              "state": base64.b64encode(g.numpy().tobytes()).decode("ascii")}}

    def _check_state(self, state: dict) -> torch.Tensor:
        """ChainError (one line) unless ``state`` (_read_state's) is one this chain can continue; returns the
        generator state it holds. Nothing is changed."""
        layers = [f.name for f in self.factors]
        if state["layers"] != layers:
            raise ChainError(f"the saved chain adapts other layers ({len(state['layers'])}: "
                             f"{', '.join(state['layers'][:3])}, ...) than this model ({len(layers)}: "
                             f"{', '.join(layers[:3])}, ...); build the model with the same LoraConfig")
        device = state["generator"]["device"]
        if device != self.generator.device.type:
            raise ChainError(f"the saved chain's generator is on {device} and this one on "
                             f"{self.generator.device.type}: resume on the same kind of device")
        generator_state = torch.frombuffer(bytearray(state["generator"]["state"]), dtype=torch.uint8)
        try:  # on a scratch generator of the same kind: the chain's own is set only once all is checked
            torch.Generator(device=self.generator.device).set_state(generator_state)
        except RuntimeError as e:
            raise ChainError(f"the saved generator state cannot be set ({str(e).splitlines()[0]}): "
                             f"chain_state.json is damaged; use another checkpoint") from None
        return generator_state

    def _restore(self, state: dict, generator_state: torch.Tensor | None = None) -> None:
        """Continue from ``state``; ``generator_state``: what _check_state returned for it, if already checked."""
        self.generator.set_state(generator_state if generator_state is not None else self._check_state(state))
        self.merge_log = [tuple(m) for m in state["merge_log"]]

    def _take_save_routes(self) -> None:
        """The model's save_pretrained and load_adapter become the controller's (bound methods on the
        instance: Trainer and users call model.save_pretrained / model.load_adapter; a deepcopy of the model
        copies the controller with it)."""
        model = self.model
        self._peft_save = type(model).save_pretrained.__get__(model)
        self._peft_load = type(model).load_adapter.__get__(model)
        model.save_pretrained = self.save_pretrained
        model.load_adapter = self.load_adapter
        model._raclora_chain = self

    def _adapter_folder(self, save_directory: str | os.PathLike) -> Path:
        # PEFT saves a non-default adapter in a subfolder of its name
        return Path(save_directory) if self.adapter == "default" else Path(save_directory) / self.adapter

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The adapted layers' base weights (the earlier links merged into them), under the model's keys."""
        return {f"{f.name}.base_layer.weight": f.layer.base_layer.weight.detach() for f in self.factors}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """PEFT's save_pretrained, then the adapted layers' base weights into its weights file and the chain's
        config and state beside it (see the class docstring)."""
        self._peft_save(save_directory, *args, **kwargs)
        selected = kwargs.get("selected_adapters")
        if not kwargs.get("is_main_process", True) or (selected is not None and self.adapter not in selected):
            return
        folder = self._adapter_folder(save_directory)
        weights = {k: v.to("cpu").contiguous() for k, v in self.base_weights().items()}
        safe = folder / "adapter_model.safetensors"
        if safe.exists():
            from safetensors.torch import load_file, save

            tensors = load_file(str(safe))
            tensors.update(weights)
            atomic_write(safe, save(tensors, metadata={"format": "pt"}))
        else:  # safe_serialization=False: PEFT's adapter_model.bin
            path = folder / "adapter_model.bin"
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            tensors.update(weights)
            buffer = io.BytesIO()
            torch.save(tensors, buffer)
            atomic_write(path, buffer.getvalue())
        self.config.save_pretrained(folder)
        atomic_write(folder / STATE_NAME, json.dumps(self.state()) + "\n")

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args, **kwargs):
        """PEFT's load_adapter; for this chain's adapter, first the folder is checked (a chain of this config,
        its state readable, the base weights of every adapted layer in its weights file), then after PEFT's
        load the chain's state is restored and the gradients set as the method says."""
        if adapter_name != self.adapter:
            return self._peft_load(model_id, adapter_name, *args, **kwargs)
        folder = Path(model_id) / kwargs["subfolder"] if kwargs.get("subfolder") else Path(model_id)
        if not folder.is_dir():
            raise ChainError(f"{model_id} is not a local folder: a chain resumes from a folder its own save wrote")
        saved = ChainConfig.from_pretrained(folder)
        mine = {k: v for k, v in self.config.to_dict().items() if not k.startswith("merge_every")}
        theirs = {k: v for k, v in saved.to_dict().items() if not k.startswith("merge_every")}
        if mine != theirs:
            diff = ", ".join(f"{k}={theirs[k]!r} (this chain: {mine[k]!r})" for k in mine if mine[k] != theirs[k])
            raise ChainError(f"{folder} holds another chain: {diff}; build the controller with its config")
        state = _read_state(folder / STATE_NAME)
        generator_state = self._check_state(state)
        missing = sorted(set(self.base_weights()) - _weight_keys(folder))
        if missing:
            raise ChainError(f"{folder}: the weights file has no base weight for {missing[0]} (and "
                             f"{len(missing) - 1} more): without them the earlier links are lost; use a "
                             f"checkpoint written by the chain's own save")
        result = self._peft_load(model_id, adapter_name, *args, **kwargs)
        self._restore(state, generator_state)
        self.method.prepare(self.factors)
        return result

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Two saves of the model as it stands, neither changing it:

        - ``merged/``: every link merged (``merge_and_unload``): a plain transformers model for
          ``from_pretrained``;
        - ``adapter/``: the model's own save (PEFT's adapter, the adapted layers' base weights, the chain's
          config and state) for ``PeftModel.from_pretrained(base, adapter)`` or
          ``AutoPeftModelFor*.from_pretrained(adapter)`` on the base the model was built from; and, when that
          base was built in memory (no ``base_model_name_or_path`` to load it from), ``base/``, which the
          adapter's config then names.
        """
        folder = Path(folder)
        paths = {"merged": folder / "merged", "adapter": folder / "adapter"}
        copy.deepcopy(self.model).merge_and_unload().save_pretrained(paths["merged"])
        config = self.model.peft_config[self.adapter]
        named = config.base_model_name_or_path
        if not named:
            paths["base"] = folder / "base"
            copy.deepcopy(self.model).unload().save_pretrained(paths["base"])
            config.base_model_name_or_path = str(paths["base"].resolve())
        try:
            self.save_pretrained(paths["adapter"])
        finally:
            config.base_model_name_or_path = named
        return paths


def _read_state(path: Path) -> dict:
    """chain_state.json, checked; ChainError (one line) for a missing or damaged file."""
    state = _read_json(path, "the chain's state")
    try:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, this version reads {STATE_FORMAT}")
        log = state["merge_log"]
        if not isinstance(log, list) or any(not isinstance(m, list) or len(m) != 2 for m in log):
            raise ValueError("merge_log is not a list of [step, epoch]")
        if state["merges"] != len(log):
            raise ValueError(f"merges {state['merges']!r} but {len(log)} in merge_log")
        if not isinstance(state["layers"], list) or not isinstance(state["generator"]["device"], str):
            raise ValueError("layers or generator is malformed")
        state["generator"]["state"] = base64.b64decode(state["generator"]["state"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        why = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ChainError(f"{path} is damaged ({why}); use another checkpoint") from None
    return state


def _weight_keys(folder: Path) -> set[str]:
    safe = folder / "adapter_model.safetensors"
    try:
        if safe.exists():
            from safetensors import safe_open

            with safe_open(str(safe), framework="pt") as f:
                return set(f.keys())
        return set(torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise ChainError(f"{folder} has no adapter_model.safetensors (nor .bin): not a saved adapter") from None
    except Exception as e:  # safetensors' and torch's errors for a cut or damaged file
        raise ChainError(f"{folder}: the adapter's weights file cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'damaged'}); use another checkpoint") from None


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
    optimizer steps or every ``merge_every_epochs`` epochs (one of the two; neither: the schedule of the
    chain's ChainConfig). The schedule is written into the chain's config, so it is saved with every
    checkpoint. ``merge_steps`` and ``merge_epochs`` are the global step and the epoch (Trainer's
    state.epoch) of each merge made by a callback, including those before a resume.

    Resume-safe: the epoch schedule reads Trainer's own epoch count (restored from trainer_state.json),
    and the merges so far live in the chain's state, which the chain's load_adapter restores.

    It keeps transformers' callback protocol (Trainer calls ``on_<event>(args, state, control, **kwargs)`` on
    every callback it was given) without subclassing ``TrainerCallback``: importing that loads transformers'
    whole Trainer (seconds, and warnings on stderr), which this module must not do to a user who only wants
    the controller. Every event but ``on_step_end`` and ``on_epoch_end`` is a no-op, as in TrainerCallback."""

    def __init__(self, chain: ChainController, merge_every_steps: int | None = None,
                 merge_every_epochs: int | None = None, clear_optimizer: bool = False):
        if merge_every_steps is None and merge_every_epochs is None:
            merge_every_steps, merge_every_epochs = chain.config.merge_every_steps, chain.config.merge_every_epochs
        if (merge_every_steps is None) == (merge_every_epochs is None):
            raise ChainError("give one of merge_every_steps and merge_every_epochs")
        chain.config = dataclasses.replace(chain.config, merge_every_steps=merge_every_steps,
                                           merge_every_epochs=merge_every_epochs)  # checks them too
        self.chain, self.every_steps, self.every_epochs = chain, merge_every_steps, merge_every_epochs
        self.clear_optimizer = clear_optimizer

    @property
    def merge_steps(self) -> list[int]:
        return [step for step, _ in self.chain.merge_log if step is not None]

    @property
    def merge_epochs(self) -> list[float]:
        return [epoch for step, epoch in self.chain.merge_log if step is not None]

    @property
    def merges(self) -> int:
        return len(self.merge_steps)

    def _merge(self, state, optimizer) -> None:
        self.chain.merge(optimizer, self.clear_optimizer, step=state.global_step, epoch=state.epoch)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.every_steps is not None and state.global_step % self.every_steps == 0:
            self._merge(state, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        # Trainer's state.epoch is the whole number of epochs done at an epoch's end (also after a resume)
        if self.every_epochs is not None and round(state.epoch) % self.every_epochs == 0:
            self._merge(state, optimizer)

    def __getattr__(self, name: str):
        if name.startswith("on_"):  # any other Trainer event (on_train_begin, on_log, ...): nothing to do
            return _no_op
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _no_op(*args, **kwargs) -> None:
    return None


__all__ = ["ChainCallback", "ChainConfig", "ChainController", "ChainError", "PeftFactors", "lora_layers", "lora_methods"]
