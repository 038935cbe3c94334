"""MNIST loading: split sizes, relabelling, normalisation, and clear errors for missing or corrupt files."""
from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from data import DataError, load_mnist, load_tasks
from tests.conftest import ROOT

RAW = ROOT / "data" / "MNIST" / "raw"
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}


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


def test_corrupt_extracted_file_is_reported(tmp_path):
    raw = _copy_raw(tmp_path)
    for f in raw.glob("*.gz"):  # extract as torchvision would, then damage one file
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="could not read the MNIST files"):
        load_tasks(tmp_path, 5000, 0, "cpu")
