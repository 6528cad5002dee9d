"""OpenVLA's action tokenizer: normalized actions in [-1, 1] <-> the last ``n_bins`` vocabulary ids.

Semantics of ``prismatic/vla/action_tokenizer.py`` (openvla.md §3), in pure NumPy and without a text
tokenizer (the ids are all vlaprep stores; ``tokenizer.decode(ids)`` is only needed for OpenVLA's text
round trip, see ``transforms/prompt.py``):

  bins        = linspace(-1, 1, n_bins)                  # [n_bins] float64 edges
  bin_centers = (bins[:-1] + bins[1:]) / 2               # [n_bins - 1] float64
  encode(x)   = vocab_size - digitize(clip(x, -1, 1), bins)            # ids in [vocab - n_bins, vocab - 1]
  decode(id)  = bin_centers[clip(vocab_size - id - 1, 0, n_bins - 2)]  # float64, as OpenVLA

With the defaults (Llama-2, vocab 32000) the ids are 31744..31999: -1.0 -> 31999 -> -0.996078,
0.0 -> 31872 -> 0.0, 0.5 -> 31808 -> 0.501961, 0.999 -> 31745 -> 0.996078, 1.0 -> 31744 -> 0.996078
(OpenVLA's quirk: 31744 and 31745 decode to the same center and +-1.0 never come back exactly).

Error bound (uniform), proved in the tests: for every finite x,
``|decode(encode(x)) - clip(x, -1, 1)| <= 1/(n_bins - 1)`` (half a bin width, 1/255 for 256 bins),
attained at the left edge of every bin and at x = 1.0; in floating point the bound holds up to
1e-15 (the edges and centers are rounded float64 values).

``encoding="mu_law"`` (RoboVLMs' companded bins): ``y = clip(x, -1, 1)`` is companded
``c = sign(y) * ln(1 + mu*|y|) / ln(1 + mu)`` before ``digitize``; decode expands the bin center
``sign(c) * ((1 + mu)**|c| - 1) / mu``. Bins are then narrow near 0 and wide near +-1. Bound:
``|C(decode(encode(x))) - C(clip(x))| <= 1/(n_bins - 1)`` (half a companded bin), equivalently the
decoded value lies in the same (uncompanded) bin as x. Companding runs in float64 with ``log1p`` /
``expm1``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

UNIFORM = "uniform"
MU_LAW = "mu_law"
ENCODINGS = (UNIFORM, MU_LAW)
DEFAULT_MU = 255.0


def parse_action_encoding(text: str) -> tuple[str, float]:
    """``"uniform" | "mu_law" | "mu_law:MU"`` -> ``(encoding, mu)`` (mu is 255.0 unless given).

    Use as ``enc, mu = parse_action_encoding(text); ActionTokenizer(vocab_size=V, encoding=enc, mu=mu)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str action encoding, got {type(text).__name__}: {text!r}")
    name, sep, arg = text.strip().partition(":")
    if name == UNIFORM and not sep:
        return UNIFORM, DEFAULT_MU
    if name == MU_LAW:
        if not sep:
            return MU_LAW, DEFAULT_MU
        try:
            mu = float(arg)
        except ValueError as e:
            raise ValueError(f"expected mu_law:MU with a number MU, got {text!r}; hint: e.g. mu_law:255") from e
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"expected mu > 0 (finite), got {text!r}; hint: e.g. mu_law:255")
        return MU_LAW, mu
    raise ValueError(f'expected "uniform", "mu_law" or "mu_law:MU", got {text!r}')


@dataclasses.dataclass(frozen=True)
class ActionTokenizer:
    """Maps normalized actions ``[..., D]`` to token ids ``[..., D] int64`` and back (OpenVLA bins)."""

    vocab_size: int = 32000
    n_bins: int = 256
    encoding: str = UNIFORM
    mu: float = DEFAULT_MU

    def __post_init__(self):
        for name in ("vocab_size", "n_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"expected an int {name}, got {type(value).__name__}: {value!r}")
            object.__setattr__(self, name, int(value))
        if self.n_bins < 2:
            raise ValueError(f"expected n_bins >= 2, got {self.n_bins}")
        if self.vocab_size <= self.n_bins:
            raise ValueError(
                f"expected vocab_size > n_bins (action ids are the last n_bins ids), got "
                f"vocab_size={self.vocab_size}, n_bins={self.n_bins}"
            )
        if self.encoding not in ENCODINGS:
            raise ValueError(f"expected encoding in {ENCODINGS!r}, got {self.encoding!r}")
        mu = float(self.mu)
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"expected mu > 0 (finite), got {self.mu!r}")
        object.__setattr__(self, "mu", mu)

    @classmethod
    def from_encoding(cls, text: str, vocab_size: int = 32000, n_bins: int = 256) -> ActionTokenizer:
        """``ActionTokenizer`` for an encoding string such as ``"mu_law:100"``."""
        encoding, mu = parse_action_encoding(text)
        return cls(vocab_size=vocab_size, n_bins=n_bins, encoding=encoding, mu=mu)

    # Cached on the instance (functools.cached_property writes __dict__, bypassing the frozen
    # __setattr__); they pickle with it and take no part in equality or hashing.
    @functools.cached_property
    def bins(self) -> np.ndarray:
        """``[n_bins]`` float64 bin edges over [-1, 1] (companded space for mu_law)."""
        bins = np.linspace(-1.0, 1.0, self.n_bins)
        bins.flags.writeable = False
        return bins

    @functools.cached_property
    def bin_centers(self) -> np.ndarray:
        """``[n_bins - 1]`` float64 bin centers (companded space for mu_law)."""
        centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        centers.flags.writeable = False
        return centers

    @property
    def min_token_id(self) -> int:
        return self.vocab_size - self.n_bins

    @property
    def max_token_id(self) -> int:
        return self.vocab_size - 1

    def compand(self, y: Any) -> np.ndarray:
        """mu-law ``C(y) = sign(y) ln(1 + mu|y|) / ln(1 + mu)`` in float64 (identity for uniform)."""
        y = np.asarray(y, dtype=np.float64)
        if self.encoding == UNIFORM:
            return y
        return np.sign(y) * np.log1p(self.mu * np.abs(y)) / np.log1p(self.mu)

    def expand(self, c: Any) -> np.ndarray:
        """Inverse of ``compand``: ``sign(c) ((1 + mu)**|c| - 1) / mu`` in float64."""
        c = np.asarray(c, dtype=np.float64)
        if self.encoding == UNIFORM:
            return c
        return np.sign(c) * np.expm1(np.abs(c) * np.log1p(self.mu)) / self.mu

    def encode(self, x: Any) -> np.ndarray:
        """Normalized actions ``[..., D]`` -> token ids ``[..., D] int64``. NaN is an error."""
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        if np.isnan(x).any():
            raise ValueError(
                f"expected finite normalized actions, got NaN at index "
                f"{tuple(int(i) for i in np.argwhere(np.isnan(x))[0])} of an array of shape {x.shape!r}"
            )
        y = np.clip(x, -1.0, 1.0)  # keeps float32 float32; digitize compares it exactly with the float64 edges
        if self.encoding == MU_LAW:
            y = self.compand(y)
        return (self.vocab_size - np.digitize(y, self.bins)).astype(np.int64)

    def decode(self, token_ids: Any) -> np.ndarray:
        """Token ids ``[..., D]`` -> float64 values ``[..., D]``; out-of-range ids clip to the end bins."""
        ids = np.asarray(token_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"expected integer token ids, got dtype {ids.dtype} ({token_ids!r})")
        index = np.clip(self.vocab_size - ids.astype(np.int64) - 1, 0, self.n_bins - 2)
        return self.expand(self.bin_centers[index])

    def is_action_token(self, token_ids: Any) -> np.ndarray:
        """Bool mask: which ids fall in ``[min_token_id, max_token_id]``."""
        ids = np.asarray(token_ids)
        return (ids >= self.min_token_id) & (ids <= self.max_token_id)
