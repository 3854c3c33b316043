"""Synthetic skills for tools/capability.py: a character tokenizer and three tasks.

Each task makes (prompt, answer) pairs from a seeded generator:

    add      "472+39="      -> "511"     multi-digit addition
    reverse  "kqzmd<"       -> "dmzqk"   string reversal
    lookup   "c41x93m27|x:" -> "93"      key-value lookup in a short context

Splits are disjoint by construction: a prompt's split is a hash of its text (test 10%,
validation 10%, train 80%), so a training example can never be a held-out one.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable

PAD, BOS, EOS = 0, 1, 2
CHARS = string.digits + string.ascii_lowercase + "+=<|:"
VOCAB = ["<pad>", "<s>", "</s>", *CHARS]
VOCAB_SIZE = 64  # room to spare, a multiple of 8
STOI = {c: i for i, c in enumerate(VOCAB)}
SPLITS = ("train", "val", "test")


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        out.append(VOCAB[i] if 2 < i < len(VOCAB) else "?")
    return "".join(out)


def _add(rng: random.Random, easy: bool) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** rng.randint(1, 2 if easy else 3)) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random, easy: bool) -> tuple[str, str]:
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5 if easy else 8)))
    return f"{s}<", s[::-1]


def _sort(rng: random.Random, easy: bool) -> tuple[str, str]:
    s = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 5 if easy else 8)))
    return f"{s}:", "".join(sorted(s))


SKILLS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
}
MAX_ANSWER = 9  # longest answer (8 characters) plus EOS, for greedy decoding


def split_of(prompt: str) -> str:
    bucket = zlib.crc32(prompt.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def sample(skill: str, split: str, rng: random.Random, easy: bool = False) -> tuple[str, str]:
    """One example of ``skill`` whose prompt belongs to ``split`` (``easy``: the short
    operands and strings of the pretraining corpus)."""
    make = SKILLS[skill]
    while True:
        prompt, answer = make(rng, easy)
        if split_of(prompt) == split:
            return prompt, answer


def held_out(skill: str, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct examples of ``skill`` from ``split`` (val or test), fixed by ``seed``."""
    rng = random.Random(f"{seed}/{skill}/{split}")
    seen: dict[str, str] = {}
    while len(seen) < n:
        prompt, answer = sample(skill, split, rng)
        seen.setdefault(prompt, answer)
    return list(seen.items())
