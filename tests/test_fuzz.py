"""Hostile files: the header parser and the config loader, fuzzed, raise nothing but our own
errors; a hostile header costs no memory; a merge writes nowhere but OUT."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import yaml
from conftest import linear_config, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streammerge
from streammerge.config import TOP_KEYS, from_dict, parse_config
from streammerge.errors import CheckpointError, ConfigError, Problems
from streammerge.header import ITEMSIZE, parse_header, read_header

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Numbers a hostile header might use where sizes belong.
sizes = st.one_of(
    st.integers(-5, 64),
    st.integers(2**31, 2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(list(ITEMSIZE)), st.text(max_size=6), st.integers()),
        "shape": st.one_of(st.lists(sizes, max_size=4), sizes),
        "data_offsets": st.one_of(st.lists(sizes, min_size=0, max_size=3), sizes),
        "extra": st.integers(),
    },
)
names = st.one_of(st.text(max_size=8), st.sampled_from(["\n", "a\x1b[31m", "\u2028", ".."]))


@st.composite
def header_bytes(draw) -> bytes:
    """A header JSON: plausible tensors with hostile fields, optionally damaged as bytes
    (duplicate names, NaN literals, cut short, invalid UTF-8, deep nesting)."""
    doc = draw(st.dictionaries(names, entries, max_size=5))
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.one_of(st.dictionaries(names, names, max_size=2), sizes))
    raw = json.dumps(doc).encode()  # NaN and Infinity come out as bare literals
    damage = draw(st.sampled_from(["none", "duplicate", "cut", "utf8", "nest", "splice"]))
    if damage == "duplicate" and doc:
        k = json.dumps(next(iter(doc)))
        raw = raw[:-1] + f", {k}: {{}}}}".encode()
    elif damage == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "utf8":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[i:]
    elif damage == "nest":
        depth = draw(st.integers(1, 200_000))
        raw = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    elif damage == "splice":
        raw += draw(st.binary(max_size=20))
    return raw + b" " * draw(st.integers(0, 7))


@FUZZ
@given(header_bytes(), st.integers(-100, 10_000))
def test_hostile_headers_raise_only_checkpoint_errors(raw, extra):
    """Overlapping, out-of-file or huge offsets, NaN sizes, bad dtypes, duplicate names,
    non-UTF-8, deep nesting: a CheckpointError, or a header whose every tensor is sound."""
    file_nbytes = 8 + len(raw) + extra
    try:
        header = parse_header(raw, file_nbytes, "fuzz")
    except CheckpointError as e:
        assert str(e).startswith("fuzz: ") and "\n" not in str(e)
        return
    end = 0
    for info in header.tensors.values():  # accepted: contiguous, inside the file, sized right
        assert info.begin == end and info.numel * ITEMSIZE[info.dtype] == info.nbytes
        end = info.end
    assert header.data_offset + end == file_nbytes


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_any_length_prefix_reads_at_most_the_file(tmp_path_factory, n, body):
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", n) + body)
    tracemalloc.start()
    try:
        read_header(path)
    except CheckpointError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 << 10  # a 2**63-byte declared header allocates nothing of the sort


def test_a_100k_deep_header_is_an_error_not_a_crash():
    raw = b"[" * 100_000 + b"]" * 100_000
    try:
        parse_header(raw, 8 + len(raw), "deep")
    except CheckpointError as e:
        assert str(e).startswith("deep: corrupt safetensors header")
    else:
        raise AssertionError("accepted")


# -- the config loader -----------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(["linear", "ties", "slerp", "bfloat16", "float32", "base", "1e-5", "union"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(["model", "parameters", "weight", "density", "t"]), names),
                        inner, max_size=3),
    ),
    max_leaves=12,
)  # fmt: skip
configs = st.dictionaries(st.one_of(st.sampled_from(TOP_KEYS), names), values, max_size=7)


@FUZZ
@given(configs)
def test_config_mappings_raise_only_config_errors(doc):
    try:
        cfg = from_dict(doc, "fuzz.yml")
    except Problems as e:  # several independent problems: one ConfigError line each
        assert all(isinstance(p, ConfigError) for p in e.problems)
        assert all(str(p).startswith("fuzz.yml: ") and "\n" not in str(p) for p in e.problems)
        return
    except ConfigError as e:
        assert str(e).startswith("fuzz.yml: ") and "\n" not in str(e)
        return
    assert cfg.merge_method and cfg.models


@FUZZ
@given(st.one_of(st.text(max_size=300), configs.map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_config_text_raises_only_config_errors(text):
    try:
        parse_config(text, "fuzz.yml")
    except ConfigError as e:  # one, or several (Problems): every line names the file
        assert all(line.startswith("fuzz.yml: ") for line in str(e).splitlines())


def test_yaml_aliases_and_tags_are_config_errors():
    bombs = [
        "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nmodels: [*c, *c]\nmerge_method: linear\n",
        "merge_method: !!python/object/apply:os.system [echo hi]\nmodels: [a]\n",
        "? !!python/name:os.system\n: 1\n",
    ]
    for text in bombs:
        try:
            parse_config(text, "b.yml")
        except ConfigError:
            continue
        raise AssertionError(text)


def test_a_merge_writes_only_inside_out(tiny, tmp_path, monkeypatch):
    """Paths in the config (relative, with ``..``, a tokenizer source) are only ever read;
    every file a merge creates or changes is under OUT."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    rel = {k: os.path.relpath(v, work) for k, v in tiny.items()}
    cfg = write_config(work / "m.yml", linear_config(rel, tokenizer_source=rel["ft2"]))

    def snapshot() -> dict[str, tuple[int, int]]:
        roots = [tmp_path, *{os.path.dirname(p) for p in tiny.values()}]
        return {
            os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for root in roots
            for d, _, files in os.walk(root)
            for f in files
        }

    before = snapshot()
    streammerge.merge(cfg, "../out", max_memory=16 << 20)
    after = snapshot()
    out = str(tmp_path / "a" / "out")
    changed = {p for p in after.keys() | before.keys() if after.get(p) != before.get(p)}
    assert changed and all(p.startswith(out + os.sep) for p in changed), sorted(changed)
