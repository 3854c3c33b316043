"""``streammerge verify``: re-hash a finished merge against its manifest, and optionally
check that it is a given config's merge of the inputs as they are now."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .digest import DIGEST, LEGACY, hasher_for
from .errors import VerifyError
from .header import read_header
from .journal import describe_change, input_prints, state
from .write import MANIFEST


def verify(out: str | os.PathLike, against: str | os.PathLike | None = None) -> int:
    """Re-hash every shard header and tensor of ``out`` against its manifest; with
    ``against`` (a config), also check that the manifest is that config's merge of the
    inputs as they are now (config, seed, input fingerprints, layout, plan hash).

    Returns the number of tensors checked; raises ``VerifyError`` naming the first
    damaged shard or tensor, or what differs from ``against``.
    """
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        shards, tensors = manifest["shards"], manifest["tensors"]
    except FileNotFoundError:
        raise VerifyError(f"{out}: no {MANIFEST}; not a streammerge output") from None
    except (ValueError, KeyError, TypeError) as e:
        raise VerifyError(f"{out / MANIFEST}: unreadable manifest: {e}") from None
    checked = 0
    for shard in shards:
        path = out / shard["file"]
        if not path.is_file():
            raise VerifyError(f"{path}: shard is missing")
        if path.stat().st_size != shard["nbytes"]:
            raise VerifyError(
                f"{path}: shard has {path.stat().st_size} bytes, manifest says {shard['nbytes']}"
            )
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(0)
            if hashlib.sha256(f.read(8 + n)).hexdigest() != shard["header_sha256"]:
                raise VerifyError(f"{path}: header does not match the manifest")
        header = read_header(path)
        with open(path, "rb") as f:
            for name, info in header.tensors.items():
                f.seek(header.data_offset + info.begin)
                entry = tensors.get(name, {})
                key = DIGEST if DIGEST in entry or LEGACY not in entry else LEGACY
                h = hasher_for(key)
                left = info.nbytes
                while left:
                    block = f.read(min(left, 64 << 20))
                    h.update(block)
                    left -= len(block)
                if h.hexdigest() != entry.get(key):
                    raise VerifyError(
                        f"{path}: tensor {name} is damaged (its digest differs from the manifest)"
                    )
                checked += 1
    if checked != len(tensors):
        raise VerifyError(f"{out}: manifest lists {len(tensors)} tensors, shards hold {checked}")
    if against is not None:
        from .plan import DEFAULT_SHARD_NBYTES, make_plan

        seed, shard_nbytes = manifest.get("seed", 0), manifest.get("shard_nbytes") or DEFAULT_SHARD_NBYTES
        plan = make_plan(against, shard_nbytes=shard_nbytes, seed=seed)
        change = describe_change(manifest, state(plan, input_prints(plan), shard_nbytes), "since the merge")
        if change is not None:
            raise VerifyError(f"{out}: does not match {against}: {change}")
    return checked
