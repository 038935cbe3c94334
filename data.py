"""MNIST as whole tensors on the run's device, split into task A (digits 0-4) and task B (5-9).

No DataLoader and no per-sample transforms: each split is one (N, 784) float tensor, normalised
once, and batches are slices of a seeded permutation (see ``batches``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel mean and std, pixels in [0, 1]
SOURCE = "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror of Y. LeCun and C. Cortes' MNIST)"


class DataError(RuntimeError):
    """The data cannot be had; the message says what to put where."""


@dataclass
class Split:
    x: torch.Tensor  # (N, 784) float32, normalised
    y: torch.Tensor  # (N,) int64 labels in 0..4

    def __len__(self) -> int:
        return self.y.numel()


@dataclass
class Task:
    train: Split
    val: Split
    test: Split


def _raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _check_archives(raw: Path) -> None:
    """Fail fast, naming the file, when a shipped .gz archive is not the original."""
    from torchvision.datasets import MNIST

    for name, md5 in MNIST.resources:
        gz = raw / name
        if gz.exists() and _md5(gz) != md5:
            raise DataError(
                f"corrupt data file {gz} (md5 {_md5(gz)}, expected {md5}); "
                f"replace it with the original {name} from {SOURCE}"
            )


def load_mnist(data_dir: str | os.PathLike) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Return ((train_images, train_labels), (test_images, test_labels)) as uint8 (N, 28, 28) and int64 (N,).

    Uses torchvision's MNIST under ``data_dir``; it extracts the shipped .gz archives and only
    downloads what is missing. Any failure becomes a one-line DataError that says what to put where.
    """
    from torchvision.datasets import MNIST

    raw = _raw_dir(data_dir)
    _check_archives(raw)
    out = []
    for train in (True, False):
        try:
            ds = MNIST(str(data_dir), train=train, download=True)
        except Exception as e:
            text = str(e).strip()
            if not text.startswith("Error downloading"):  # the files are there but cannot be read
                raise DataError(f"could not read the MNIST files in {raw} ({type(e).__name__}: "
                                f"{text.splitlines()[0] if text else ''}); delete the extracted files there "
                                f"(not the .gz archives) so that they are re-extracted") from None
            names = ", ".join(n for n, _ in MNIST.resources)
            reason = text.splitlines()[-1].strip() if len(text.splitlines()) > 1 else text
            raise DataError(
                f"MNIST is missing from {raw} and could not be downloaded ({reason}); "
                f"put the four files {names} in {raw} (they ship with this repository under data/MNIST/raw)"
            ) from None
        if ds.data.shape[1:] != (28, 28) or ds.data.shape[0] != ds.targets.shape[0]:
            raise DataError(f"MNIST files in {raw} have unexpected shapes {tuple(ds.data.shape)}; delete the "
                            f"extracted files there (not the .gz archives) so that they are re-extracted")
        out.append((ds.data, ds.targets.long()))
    return out[0], out[1]


def _normalise(images: torch.Tensor) -> torch.Tensor:  # uint8 (N, 28, 28) -> float32 (N, 784)
    # in place, so that no temporary copies of the whole set are made: (x / 255 - MEAN) / STD
    return images.float().div_(255.0).sub_(MEAN).div_(STD).reshape(images.shape[0], -1)


def _select(x: torch.Tensor, y: torch.Tensor, digits: range) -> Split:
    mask = (y >= digits.start) & (y < digits.stop)
    return Split(x[mask], y[mask] - digits.start)  # relabel to 0..4: the same 5-way head serves both tasks


def load_tasks(data_dir: str | os.PathLike, val_size: int, split_seed: int,
               device: torch.device | str) -> dict[str, Task]:
    """Tasks "A" (digits 0-4) and "B" (digits 5-9 relabelled 0-4), each split into train/val/test.

    The 60k training images are split (60000 - val_size) / val_size by a permutation from a
    generator seeded with ``split_seed``; test is the 10k test set. Everything lives on ``device``.
    """
    (xtr, ytr), (xte, yte) = load_mnist(data_dir)
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(xtr.shape[0], generator=g)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    parts = {  # still uint8: each piece is normalised once selected, so no float copy of the whole set is made
        "train": (xtr[train_idx], ytr[train_idx]),
        "val": (xtr[val_idx], ytr[val_idx]),
        "test": (xte, yte),
    }
    tasks = {}
    for name, digits in (("A", range(0, 5)), ("B", range(5, 10))):
        splits = {k: _select(x, y, digits) for k, (x, y) in parts.items()}
        tasks[name] = Task(**{k: Split(_normalise(s.x).to(device), s.y.to(device)) for k, s in splits.items()})
    return tasks


def batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """Index tensors of one epoch: a seeded permutation of range(n) cut into batch_size slices
    (the last one may be shorter, as with a DataLoader's drop_last=False)."""
    perm = torch.randperm(n, generator=generator, device=device)
    return list(perm.split(batch_size))
