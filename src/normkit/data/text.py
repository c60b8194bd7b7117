"""A byte-level text corpus built from text that ships with every Python installation.

Why: language-modelling claims (LN removal, PowerNorm/UN on padded batches, Mix-LN, Peri-LN) need
real text, and normkit downloads nothing. Every CPython installation carries a few hundred kilobytes
of English prose in the docstrings of its standard library, and megabytes of code in its ``.py``
sources. This module turns a **fixed list of standard-library modules** (:data:`TEXT_MODULES`) into a
byte-level corpus (vocabulary 256: no tokenizer to ship or train), split into train/val by document.

Stability: the text is the installed Python's own, so it differs between Python versions (3.11's
``argparse`` docstrings are not 3.13's). :class:`TextCorpus` therefore records
``python_version`` and a ``sha256`` of the bytes; results from two machines are comparable when the
hashes match. Within one Python version the corpus is deterministic: modules in the listed order,
members sorted by name, no dependence on ``PYTHONHASHSEED``, the environment or the network, and
only members defined by the module itself (``__module__`` and ``__qualname__`` match), so functions a
third-party library patches into the standard library (transformers adds
``logging.Logger.warning_advice``) do not change the text.

Sources (``source=``):

* ``"docstrings"`` (default, ~350 KB on 3.11, ~1300 documents): for each module its docstring, then
  the docstrings of its public classes and functions *defined in that module* (sorted by name), then
  for each class the docstrings of its public methods. Each document is ``"<qualified name>\\n<doc>"``.
  Empty under ``python -OO`` (docstrings stripped), where a clear error points to ``"sources"``.
* ``"sources"`` (~2.2 MB): the ``.py`` source file of each module, one document per module.

The split assigns each document to val when the first byte of ``sha256(name)`` falls below
``256 * val_fraction``, so it does not depend on how many documents precede it, and a document's
bytes never appear in both splits.

Batches: :func:`lm_batches` gives fixed-length next-byte windows; :func:`padded_batches` gives
variable-length sequences padded to the batch's longest, with a padding mask and ignored targets,
for the norms whose statistics padding distorts (PowerNorm, UN) and for placement claims.

Depends on nothing else in normkit (layer 0); only torch is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

#: The standard-library modules the corpus is read from, in this order. Pure-Python modules present
#: in every CPython 3.9+ build (no optional C extensions such as tkinter or sqlite3), so importing
#: them cannot fail; ``typing`` is left out because reading its members emits deprecation warnings.
TEXT_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio.base_events", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "heapq", "http.client", "inspect", "ipaddress", "json",
    "logging", "os", "pathlib", "pickle", "pprint", "random", "re", "shlex", "shutil", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "unittest.case",
    "urllib.parse", "uuid", "zipfile",
)  # fmt: skip

#: Separator written between documents in :attr:`TextCorpus.train` / ``val`` (a blank line).
DOC_SEPARATOR = b"\n\n"

#: Byte-level vocabulary: every byte value is a token.
VOCAB_SIZE = 256

#: Padding id used by :func:`padded_batches` inputs (NUL never occurs in the corpus text).
PAD_ID = 0

#: Target value of padded positions (``torch.nn.functional.cross_entropy``'s default ignore_index).
IGNORE_INDEX = -100

SOURCES = ("docstrings", "sources")


@dataclass(frozen=True)
class TextCorpus:
    """A byte-level corpus split into train and val, with what is needed to compare runs.

    ``train`` and ``val`` are 1-D ``uint8`` tensors (documents joined by :data:`DOC_SEPARATOR`);
    batch helpers return ``int64`` ids. ``sha256`` is the hash of ``train + b"\\0" + val``.
    """

    source: str
    train: Tensor
    val: Tensor
    train_documents: int
    val_documents: int
    python_version: str  # "3.11.7"
    sha256: str
    vocab_size: int = VOCAB_SIZE

    def split(self, name: str) -> Tensor:
        """``"train"`` or ``"val"``."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def unigram_nats(self) -> float:
        """Entropy (nats/byte) of the training split's byte frequencies: the loss of a model that predicts
        every next byte from its overall frequency alone, i.e. one that learned no context."""
        counts = torch.bincount(self.train.long(), minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def decode(self, ids: Tensor) -> str:
        """Bytes back to text (invalid UTF-8 sequences, e.g. a window cut mid-character, replaced)."""
        return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def _docstring_documents(module_name: str) -> list[tuple[str, str]]:
    mod = importlib.import_module(module_name)
    docs: list[tuple[str, str]] = []
    if mod.__doc__:
        docs.append((module_name, inspect.cleandoc(mod.__doc__)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != mod.__name__ or getattr(obj, "__qualname__", None) != name:
                continue  # re-exported from elsewhere (read once, where it is defined) or patched in
            qual = f"{module_name}.{name}"
            if obj.__doc__:
                docs.append((qual, inspect.cleandoc(obj.__doc__)))
            if inspect.isclass(obj):
                for mname, meth in sorted(vars(obj).items()):
                    if mname.startswith("_") or not inspect.isfunction(meth) or not meth.__doc__:
                        continue
                    if meth.__module__ != mod.__name__ or meth.__qualname__ != f"{name}.{mname}":
                        continue  # patched in by a third party (transformers adds logging.Logger.warning_advice)
                    docs.append((f"{qual}.{mname}", inspect.cleandoc(meth.__doc__)))
    return docs


def _source_documents(module_name: str) -> list[tuple[str, str]]:
    mod = importlib.import_module(module_name)
    path = inspect.getsourcefile(mod)
    if path is None:
        raise RuntimeError(
            f"the source of the standard-library module {module_name!r} is not installed "
            "(a stripped Python); use source='docstrings'"
        )
    with open(path, encoding="utf-8") as f:
        return [(module_name, f.read())]


def _is_val(name: str, val_fraction: float) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < round(256 * val_fraction)


@cache
def load_text(source: str = "docstrings", val_fraction: float = 0.1) -> TextCorpus:
    """The corpus of :data:`TEXT_MODULES` (cached per arguments; ~0.1 s the first time).

    Args:
        source: ``"docstrings"`` (English prose, ~350 KB) or ``"sources"`` (Python code, ~2.2 MB).
        val_fraction: share of documents held out, in (0, 1); assigned by a hash of each document's
            name (see the module docstring). With ``"sources"`` a document is a whole module.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not isinstance(val_fraction, float | int) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    reader = _docstring_documents if source == "docstrings" else _source_documents
    docs = [d for m in TEXT_MODULES for d in reader(m)]
    if not docs:
        raise RuntimeError("the standard library has no docstrings here (python -OO strips them); use source='sources'")
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for name, text in docs:
        body = (f"{name}\n{text}" if source == "docstrings" else text).encode("utf-8")
        (val_parts if _is_val(name, val_fraction) else train_parts).append(body)
    if not train_parts or not val_parts:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty split ({len(train_parts)} train, {len(val_parts)} val documents)"
        )
    train_b = DOC_SEPARATOR.join(train_parts)
    val_b = DOC_SEPARATOR.join(val_parts)
    digest = hashlib.sha256(train_b + b"\0" + val_b).hexdigest()
    return TextCorpus(
        source=source,
        train=torch.frombuffer(bytearray(train_b), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val_b), dtype=torch.uint8),
        train_documents=len(train_parts),
        val_documents=len(val_parts),
        python_version=".".join(map(str, sys.version_info[:3])),
        sha256=digest,
    )


class LMBatch(NamedTuple):
    """Next-token windows: ``targets[:, t] = inputs[:, t + 1]`` in the corpus (both ``int64``)."""

    inputs: Tensor  # (B, T)
    targets: Tensor  # (B, T)


class PaddedBatch(NamedTuple):
    """Variable-length sequences right-padded to the longest in the batch.

    ``mask`` is ``True`` on real tokens (same convention as ``attention_mask``); padded inputs are
    :data:`PAD_ID` and padded targets :data:`IGNORE_INDEX`, so
    ``cross_entropy(logits.flatten(0, 1), targets.flatten())`` counts real tokens only.
    """

    inputs: Tensor  # (B, T_max) int64
    targets: Tensor  # (B, T_max) int64
    mask: Tensor  # (B, T_max) bool
    lengths: Tensor  # (B,) int64


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _tokens(tokens: Tensor | TextCorpus, split: str) -> Tensor:
    if isinstance(tokens, TextCorpus):
        tokens = tokens.split(split)
    if not isinstance(tokens, Tensor) or tokens.dim() != 1:
        got = f"a {tokens.dim()}-D tensor" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(f"tokens must be a TextCorpus or a 1-D tensor of ids, got {got}")
    return tokens


def lm_batches(
    tokens: Tensor | TextCorpus,
    batch_size: int,
    seq_len: int,
    *,
    num_batches: int | None = None,
    seed: int = 0,
    split: str = "train",
    shuffle: bool = True,
) -> Iterator[LMBatch]:
    """Fixed-length next-byte windows from a corpus split (or any 1-D id tensor).

    With ``shuffle=True`` (training) window starts are drawn uniformly from a ``torch.Generator``
    seeded with ``seed``: the same seed gives the same batches on every machine, and
    ``num_batches=None`` then runs forever. With ``shuffle=False`` (evaluation) the split is cut into
    consecutive non-overlapping windows, covering it once, and the last incomplete batch is dropped
    (``num_batches`` caps the count).
    """
    data = _tokens(tokens, split)
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    if num_batches is not None:
        _check_int("num_batches", num_batches, 0)
    n = data.numel() - seq_len  # last valid start: targets need one more byte
    if n < 1:
        raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} tokens, got {data.numel()}")
    offsets = torch.arange(seq_len + 1)
    data = data.long()
    if shuffle:
        gen = torch.Generator().manual_seed(seed)
        count = 0
        while num_batches is None or count < num_batches:
            starts = torch.randint(0, n, (batch_size,), generator=gen)
            win = data[starts[:, None] + offsets]
            yield LMBatch(win[:, :-1], win[:, 1:])
            count += 1
    else:
        starts = torch.arange(0, n, seq_len)
        total = starts.numel() // batch_size
        if num_batches is not None:
            total = min(total, num_batches)
        for b in range(total):
            win = data[starts[b * batch_size : (b + 1) * batch_size, None] + offsets]
            yield LMBatch(win[:, :-1], win[:, 1:])


def padded_batches(
    tokens: Tensor | TextCorpus,
    batch_size: int,
    min_len: int,
    max_len: int,
    *,
    num_batches: int | None = None,
    seed: int = 0,
    split: str = "train",
) -> Iterator[PaddedBatch]:
    """Variable-length next-byte sequences, right-padded, with a padding mask.

    Each sequence's length is drawn uniformly from ``[min_len, max_len]`` and its start uniformly
    from the split (``torch.Generator`` seeded with ``seed``), so the expected padding share is
    controlled by the two bounds — what the padding-sensitive norms (PowerNorm, UN) need to be
    tested against. ``num_batches=None`` runs forever.
    """
    data = _tokens(tokens, split)
    batch_size = _check_int("batch_size", batch_size, 1)
    min_len = _check_int("min_len", min_len, 1)
    max_len = _check_int("max_len", max_len, min_len)
    if num_batches is not None:
        _check_int("num_batches", num_batches, 0)
    if data.numel() <= max_len:
        raise ValueError(f"max_len={max_len} needs at least {max_len + 1} tokens, got {data.numel()}")
    data = data.long()
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(max_len + 1)
    count = 0
    while num_batches is None or count < num_batches:
        lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=gen)
        starts = torch.randint(0, data.numel() - max_len, (batch_size,), generator=gen)
        t_max = int(lengths.max())
        win = data[starts[:, None] + offsets[: t_max + 1]]
        mask = torch.arange(t_max)[None, :] < lengths[:, None]
        inputs = win[:, :-1].masked_fill(~mask, PAD_ID)
        targets = win[:, 1:].masked_fill(~mask, IGNORE_INDEX)
        yield PaddedBatch(inputs, targets, mask, lengths)
        count += 1


__all__ = [
    "DOC_SEPARATOR",
    "IGNORE_INDEX",
    "PAD_ID",
    "SOURCES",
    "TEXT_MODULES",
    "VOCAB_SIZE",
    "LMBatch",
    "PaddedBatch",
    "TextCorpus",
    "lm_batches",
    "load_text",
    "padded_batches",
]
