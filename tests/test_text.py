"""The texts of the character-level language models (data.TEXTS): the shipped files are the pinned ones and a
changed, missing or non-UTF-8 file is refused in one line; one vocabulary, the union of both texts; the 90 / 5 / 5
splits; next-character windows; Shakespeare's speaking roles."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from data import (NEXT_TOKEN, TEXTS, ConfigError, DataError, Vocabulary, keep_roles, load_text, speaking_roles,
                  text_bounds, text_splits, text_task, text_vocabulary, windows)
from tests.conftest import ROOT

DATA = ROOT / "data"
DISTINCT = {"shakespeare": 65, "austen": 76}  # data/text/README.md
ROLES = 309  # distinct speaker names of Tiny Shakespeare (not the 904 of ../shared/text/README.md: see docs/text.md)


@pytest.fixture(scope="module")
def texts():
    return {name: load_text(name, DATA) for name in TEXTS}


@pytest.fixture(scope="module")
def vocabulary():
    return text_vocabulary(DATA)


def test_the_shipped_files_are_the_pinned_ones(texts):
    for name, text in TEXTS.items():
        assert hashlib.sha256((DATA / "text" / text.file).read_bytes()).hexdigest() == text.sha256
        assert len(texts[name]) == text.characters and len(set(texts[name])) == DISTINCT[name]
        assert "\r" not in texts[name]


def _copy(tmp_path, name="shakespeare"):
    (tmp_path / "text").mkdir()
    path = tmp_path / "text" / TEXTS[name].file
    shutil.copy(DATA / "text" / TEXTS[name].file, path)
    return path


def _one_line_error(name, data_dir) -> str:
    with pytest.raises(DataError) as e:
        load_text(name, data_dir)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_changed_byte_is_refused_naming_the_file_both_digests_and_the_fix(tmp_path):
    path = _copy(tmp_path)
    assert load_text("shakespeare", tmp_path) == load_text("shakespeare", DATA)  # a faithful copy reads
    blob = bytearray(path.read_bytes())
    blob[1000] ^= 0x01  # still ASCII, still UTF-8: only the digest sees it
    path.write_bytes(bytes(blob))
    msg = _one_line_error("shakespeare", tmp_path)
    assert msg.startswith(f"corrupt data file {path} (SHA-256 {hashlib.sha256(blob).hexdigest()}, "
                          f"expected {TEXTS['shakespeare'].sha256}); restore the original")
    assert "git checkout -- data/text/tinyshakespeare.txt" in msg


def test_a_missing_file_an_unknown_name_and_a_non_utf8_file_are_refused_in_one_line(tmp_path):
    msg = _one_line_error("austen", tmp_path)
    assert f"no file {tmp_path / 'text' / TEXTS['austen'].file}" in msg and "git checkout" in msg
    assert _one_line_error("hamlet", tmp_path) == "unknown text 'hamlet'; allowed: shakespeare, austen"
    path = _copy(tmp_path, "austen")
    blob = bytearray(path.read_bytes())
    blob[500] = 0xFF  # never a byte of UTF-8
    path.write_bytes(bytes(blob))
    msg = _one_line_error("austen", tmp_path)
    assert msg.startswith(f"corrupt data file {path} (not UTF-8: invalid start byte at byte 500); restore")


def test_one_vocabulary_is_the_union_and_round_trips_both_texts(texts, vocabulary):
    union = set(texts["shakespeare"]) | set(texts["austen"])
    assert len(vocabulary) == len(union) and set(vocabulary.chars) == union
    assert list(vocabulary.chars) == sorted(union)  # token i is the i-th character by code point
    for text in texts.values():
        tokens = vocabulary.encode(text)
        assert tokens.dtype == torch.int64 and tokens.shape == (len(text),)
        assert vocabulary.decode(tokens) == text
    assert vocabulary.encode("").shape == (0,) and vocabulary.decode([]) == ""
    assert vocabulary.decode(vocabulary.encode("First Citizen:")) == "First Citizen:"
    with pytest.raises(DataError, match=r"character '€' \(U\+20AC, at position 3\) is not in the vocabulary"):
        vocabulary.encode("abc€")
    with pytest.raises(DataError, match="tokens must lie in"):
        vocabulary.decode([len(vocabulary)])
    small = Vocabulary.of(["ba", "ca"])
    assert small.chars == "abc" and small.encode("cab").tolist() == [2, 0, 1]


def test_the_splits_are_contiguous_disjoint_and_cover_the_text_90_5_5(texts):
    for name, text in texts.items():
        n = len(text)
        b = text_bounds(n)
        assert b["train"][0] == 0 and b["train"][1] == b["val"][0] and b["val"][1] == b["test"][0]
        assert b["test"][1] == n and b["heldout"] == (b["val"][0], n)
        assert b["train"][1] == int(n * 0.9)  # nanoGPT's shakespeare_char cut
        assert abs((b["val"][1] - b["val"][0]) - (b["test"][1] - b["test"][0])) <= 1  # 5 % and 5 %
        parts = text_splits(text)
        assert parts["train"] + parts["val"] + parts["test"] == text
        assert parts["heldout"] == parts["val"] + parts["test"]
    assert text_bounds(1_115_394) == {"train": (0, 1_003_854), "val": (1_003_854, 1_059_624),
                                      "test": (1_059_624, 1_115_394), "heldout": (1_003_854, 1_115_394)}
    assert text_bounds(684_781) == {"train": (0, 616_302), "val": (616_302, 650_541), "test": (650_541, 684_781),
                                    "heldout": (616_302, 684_781)}


def test_windows_targets_are_the_inputs_shifted_by_one_character(texts, vocabulary):
    tokens = torch.arange(23)
    w = windows(tokens, 5)
    assert w.x.tolist()[0] == [0, 1, 2, 3, 4] and w.y.tolist()[-1] == [16, 17, 18, 19, 20] and len(w) == 4
    task = text_task("austen", 64, DATA, "cpu", vocabulary)
    assert task.spec.shape == (64,) and task.spec.classes == len(vocabulary) and task.spec.objective is NEXT_TOKEN
    parts = text_splits(vocabulary.encode(texts["austen"]))
    for k in ("train", "val", "test"):
        s = task.__dict__[k]
        assert s.x.dtype == s.y.dtype == torch.int64 and s.x.shape == s.y.shape == (len(s), 64)
        assert len(s) == (len(parts[k]) - 1) // 64
        assert torch.equal(s.x.flatten(), parts[k][: s.x.numel()])  # non-overlapping, in order, from the split
        assert torch.equal(s.y[:, :-1], s.x[:, 1:]) and torch.equal(s.y[:-1, -1], s.x[1:, 0])
        assert s.y[-1, -1] == parts[k][s.x.numel()]  # the next character even past the last window


def test_a_context_length_out_of_range_is_refused_in_one_line(vocabulary):
    top = 34_239 - 1  # Austen's val split holds 34,239 characters
    for bad in (0, -1, top + 1, 2.0, True):
        with pytest.raises(ConfigError) as e:
            text_task("austen", bad, DATA, "cpu", vocabulary)
        assert str(e.value).startswith(f"context length must be an integer from 1 to {top} for the text 'austen'")
        assert "\n" not in str(e.value)
    assert len(text_task("austen", top, DATA, "cpu", vocabulary).val) == 1
    with pytest.raises(ConfigError, match="from 1 to 9 for 10 tokens"):
        windows(torch.arange(10), 10)


def test_speaking_roles_of_tiny_shakespeare(texts):
    text = texts["shakespeare"]
    roles = speaking_roles(text)
    assert len(roles) == ROLES
    assert list(roles)[:2] == ["First Citizen", "All"]
    assert roles["First Citizen"][0] == "Before we proceed any further, hear me speak."
    # every line of the text is a blank line, a speaker line or a line of exactly one speech
    speeches = [s for ss in roles.values() for s in ss]
    lines = text.split("\n")
    speaker_lines = sum(1 for i, line in enumerate(lines) if line and (i == 0 or not lines[i - 1]))
    assert sum(s.count("\n") + 1 for s in speeches) + speaker_lines == sum(1 for line in lines if line)
    assert sum(map(len, speeches)) > 0.9 * len(text)
    sizes = {t: len(keep_roles(roles, t)) for t in (0, 1_000, 5_000, 10_000)}
    assert sizes == {0: ROLES, 1_000: 141, 5_000: 64, 10_000: 35}
    assert all(sum(map(len, s)) >= 5_000 for s in keep_roles(roles, 5_000).values())
    with pytest.raises(DataError, match="line 2 opens a block but is not a speaker line"):
        speaking_roles("\nno name here\n")
    with pytest.raises(ConfigError, match="min_characters must be an integer >= 0"):
        keep_roles(roles, -1)
