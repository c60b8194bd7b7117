"""normkit.data.text: the standard-library byte corpus and its batches."""

from __future__ import annotations

import hashlib
import socket
import sys

import pytest
import torch

from normkit.data.text import (
    IGNORE_INDEX,
    PAD_ID,
    TextCorpus,
    lm_batches,
    load_text,
    padded_batches,
)


@pytest.fixture(scope="module")
def corpus() -> TextCorpus:
    return load_text()


def test_corpus_is_prose_of_a_useful_size_and_records_its_origin(corpus):
    assert corpus.train.dtype == torch.uint8 and corpus.train.dim() == 1
    assert corpus.train.numel() > 100_000 and corpus.val.numel() > 5_000
    assert corpus.val_documents > 0 and corpus.train_documents > 5 * corpus.val_documents
    assert corpus.python_version == ".".join(map(str, sys.version_info[:3]))
    whole = bytes(corpus.train.tolist()) + b"\0" + bytes(corpus.val.tolist())
    assert corpus.sha256 == hashlib.sha256(whole).hexdigest()
    assert PAD_ID not in set(corpus.train.unique().tolist())  # padding id is not a text byte
    assert "Return" in corpus.decode(corpus.train[:20000])  # docstrings, in English


def test_deterministic_and_network_free(corpus, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the corpus touched the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    again = load_text.__wrapped__()  # bypass the cache: rebuilt from scratch
    assert again.sha256 == corpus.sha256
    assert torch.equal(again.train, corpus.train)


def test_split_by_document_never_shares_a_document(corpus):
    import inspect
    import json
    import textwrap

    train, val = bytes(corpus.train.tolist()), bytes(corpus.val.tolist())
    for name, obj in [("json", json), ("json.dumps", json.dumps), ("json.loads", json.loads),
                      ("textwrap.dedent", textwrap.dedent), ("textwrap.TextWrapper", textwrap.TextWrapper),
                      ("textwrap.TextWrapper.wrap", textwrap.TextWrapper.wrap)]:  # fmt: skip
        doc = f"{name}\n{inspect.cleandoc(obj.__doc__)}".encode()
        in_val = hashlib.sha256(name.encode()).digest()[0] < round(256 * 0.1)
        assert (doc in val) == in_val and (doc in train) == (not in_val), name
    more_val = load_text(val_fraction=0.3)
    assert more_val.val_documents > corpus.val_documents


def test_lm_windows_are_consecutive_corpus_bytes(corpus):
    raw = bytes(corpus.train.tolist())
    batches = list(lm_batches(corpus, 3, 17, num_batches=2, seed=5))
    assert len(batches) == 2
    for b in batches:
        assert b.inputs.shape == b.targets.shape == (3, 17) and b.inputs.dtype == torch.int64
        for row_in, row_t in zip(b.inputs.tolist(), b.targets.tolist(), strict=True):
            seq = bytes(row_in) + bytes(row_t[-1:])
            assert seq in raw  # a real window
            assert row_t[:-1] == row_in[1:]  # shifted by one
    same = list(lm_batches(corpus, 3, 17, num_batches=2, seed=5))
    other = next(lm_batches(corpus, 3, 17, seed=6))
    assert all(torch.equal(a.inputs, c.inputs) for a, c in zip(batches, same, strict=True))
    assert not torch.equal(other.inputs, batches[0].inputs)


def test_lm_eval_windows_tile_the_split_once(corpus):
    val = corpus.val.long()
    batches = list(lm_batches(corpus, 4, 64, split="val", shuffle=False))
    n_windows = (val.numel() - 64 + 63) // 64  # starts 0, 64, ... < numel - 64
    assert len(batches) == n_windows // 4
    flat = torch.cat([b.inputs for b in batches]).flatten()
    assert torch.equal(flat, val[: flat.numel()])
    assert len(list(lm_batches(corpus, 4, 64, split="val", shuffle=False, num_batches=3))) == 3


def test_padded_batches_mask_and_targets(corpus):
    raw = bytes(corpus.train.tolist())
    for b in padded_batches(corpus, 6, 5, 40, num_batches=3, seed=1):
        t_max = int(b.lengths.max())
        assert b.inputs.shape == b.targets.shape == b.mask.shape == (6, t_max)
        assert b.mask.dtype == torch.bool
        assert torch.equal(b.mask.sum(1), b.lengths)
        assert ((b.lengths >= 5) & (b.lengths <= 40)).all()
        assert (b.inputs[~b.mask] == PAD_ID).all() and (b.targets[~b.mask] == IGNORE_INDEX).all()
        for i in range(6):
            n = int(b.lengths[i])
            row_in, row_t = b.inputs[i, :n].tolist(), b.targets[i, :n].tolist()
            assert row_t[:-1] == row_in[1:] and bytes(row_in) + bytes(row_t[-1:]) in raw
    # mean padding share of uniform lengths in [5, 40] is well away from 0
    b = next(padded_batches(corpus, 64, 5, 40, seed=0))
    assert 0.2 < 1 - b.mask.float().mean().item() < 0.7


def test_bad_input_is_refused_clearly(corpus):
    with pytest.raises(ValueError, match="source must be one of"):
        load_text("wikipedia")
    with pytest.raises(ValueError, match="val_fraction"):
        load_text(val_fraction=1.5)
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        next(lm_batches(corpus, 2.0, 8))
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        next(lm_batches(corpus, 2, 0))
    with pytest.raises(ValueError, match="needs at least 11 tokens, got 5"):
        next(lm_batches(torch.arange(5), 2, 10))
    with pytest.raises(TypeError, match="1-D tensor"):
        next(lm_batches(torch.zeros(3, 3), 2, 2))
    with pytest.raises(ValueError, match="max_len must be >= 8, got 4"):
        next(padded_batches(corpus, 2, 8, 4))
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        corpus.split("test")


def test_functions_patched_into_the_stdlib_do_not_change_the_text(corpus, monkeypatch):
    import logging

    def warning_advice(self, *args):
        """Patched in by a third-party library (transformers does this)."""

    monkeypatch.setattr(logging.Logger, "warning_advice", warning_advice, raising=False)
    monkeypatch.setattr(logging, "patched_function", warning_advice, raising=False)
    assert load_text.__wrapped__().sha256 == corpus.sha256
