"""Paths read from manifests, pointers and configs stay inside their directory (no traversal)."""

from __future__ import annotations

import os
import re

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
