"""A model reference -> a local path: a path as is, or a Hugging Face hub ID from the cache.

Hub IDs (``org/name``, optionally ``org/name@revision``) resolve through
``huggingface_hub`` (the optional extra ``streammerge[hub]``) with
``local_files_only=True``: streammerge never downloads, so a merge behaves the same
offline, and a model that is not cached yields one line saying what to download.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# What a merge needs from a repository (weights, their index, configs, tokenizer files).
PATTERNS = ("*.safetensors", "*.json", "*.bin", "tokenizer.model", "*.txt", "*.jinja")


def resolve(ref: str) -> Path:
    """The local path of ``ref``; errors say how to get a missing model."""
    p = Path(ref)
    if p.exists():
        return p
    if not HUB_ID.fullmatch(ref) or ref.startswith((".", "/")):
        raise CheckpointError(f"{ref}: no such file or directory")
    repo, _, revision = ref.partition("@")
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{ref}: no such file or directory; as a Hugging Face hub ID it needs"
            f" streammerge[hub] and the model in the local cache ({fetch})"
        ) from None
    try:
        local = snapshot_download(
            repo, revision=revision or None, local_files_only=True, allow_patterns=list(PATTERNS)
        )
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise CheckpointError(
            f"{ref}: no such file or directory, nor a model in the local Hugging Face cache"
            f" ({HF_HUB_CACHE}); streammerge does not download, run: {fetch}"
        ) from None
    return Path(local)
