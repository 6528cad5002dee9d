"""The one family of user errors: what the CLI reports as one line with exit code 2.

A ``UserError`` means the user can fix it: an input path, a flag, a ``run.yaml`` value, a model or
tokenizer directory, the output location, or the machine (disk full, read-only). Raise it with the
values (``expected X, got Y for K in D; hint``) and ``from e`` when it wraps a lower-level error.
Every other exception is a bug in vlaprep and keeps its traceback.

Stage modules subclass it (``SourceError``, ``ShardsArgumentError``, ``RunConfigError``,
``ValidationError``...) so callers can still catch one stage's errors; the CLI catches ``UserError``.
"""

from __future__ import annotations

import errno

# Failures of the machine, not of vlaprep: reported as one line naming the file.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
     errno.EDQUOT, errno.ENAMETOOLONG, errno.EMFILE}
)


class UserError(ValueError):
    """Something the user can fix; reported as one line (exit 2). Subclass per stage."""


class UsageError(UserError):
    """Bad command-line arguments."""


class OutputError(UserError):
    """The output location cannot be used (not ours, not writable, not a directory, disk full)."""


class Interrupted(UserError):
    """The run was stopped by SIGINT/SIGTERM; its workers were stopped and nothing was published."""


def in_chain(exc: BaseException, wanted) -> BaseException | None:
    """The first exception in ``exc``'s cause/context chain for which ``wanted(e)`` holds (``exc`` included).

    Beam re-raises a worker's failure wrapped in its own exception types; what the worker raised is
    reachable through ``__cause__``/``__context__`` when it ran in-process."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if wanted(e):
            return e
        stack.extend([e.__cause__, e.__context__])
    return None


def environment_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a machine failure (disk full, read-only, ...) in ``exc``'s cause chain, if any.

    Beam re-raises a worker's failure wrapped in its own exception types; the original ``OSError``
    is found through ``__cause__``/``__context__``, or, from another process, in the message text.
    """
    found = in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS)
    if found is not None:
        return found
    text = str(exc)
    for code in sorted(ENVIRONMENT_ERRNOS):
        marker = f"[Errno {code}]"
        if marker in text:
            line = next(x for x in text.splitlines() if marker in x)
            return OSError(code, line.split(marker, 1)[1].strip().split(":", 1)[0].strip() or errno.errorcode[code])
    return None


def describe_environment_error(e: OSError) -> str:
    """One line: what failed, on which file, and what to do."""
    import os

    hints = {
        errno.ENOSPC: "free space or choose another --output",
        errno.EDQUOT: "free space or choose another --output",
        errno.EROFS: "choose a writable --output",
        errno.EACCES: "check the permissions or choose another path",
        errno.EPERM: "check the permissions or choose another path",
        errno.ENOTDIR: "a parent of the path is a file, not a directory",
        errno.ELOOP: "a symlink loop: fix or remove the link",
    }
    where = f" for {e.filename!r}" if getattr(e, "filename", None) else ""
    reason = e.strerror or os.strerror(e.errno)
    hint = hints.get(e.errno)
    return f"{reason}{where}" + (f"; hint: {hint}" if hint else "")
