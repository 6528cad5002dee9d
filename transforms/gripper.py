"""Gripper conventions of OpenVLA's per-dataset transforms, in NumPy (no TensorFlow).

Every function takes one gripper column ``a: [T] float`` and returns ``[T] float32`` where, after the
conversion, 1 = open and 0 = closed (OpenVLA's absolute convention). Semantics follow OpenVLA's
``prismatic/vla/datasets/rlds/utils/data_utils.py`` (see shared/reference/openvla.md section 6); the
scans there are ``tf.scan`` loops, here they are vectorised fills that give identical results.

Inputs are cast to float32 *before* thresholding: OpenVLA compares float32 tensors against the
thresholds, and e.g. ``float32(-0.1) < -0.1`` is True in float64 but False in float32.
"""

from __future__ import annotations

import numpy as np

from vlaprep.transforms.base import TransformError

# Thresholds as float32 so comparisons happen in the dtype OpenVLA's TF graph used.
_OPEN_ABOVE = np.float32(0.95)  # binarize: a > 0.95 is "open"
_CLOSED_BELOW = np.float32(0.05)  # binarize: a < 0.05 is "closed"; anything else is "between"
_REL_THRESHOLD = np.float32(0.1)  # rel2abs: a < -0.1 opens, a > 0.1 closes, else no change


def _as_column(a, fn: str) -> np.ndarray:
    """``a`` as a 1-D float32 array ``[T]``; raises TransformError for any other rank."""
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != 1:
        raise TransformError(
            f"expected a 1-D gripper column [T], got shape {arr.shape!r} for {fn}; "
            f"hint: pass action[:, -1], not action[:, -1:]"
        )
    return arr


def binarize_gripper_actions(a) -> np.ndarray:
    """Continuous gripper ``[T]`` -> ``[T] float32`` in {0, 1} (plus the raw last value, see below).

    ``a > 0.95`` is open (1), ``a < 0.05`` is closed (0); an in-between value takes the state reached
    *after* it, i.e. the next non-between value. OpenVLA's reverse scan starts its carry at the raw
    last value ``a[-1]``, so a trailing run of in-between values keeps that raw value (it is *not*
    binarized) -- reproduced here on purpose. Equivalent to::

        carry = a[-1]
        for i in reversed(range(T)):
            carry = carry if between[i] else float(open[i])
            out[i] = carry
    """
    a = _as_column(a, "binarize_gripper_actions")
    t = a.shape[0]
    if t == 0:
        return np.zeros((0,), dtype=np.float32)
    is_open = a > _OPEN_ABOVE
    decided = is_open | (a < _CLOSED_BELOW)  # NaN is neither, so it counts as "between" like in TF
    # For each i, the index of the first decided step at or after i (t when none): a reverse
    # running minimum over "own index if decided else t".
    candidate = np.where(decided, np.arange(t), t)
    next_decided = np.minimum.accumulate(candidate[::-1])[::-1]
    # Slot t holds the scan's initial carry, the raw last value.
    values = np.append(is_open.astype(np.float32), a[-1])
    return values[next_decided].astype(np.float32, copy=False)


def invert_gripper_actions(a) -> np.ndarray:
    """``[T]`` -> ``[T] float32``: ``1 - a`` (datasets where 1 means closed)."""
    a = _as_column(a, "invert_gripper_actions")
    return (np.float32(1.0) - a).astype(np.float32, copy=False)


def rel2abs_gripper_actions(a) -> np.ndarray:
    """Relative gripper commands ``[T]`` (+1 close, -1 open) -> absolute ``[T] float32`` (1 open, 0 closed).

    ``thr = +1`` (open) where ``a < -0.1``, ``-1`` (close) where ``a > 0.1``, else 0 (no change). Each
    step carries the latest nonzero ``thr`` forward; steps before the first command get the opposite
    of that first command (OpenVLA assumes the first command is not redundant), or "open" when the
    episode has no command at all. Output is ``carry / 2 + 0.5``.
    """
    a = _as_column(a, "rel2abs_gripper_actions")
    t = a.shape[0]
    if t == 0:
        return np.zeros((0,), dtype=np.float32)
    thr = np.where(a < -_REL_THRESHOLD, 1, np.where(a > _REL_THRESHOLD, -1, 0)).astype(np.int64)
    nonzero = np.flatnonzero(thr)
    start = -thr[nonzero[0]] if nonzero.size else 1
    # Forward fill: index of the latest nonzero command at or before i (-1 when none yet).
    last = np.maximum.accumulate(np.where(thr != 0, np.arange(t), -1))
    carry = np.where(last >= 0, thr[np.maximum(last, 0)], start)
    return (carry.astype(np.float32) / np.float32(2.0) + np.float32(0.5)).astype(np.float32, copy=False)
