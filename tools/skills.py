"""Synthetic skills for tools/capability.py: a character tokenizer and three tasks.

Each task makes (prompt, answer) pairs from a seeded generator, on strings of 3-8 characters
(3-5 in the ``easy`` form the base is pretrained on):

    reverse  "kqzmdab<"  -> "badmzqk"   string reversal
    sort     "5021937:"  -> "0123579"   digit sorting
    cipher   "kqzmd|"    -> "rxgtk"     Caesar cipher, each letter shifted by 7

plus ``copy`` ("k3zm9=" -> "k3zm9", any length), which is only ever pretraining text: it teaches
the base every position a full-length example uses without teaching any skill's long form.

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


def _text(rng: random.Random, alphabet: str, easy: bool) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 5 if easy else 8)))


def _reverse(rng: random.Random, easy: bool) -> tuple[str, str]:
    s = _text(rng, string.ascii_lowercase, easy)
    return f"{s}<", s[::-1]


def _sort(rng: random.Random, easy: bool) -> tuple[str, str]:
    s = _text(rng, string.digits, easy)
    return f"{s}:", "".join(sorted(s))


def _cipher(rng: random.Random, easy: bool) -> tuple[str, str]:
    s = _text(rng, string.ascii_lowercase, easy)
    return f"{s}|", "".join(chr((ord(c) - ord("a") + 7) % 26 + ord("a")) for c in s)


def _copy(rng: random.Random, easy: bool) -> tuple[str, str]:
    s = _text(rng, string.ascii_lowercase + string.digits, False)  # always full length
    return f"{s}=", s


SKILLS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "cipher": _cipher,
}
GENERATORS = {**SKILLS, "copy": _copy}  # everything ``sample`` can draw, pretraining text included
MAX_ANSWER = 9  # longest answer (8 characters) plus EOS, for greedy decoding


def split_of(prompt: str) -> str:
    bucket = zlib.crc32(prompt.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def sample(skill: str, split: str, rng: random.Random, easy: bool = False) -> tuple[str, str]:
    """One example of ``skill`` whose prompt belongs to ``split`` (``easy``: the short
    operands and strings of the pretraining corpus)."""
    make = GENERATORS[skill]
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
