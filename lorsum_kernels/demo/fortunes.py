"""Quotes of Debian's ``fortunes`` package by topic (5 classes), offline: a second classification task.

Contract:

* ``fortunes_root()`` is ``/usr/share/games/fortunes`` (``apt-get install fortunes``, Debian's
  fortune-mod data; override with ``LORSUM_FORTUNES_DIR``). Raises with the install command when absent.
* ``load_quotes()`` reads the files of ``CLASSES`` (sorted), splits each on its ``%`` lines, keeps the
  quotes of 20 to 600 characters with their whitespace folded, and drops quotes that appear in two files:
  2,590 quotes, in file order, so the list (and any split of it by a seed) is the same everywhere.
  Returns ``bbc.Articles``, so ``bbc.split`` and ``bbc.tokenize`` apply unchanged.

Short, often humorous texts whose topic is carried by a few words: a task unlike BBC's news articles
(the defaults sweep's third task, docs/defaults_sweep.md). The text is read at run time, never copied here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch

from .bbc import Articles

__all__ = ["CLASSES", "fortunes_root", "load_quotes"]

CLASSES = ("computers", "food", "literature", "politics", "science")


def fortunes_root() -> Path:
    root = Path(os.environ.get("LORSUM_FORTUNES_DIR", "/usr/share/games/fortunes"))
    if not all((root / name).is_file() for name in CLASSES):
        raise FileNotFoundError(
            f"the fortunes files {CLASSES} are not in {root}: install Debian's fortunes package "
            "(apt-get install fortunes) or set LORSUM_FORTUNES_DIR")
    return root


def _quotes(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    quotes = (re.sub(r"\s+", " ", q).strip() for q in re.split(r"^%\s*$", text, flags=re.M))
    return [q for q in quotes if 20 <= len(q) <= 600]


def load_quotes(root: Path | None = None) -> Articles:
    root = fortunes_root() if root is None else root
    per_class = {name: _quotes(root / name) for name in sorted(CLASSES)}
    seen = Counter(q for quotes in per_class.values() for q in set(quotes))
    texts, labels = [], []
    for index, name in enumerate(sorted(CLASSES)):
        for quote in dict.fromkeys(per_class[name]):  # in file order, once
            if seen[quote] == 1:
                texts.append(quote)
                labels.append(index)
    return Articles(texts, torch.tensor(labels, dtype=torch.int64), sorted(CLASSES))
