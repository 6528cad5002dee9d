"""Action normalization to [-1, 1] and back, bit-compatible with OpenVLA (pure NumPy).

Modes (``NormalizationSpec.parse``):

  ``bounds_q99``      OpenVLA's default. Masked-in dims: ``clip(2*(x - q01)/(q99 - q01 + 1e-8) - 1, -1, 1)``;
                      masked-out dims (``mask`` False, the gripper) pass through raw; THEN every dim whose
                      statistics have ``min == max`` becomes 0.0, masked-out dims included.
  ``bounds``          the same with ``min``/``max`` in place of ``q01``/``q99``.
  ``normal``          ``(x - mean)/(std + 1e-8)`` on masked-in dims; no clip, no zero rule.
  ``fixed:LOW,HIGH``  RoboVLMs: ``clip(x, LOW, HIGH)`` then ``2*(x - LOW)/(HIGH - LOW) - 1`` on masked-in
                      dims; independent of the statistics except for the mask; no zero rule.

``stats`` is always one dataset's ``"action"`` block of ``dataset_statistics.json``
(``{"mean": [D], "std": [D], "max": [D], "min": [D], "q01": [D], "q99": [D], "mask": [D]}``; a missing
``mask`` means every dim is normalized).

Precision (normalize). OpenVLA (``prismatic/vla/datasets/rlds/utils/data_utils.py``,
``normalize_action_and_proprio``) holds the statistics as float64 NumPy arrays
(``tree_map(np.array, json.load(...))``) and the actions as float32 tensors, and writes
``2 * (x - low) / (high - low + 1e-8) - 1``. TensorFlow converts each NumPy operand to the tensor's
float32 when it meets the tensor, but ``high - low + 1e-8`` never meets it: NumPy evaluates that
denominator in float64 first, and only the result is rounded to float32. So the exact recipe is

    low32 = float32(low)                         # rounded once
    den32 = float32(high - low + 1e-8)           # float64 arithmetic, rounded once
    y     = clip(2 * (x32 - low32) / den32 - 1, -1, 1)   # every op a correctly rounded float32 op

and likewise ``(x32 - float32(mean)) / float32(std + 1e-8)`` for ``normal``. We reproduce it with
NumPy float32 ops, which round exactly as TensorFlow's CPU kernels do; ``tests/transforms/
test_normalization.py`` checks bit equality against the reference expression run through
``tf.data.Dataset.map`` when TensorFlow is installed. (Casting high and low to float32 *before*
subtracting -- the obvious reading -- differs in the last bit for about 7% of the normalized values
of random Bridge-scale data.) The zero rule compares the float64 ``min`` and ``max``, as OpenVLA does.

Precision (unnormalize). OpenVLA's inference (``predict_action`` in the HF ``modeling_prismatic.py``)
is NumPy float64 throughout: float64 bin centers, ``0.5 * (y + 1) * (q99 - q01) + q01`` with float64
statistics and no ``1e-8``. ``unnormalize_actions`` computes the same in float64 and rounds the
result once to ``dtype`` (float32 by default; pass ``dtype=np.float64`` for OpenVLA's exact numbers).
Masked-out dims pass through unchanged; a dim zeroed by the ``min == max`` rule comes back as
``q01`` (= the constant) when masked in and as the normalized value (0.0) when masked out, as in
OpenVLA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

BOUNDS_Q99 = "bounds_q99"
BOUNDS = "bounds"
NORMAL = "normal"
FIXED = "fixed"
MODES = (BOUNDS_Q99, BOUNDS, NORMAL, FIXED)
EPS = 1e-8  # OpenVLA's denominator guard, added in float64 (see the module docstring)

_STAT_KEYS = {BOUNDS_Q99: ("q01", "q99"), BOUNDS: ("min", "max"), NORMAL: ("mean", "std")}
_SPEC_HINT = 'write one of "bounds_q99", "bounds", "normal" or "fixed:LOW,HIGH" (e.g. "fixed:-1,1")'


@dataclasses.dataclass(frozen=True)
class NormalizationSpec:
    """How actions are mapped to [-1, 1]: ``mode`` in ``MODES``; ``low``/``high`` only for ``fixed``."""

    mode: str
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"expected mode in {MODES!r}, got {self.mode!r}; hint: {_SPEC_HINT}")
        if self.mode == FIXED:
            if self.low is None or self.high is None:
                raise ValueError(
                    f"expected low and high for mode 'fixed', got low={self.low!r}, high={self.high!r}"
                )
            low, high = float(self.low), float(self.high)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"expected finite LOW and HIGH, got fixed:{low!r},{high!r}")
            if not low < high:
                raise ValueError(
                    f"expected LOW < HIGH, got fixed:{self.low},{self.high}; "
                    f"hint: write fixed:{self.high},{self.low} if the bounds were swapped"
                )
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)
        elif self.low is not None or self.high is not None:
            raise ValueError(
                f"expected no low/high for mode {self.mode!r} (they come from the statistics), "
                f"got low={self.low!r}, high={self.high!r}"
            )

    @classmethod
    def parse(cls, text: str) -> NormalizationSpec:
        """``"bounds_q99" | "bounds" | "normal" | "fixed:LOW,HIGH"`` -> spec; ``str(spec)`` parses back."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str normalization spec, got {type(text).__name__}: {text!r}")
        mode, sep, args = text.strip().partition(":")
        if mode != FIXED:
            if sep or mode not in MODES:
                raise ValueError(f"expected a normalization spec, got {text!r}; hint: {_SPEC_HINT}")
            return cls(mode)
        parts = args.split(",")
        try:
            if len(parts) != 2:
                raise ValueError(f"{len(parts)} values")
            low, high = (float(p) for p in parts)
        except ValueError as e:
            raise ValueError(
                f"expected fixed:LOW,HIGH with two numbers, got {text!r}; hint: e.g. fixed:-1,1"
            ) from e
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"expected finite LOW and HIGH, got {text!r}; hint: e.g. fixed:-1,1")
        if not low < high:  # message names the text as the user wrote it
            raise ValueError(
                f"expected LOW < HIGH, got {text.strip()}; hint: write fixed:{parts[1].strip()},"
                f"{parts[0].strip()} if the bounds were swapped"
            )
        return cls(FIXED, low, high)

    def __str__(self) -> str:
        return f"fixed:{self.low!r},{self.high!r}" if self.mode == FIXED else self.mode


def _as_spec(spec: NormalizationSpec | str) -> NormalizationSpec:
    return NormalizationSpec.parse(spec) if isinstance(spec, str) else spec


def _stat(stats: Mapping[str, Any], key: str, width: int | None = None) -> np.ndarray:
    """One statistics entry as a float64 [D] array (what OpenVLA's ``np.array(json list)`` gives)."""
    if key not in stats:
        raise ValueError(f"expected key {key!r} in the action statistics, got keys {sorted(stats)!r}")
    value = np.asarray(stats[key], dtype=np.float64)
    if value.ndim != 1 or (width is not None and value.shape[0] != width):
        expected = width if width is not None else "D"
        raise ValueError(f"expected statistics {key!r} of shape ({expected},), got {value.shape!r}")
    return value


def _width(stats: Mapping[str, Any]) -> int:
    for key in ("mean", "min", "q01", "max", "q99", "std", "mask"):
        if key in stats:
            return int(np.asarray(stats[key]).shape[-1])
    raise ValueError(f"expected action statistics with 'mean', 'min', 'q01'..., got keys {sorted(stats)!r}")


def normalization_mask(stats: Mapping[str, Any]) -> np.ndarray:
    """``stats["mask"]`` as a [D] bool array; all True when the statistics carry no mask."""
    width = _width(stats)
    if "mask" not in stats or stats["mask"] is None:
        return np.ones(width, dtype=bool)
    raw = np.asarray(stats["mask"])
    if raw.shape != (width,) or not (raw.dtype == bool or np.isin(raw, (0, 1)).all()):
        raise ValueError(f"expected 'mask' of {width} bools, got {stats['mask']!r}")
    return raw.astype(bool)


def _check_actions(action: Any, width: int, name: str) -> np.ndarray:
    array = np.asarray(action)
    if array.ndim < 1 or array.shape[-1] != width:
        raise ValueError(
            f"expected {name} of shape [N, {width}] (width from the statistics), got {array.shape!r}"
        )
    return array


def normalize_actions(action: Any, stats: Mapping[str, Any], spec: NormalizationSpec | str) -> np.ndarray:
    """``action: [N, D]`` (any leading shape) -> normalized ``[N, D] float32``, exactly as OpenVLA."""
    spec = _as_spec(spec)
    width = _width(stats)
    x = _check_actions(action, width, "action").astype(np.float32, copy=False)  # OpenVLA casts to float32
    mask = normalization_mask(stats)

    if spec.mode == FIXED:
        # RoboVLMs' normalize_action: NumPy float32 array with Python-float bounds (weak scalars).
        low32, high32 = np.float32(spec.low), np.float32(spec.high)
        den32 = np.float32(spec.high - spec.low)
        y = np.float32(2) * (np.clip(x, low32, high32) - low32) / den32 - np.float32(1)
        return np.where(mask, y, x).astype(np.float32, copy=False)

    if spec.mode == NORMAL:
        mean32 = _stat(stats, "mean", width).astype(np.float32)
        den32 = (_stat(stats, "std", width) + EPS).astype(np.float32)  # float64 add, then round
        return np.where(mask, (x - mean32) / den32, x).astype(np.float32, copy=False)

    low_key, high_key = _STAT_KEYS[spec.mode]
    low, high = _stat(stats, low_key, width), _stat(stats, high_key, width)
    low32 = low.astype(np.float32)
    den32 = (high - low + EPS).astype(np.float32)  # float64 subtract/add, then one rounding (as TF sees it)
    y = np.clip(np.float32(2) * (x - low32) / den32 - np.float32(1), np.float32(-1), np.float32(1))
    y = np.where(mask, y, x)
    unused = _stat(stats, "min", width) == _stat(stats, "max", width)  # float64 compare, as OpenVLA
    return np.where(unused, np.float32(0), y).astype(np.float32, copy=False)


def unnormalize_actions(
    normalized: Any,
    stats: Mapping[str, Any],
    spec: NormalizationSpec | str,
    *,
    dtype: type = np.float32,
) -> np.ndarray:
    """``normalized: [N, D]`` in [-1, 1] -> actions ``[N, D]`` (``dtype``), OpenVLA's inference inverse.

    bounds_q99 / bounds: ``0.5*(y + 1)*(high - low) + low``; normal: ``y*(std + 1e-8) + mean`` (OpenVLA
    has no inference path for it; this is the exact algebraic inverse); fixed: ``0.5*(y + 1)*(HIGH -
    LOW) + LOW``. Masked-in dims only; all arithmetic in float64, rounded once to ``dtype``.
    """
    spec = _as_spec(spec)
    width = _width(stats)
    y = _check_actions(normalized, width, "normalized actions").astype(np.float64)
    mask = normalization_mask(stats)
    if spec.mode == FIXED:
        x = 0.5 * (y + 1) * (spec.high - spec.low) + spec.low
    elif spec.mode == NORMAL:
        x = y * (_stat(stats, "std", width) + EPS) + _stat(stats, "mean", width)
    else:
        low_key, high_key = _STAT_KEYS[spec.mode]
        low, high = _stat(stats, low_key, width), _stat(stats, high_key, width)
        x = 0.5 * (y + 1) * (high - low) + low
    return np.where(mask, x, y).astype(dtype)
