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


def _normalise(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    # uint8 (N, 28, 28) -> float32 (N, 784), in place, so that no temporary copies of the whole set are
    # made: (x / 255 - mean) / std
    return images.float().div_(255.0).sub_(mean).div_(std).reshape(images.shape[0], -1)


def _split(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], val_size: int,
           split_seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "val", "test"}: (images, labels). The 60k training images are split
    (60000 - val_size) / val_size by a permutation from a generator seeded with ``split_seed``.
    Still uint8: each piece is normalised once selected, so no float copy of the whole set is made."""
    (xtr, ytr), g = train, torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(xtr.shape[0], generator=g)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return {"train": (xtr[train_idx], ytr[train_idx]), "val": (xtr[val_idx], ytr[val_idx]), "test": test}


def _select(x: torch.Tensor, y: torch.Tensor, digits: range) -> Split:
    mask = (y >= digits.start) & (y < digits.stop)
    return Split(x[mask], y[mask] - digits.start)  # relabel to 0..4: the same 5-way head serves both tasks


def load_tasks(data_dir: str | os.PathLike, val_size: int, split_seed: int,
               device: torch.device | str) -> dict[str, Task]:
    """Tasks "A" (digits 0-4) and "B" (digits 5-9 relabelled 0-4), each split into train/val/test.

    The 60k training images are split (60000 - val_size) / val_size by a permutation from a
    generator seeded with ``split_seed``; test is the 10k test set. Everything lives on ``device``.
    """
    parts = _split(*load_mnist(data_dir), val_size, split_seed)
    tasks = {}
    for name, digits in (("A", range(0, 5)), ("B", range(5, 10))):
        splits = {k: _select(x, y, digits) for k, (x, y) in parts.items()}
        tasks[name] = Task(**{k: Split(_normalise(s.x).to(device), s.y.to(device)) for k, s in splits.items()})
    return tasks


# --- all ten classes, MNIST or Fashion-MNIST, for the from-scratch study (scratch.py) ---------------
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel mean and std, pixels in [0, 1]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist puts the .gz files here
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def provide_fashion_mnist(data_dir: str | os.PathLike, source: Path = DEBIAN_FASHION) -> Path:
    """Make sure <data_dir>/FashionMNIST/raw holds the four decompressed IDX files; return that folder.

    Missing files are decompressed from ``source`` (Debian's package, whose .gz files are recompressed,
    so their md5s differ from torchvision's: the decompressed contents are what torchvision reads).
    Each file is written atomically, so an interrupted copy is never mistaken for a whole one.
    """
    import gzip
    import shutil

    from results import atomic_path

    raw = Path(data_dir) / "FashionMNIST" / "raw"
    for name in FASHION_FILES:
        if (raw / name).exists():
            continue
        gz = source / (name + ".gz")
        if not gz.exists():
            raise DataError(f"Fashion-MNIST file {name} is missing from {raw} and from {source}; install Debian's "
                            f"package (apt-get install dataset-fashion-mnist) or put the four files "
                            f"{', '.join(FASHION_FILES)} (decompressed) in {raw}")
        try:
            with gzip.open(gz, "rb") as f, atomic_path(raw / name) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out)
        except (OSError, EOFError) as e:
            raise DataError(f"could not decompress {gz} ({type(e).__name__}: {e}); reinstall the package "
                            f"dataset-fashion-mnist") from None
    return raw


def load_ten_classes(dataset: str, data_dir: str | os.PathLike, val_size: int, split_seed: int,
                     device: torch.device | str) -> Task:
    """All ten classes of ``dataset`` ("mnist" or "fashion_mnist") as one Task, labels 0-9.

    Train/val is the same seeded split of the 60k training images as load_tasks uses; test is the
    10k test set. Pixels are normalised with the dataset's own training mean and std.
    """
    if dataset == "mnist":
        (train, test), mean, std = load_mnist(data_dir), MEAN, STD
    elif dataset == "fashion_mnist":
        (train, test), mean, std = _load_fashion(data_dir), FASHION_MEAN, FASHION_STD
    else:
        raise DataError(f"unknown dataset {dataset!r}; allowed: mnist, fashion_mnist")
    parts = _split(train, test, val_size, split_seed)
    return Task(**{k: Split(_normalise(x, mean, std).to(device), y.to(device)) for k, (x, y) in parts.items()})


def _load_fashion(data_dir):
    from torchvision.datasets import FashionMNIST

    raw = provide_fashion_mnist(data_dir)
    out = []
    for train, n in ((True, 60000), (False, 10000)):
        try:
            ds = FashionMNIST(str(data_dir), train=train, download=False)
            ok = ds.data.shape == (n, 28, 28) and ds.targets.shape == (n,) and int(ds.targets.max()) == 9
        except Exception as e:  # a truncated or foreign file: torchvision's reader fails in many ways
            ok, why = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        else:
            why = f"shapes {tuple(ds.data.shape)}, {tuple(ds.targets.shape)}"
        if not ok:
            raise DataError(f"could not read the Fashion-MNIST files in {raw} ({why}); delete them so that they "
                            f"are decompressed again from {DEBIAN_FASHION}")
        out.append((ds.data, ds.targets.long()))
    return out[0], out[1]


def batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """Index tensors of one epoch: a seeded permutation of range(n) cut into batch_size slices
    (the last one may be shorter, as with a DataLoader's drop_last=False)."""
    perm = torch.randperm(n, generator=generator, device=device)
    return list(perm.split(batch_size))
