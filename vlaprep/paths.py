"""Paths read from manifests, pointers and configs stay inside their directory (no traversal), and
files appear atomically (temp file in the same directory + fsync + rename + fsync of the directory)."""

from __future__ import annotations

import os
import re
import tempfile

_SEPARATORS = re.compile(r"[\\/]")


def confined(root: str, relative: str, where: str) -> str:
    """``root/relative``; raises ValueError for absolute paths, URLs, ``..`` parts or empty names.

    A manifest or pointer is data: an edited or crafted one must not make a reader open files outside
    the output directory it describes.
    """
    parts = _SEPARATORS.split(relative) if isinstance(relative, str) else None
    if (
        not parts
        or os.path.isabs(relative)
        or "://" in relative
        or re.match(r"^[A-Za-z]:", relative)
        or any(p in ("", "..") for p in parts)
    ):
        raise ValueError(
            f"expected a relative path inside {root!r}, got {relative!r} in {where}; "
            "hint: the file was edited or crafted, regenerate it"
        )
    return os.path.join(root, *parts) if "://" not in root else root.rstrip("/") + "/" + "/".join(parts)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; published files get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
