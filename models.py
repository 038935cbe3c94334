"""The models adapters are studied on, in one registry: the MLP of the RAC-LoRA MNIST experiment, a
small pre-norm Vision Transformer and a small causal transformer over token sequences in nanoGPT's shape.

The MLP and the ViT take flattened inputs, (..., N, features) floats with the task's ``shape`` (an image:
channels, height, width), and return (..., N, classes) logits; the GPT takes (..., N, T) int64 token ids (the
task's ``shape`` is (T,), its classes the vocabulary) and returns (..., N, T, classes) logits, one next-token
prediction per position. Each is written so that a leading run dimension passes through it untouched: the stacked
engine (engine/stack.py) swaps its layers for stacked ones of the same names and trains R runs at once. Every
random draw (initial weights, dropout masks) comes from a generator the caller gives.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from data import DIGITS, NEXT_TOKEN, TEST_IMAGES, TRAIN_IMAGES, TaskSpec
from raclora.errors import ConfigError


class SeededDropout(nn.Module):
    """Inverted dropout whose masks come from ``self.generator`` (set per run), never the global RNG.

    Same maths as nn.Dropout: keep each unit with probability 1 - p and scale kept units by 1/(1 - p).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            raise RuntimeError("SeededDropout has no generator: call set_generator(model, g) before training")
        # the mask as 1.0 / 0.0 in the draws' own tensor (ge_ in place): x * mask is x * (bool mask) without the bool
        # tensor and its conversion to x's dtype, forward and backward (the same numbers, bit for bit)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype).ge_(self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout for each hidden width, then a Linear head. Input: (N, features) floats, one
    flattened example of any ``shape`` (an image's channels x height x width) per row."""

    takes = ("images", "features")  # what its examples may be (check_task): any vector of floats
    # the first layer sees each example as one row, so a stack of MLPs can share one (N, H*W) input
    row_wise = True
    eval_batch = None  # evaluate a whole split in one pass
    fold_adapters = False  # stacked LoRA layers: x W^T + s (x A^T) B^T, two thin products beside the base one

    def __init__(self, shape: tuple[int, ...], classes: int, hidden: list[int] | tuple[int, ...] = (64, 64),
                 dropout: float = 0.1):
        super().__init__()
        dims = [math.prod(shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), SeededDropout(dropout)]
        layers.append(nn.Linear(dims[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, features) -> (..., N, classes) logits
        return self.net(x)


class Tokens(nn.Module):
    """A learned class token in front of the patch tokens, then learned positions added to every token."""

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(dim))  # (d,)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))  # (T, d), T = patches + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, P, d) -> (N, P + 1, d)
        cls = self.cls.expand(*x.shape[:-2], 1, x.shape[-1])
        return torch.cat([cls, x], dim=-2) + self.pos


class Positions(nn.Module):
    """Learned positions: row t of ``weight`` (context, d) is added to the token at position t (nanoGPT's wpe)."""

    def __init__(self, context: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(context, dim))  # (context, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., T, d) -> (..., T, d), T <= context
        return h + self.weight[:h.shape[-2]]


class Attention(nn.Module):
    """Multi-head self-attention with q, k, v and output projections as Linear layers (adaptable by name).
    ``causal``: position t attends to positions 0..t only (the GPT); else to every position (the ViT)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:  # the models check their own fields first, with the fields' names
            raise ValueError(f"width {dim} is not a multiple of heads {heads}")
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., T, d) -> (..., T, d)
        def split(t):  # (..., T, d) -> (..., heads, T, d / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        # written out rather than F.scaled_dot_product_attention: for 17 tokens its CPU path spends more
        # time checking masks than multiplying (measured 20 % slower per epoch here)
        s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (..., heads, T, T): queries x keys
        if self.causal:  # no query sees a later key: weight exp(-inf) = 0 exactly, so the future adds exactly 0
            t = s.shape[-1]
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        a = torch.softmax(s, dim=-1) @ v  # (..., heads, T, d/heads)
        return self.o(a.transpose(-3, -2).flatten(-2))


class Block(nn.Module):
    """Pre-norm transformer block: h + drop(attn(ln1(h))), then h + drop(fc2(gelu(fc1(ln2(h)))))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, causal: bool = False):
        super().__init__()
        self.ln1, self.attn, self.drop1 = nn.LayerNorm(dim), Attention(dim, heads, causal), SeededDropout(dropout)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.drop2 = SeededDropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., T, d)
        h = h + self.drop1(self.attn(self.ln1(h)))
        return h + self.drop2(self.fc2(F.gelu(self.fc1(self.ln2(h)))))


class ViT(nn.Module):
    """A small pre-norm Vision Transformer: non-overlapping patch x patch patches, flattened and embedded
    by a Linear, a class token and learned positions, ``depth`` blocks, LayerNorm, a Linear head on the
    class token. Dropout (from the run's generator) after the embedding and in every residual branch."""

    takes = ("images",)
    row_wise = False  # the first layer sees patches: a stack expands a shared input to one copy per run
    eval_batch = 1000  # images per evaluation pass: attention over a whole split at once would not fit
    # stacked LoRA layers: one product with W + s B A. The layers are narrow (32 wide) and see 17 tokens per
    # image, where thin rank-r products are slow on a CPU: 20-25 % less time per epoch, measured here
    fold_adapters = True

    def __init__(self, shape: tuple[int, ...], classes: int, patch: int = 7, dim: int = 32, depth: int = 2,
                 heads: int = 2, mlp_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"the vit takes images (channels, height, width), not inputs of shape {tuple(shape)}")
        channels, height, width = shape
        if height % patch or width % patch:
            raise ValueError(f"vit_patch {patch} does not divide the {height}x{width} images")
        if dim % heads:
            raise ValueError(f"vit_dim {dim} is not a multiple of vit_heads {heads}")
        self.shape, self.patch_size = (channels, height, width), patch
        patches = (height // patch) * (width // patch)
        self.patch = nn.Linear(channels * patch * patch, dim)
        self.tokens = Tokens(dim, patches + 1)
        self.drop = SeededDropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, C*H*W) -> (..., N, patches, C*p*p), row-major
        (channels, height, width), p = self.shape, self.patch_size
        x = x.unflatten(-1, (channels, height // p, p, width // p, p))  # (..., N, C, gh, p, gw, p)
        b = x.dim() - 5
        x = x.permute(*range(b), b + 1, b + 3, b, b + 2, b + 4)  # (..., N, gh, gw, C, p, p)
        return x.flatten(-5, -4).flatten(-3)  # (..., N, patches, C*p*p): one channel's p x p block after another

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, C*H*W) -> (..., N, classes)
        h = self.drop(self.tokens(self.patch(self.patches(x))))  # (..., N, T, d)
        h = self.norm(self.blocks(h))
        return self.head(h[..., 0, :])  # the class token


class GPT(nn.Module):
    """A small causal, pre-norm transformer in nanoGPT's shape over sequences of token ids: token embedding
    (V, d) and learned positions (context, d), dropout, ``depth`` blocks of causal self-attention (q, k, v, o)
    and a GELU MLP (fc1 d -> mlp_dim, 4d by default, then fc2), LayerNorm, and a Linear head d -> V over the
    vocabulary, untied from the token embedding (an adapter on the head leaves the embedding as it is). The
    logits at position t see tokens 0..t only. Dropout (from the run's generator) after the embeddings and in
    every residual branch, as in nanoGPT (not on the attention weights); unlike nanoGPT every Linear has a bias
    (the head too)."""

    takes = ("tokens",)
    row_wise = False  # the first layer looks up each run's own table: a stack expands a shared input per run
    # sequences per evaluation pass: 64 x 64 tokens, as a training batch; bounds the (N, heads, T, T) attention maps
    # and the memory estimate (models.sizes: about 72M floats a pass at the default size)
    eval_batch = 64
    # stacked LoRA layers: two thin rank-r products beside the base one. Its layers see N x T rows (64 x 64 a
    # batch), where the thin products are cheap: folding W + s B A was 1-9 % slower per epoch here (docs/engine.md)
    fold_adapters = False

    def __init__(self, shape: tuple[int, ...], classes: int, dim: int = 128, depth: int = 4, heads: int = 4,
                 context: int = 64, mlp_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        if len(shape) != 1:
            raise ValueError(f"the gpt takes token sequences (length,), not inputs of shape {tuple(shape)}")
        if shape[0] > context:
            raise ValueError(f"the task's sequences of {shape[0]} tokens are longer than gpt_context {context}")
        if dim % heads:
            raise ValueError(f"gpt_dim {dim} is not a multiple of gpt_heads {heads}")
        self.context = context  # the longest sequence, in tokens (nanoGPT's block_size)
        self.embed = nn.Embedding(classes, dim)  # (V, d): the task's classes are its vocabulary
        self.pos = Positions(context, dim)
        self.drop = SeededDropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim or 4 * dim, dropout, causal=True)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, T) int64 token ids -> (..., N, T, V) logits
        if x.shape[-1] > self.context:
            raise ValueError(f"sequences of {x.shape[-1]} tokens are longer than the gpt's context of "
                             f"{self.context} tokens (gpt_context)")
        h = self.drop(self.pos(self.embed(x)))  # (..., N, T, d)
        return self.head(self.norm(self.blocks(h)))


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, steps: int, generators: list[torch.Generator],
             context: int) -> torch.Tensor:
    """Sample ``steps`` tokens after ``prompt`` (int64 (t,) token ids) from a model of next-token logits, each from
    the softmax of the last position's logits (temperature 1, no top-k), the window cut to the last ``context``
    tokens: one run (one generator) or a stack of R runs (R generators, run i drawing from ``generators[i]``).
    Returns int64 (R, t + steps), prompt included; the model is in eval mode (no dropout) meanwhile."""
    was_training = model.training
    model.eval()
    stacked = getattr(model, "example_dim", 0) == 1
    seqs = prompt.to(next(model.parameters()).device).view(1, 1, -1).repeat(len(generators), 1, 1)  # (R, 1, t)
    for _ in range(steps):
        window = seqs[..., -context:]
        logits = model(window) if stacked else model(window[0]).unsqueeze(0)  # (R, 1, t, V)
        probs = torch.softmax(logits[:, 0, -1].double(), dim=-1)  # (R, V), in float64: the same draw in any dtype
        nxt = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])  # (R, 1)
        seqs = torch.cat([seqs, nxt.view(-1, 1, 1)], dim=-1)
    model.train(was_training)
    return seqs[:, 0]


# name -> (class, the config fields it reads, as {config field: constructor argument})
MODELS = {
    "mlp": (MLP, {"hidden": "hidden", "dropout": "dropout"}),
    "vit": (ViT, {"vit_patch": "patch", "vit_dim": "dim", "vit_depth": "depth", "vit_heads": "heads",
                  "vit_mlp_dim": "mlp_dim", "dropout": "dropout"}),
    "gpt": (GPT, {"gpt_dim": "dim", "gpt_depth": "depth", "gpt_heads": "heads", "gpt_context": "context",
                  "dropout": "dropout"}),
}

# what a model's examples may be (each model's ``takes``), in words for the errors of check_task
INPUTS = {"images": "images", "features": "vectors of floats", "tokens": "token sequences"}


def task_inputs(spec: TaskSpec) -> str:
    """What the examples of the task ``spec`` are, a key of INPUTS: token sequences for next-token prediction
    (inputs (N, T) int64 ids), images for an image shape, else vectors of floats."""
    if spec.objective is NEXT_TOKEN:
        return "tokens"
    return "images" if spec.image is not None else "features"


def model_settings(cfg) -> dict:
    """The constructor arguments of ``cfg.model`` taken from the config's fields."""
    _, fields = MODELS[cfg.model]
    return {arg: getattr(cfg, f) for f, arg in fields.items()}


def build_model(name: str, settings: dict, shape: tuple[int, ...], classes: int,
                generator: torch.Generator | None, device) -> nn.Module:
    """Model ``name`` of the registry on ``device``, for inputs of ``shape`` (data.TaskSpec.shape) and ``classes`` classes.

    The module is built on the meta device, so torch's global RNG is never touched; its weights are then
    drawn from ``generator``: every Linear as nn.Linear draws (weight and bias U(+-1/sqrt(in))), LayerNorm
    at (1, 0), the class token, the token embeddings and positions N(0, 0.02^2), one module after the other
    in module order. With ``generator=None`` the weights are left uninitialised: only for loading a state dict
    next.
    """
    cls, _ = MODELS[name]
    with torch.device("meta"):
        model = cls(tuple(shape), classes, **settings)
    model = model.to_empty(device=device)
    if generator is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features ** 0.5
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.uniform_(-bound, bound, generator=generator)
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                elif isinstance(m, Tokens):
                    m.cls.normal_(0.0, 0.02, generator=generator)
                    m.pos.normal_(0.0, 0.02, generator=generator)
                elif isinstance(m, (nn.Embedding, Positions)):
                    m.weight.normal_(0.0, 0.02, generator=generator)
    return model


def meta_model(name: str, settings: dict, shape: tuple[int, ...], classes: int) -> nn.Module:
    """The model on the meta device: its layers and shapes, with no memory and no compute."""
    cls, _ = MODELS[name]
    with torch.device("meta"):
        return cls(tuple(shape), classes, **settings)


def set_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Give every SeededDropout in ``model`` the run's generator."""
    for m in model.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- which Linear layers get adapters (PEFT's target_modules) ---------------------------------------
TARGET_PRESETS = {  # preset -> the module names (last part of the dotted name) it selects; None = every Linear
    "all": None,
    "attention": ("q", "k", "v", "o"),
    "mlp": ("fc1", "fc2"),
}


def targeted(name: str, targets: list[str] | tuple[str, ...] | None) -> bool:
    """Whether the Linear called ``name`` (dotted) is selected by ``targets``: presets of TARGET_PRESETS
    or module names, matched as PEFT matches a list: the whole name, or its end after a dot."""
    if targets is None:
        return True
    names: set[str] = set()
    for t in targets:
        if t in TARGET_PRESETS:
            if TARGET_PRESETS[t] is None:
                return True
            names.update(TARGET_PRESETS[t])
        else:
            names.add(t)
    return any(name == t or name.endswith("." + t) for t in names)


def target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the Linear layers ``targets`` selects, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and targeted(n, targets)]


def sizes(name: str, settings: dict, spec: TaskSpec,
          examples: tuple[int, int] = (TRAIN_IMAGES, TEST_IMAGES)) -> tuple[int, int, int]:
    """(parameters, activation floats of one evaluation pass, input floats) of model ``name`` on the task
    ``spec`` (data.TaskSpec) of ``examples`` (training, test) examples, MNIST's by default: the activations
    are the outputs of every layer, counted in a forward pass on the meta device (no memory, no compute) over
    the examples the model evaluates at once (its eval_batch, or a whole test set), twice (the output and a
    temporary); the inputs are the training and test sets, in 4-byte floats (an int64 token id counts two)."""
    model = meta_model(name, settings, spec.shape, spec.classes).eval()
    train_examples, test_examples = examples
    batch = min(model.eval_batch or test_examples, test_examples)
    tokens = task_inputs(spec) == "tokens"
    floats = [0]

    def count(module, args, out):
        floats[0] += out.numel()
        if isinstance(module, Attention):  # its (N, heads, T, T) attention map, not an output of any layer
            floats[0] += out.numel() // out.shape[-1] * module.heads * out.shape[-2]

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())
             or isinstance(m, Attention)]
    model(torch.empty(batch, spec.features, dtype=torch.long if tokens else torch.float32, device="meta"))
    for h in hooks:
        h.remove()
    inputs = (train_examples + test_examples) * spec.features * (2 if tokens else 1)
    return sum(p.numel() for p in model.parameters()), 2 * floats[0], inputs


def check_task(name: str, spec: TaskSpec, tasks: str) -> None:
    """ConfigError unless model ``name`` takes the examples of the task ``spec``; ``tasks`` says in words what
    the study's tasks are ("main.py's tasks are MNIST images")."""
    takes = MODELS[name][0].takes
    if task_inputs(spec) not in takes:
        raise ConfigError(f"the {name} takes {' or '.join(INPUTS[t] for t in takes)} and {tasks}")


def check_model(cfg, spec: TaskSpec = DIGITS, tasks: str = "main.py's tasks are MNIST images") -> None:
    """ConfigError, before any compute, for a model that does not take the examples of the task ``spec``
    (check_task; ``tasks``: what they are, in words), cannot be built from ``cfg``, target_modules that select
    none of its Linear layers, or a rank above every selected layer's min(in, out)."""
    check_task(cfg.model, spec, tasks)
    try:
        model = meta_model(cfg.model, model_settings(cfg), spec.shape, spec.classes)
    except (ValueError, RuntimeError) as e:  # RuntimeError: sizes torch cannot even describe
        raise ConfigError(f"the {cfg.model} cannot be built from these settings: {e}") from None
    chosen = target_linears(model, cfg.targets())
    if not chosen:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(f"target_modules {' '.join(cfg.target_modules)} selects none of the {cfg.model}'s Linear "
                          f"layers; allowed: the presets {', '.join(TARGET_PRESETS)} (attention and mlp are the "
                          f"transformers' q k v o and fc1 fc2) or layer names: {' '.join(names)}")
    top = max(min(m.in_features, m.out_features) for _, m in chosen)
    for r in cfg.ranks:
        if r > top:
            raise ConfigError(f"rank {r} is out of range: ranks must be integers from 1 to {top} (the largest "
                              f"min(in, out) among the adapted layers of the {cfg.model})")
