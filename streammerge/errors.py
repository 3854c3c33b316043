"""The one error family. Each message is one line: where, what, got vs expected.

The CLI prints ``error: <message>`` and exits with the class's ``exit_code`` (2 unless
said otherwise); anything else is a bug and keeps its traceback.
"""


class StreamMergeError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2

    def __str__(self) -> str:
        # Names from hostile files or configs may hold newlines or escapes: keep one line.
        text = super().__str__()
        return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(StreamMergeError):
    """The merge config is wrong: bad YAML, unknown key, wrong type, bad value.

    Messages start with the config file and the key path, e.g.
    ``merge.yml: models[1].parameters.weight: expected a number, got 'abc'``.
    """


class CheckpointError(StreamMergeError):
    """A model on disk is missing, unreadable, truncated or malformed."""


class ShapeError(StreamMergeError):
    """Input tensors that must agree (names, shapes, dtypes) do not."""


class BudgetError(StreamMergeError):
    """The memory budget or a size argument cannot work for this plan."""


class OutputError(StreamMergeError):
    """The output location is unusable: exists, not empty, not writable, stale partial."""


class WriteError(OutputError):
    """Writing the output failed mid-merge (no space left, I/O error). Exit 1: the
    finished tensors are kept in ``OUT.partial/`` for ``--resume``."""

    exit_code = 1


class Interrupted(StreamMergeError):
    """SIGINT/SIGTERM stopped a merge; the journal is flushed for ``--resume``. Exit 130."""

    exit_code = 130


class VerifyError(StreamMergeError):
    """A finished merge does not match its manifest (``streammerge verify``). Exit 1."""

    exit_code = 1


class MethodError(StreamMergeError):
    """A method's math is undefined for these inputs (e.g. multislerp's weighted mean of
    antipodal directions is zero); names the tensor and what to change."""


class ShardError(StreamMergeError):
    """A shard task failed past its attempt cap, or ``finalize`` found shards not done.

    Messages name the shard by index and file, e.g. ``shard 3
    (model-00004-of-00007.safetensors): 3 attempts failed; last: a worker process died``.
    """


class BackendError(StreamMergeError):
    """A backend cannot run: Ray is not installed, or its cluster cannot be reached."""
