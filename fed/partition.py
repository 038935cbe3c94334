"""Task B's training examples split over clients: ``iid`` (a seeded permutation cut into near-equal shards) or
``dirichlet`` label skew (for each class, the clients' shares drawn from Dirichlet(alpha, ..., alpha); small
alpha gives clients few classes). Every example goes to exactly one client; the split depends only on the
seed. Draws come from numpy's PCG64 generator seeded with the partition seed (torch has no Dirichlet
sampler that takes a generator).

``role`` (LEAF's Shakespeare task; ``role_partition``) is the text's own split: each client is one of
Shakespeare's speaking roles (data.speaking_roles) and holds the next-character windows of its speeches that lie
in the training split. It draws nothing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data import Split, Vocabulary, keep_roles, speaking_roles, windows
from raclora.errors import ConfigError, DataError

PARTITIONS = ("iid", "dirichlet", "role")
MAX_TRIES = 100  # dirichlet: draws until every client holds at least one image
SPEECH_JOIN = "\n\n"  # role: a role's speeches joined as the text separates blocks (its speaker lines left out)


def partition(labels: torch.Tensor, clients: int, scheme: str, alpha: float, seed: int) -> list[torch.Tensor]:
    """Indices into ``labels`` (N,) (or (N, T): one row per example, an iid split only) of each client's shard,
    sorted; ConfigError for a split that cannot be made. ``role`` is role_partition's (it needs the text)."""
    n = labels.shape[0]
    if scheme not in PARTITIONS:
        raise ConfigError(f"unknown partition {scheme!r}; allowed: {', '.join(PARTITIONS)}")
    if scheme == "role":
        raise ValueError("the role partition is made from the text: fed.partition.role_partition")
    if not 1 <= clients <= n:
        raise ConfigError(f"clients must be from 1 to the {n} training images, got {clients}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"dirichlet_alpha must be a finite number > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [torch.from_numpy(np.sort(s)) for s in np.array_split(rng.permutation(n), clients)]
    y = labels.cpu().numpy()
    for _ in range(MAX_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * idx.size).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        out = [np.sort(np.concatenate(s)) for s in shards]
        if min(s.size for s in out) > 0:
            return [torch.from_numpy(s) for s in out]
    raise ConfigError(f"dirichlet_alpha {alpha} leaves a client of {clients} without images in {MAX_TRIES} draws; "
                      f"use a larger dirichlet_alpha or fewer clients")


def speech_spans(text: str, roles: dict[str, list[str]]) -> dict[str, list[tuple[int, int]]]:
    """Where each speech of ``roles`` (data.speaking_roles(text)) lies in ``text``: name -> [(start, stop)], one
    per speech, in its order. A speech is found as its whole block (a blank line or the text's start, the line
    ``<name>:``, the speech, a blank line or the end) from just past the role's previous speech, so it is that
    speech and no look-alike of another role's or inside another block; DataError if one is not found (roles not
    of this text)."""
    padded = f"\n\n{text}\n\n"  # every block between blank lines, the first and last ones too
    out = {}
    for name, speeches in roles.items():
        spans, cursor = [], 0
        for speech in speeches:
            block = f"\n\n{name}:\n{speech}\n\n"
            at = padded.find(block, cursor)
            if at < 0:
                raise DataError(f"speech {len(spans) + 1} of role {name!r} is not a block of this text; "
                                f"give speech_spans the roles of data.speaking_roles(text)")
            start = at + len(f"\n\n{name}:\n") - 2  # in text, without the padding
            spans.append((start, start + len(speech)))
            cursor = at + len(block) - 2  # the block's closing blank line may open the role's next block
        out[name] = spans
    return out


@dataclass
class RoleShards:
    """The clients of the role partition: ``train``, every client's windows one after the other (x, y int64
    (N, T)); ``shards``, each client's indices into it; ``roles``, each client's name; ``chars``, each client's
    training characters (its speeches in the training split); ``kept``, how many roles had min_role_chars."""
    train: Split
    shards: list[torch.Tensor]
    roles: list[str]
    chars: list[int]
    kept: int


def role_partition(text: str, vocabulary: Vocabulary, context: int, train_stop: int, clients: int,
                   min_characters: int) -> RoleShards:
    """Shakespeare's speaking roles as clients (LEAF's Shakespeare task). A role's training speeches are those that
    lie wholly in ``text[:train_stop]`` (the training split: none of the val or test characters), found by
    speech_spans; the roles with at least ``min_characters`` of them are kept (data.keep_roles), and the
    ``clients`` largest of those (by training characters; ties in the order they first speak) are the clients,
    client 0 the largest. A client's examples are the non-overlapping next-character windows (data.windows) of
    its training speeches joined in text order by SPEECH_JOIN (a blank line, as between the text's blocks).
    ConfigError (one line) for clients out of 1..kept, or a min_characters that leaves a role no window."""
    if isinstance(min_characters, bool) or not isinstance(min_characters, int) or min_characters <= context:
        raise ConfigError(f"min_role_chars must be an integer above gpt_context ({context}): a role needs "
                          f"{context + 1} characters for one window; got {min_characters!r}")
    roles = speaking_roles(text)
    spans = speech_spans(text, roles)
    in_train = {name: [text[a:b] for a, b in spans[name] if b <= train_stop] for name in roles}
    kept = keep_roles(in_train, min_characters)
    if not 1 <= clients <= len(kept):
        raise ConfigError(f"clients must be from 1 to the {len(kept)} speaking roles with at least {min_characters} "
                          f"training characters (min_role_chars), got {clients}; use fewer clients or a lower "
                          f"min_role_chars")
    size = {name: sum(map(len, speeches)) for name, speeches in kept.items()}
    chosen = sorted(kept, key=lambda name: -size[name])[:clients]  # a stable sort: ties in text order
    parts = [windows(vocabulary.encode(SPEECH_JOIN.join(kept[name])), context) for name in chosen]
    counts = [p.x.shape[0] for p in parts]
    starts = np.cumsum([0, *counts])
    return RoleShards(train=Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])),
                      shards=[torch.arange(a, b) for a, b in zip(starts[:-1], starts[1:])], roles=chosen,
                      chars=[size[name] for name in chosen], kept=len(kept))
