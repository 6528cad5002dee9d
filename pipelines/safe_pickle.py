"""Load pickled ``.npy`` files (CALVIN's ``auto_lang_ann.npy``, ``scene_info.npy``) without executing them.

``np.load(..., allow_pickle=True)`` runs whatever the pickle says, so a dataset file could run code on
every worker that opens it. Here the ``.npy`` header is parsed with NumPy's own format reader and the
payload goes through an unpickler that admits only NumPy arrays/dtypes/scalars and builtin containers.
Anything else (``os.system``, ``builtins.eval``, ``subprocess``...) raises ``UnsafePickleError`` before
it is looked up, let alone called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

# (module, name) pairs a pickled dict of strings, tuples and NumPy arrays legitimately needs.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles encode bytes payloads through it
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "str"),
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "complex"),
        ("builtins", "bool"),
        ("collections", "OrderedDict"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than NumPy arrays and builtin containers."""


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name} in {self._source}: only NumPy arrays and builtin "
            "containers are allowed; hint: the file is corrupt or was crafted to run code"
        )


def restricted_loads(data: bytes, *, source: str = "<pickle>") -> Any:
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()


def load_pickled_npy(path: str) -> Any:
    """``np.load(path, allow_pickle=True)`` for an object ``.npy`` file, through ``RestrictedUnpickler``.

    Returns the unpickled object, unwrapped from a 0-d object array (what ``.item()`` would give).
    """
    from vlaprep import paths

    with io.BytesIO(paths.read_bytes(path)) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise ValueError(f"expected a .npy file, got unreadable header in {path}: {e}") from e
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        payload = f.read()
    obj = restricted_loads(payload, source=path)
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        return obj.item()
    if isinstance(obj, np.ndarray) and tuple(obj.shape) != tuple(shape):
        raise ValueError(f"expected shape {shape!r} from the header of {path}, got {obj.shape!r}")
    return obj
