"""MNIST and Fashion-MNIST loading: split sizes, relabelling, normalisation, the IDX parser, what is verified
(the .gz md5s; the content read from them; Fashion-MNIST's SHA-256 digests), and clear errors for missing or
corrupt files."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import struct

import pytest
import torch

from data import (DEBIAN_FASHION, FASHION_FILES, DataError, _parse_idx, load_fashion_mnist, load_mnist, load_tasks,
                  load_ten_classes)
from tests.conftest import ROOT

RAW = ROOT / "data" / "MNIST" / "raw"
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}


@pytest.fixture(scope="module")
def clean_mnist():
    return load_mnist(ROOT / "data")


def test_tasks_split_relabel_and_normalise(mnist_tasks):
    A, B = mnist_tasks["A"], mnist_tasks["B"]
    assert len(A.train) + len(B.train) == 55_000 and len(A.val) + len(B.val) == 5_000
    assert len(A.test) + len(B.test) == 10_000
    assert (len(A.test), len(B.test)) == (5139, 4861)  # digits 0-4 / 5-9 in the MNIST test set
    for task in (A, B):
        for s in (task.train, task.val, task.test):
            assert s.x.shape[1] == 784 and s.x.dtype == torch.float32
            assert set(s.y.unique().tolist()) == {0, 1, 2, 3, 4}
    x = torch.cat([A.train.x, B.train.x])
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1.0) < 0.02  # mean 0.1307, std 0.3081 removed


def test_split_is_seeded():
    a = load_tasks(ROOT / "data", 5000, 0, "cpu")["B"].val
    b = load_tasks(ROOT / "data", 5000, 0, "cpu")["B"].val
    c = load_tasks(ROOT / "data", 5000, 1, "cpu")["B"].val
    assert torch.equal(a.x, b.x) and not (len(a) == len(c) and torch.equal(a.x, c.x))


def _copy_raw(tmp_path, skip=()):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in RAW.glob("*.gz"):
        if f.name not in skip:
            shutil.copy(f, raw / f.name)
    return raw


def test_missing_file_without_network_says_what_to_put_where(tmp_path, monkeypatch):
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    _copy_raw(tmp_path, skip={"t10k-labels-idx1-ubyte.gz"})
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert "could not be downloaded" in msg and "t10k-labels-idx1-ubyte.gz" in msg and str(tmp_path) in msg


def test_corrupt_archive_is_named(tmp_path):
    raw = _copy_raw(tmp_path)
    data = (raw / "train-labels-idx1-ubyte.gz").read_bytes()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt data file .*train-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path)
    labels = bytearray(gzip.decompress(data))  # a well-formed .gz of the wrong content: the md5 refuses it
    labels[8:] = bytes((b + 1) % 10 for b in labels[8:])
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DataError, match=r"corrupt data file .*train-labels-idx1-ubyte.gz \(md5 .*, expected"):
        load_mnist(tmp_path)


def test_extracted_files_are_never_read(tmp_path, clean_mnist):
    raw = _copy_raw(tmp_path)
    for f in raw.glob("*.gz"):  # extract as torchvision would, then corrupt them at the same size
        data = bytearray(gzip.decompress(f.read_bytes()))
        header = 8 if "labels" in f.name else 16
        if "labels" in f.name or f.name.startswith("t10k"):
            data[header:] = (b"\xff" if "labels" in f.name else b"\x00") * (len(data) - header)
        (raw / f.stem).write_bytes(data)
    (train_x, train_y), (test_x, test_y) = load_mnist(tmp_path)
    (clean_train_x, clean_train_y), (clean_test_x, clean_test_y) = clean_mnist
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == test_y.dtype == torch.int64
    assert torch.equal(train_x, clean_train_x) and torch.equal(train_y, clean_train_y)
    assert torch.equal(test_x, clean_test_x) and torch.equal(test_y, clean_test_y)
    assert int(test_x.max()) == 255 and int(train_y.max()) == 9


def test_idx_parse_agrees_with_torchvision(tmp_path, clean_mnist):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    loaded = dict(zip(("train-images", "train-labels", "t10k-images", "t10k-labels"),
                      (t for pair in clean_mnist for t in pair)))
    for f in sorted(RAW.glob("*.gz")):
        data = gzip.decompress(f.read_bytes())
        (tmp_path / f.stem).write_bytes(data)
        reader = read_label_file if "labels" in f.name else read_image_file
        theirs, ours = reader(str(tmp_path / f.stem)), _parse_idx(data, f.stem)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs), f.name
        assert torch.equal(loaded[f.name.split("-idx")[0]], theirs), f.name
    assert [t.shape[0] for t in loaded.values()] == [60000, 60000, 10000, 10000]


def test_idx_structure_is_checked():
    good = gzip.decompress((RAW / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert _parse_idx(good, "t10k-labels-idx1-ubyte").shape == (10000,)
    for data, name, needle in (
        (b"\x00\x00\x08", "t10k-labels-idx1-ubyte", "shorter than the 8-byte header"),
        (struct.pack(">I", 0x0803) + good[4:], "t10k-labels-idx1-ubyte", "magic number 0x00000803, expected 0x00000801"),
        (good, "train-labels-idx1-ubyte", r"dimensions \(10000,\), expected \(60000,\)"),
        (good[:-1], "t10k-labels-idx1-ubyte", "10007 bytes, expected 10008"),
        (good + b"\x00", "t10k-labels-idx1-ubyte", "10009 bytes, expected 10008"),
        (good[:-1] + b"\x0a", "t10k-labels-idx1-ubyte", "label value 10, expected 0..9"),
        (struct.pack(">4I", 0x0803, 10000, 28, 27) + bytes(10000 * 28 * 27), "t10k-images-idx3-ubyte",
         r"dimensions \(10000, 28, 27\), expected \(10000, 28, 28\)"),
    ):
        with pytest.raises(ValueError, match=needle):
            _parse_idx(data, name)


# --- Fashion-MNIST -------------------------------------------------------------------------------------------
def _idx_bytes(x: torch.Tensor) -> bytes:
    magic = 0x0803 if x.dim() == 3 else 0x0801
    return struct.pack(f">{1 + x.dim()}I", magic, *x.shape) + x.numpy().tobytes()


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """A Debian-like folder of four synthetic, exactly balanced Fashion-MNIST .gz files; returns
    (folder, {name: tensor}, {name: SHA-256 of the decompressed content})."""
    source, g = tmp_path_factory.mktemp("debian"), torch.Generator().manual_seed(0)
    tensors, digests = {}, {}
    for split, n in (("train", 60000), ("t10k", 10000)):
        tensors[f"{split}-images-idx3-ubyte"] = torch.arange(251, dtype=torch.uint8).repeat(n * 784 // 251 + 1)[
            :n * 784].view(n, 28, 28)
        tensors[f"{split}-labels-idx1-ubyte"] = (torch.randperm(n, generator=g) % 10).to(torch.uint8)
    for name, x in tensors.items():
        data = _idx_bytes(x)
        (source / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        digests[name] = hashlib.sha256(data).hexdigest()
    return source, tensors, digests


def _one_line_error(fn) -> str:
    with pytest.raises(DataError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_fashion_mnist_is_read_from_the_gz_and_verified(tmp_path, fake_fashion):
    source, tensors, digests = fake_fashion
    raw = tmp_path / "FashionMNIST" / "raw"
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(tmp_path, source=source, digests=digests)
    assert not raw.exists()  # nothing is decompressed to disk
    assert torch.equal(train_x, tensors["train-images-idx3-ubyte"]) and train_x.dtype == torch.uint8
    assert torch.equal(test_y, tensors["t10k-labels-idx1-ubyte"].long()) and test_y.dtype == torch.int64
    assert train_y.shape == (60000,) and test_x.shape == (10000, 28, 28)

    raw.mkdir(parents=True)  # decompressed files placed by the user are read, and verified
    name = "t10k-images-idx3-ubyte"
    (raw / name).write_bytes(_idx_bytes(tensors[name]))
    assert torch.equal(load_fashion_mnist(tmp_path, source=source, digests=digests)[1][0], tensors[name])
    corrupt = bytearray((raw / name).read_bytes())
    corrupt[16:] = bytes(len(corrupt) - 16)  # same size, pixels zeroed
    (raw / name).write_bytes(corrupt)
    msg = _one_line_error(lambda: load_fashion_mnist(tmp_path, source=source, digests=digests))
    assert f"corrupt data file {raw / name} (SHA-256" in msg and digests[name] in msg and "delete it" in msg
    (raw / name).unlink()

    bad = tmp_path / "bad"  # a damaged .gz in the package
    shutil.copytree(source, bad)
    gz = bad / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-9])
    msg = _one_line_error(lambda: load_fashion_mnist(tmp_path, source=bad, digests=digests))
    assert f"could not decompress {gz}" in msg and "apt-get install --reinstall dataset-fashion-mnist" in msg
    msg = _one_line_error(lambda: load_fashion_mnist(tmp_path, source=tmp_path / "nowhere", digests=digests))
    assert "apt-get install dataset-fashion-mnist" in msg and FASHION_FILES[0] in msg


def test_fashion_mnist_structure_and_balance_are_checked(tmp_path, fake_fashion):
    source, tensors, digests = fake_fashion
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    name = "train-labels-idx1-ubyte"
    y = tensors[name].clone()
    y[y == 3] = 4  # still labels 0..9, the right shape and a matching digest, but not 6000 per class
    data = _idx_bytes(y)
    (raw / f"{name}.gz").write_bytes(gzip.compress(data))
    msg = _one_line_error(lambda: load_fashion_mnist(
        tmp_path, source=source, digests={**digests, name: hashlib.sha256(data).hexdigest()}))
    assert f"corrupt data file {raw / name}.gz (images per class" in msg and "expected 6000 each" in msg
    data = _idx_bytes(tensors[name])[:-1] + b"\x0c"  # a digest that matches, a label out of range
    (raw / f"{name}.gz").write_bytes(gzip.compress(data))
    msg = _one_line_error(lambda: load_fashion_mnist(
        tmp_path, source=source, digests={**digests, name: hashlib.sha256(data).hexdigest()}))
    assert "label value 12, expected 0..9" in msg


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_matches_the_pinned_digests(tmp_path):
    task = load_ten_classes("fashion_mnist", tmp_path, 5000, 0, "cpu")  # pinned digests, balance, structure
    assert (len(task.train), len(task.val), len(task.test)) == (55000, 5000, 10000)
    assert torch.bincount(task.test.y).tolist() == [1000] * 10
    assert not (tmp_path / "FashionMNIST").exists()
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)  # a decompressed copy corrupted at the same size, labels still 0..9
    name = "t10k-labels-idx1-ubyte"
    data = bytearray(gzip.decompress((DEBIAN_FASHION / f"{name}.gz").read_bytes()))
    data[8:] = bytes((b + 1) % 10 for b in data[8:])
    (raw / name).write_bytes(data)
    msg = _one_line_error(lambda: load_fashion_mnist(tmp_path))
    assert f"corrupt data file {raw / name}" in msg and "delete it" in msg
