"""Text domains that ship with Python itself, a byte tokenizer and seeded window streams.

Nothing is downloaded. The domains (for language-model data reweighting, the
``lm_reweight`` experiment) are built from the running interpreter's files:

* ``docs``: the English reference documentation in ``pydoc_data.topics`` (the text
  ``help("if")`` prints), minus the held-out topics;
* ``code``: standard-library source, the ``.py`` files directly under
  ``sysconfig.get_paths()["stdlib"]`` in sorted order;
* ``shuffled``: the ``docs`` text with its words in a random order (same words and
  characters, no sentence structure left);
* ``random``: uniformly random printable ASCII characters.

The held-out topics (every ``val_every``-th topic in sorted order), less the paragraphs
they share with the other topics, form the clean validation text, which no domain
contains. Tokens are UTF-8 bytes (vocabulary 256):
:func:`encode` / :func:`decode`. Every domain is cut to the same number of bytes, so
no domain wins by size alone.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import random as _random
import string
import sysconfig
from typing import Iterator, Sequence

import torch

__all__ = ["VOCAB", "DOMAINS", "CORRUPTED", "TextDomains", "encode", "decode", "doc_topics",
           "stdlib_source", "shuffle_words", "random_characters", "build_domains", "windows",
           "window_stream"]

#: vocabulary size of the byte tokenizer
VOCAB = 256
#: the domain names, in the order of the weight vector
DOMAINS = ("docs", "code", "shuffled", "random")
#: the corrupted domains (those a good weighting should drop)
CORRUPTED = ("shuffled", "random")


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as an int64 tensor of token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def decode(tokens: torch.Tensor) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def doc_topics() -> dict:
    """``pydoc_data.topics.topics``: topic name -> English documentation text."""
    from pydoc_data.topics import topics
    return dict(topics)


def stdlib_source(n_bytes: int) -> str:
    """The first ``n_bytes`` characters of the standard library's top-level ``.py`` files,
    concatenated in sorted order (ASCII only: other characters are dropped)."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="ignore") as fh:
            text = fh.read().encode("ascii", errors="ignore").decode("ascii")
        parts.append(text)
        total += len(text)
        if total >= n_bytes:
            break
    text = "".join(parts)
    if len(text) < n_bytes:
        raise ValueError(f"n_bytes={n_bytes}: the standard library under {root} has only "
                         f"{len(text)} characters of top-level source")
    return text[:n_bytes]


def shuffle_words(text: str, seed: int) -> str:
    """``text``'s whitespace-separated words in a seeded random order, joined by spaces."""
    words = text.split()
    _random.Random(seed).shuffle(words)
    return " ".join(words)


def random_characters(n: int, seed: int) -> str:
    """``n`` characters drawn uniformly from the printable ASCII letters, digits,
    punctuation, space and newline (seeded)."""
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n"
    return "".join(_random.Random(seed).choices(alphabet, k=n))


@dataclasses.dataclass
class TextDomains:
    """Token tensors of the training domains (``names`` order) and of the held-out text."""

    names: tuple
    train: list
    val: torch.Tensor
    corrupted: tuple = CORRUPTED


def _ascii(text: str) -> str:
    return text.encode("ascii", errors="ignore").decode("ascii")


def build_domains(n_bytes: int = 200_000, val_every: int = 5, seed: int = 0) -> TextDomains:
    """The four domains of :data:`DOMAINS`, ``n_bytes`` tokens each, and the held-out text.

    Topics of ``pydoc_data.topics`` in sorted order: every ``val_every``-th one is held
    out (validation; its paragraphs that also occur in another topic are dropped), the
    others form ``docs`` (repeated if shorter than ``n_bytes``).
    ``seed`` sets the word shuffle and the random characters; the rest is fixed.
    Raises ValueError naming ``n_bytes`` / ``val_every`` when out of range.
    """
    if not isinstance(n_bytes, int) or n_bytes < 1000:
        raise ValueError(f"n_bytes must be an integer ≥ 1000, got {n_bytes!r}")
    if not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an integer ≥ 2, got {val_every!r}")
    topics = doc_topics()
    names = sorted(topics)
    held = [topics[k] for i, k in enumerate(names) if i % val_every == 0]
    kept = [topics[k] for i, k in enumerate(names) if i % val_every != 0]
    docs = _ascii("\n".join(kept))
    # topics share sections (a topic can contain another's text): keep only the held-out
    # paragraphs that occur in no training topic
    seen = {p.strip() for p in docs.split("\n\n")}
    held = ["\n\n".join(p for p in _ascii(t).split("\n\n") if p.strip() not in seen) for t in held]
    docs = (docs * (n_bytes // len(docs) + 1))[:n_bytes]
    texts = {
        "docs": docs,
        "code": stdlib_source(n_bytes),
        "shuffled": shuffle_words(docs + "\n" + docs, seed)[:n_bytes],
        "random": random_characters(n_bytes, seed),
    }
    return TextDomains(DOMAINS, [encode(texts[d]) for d in DOMAINS], encode(_ascii("\n".join(held))))


def windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``tokens[s : s + length + 1]`` for each start ``s``: shape ``(len(starts), length + 1)``
    (inputs are ``[:, :-1]``, next-token targets ``[:, 1:]``)."""
    return tokens[starts[:, None] + torch.arange(length + 1)]


def window_stream(texts: Sequence[torch.Tensor], batch_size: int, length: int,
                  seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded batches of ``batch_size`` random windows from each of ``texts``:
    tensors of shape ``(len(texts), batch_size, length + 1)``; the same seed gives the
    same batches."""
    for t in texts:
        if t.numel() < length + 2:
            raise ValueError(f"length={length}: a text of {t.numel()} tokens has no window")
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.stack([
            windows(t, torch.randint(0, t.numel() - length - 1, (batch_size,), generator=generator),
                    length)
            for t in texts])
