"""Tokenizers and vocabularies: the ``tokenizer:`` block, ``tokenizer_source``,
``chat_template``, output vocabularies and the embedding rows of every input.

mergekit's semantics (reference §1.8, §3.5): the output vocabulary is the base's
(``base``), a named model's, or the ``union`` (the base's, then the other models' regular
tokens, then their added tokens). Each token-indexed tensor (``embed_tokens``,
``lm_head``) of each input is re-laid out for it as a ``derive.RowMap``: a token the model
has keeps its row; one it lacks gets the configured source, the one model that has it,
the base's row, or the mean over the models that have it; padding rows get the mean of
the real rows. Vocabularies come from ``tokenizer.json`` (no tokenizers library needed)
and the output tokenizer is that file with the new tokens appended as added tokens,
as ``add_tokens`` would. Torch-free: this runs at plan time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)

TOKEN_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where an embedding row for one token comes from (a ``tokens:`` entry)."""

    kind: str  # "model" (that model's own row), "model_token", "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    source: str  # "union", "base" or a model reference
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "tokens": {t: {"kind": s.kind, "model": s.model, "token": s.token, "token_id": s.token_id,
                           "force": s.force} for t, s in self.tokens},
            "pad_to_multiple_of": self.pad_to_multiple_of,
        }  # fmt: skip


def parse_tokenizer(raw, legacy, fail) -> TokenizerSpec | None:
    """The ``tokenizer:`` block or the legacy ``tokenizer_source`` (mutually exclusive)."""
    if raw is not None and legacy is not None:
        raise fail("tokenizer", "set either tokenizer or tokenizer_source, not both")
    if legacy is not None:
        if not isinstance(legacy, str) or not legacy:
            raise fail("tokenizer_source", f"expected union, base or a model, got {legacy!r}")
        return TokenizerSpec(legacy)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise fail("tokenizer", "expected a mapping with source, tokens, pad_to_multiple_of")
    for k in raw:
        if k not in ("source", "tokens", "pad_to_multiple_of"):
            raise fail(f"tokenizer.{k}", "unknown key; expected source, tokens or pad_to_multiple_of")
    source = raw.get("source", "union")
    if not isinstance(source, str) or not source:
        raise fail("tokenizer.source", f"expected union, base or a model, got {source!r}")
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise fail("tokenizer.pad_to_multiple_of", f"expected a positive integer, got {pad!r}")
    tokens = raw.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise fail("tokenizer.tokens", "expected a mapping of token to {source, force}")
    out = []
    for tok, entry in tokens.items():
        key = f"tokenizer.tokens[{tok!r}]"
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise fail(key, "expected a mapping with source and/or force")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise fail(f"{key}.force", f"expected true or false, got {force!r}")
        out.append((str(tok), _token_source(entry.get("source"), force, f"{key}.source", fail)))
    return TokenizerSpec(source, tuple(out), pad)


def _token_source(src, force: bool, key: str, fail) -> TokenSource:
    if src is None:
        return TokenSource("default", force=force)
    if isinstance(src, str):
        return TokenSource("model", model=src, force=force)
    if isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
        return TokenSource("zero", force=force)
    if isinstance(src, dict) and src.get("kind") == "model_token":
        if set(src) - {"kind", "model", "token", "token_id"} or not isinstance(src.get("model"), str):
            raise fail(key, "model_token needs model and one of token, token_id")
        if ("token" in src) == ("token_id" in src):
            raise fail(key, "model_token needs exactly one of token, token_id")
        return TokenSource("model_token", src["model"], src.get("token"), src.get("token_id"), force)
    raise fail(key, f"expected a model, {{kind: zero}} or {{kind: model_token, ...}}, got {src!r}")


def parse_chat_template(value, fail) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail("chat_template", f"expected auto, a builtin name or a Jinja template, got {value!r}")
    if value == "auto" or value in BUILTIN_TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:
        names = ", ".join(["auto", *BUILTIN_TEMPLATES])
        raise fail(
            "chat_template", f"expected {names} or a Jinja template (20+ characters with '{{'), got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class Vocab:
    """One tokenizer's vocabulary: token -> id, which tokens are added, the usable size."""

    ids: dict[str, int]
    added: dict[str, dict]  # content -> its added_tokens entry
    size: int  # ids >= size are unused (config.json vocab_size)
    doc: dict  # the tokenizer.json document


def read_vocab(directory: Path, config: dict | None) -> Vocab:
    path = directory / "tokenizer.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model = doc["model"]
        vocab = model["vocab"]
        ids = dict(vocab) if isinstance(vocab, dict) else {p[0]: i for i, p in enumerate(vocab)}
        added = {e["content"]: e for e in doc.get("added_tokens") or []}
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; merging vocabularies needs each model's tokenizer.json"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: unreadable tokenizer: {e}") from None
    for tok, e in added.items():
        ids[tok] = e["id"]
    size = (config or {}).get("vocab_size") or len(ids)
    return Vocab(ids, added, size, doc)


@dataclass(frozen=True, slots=True)
class VocabPlan:
    tokens: tuple[str, ...]  # output vocabulary, by id
    n_padded: int  # embedding rows written
    tokenizer: dict  # output tokenizer.json; empty: the source's files are copied as they are
    new_added: tuple[dict, ...]  # added_tokens entries the output gained (tokenizer_config)
    source_dir: str  # tokenizer files are copied from here, then patched


def build_vocab(spec: TokenizerSpec, vocabs: list[Vocab], dirs: list[Path], base_i: int, named: int | None):
    """The output vocabulary of ``spec`` over the models' ``vocabs`` (gather order)."""
    base = vocabs[base_i]
    if spec.source not in ("union", "base"):
        v = vocabs[named]
        src = dirs[named]
        tokens = _by_id(v.ids, len(v.ids), dirs[named])
        return VocabPlan(tokens, _pad(len(tokens), spec), {}, (), str(src))  # copied verbatim
    keep = {t: i for t, i in base.ids.items() if i < base.size}
    doc = json.loads(json.dumps(base.doc))
    doc["added_tokens"] = [e for e in doc.get("added_tokens") or [] if e["id"] < base.size]
    new_added: list[dict] = []

    def add(tok: str, entry: dict | None) -> None:
        e = dict(entry) if entry else {"content": tok, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": True, "special": False}  # fmt: skip
        e["id"] = len(keep)
        keep[tok] = e["id"]
        doc["added_tokens"].append(e)
        new_added.append(e)

    if spec.source == "union":
        others = [base] + [v for i, v in enumerate(vocabs) if i != base_i]
        regular = [t for v in others for t, i in sorted(v.ids.items(), key=lambda x: x[1])
                   if i < v.size and t not in v.added]  # fmt: skip
        for tok in dict.fromkeys(regular):
            if tok not in keep:
                add(tok, None)
        for v in others:
            for tok, e in sorted(v.added.items(), key=lambda x: x[1]["id"]):
                if e["id"] < v.size and tok not in keep:
                    add(tok, e)
    for tok, _ in spec.tokens:  # tokens named in the config join the vocabulary
        if tok not in keep:
            add(tok, None)
    tokens = _by_id(keep, len(keep), dirs[base_i])
    return VocabPlan(tokens, _pad(len(tokens), spec), doc, tuple(new_added), str(dirs[base_i]))


def _by_id(ids: dict[str, int], n: int, where: Path) -> tuple[str, ...]:
    out: list[str | None] = [None] * n
    for t, i in ids.items():
        if 0 <= i < n:
            out[i] = t
    if None in out:
        raise CheckpointError(
            f"{where / 'tokenizer.json'}: token ids are not dense (id {out.index(None)} unused)"
        )
    return tuple(out)  # type: ignore[arg-type]


def _pad(n: int, spec: TokenizerSpec) -> int:
    m = spec.pad_to_multiple_of
    return -(-n // m) * m if m else n


def row_maps(plan: VocabPlan, spec: TokenizerSpec, vocabs, refs, base_i, models, dtype: str):
    """One ``RowMap`` per input for one token-indexed tensor; ``refs[i]`` is model i's
    tensor (None where it lacks it). mergekit's ``PermutedVocabulary``."""
    from .derive import RowMap

    present = [i for i, r in enumerate(refs) if r is not None]
    sources = tuple(refs[i] for i in present)
    perm = []  # per present model: output id -> its row or -1
    for i in present:
        v, rows = vocabs[i], refs[i].shape[0]
        perm.append([v.ids.get(t, -1) if v.ids.get(t, -1) < min(v.size, rows) else -1 for t in plan.tokens])
    cfgs = dict(spec.tokens)
    defaults: dict[int, tuple[tuple[int, int], ...]] = {}
    for k, tok in enumerate(plan.tokens):
        cfg = cfgs.get(tok)
        have = [j for j in range(len(present)) if perm[j][k] >= 0]
        if not (cfg and cfg.force) and len(have) == len(present):
            continue
        defaults[k] = _default(cfg, k, tok, have, perm, present, vocabs, refs, models, base_i)
    out = []
    for j in range(len(present)):
        forced = {k for k, t in enumerate(plan.tokens) if cfgs.get(t) and cfgs[t].force}
        rows = tuple(j if perm[j][k] >= 0 and k not in forced else -1 for k in range(len(plan.tokens)))
        src_rows = tuple(max(perm[j][k], 0) for k in range(len(plan.tokens)))
        defs = tuple((k, defaults.get(k, ())) for k in range(len(plan.tokens)) if rows[k] < 0)
        out.append(RowMap(sources, rows, src_rows, defs, len(plan.tokens), dtype))
    return present, out


def _default(cfg, k, tok, have, perm, present, vocabs, refs, models, base_i):
    def row_of(model: str):
        j = next((j for j, i in enumerate(present) if models[i] == model), None)
        if j is None:
            raise CheckpointError(
                f"tokenizer.tokens[{tok!r}]: model {model} is not an input with this tensor"
            )
        return j

    if cfg is not None and cfg.kind == "zero":
        return ()
    if cfg is not None and cfg.kind == "model":
        j = row_of(cfg.model)
        if perm[j][k] < 0:
            raise CheckpointError(f"tokenizer.tokens[{tok!r}].source: {cfg.model} lacks token {tok!r}")
        return ((j, perm[j][k]),)
    if cfg is not None and cfg.kind == "model_token":
        j = row_of(cfg.model)
        tid = cfg.token_id if cfg.token_id is not None else vocabs[present[j]].ids.get(cfg.token, -1)
        if not 0 <= tid < refs[present[j]].shape[0]:
            raise CheckpointError(f"tokenizer.tokens[{tok!r}].source: no row for it in {cfg.model}")
        return ((j, tid),)
    if len(have) == 1:
        return ((have[0], perm[have[0]][k]),)
    if not have:
        log.warning("token %r is in no model; its embedding is zero", tok)
        return ()
    jb = next((j for j, i in enumerate(present) if i == base_i), None)
    if jb is not None and perm[jb][k] >= 0:
        return ((jb, perm[jb][k]),)
    return tuple((j, perm[j][k]) for j in have)


def tie_lm_head(ckpts: list) -> tuple[list, bool]:
    """Reference §1.7: where some inputs have ``lm_head`` and others tie it to
    ``embed_tokens``, the others contribute their ``embed_tokens`` and an untied
    ``lm_head`` is written. Returns the checkpoints and whether that happened."""
    from dataclasses import replace

    head, embed = TOKEN_TENSORS[1], TOKEN_TENSORS[0]
    have = [head in c.tensors for c in ckpts]
    if all(have) or not any(have):
        return ckpts, False
    out = []
    for c in ckpts:
        if head not in c.tensors and embed in c.tensors:
            c = replace(c, tensors={**c.tensors, head: c.tensors[embed]})
        out.append(c)
    return out, True


def apply_tokenizer(cfg, ckpts: list, ref_i: int, promote) -> tuple[list, VocabPlan]:
    """Re-lay every input's token-indexed tensors out for the output vocabulary."""
    from dataclasses import replace

    from .checkpoint import TensorRef
    from .hub import resolve

    spec = cfg.tokenizer
    dirs = [c.directory for c in ckpts]
    vocabs = [read_vocab(d, c.config) for d, c in zip(dirs, ckpts)]
    models = [m.model for m in cfg.models]
    named = None
    if spec.source not in ("union", "base"):
        where = next((i for i, m in enumerate(models) if m == spec.source), None)
        if where is None:
            src_dir = resolve(spec.source)
            vocabs.append(read_vocab(src_dir, _config(src_dir)))
            dirs.append(src_dir)
            where = len(vocabs) - 1
        named = where
    plan = build_vocab(spec, vocabs, dirs, ref_i, named)
    vocabs = vocabs[: len(ckpts)]
    tensors = [dict(c.tensors) for c in ckpts]
    for name in TOKEN_TENSORS:
        refs = [c.tensors.get(name) for c in ckpts]
        present_refs = [r for r in refs if r is not None]
        if not present_refs:
            continue
        dtype = cfg.dtype or promote({r.dtype for r in present_refs})
        present, maps = row_maps(plan, spec, vocabs, refs, cfg.base_index, models, dtype)
        for i, rm in zip(present, maps):
            r = refs[i]
            if not _as_stored(rm, r, plan.n_padded, dtype):
                tensors[i][name] = TensorRef(r.path, r.offset, dtype, (plan.n_padded, *r.shape[1:]), rm)
    return [replace(c, tensors=t) for c, t in zip(ckpts, tensors)], plan


def _as_stored(rm, ref, n_padded: int, dtype: str) -> bool:
    """Whether row map ``rm`` gives ``ref``'s bytes as they are: every row from ``ref``
    itself, in order, none defaulted or padded, no dtype change (then ``ref`` is read
    plainly: no derivation, and the job can run straight from the stored bytes)."""
    n = ref.shape[0]
    if dtype != ref.dtype or n_padded != n or rm.n_real != n or rm.defaults:
        return False
    if len(set(rm.rows)) != 1 or rm.rows[0] < 0 or rm.sources[rm.rows[0]] != ref:
        return False
    return rm.src_rows == tuple(range(n))


def _config(d: Path) -> dict | None:
    try:
        return json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_tokenizer(plan: VocabPlan | None, template: str | None, src: Path, out: Path, files) -> None:
    """Copy the tokenizer ``files`` from ``src``; with a built vocabulary, write its
    ``tokenizer.json`` and register the new added tokens; set ``chat_template``."""
    import shutil

    for name in files:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    tc_path = out / "tokenizer_config.json"
    if plan is not None and plan.tokenizer:
        (out / "tokenizer.json").write_text(json.dumps(plan.tokenizer, ensure_ascii=False, indent=2))
        (out / "tokenizer.model").unlink(missing_ok=True)  # a built tokenizer is fast-only
        if tc_path.is_file() and plan.new_added:
            tc = json.loads(tc_path.read_text(encoding="utf-8"))
            dec = tc.setdefault("added_tokens_decoder", {})
            for e in plan.new_added:
                dec[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
            tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n")
    if template is not None and tc_path.is_file():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        tc["chat_template"] = BUILTIN_TEMPLATES.get(template, template)
        tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n")
        if (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(tc["chat_template"])


def resolve_template(template: str | None, dirs: list[Path]) -> str | None:
    """``auto``: the inputs' most common chat template (first in gather order on a tie)."""
    if template != "auto":
        return template
    found = []
    for d in dirs:
        jinja, tc = d / "chat_template.jinja", d / "tokenizer_config.json"
        if jinja.is_file():
            found.append(jinja.read_text(encoding="utf-8"))
        elif tc.is_file():
            t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(t, str):
                found.append(t)
    return max(found, key=found.count) if found else None
