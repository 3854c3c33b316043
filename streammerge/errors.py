"""The one error family. Each message is one line: where, what, got vs expected.

The CLI prints ``error: <message>`` and exits with the class's ``exit_code`` (2 unless
said otherwise); anything else is a bug and keeps its traceback.
"""

from contextlib import contextmanager


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


class Problems(StreamMergeError):
    """Several independent problems found in one pass (a config, a plan), one line each.

    ``str()`` is the lines joined by newlines; the CLI prefixes each with ``error:``.
    """

    def __init__(self, problems) -> None:
        self.problems = tuple(problems)
        super().__init__(*self.problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)  # each line made printable by its own class


class ConfigErrors(Problems, ConfigError):
    """Several ``ConfigError``s at once: still a ConfigError to those who catch one."""


def raise_all(problems) -> None:
    """Raise nothing, the one problem itself, or ``Problems`` for several."""
    problems = list(problems)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise (ConfigErrors if all(isinstance(p, ConfigError) for p in problems) else Problems)(problems)


class Collector:
    """Gathers independent problems so that one pass reports them all."""

    def __init__(self) -> None:
        self.errors: list[StreamMergeError] = []

    @contextmanager
    def each(self):
        """Record a StreamMergeError raised in the block and carry on after it."""
        try:
            yield
        except _Recorded:
            pass
        except Problems as e:
            self.errors += e.problems
        except StreamMergeError as e:
            self.errors.append(e)

    def mark(self) -> int:
        return len(self.errors)

    def stop_if_new(self, mark: int) -> None:
        """Leave the enclosing ``each`` block if problems were recorded since ``mark``."""
        if len(self.errors) > mark:
            raise _Recorded

    def check(self) -> None:
        raise_all(self.errors)


class _Recorded(Exception):
    """Unwinds to the enclosing ``Collector.each``: the problems are already recorded."""


class EvalError(StreamMergeError):
    """A ``streammerge tune`` evaluation command failed or printed no score."""


class ShardError(StreamMergeError):
    """A shard task failed past its attempt cap, or ``finalize`` found shards not done.

    Messages name the shard by index and file, e.g. ``shard 3
    (model-00004-of-00007.safetensors): 3 attempts failed; last: a worker process died``.
    """


class BackendError(StreamMergeError):
    """A backend cannot run: Ray is not installed, or its cluster cannot be reached."""
