"""MNIST as whole tensors on the run's device, split into task A (digits 0-4) and task B (5-9).

No DataLoader and no per-sample transforms: each split is one (N, 784) float tensor, normalised
once, and batches are slices of a seeded permutation (see ``batches``).

Also the two texts of the character-level language models (TEXTS: Tiny Shakespeare and Pride and Prejudice,
one vocabulary, 90 / 5 / 5 splits, next-character windows: ``text_task``) and Shakespeare's speaking roles.
"""
from __future__ import annotations

import gzip
import functools
import hashlib
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from raclora.errors import ConfigError, DataError
from raclora.files import atomic_path

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel mean and std, pixels in [0, 1]
SOURCE = "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror of Y. LeCun and C. Cortes' MNIST)"


class Objective:
    """How a task scores a model's outputs against its targets: the training loss and the metric. Logits are
    (..., N, C) over N examples (a sequence task, next-token prediction, puts its positions into N) and targets
    (..., N) class indices. Every engine (train.py, engine/stack.py, fed/local.py) trains and evaluates through
    the task's objective, so a new kind of task brings its own and edits no loop."""
    name: str
    metric: str  # what ``correct`` averages to, for tables and axes

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the examples: what a step of one run minimises. logits (N, C), targets (N,)."""
        raise NotImplementedError

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Every example's loss, (..., N) for logits (..., N, C) and targets (..., N): a stack takes each run's
        mean."""
        raise NotImplementedError

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1.0 where an example is right, else 0.0: (..., N) float32, for logits (..., N, C), targets (..., N)."""
        raise NotImplementedError


class Classification(Objective):
    """One class per example: cross-entropy, accuracy."""
    name, metric = "classification", "accuracy"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:  # (R, N, C): cross_entropy takes the classes on dimension 1
            return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return F.cross_entropy(logits, targets, reduction="none")

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == targets).float()


class NextToken(Objective):
    """Next-token prediction over sequences: logits (..., N, T, V) for N sequences of T positions over a
    vocabulary of V tokens, targets (..., N, T) the token after each position. The loss is the cross-entropy in
    nats averaged over every position (an example's loss: the mean over its T positions; bits per token are
    nats / ln 2); the metric is the share of positions whose most likely next token is the right one."""
    name, metric = "next_token", "next-token accuracy"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
        return flat.view(targets.shape).mean(-1)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == targets).float().mean(-1)


CLASSIFICATION = Classification()
NEXT_TOKEN = NextToken()


@dataclass(frozen=True)
class TaskSpec:
    """What a model and the engines need to know of a task: one example's input shape, its targets and how
    it is scored. A split holds its inputs flattened, (N, features)."""
    shape: tuple[int, ...]  # one example's input: (channels, height, width) for an image; (length,) for a sequence
    classes: int  # targets are class indices 0..classes-1 (a vocabulary, for next-token prediction)
    objective: Objective = CLASSIFICATION  # the loss the engines train on and the metric they report

    @property
    def features(self) -> int:  # numbers in one flattened input
        return math.prod(self.shape)

    @property
    def image(self) -> tuple[int, int, int] | None:
        """(channels, height, width) for an image task, None otherwise."""
        return tuple(self.shape) if len(self.shape) == 3 else None


TRAIN_IMAGES = 60000  # MNIST's and Fashion-MNIST's training sets
TEST_IMAGES = 10000  # and their test sets
MIN_TRAIN_IMAGES = 10000  # val_size leaves at least this many training images (about 5000 per task)
IMAGE_SHAPE = (28, 28)  # MNIST's and Fashion-MNIST's images, height x width (one channel)
DIGITS = TaskSpec(shape=(1, *IMAGE_SHAPE), classes=5)  # tasks A (digits 0-4) and B (5-9 relabelled 0-4) of load_tasks
TEN_CLASSES = TaskSpec(shape=(1, *IMAGE_SHAPE), classes=10)  # all of MNIST or Fashion-MNIST (scratch.py)


def check_val_size(val_size: int) -> None:
    """ConfigError unless ``val_size`` leaves at least MIN_TRAIN_IMAGES of the training images to train on."""
    top = TRAIN_IMAGES - MIN_TRAIN_IMAGES
    if not 1 <= val_size <= top:
        raise ConfigError(f"val_size must be an integer from 1 to {top} (at least {MIN_TRAIN_IMAGES} of the "
                          f"{TRAIN_IMAGES} training images must remain to train on), got {val_size}")


@dataclass
class Split:
    x: torch.Tensor  # (N, features) float32, normalised: MNIST's (N, 784) (a text task: int64 tokens (N, T))
    y: torch.Tensor  # (N, ...) int64 targets: MNIST's (N,) labels in 0..4 (a sequence task: (N, T))

    def __len__(self) -> int:  # examples
        return self.y.shape[0]


@dataclass
class Task:
    train: Split
    val: Split
    test: Split
    spec: TaskSpec = DIGITS  # its inputs' shape, its targets and its objective


def _raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _parse_idx(data: bytes, name: str) -> torch.Tensor:
    """Parse the decompressed IDX file ``name`` (e.g. "t10k-labels-idx1-ubyte") of MNIST or Fashion-MNIST.

    The format: a big-endian magic number, 0x00000801 (uint8, one dimension: labels) or 0x00000803
    (uint8, three dimensions: images), one big-endian uint32 per dimension, then the uint8 data.
    Checks the magic, the dimensions (N or N x 28 x 28, N = 60000 for "train", 10000 for "t10k"), the
    exact length and, for labels, values in 0..9. Returns uint8 (N, 28, 28) images or int64 (N,) labels,
    as torchvision's read_image_file / read_label_file do; raises ValueError saying what is wrong.
    """
    images = "-images-" in name
    n = TRAIN_IMAGES if name.startswith("train") else TEST_IMAGES
    dims = (n, *IMAGE_SHAPE) if images else (n,)
    magic, head = (0x0803 if images else 0x0801), 4 * (1 + len(dims))
    if len(data) < head:
        raise ValueError(f"{len(data)} bytes, shorter than the {head}-byte header")
    got = struct.unpack(f">{1 + len(dims)}I", data[:head])
    if got[0] != magic:
        raise ValueError(f"magic number 0x{got[0]:08x}, expected 0x{magic:08x}")
    if got[1:] != dims:
        raise ValueError(f"dimensions {got[1:]}, expected {dims}")
    if len(data) != head + math.prod(dims):
        raise ValueError(f"{len(data)} bytes, expected {head + math.prod(dims)}")
    x = torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=head).view(dims)
    if images:
        return x
    if int(x.max()) > 9:
        raise ValueError(f"label value {int(x.max())}, expected 0..9")
    return x.long()


def _decode(data: bytes, name: str, path: Path, fix: str) -> torch.Tensor:
    """_parse_idx(data, name), any failure a one-line DataError naming ``path`` and what to do."""
    try:
        return _parse_idx(data, name)
    except ValueError as e:
        raise DataError(f"corrupt data file {path} (as {name}: {e}); {fix}") from None


def _verified_gz(gz: Path, md5: str) -> bytes:
    """The bytes of a shipped .gz archive; fail fast, naming the file, when it is not the original."""
    blob = gz.read_bytes()
    got = hashlib.md5(blob).hexdigest()
    if got != md5:
        raise DataError(f"corrupt data file {gz} (md5 {got}, expected {md5}); "
                        f"replace it with the original {gz.name} from {SOURCE}")
    return blob


def _download_mnist(raw: Path, names: list[str]) -> None:
    """Fetch the missing archives ``names`` into ``raw`` with torchvision's downloader, from its mirrors
    (it checks each download's md5); nothing is extracted. Failure: a DataError that says what to put where."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_url

    md5s = dict(MNIST.resources)
    for name in names:
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_url(f"{mirror}{name}", str(raw), filename=name, md5=md5s[name])
                break
            except (RuntimeError, OSError) as e:  # URLError is an OSError; a bad md5 a RuntimeError
                errors.append(e)
        else:
            text = str(errors[-1]).strip()
            reason = f"{type(errors[-1]).__name__}: {text.splitlines()[-1] if text else ''}"
            raise DataError(
                f"MNIST is missing from {raw} and could not be downloaded ({reason}); put the four files "
                f"{', '.join(n for n, _ in MNIST.resources)} in {raw} (they ship with this repository under "
                f"data/MNIST/raw)"
            )


def load_mnist(data_dir: str | os.PathLike) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Return ((train_images, train_labels), (test_images, test_labels)) as uint8 (N, 28, 28) and int64 (N,).

    Reads the four .gz archives in <data_dir>/MNIST/raw after checking their md5 sums against
    torchvision's, decompressing them in memory (gzip checks its CRC32 too) and parsing the IDX
    format here (_parse_idx: magic, dimensions 60000 / 10000 x 28 x 28, length, labels 0..9). Extracted
    ``*-ubyte`` files are never read. A missing archive is downloaded by torchvision's downloader. Any
    failure is a one-line DataError that says what to put where.
    """
    from torchvision.datasets import MNIST

    raw = _raw_dir(data_dir)
    blobs = {name: _verified_gz(raw / name, md5) for name, md5 in MNIST.resources if (raw / name).exists()}
    missing = [name for name, _ in MNIST.resources if name not in blobs]
    if missing:
        _download_mnist(raw, missing)
        blobs.update({name: _verified_gz(raw / name, md5) for name, md5 in MNIST.resources if name in missing})
    fix = f"replace it with the original from {SOURCE}"  # unreachable past a matching md5; kept as a guard
    x = {name: _decode(gzip.decompress(blob), name[:-3], raw / name, fix) for name, blob in blobs.items()}
    return tuple((x[f"{s}-images-idx3-ubyte.gz"], x[f"{s}-labels-idx1-ubyte.gz"]) for s in ("train", "t10k"))


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
        tasks[name] = Task(**{k: Split(_normalise(s.x).to(device), s.y.to(device)) for k, s in splits.items()},
                           spec=DIGITS)
    return tasks


# --- all ten classes, MNIST or Fashion-MNIST, for the from-scratch study (scratch.py) ---------------
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel mean and std, pixels in [0, 1]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist puts the .gz files here
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
# SHA-256 of the *decompressed* IDX files (not of any .gz: Debian recompressed them, so .gz digests, and
# torchvision's .gz md5s, do not carry over). Computed from /usr/share/datasets/fashion-mnist/*.gz of
# Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1; that data is exactly balanced (6000 images
# per class in train, 1000 in test), which load_fashion_mnist checks as well.
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def _fashion_missing(name: str, raw: Path, source: Path) -> DataError:
    return DataError(f"Fashion-MNIST file {name} is missing from {raw} and from {source}; install Debian's "
                     f"package (apt-get install dataset-fashion-mnist) or put the four files "
                     f"{', '.join(FASHION_FILES)} (decompressed, or as .gz) in {raw}")


def provide_fashion_mnist(data_dir: str | os.PathLike, source: Path = DEBIAN_FASHION) -> Path:
    """Make sure <data_dir>/FashionMNIST/raw holds the four decompressed IDX files; return that folder.

    Loading does not need this (load_fashion_mnist reads ``source``'s .gz files directly); it is for
    whoever wants the decompressed files, e.g. for another tool. Missing files are decompressed from
    ``source`` unchecked; load_fashion_mnist verifies them (by FASHION_SHA256) if it reads them.
    Each file is written atomically, so an interrupted copy is never mistaken for a whole one.
    """
    import shutil


    raw = Path(data_dir) / "FashionMNIST" / "raw"
    for name in FASHION_FILES:
        if (raw / name).exists():
            continue
        gz = source / (name + ".gz")
        if not gz.exists():
            raise _fashion_missing(name, raw, source)
        try:
            with gzip.open(gz, "rb") as f, atomic_path(raw / name) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out)
        except (OSError, EOFError) as e:
            raise DataError(f"could not decompress {gz} ({type(e).__name__}: {e}); reinstall the package "
                            f"dataset-fashion-mnist") from None
    return raw


def load_fashion_mnist(data_dir: str | os.PathLike, source: Path = DEBIAN_FASHION,
                       digests: dict[str, str] = FASHION_SHA256):
    """Fashion-MNIST as load_mnist returns MNIST: ((train_images, train_labels), (test_images, test_labels)).

    Each of the four files is read from the first of <data_dir>/FashionMNIST/raw/<name> (decompressed,
    placed by the user or by provide_fashion_mnist), <data_dir>/FashionMNIST/raw/<name>.gz and
    ``source``/<name>.gz (Debian's package), decompressed in memory, and must have the SHA-256 in
    ``digests`` (of the decompressed content); then it is parsed and checked (_parse_idx), and each
    class must have exactly 6000 training and 1000 test images. Otherwise: a one-line DataError naming
    the file and what to do. Nothing is written.
    """
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    x = {}
    for name in FASHION_FILES:
        path = next((p for p in (raw / name, raw / f"{name}.gz", source / f"{name}.gz") if p.exists()), None)
        if path is None:
            raise _fashion_missing(name, raw, source)
        if path.parent == source:
            fix = "reinstall Debian's package (apt-get install --reinstall dataset-fashion-mnist)"
        else:
            fix = f"delete it (the files of Debian's dataset-fashion-mnist in {source} are read directly)"
        data = path.read_bytes()
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)  # checks the CRC32 and length in the gzip trailer too
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"could not decompress {path} ({type(e).__name__}: {e}); {fix}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != digests[name]:
            raise DataError(f"corrupt data file {path} (SHA-256 of its content {got}, expected {digests[name]}); "
                            f"{fix}")
        x[name] = _decode(data, name, path, fix)
        if "-labels-" in name:
            counts = torch.bincount(x[name], minlength=10).tolist()
            if len(set(counts)) != 1:
                raise DataError(f"corrupt data file {path} (images per class {counts}, expected "
                                f"{x[name].numel() // 10} each); {fix}")
    return tuple((x[f"{s}-images-idx3-ubyte"], x[f"{s}-labels-idx1-ubyte"]) for s in ("train", "t10k"))


# The ten-class datasets (scratch.py's --dataset): name -> (loader of ((train x, y), (test x, y)) uint8 images
# and int64 labels, training-set pixel mean, std, the task it makes). A new dataset is one entry here.
DATASETS = {
    "mnist": (load_mnist, MEAN, STD, TEN_CLASSES),
    "fashion_mnist": (load_fashion_mnist, FASHION_MEAN, FASHION_STD, TEN_CLASSES),
}


def load_ten_classes(dataset: str, data_dir: str | os.PathLike, val_size: int, split_seed: int,
                     device: torch.device | str) -> Task:
    """All ten classes of ``dataset`` (a name of DATASETS) as one Task, labels 0-9.

    Train/val is the same seeded split of the 60k training images as load_tasks uses; test is the
    10k test set. Pixels are normalised with the dataset's own training mean and std.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    load, mean, std, spec = DATASETS[dataset]
    train, test = load(data_dir)
    parts = _split(train, test, val_size, split_seed)
    return Task(**{k: Split(_normalise(x, mean, std).to(device), y.to(device)) for k, (x, y) in parts.items()},
                spec=spec)


def batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """Index tensors of one epoch: a seeded permutation of range(n) cut into batch_size slices
    (the last one may be shorter, as with a DataLoader's drop_last=False)."""
    perm = torch.randperm(n, generator=generator, device=device)
    return list(perm.split(batch_size))


# --- two public-domain texts for the character-level language models (issue 22) ----------------------------
@dataclass(frozen=True)
class Text:
    """A text that ships in <data_dir>/text/ (data/text/ of this repository), pinned by its digest."""
    file: str  # its name in <data_dir>/text/
    sha256: str  # of the file's bytes (UTF-8, "\n" line ends)
    characters: int  # its length in characters (Unicode code points), not bytes
    source: str  # where it comes from (data/text/README.md)


# name -> the text. Facts in data/text/README.md; a new text is one entry here (the vocabulary follows).
TEXTS = {
    "shakespeare": Text("tinyshakespeare.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                        1_115_394, "Tiny Shakespeare, Karpathy's char-rnn data/tinyshakespeare/input.txt"),
    "austen": Text("austen_pride_and_prejudice.txt", "d02c06ecdee0120842aa1274288a07fe68d5316d1e8285853eaf4fc65a0b39a0",
                   684_781, "J. Austen, Pride and Prejudice, Project Gutenberg eBook #1342, header, footer and "
                            "licence removed"),
}
_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"  # one int32 per character, in native order


def load_text(name: str, data_dir: str | os.PathLike) -> str:
    """The text ``name`` (a key of TEXTS), read from <data_dir>/text/<file> and verified: it must be UTF-8 and
    have the pinned SHA-256 (so, too, its number of characters). Otherwise, as for an unknown name or a missing
    file: a one-line DataError naming the file and how to restore it. Nothing is written."""
    if name not in TEXTS:
        raise DataError(f"unknown text {name!r}; allowed: {', '.join(TEXTS)}")
    text = TEXTS[name]
    path = Path(data_dir) / "text" / text.file
    fix = (f"restore the original, which ships with this repository as data/text/{text.file} "
           f"(git checkout -- data/text/{text.file})")
    if not path.is_file():
        raise DataError(f"text {name!r} is missing: no file {path}; {fix}")
    blob = path.read_bytes()
    try:
        decoded = blob.decode("utf-8")  # strict, and no line-end translation: the characters are the file's
    except UnicodeDecodeError as e:
        raise DataError(f"corrupt data file {path} (not UTF-8: {e.reason} at byte {e.start}); {fix}") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != text.sha256:
        raise DataError(f"corrupt data file {path} (SHA-256 {got}, expected {text.sha256}); {fix}")
    return decoded


def _code_points(text: str) -> torch.Tensor:
    """int32 (len(text),): each character's code point."""
    if not text:
        return torch.empty(0, dtype=torch.int32)
    return torch.frombuffer(bytearray(text.encode(_UTF32)), dtype=torch.int32)


class Vocabulary:
    """A character vocabulary: token i is the i-th of ``chars``, distinct characters in code-point order."""

    def __init__(self, chars: str):
        if not chars or list(chars) != sorted(set(chars)):
            raise ValueError("a vocabulary's characters must be one or more, distinct and sorted by code point")
        self.chars = chars
        self._codes = _code_points(chars)  # int32 (V,), ascending: a character's token is its index here

    @classmethod
    def of(cls, texts) -> Vocabulary:
        """The sorted union of the characters of ``texts`` (an iterable of str)."""
        return cls("".join(sorted(set().union(*texts))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 (len(text),) tokens; a DataError naming the first character that is not in the vocabulary."""
        codes = _code_points(text)
        tokens = torch.searchsorted(self._codes, codes).clamp_(max=len(self) - 1)  # int64: where each would sit
        bad = (self._codes[tokens] != codes).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"character {text[i]!r} (U+{ord(text[i]):04X}, at position {i}) is not in the "
                            f"vocabulary of {len(self)} characters")
        return tokens

    def decode(self, tokens) -> str:
        """The text of ``tokens`` (a 1-D tensor or sequence of ints in 0..len(self)-1)."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64).cpu().flatten()
        if len(tokens) and not (0 <= int(tokens.min()) and int(tokens.max()) < len(self)):
            raise DataError(f"tokens must lie in 0..{len(self) - 1} (the vocabulary's {len(self)} characters), "
                            f"got {int(tokens.min())}..{int(tokens.max())}")
        return self._codes[tokens].numpy().tobytes().decode(_UTF32)


def text_vocabulary(data_dir: str | os.PathLike) -> Vocabulary:
    """The one character vocabulary of every text of TEXTS: the sorted union of their characters, derived from
    the verified files (load_text), so that a model trained on one text reads the others."""
    return Vocabulary.of(load_text(name, data_dir) for name in TEXTS)


def text_bounds(n: int) -> dict[str, tuple[int, int]]:
    """Where each split of a text of ``n`` characters lies: name -> (start, stop), contiguous and in order.

    train is the first 90 % (n * 9 // 10 characters, nanoGPT's shakespeare_char int(n * 0.9) for both texts);
    the last 10 % is held out and cut in two, so that early stopping and the reported figure never read the
    same characters: val, its first half ((n - train) // 2 characters), on which a run early-stops, and test,
    its second half, on which it is reported. heldout is the whole last 10 % (val + test), nanoGPT's validation
    split, for comparing losses with nanoGPT's reported ones (1.4697 for its baby GPT on Shakespeare)."""
    train = n * 9 // 10
    val = train + (n - train) // 2
    return {"train": (0, train), "val": (train, val), "test": (val, n), "heldout": (train, n)}


def text_splits(seq):
    """{name: seq[start:stop]} for the splits of text_bounds(len(seq)); ``seq`` a str or a 1-D token tensor."""
    return {name: seq[a:b] for name, (a, b) in text_bounds(len(seq)).items()}


def windows(tokens: torch.Tensor, context: int) -> Split:
    """The (N, T) non-overlapping windows of ``tokens`` (int64, 1-D) for a context length T = ``context``:
    x[i] = tokens[i*T : (i+1)*T] and y[i] = tokens[i*T+1 : (i+1)*T+1], the next character at every position,
    N = (len(tokens) - 1) // T; the characters past the last whole window are left out (fewer than T)."""
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context < len(tokens):
        raise ConfigError(f"context length must be an integer from 1 to {len(tokens) - 1} for {len(tokens)} tokens "
                          f"(a window reads one more than its length), got {context!r}")
    n = (len(tokens) - 1) // context
    return Split(tokens[: n * context].view(n, context), tokens[1: n * context + 1].view(n, context))


def text_task(name: str, context: int, data_dir: str | os.PathLike, device: torch.device | str,
              vocabulary: Vocabulary | None = None, chars: int = 0, train_chars: int = 0) -> Task:
    """The text ``name`` (a key of TEXTS) as a next-character Task for a context length ``context``: train, val
    and test of text_bounds, each the non-overlapping windows of ``windows``, x and y int64 (N, context) on
    ``device``; spec TaskSpec(shape=(context,), classes=len(vocabulary), objective=NEXT_TOKEN). ``vocabulary``
    defaults to text_vocabulary(data_dir), the one of every text (pass it to make several tasks without
    re-reading the files). ``chars`` > 0 keeps the first ``chars`` characters of each split (a quick run, the
    tests), ``train_chars`` > 0 the first ``train_chars`` of the training split (a study's budget). A context length
    below 1, or one that leaves a split no window, is a ConfigError.
    For nanoGPT's validation split: windows(text_splits(vocabulary.encode(load_text(name, data_dir)))["heldout"],
    context)."""
    text = load_text(name, data_dir)
    vocabulary = text_vocabulary(data_dir) if vocabulary is None else vocabulary
    parts = text_splits(vocabulary.encode(text))
    for k, cap in (("train", train_chars), *((k, chars) for k in ("train", "val", "test"))):
        if cap:
            parts[k] = parts[k][:cap]
    shortest = min(("train", "val", "test"), key=lambda k: len(parts[k]))
    top = len(parts[shortest]) - 1  # a window reads context + 1 characters
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= top:
        raise ConfigError(f"context length must be an integer from 1 to {top} for the text {name!r} (its shortest "
                          f"split, {shortest}, has {len(parts[shortest])} characters and a window reads one more "
                          f"than its length), got {context!r}")
    splits = {k: windows(parts[k], context) for k in ("train", "val", "test")}
    return Task(**{k: Split(s.x.to(device), s.y.to(device)) for k, s in splits.items()},
                spec=TaskSpec(shape=(context,), classes=len(vocabulary), objective=NEXT_TOKEN))


def speaking_roles(text: str) -> dict[str, list[str]]:
    """Tiny Shakespeare's speaking roles, for a federated study whose clients are roles (LEAF's Shakespeare task):
    speaker name -> its speeches in the order of the text, each speech its lines joined by "\\n".

    The text is blocks separated by blank lines; a block opens with its speaker line, a line ending in ':' whose
    text is the name (``First Citizen:``, ``MENENIUS:``), and its other lines are that role's speech. A block
    with no speech (a speaker line alone: a stage direction was cut) names its role and adds no speech. A block
    that does not open with a speaker line is a DataError naming the line."""
    roles: dict[str, list[str]] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        speaker, stop = lines[i], i + 1
        while stop < len(lines) and lines[stop]:
            stop += 1
        if not speaker.endswith(":") or not speaker[:-1].strip():
            raise DataError(f"line {i + 1} opens a block but is not a speaker line (a name ending in ':'): "
                            f"{speaker[:60]!r}")
        speeches = roles.setdefault(speaker[:-1], [])
        if stop > i + 1:
            speeches.append("\n".join(lines[i + 1: stop]))
        i = stop
    return roles


def keep_roles(roles: dict[str, list[str]], min_characters: int) -> dict[str, list[str]]:
    """The roles of ``roles`` (from speaking_roles) whose speeches hold at least ``min_characters`` characters
    in all (line breaks inside a speech counted; speaker lines and blank lines not), in their order."""
    if isinstance(min_characters, bool) or not isinstance(min_characters, int) or min_characters < 0:
        raise ConfigError(f"min_characters must be an integer >= 0, got {min_characters!r}")
    return {name: speeches for name, speeches in roles.items() if sum(map(len, speeches)) >= min_characters}


@functools.lru_cache(maxsize=8)
def _vocabulary(data_dir: str) -> Vocabulary:
    return text_vocabulary(data_dir)


def vocabulary(data_dir: str | os.PathLike) -> Vocabulary:
    """text_vocabulary(data_dir), read once per folder and process (the files are verified on that first read)."""
    return _vocabulary(str(Path(data_dir).resolve()))


def text_examples(name: str, context: int, chars: int = 0) -> tuple[int, int]:
    """(training, test) windows of the text ``name`` at context length ``context``, with each split cut to
    ``chars`` characters (0: whole), from the pinned length (TEXTS): no file is read."""
    bounds = text_bounds(TEXTS[name].characters)
    n = {k: b - a if not chars else min(chars, b - a) for k, (a, b) in bounds.items()}
    return max(0, (n["train"] - 1) // context), max(0, (n["test"] - 1) // context)
