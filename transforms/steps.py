"""Readers and builders shared by every per-dataset transform (pure NumPy).

``steps`` maps flattened RLDS step keys (``"action"``, ``"action/world_vector"``,
``"observation/clip_function_input/base_pose_tool_reached"``...) to arrays with a leading time axis T.
Each dataset module declares, per transform, the per-step shape of every key it reads, taken from the
dataset's own ``features.json`` (``shared/reference/oxe_layouts.json`` records them): ``()`` and ``(1,)``
are one column, ``(n,)`` is n columns, ``None`` means "not established" (``status: assumed`` layouts):
any width is accepted and the transform checks only the columns it slices.

Recurring patterns of OpenVLA's ``oxe/transforms.py`` live here once:

  ``read_steps``         every declared key as ``[T, W] float32`` (OpenVLA's graph holds float32; a float64
                         source is rounded first, so deltas are float32 arithmetic), equal lengths checked
  ``read_native``        one key in its stored dtype (DROID's float64 ``1 - gripper`` before the cast)
  ``read_zlib_matrix``   a tensor stored ZLIB-compressed (kuka), decoded like ``tf.io.decode_compressed``
  ``state_proprio``      OpenVLA's ``restructure``: concatenate ``state_obs_keys``, a zero column per None
  ``invert_clip01``      ``invert_gripper_actions(clip(g, 0, 1))`` (source 1 = closed, possibly -1..1)
  ``trajectory``         the ``Trajectory``; zero steps raise ``EmptyTrajectoryError`` where OpenVLA keeps
                         an empty trajectory (``counted=True``), else return the 0-step trajectory

Zero-step outcomes follow OpenVLA: where its graph keeps an empty trajectory (slices, Bridge's dropped
steps) the transform raises ``EmptyTrajectoryError`` (OpenVLA counts it in ``num_trajectories``); where its
graph fails on the episode (``binarize`` / ``rel2abs`` index into the empty column) the transform returns
the 0-step trajectory, which pipelines quarantine ("expected at least one step"), never count.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from vlaprep.transforms.base import EmptyTrajectoryError, Trajectory, TransformError
from vlaprep.transforms.gripper import invert_gripper_actions

def require_keys(steps: Mapping[str, np.ndarray], keys: Sequence[str], dataset: str) -> None:
    """Raise TransformError naming the first missing key and the keys that are present."""
    for key in keys:
        if key not in steps:
            raise TransformError(
                f"expected step key {key!r}, got keys {sorted(steps)!r} for {dataset}; "
                f"hint: the source must decode every key in the registry's required_keys {list(keys)!r}"
            )


def _as_2d(steps: Mapping[str, np.ndarray], key: str, dataset: str, width: int | None) -> np.ndarray:
    require_keys(steps, (key,), dataset)
    arr = np.asarray(steps[key])
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise TransformError(
            f"expected [T] or [T, W] array, got shape {arr.shape!r} for key {key!r} in {dataset}; "
            f"hint: keys must be per-step vectors with the time axis first"
        )
    if width is not None and arr.shape[1] != width:
        raise TransformError(
            f"expected width {width}, got shape {arr.shape!r} for key {key!r} in {dataset}; "
            f"hint: is this the right dataset for the transform? (widths follow the dataset's features.json)"
        )
    if arr.dtype.kind not in "biuf":
        raise TransformError(f"expected numeric values, got dtype {arr.dtype!r} for key {key!r} in {dataset}")
    return arr


def read_matrix(steps: Mapping[str, np.ndarray], key: str, dataset: str, width: int | None = None) -> np.ndarray:
    """``steps[key]`` as ``[T, W] float32``; a 1-D ``[T]`` array is one column; ``width`` must match W."""
    return _as_2d(steps, key, dataset, width).astype(np.float32)


def read_native(steps: Mapping[str, np.ndarray], key: str, dataset: str, width: int | None = None) -> np.ndarray:
    """``steps[key]`` as ``[T, W]`` in its stored dtype (float64 stays float64)."""
    return _as_2d(steps, key, dataset, width)


def read_column(steps: Mapping[str, np.ndarray], key: str, dataset: str) -> np.ndarray:
    """A scalar-per-step key (``[T]`` or ``[T, 1]``) as ``[T] float32``."""
    return read_matrix(steps, key, dataset, width=1)[:, 0]


def shape_width(shape) -> int | None:
    """Columns of a per-step shape: ``()`` -> 1, ``(n,)`` -> n, ``None`` (not established) -> None."""
    if shape is None:
        return None
    shape = tuple(shape)
    if len(shape) > 1:
        raise ValueError(f"expected a per-step shape () or (n,), got {shape!r}; hint: transforms read vectors")
    return shape[0] if shape else 1


def check_lengths(dataset: str, **arrays: np.ndarray) -> int:
    """All arrays share the leading length T; returns T."""
    lengths = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise TransformError(
            f"expected every key to have the same number of steps, got {lengths!r} in {dataset}; "
            f"hint: keys must all come from the same episode"
        )
    return next(iter(lengths.values()))


def read_steps(steps: Mapping[str, np.ndarray], shapes: Mapping, dataset: str) -> dict[str, np.ndarray]:
    """Every key of ``shapes`` as ``[T, W] float32`` with W checked against its declared shape; equal T."""
    require_keys(steps, tuple(shapes), dataset)
    out = {key: read_matrix(steps, key, dataset, shape_width(shape)) for key, shape in shapes.items()}
    check_lengths(dataset, **out)
    return out


def require_min_width(arr: np.ndarray, columns: int, key: str, dataset: str) -> None:
    """For keys of not-established width: the transform slices ``columns`` of them."""
    if arr.shape[1] < columns:
        raise TransformError(
            f"expected at least {columns} columns, got shape {arr.shape!r} for key {key!r} in {dataset}; "
            f"hint: check the dataset's features.json"
        )


def read_zlib_matrix(steps: Mapping[str, np.ndarray], key: str, dataset: str, width: int) -> np.ndarray:
    """A float32 tensor stored ZLIB-compressed (kuka's state) as ``[T, width] float32``.

    Accepts the compressed form (``[T]`` bytes, what OpenVLA reads with ``SkipDecoding``: each step is
    ``zlib(float32 little-endian bytes)``, decoded like ``tf.io.decode_compressed(..., "ZLIB")`` +
    ``tf.io.decode_raw(..., tf.float32)`` + ``reshape(-1, width)``) or values a reader already decoded.
    """
    require_keys(steps, (key,), dataset)
    arr = np.asarray(steps[key])
    if arr.dtype.kind not in "OSV":
        return read_matrix(steps, key, dataset, width)
    try:
        raw = b"".join(zlib.decompress(bytes(v)) for v in arr.reshape(-1))
    except (zlib.error, TypeError) as e:
        raise TransformError(
            f"expected ZLIB-compressed float32 bytes, got undecodable data for key {key!r} in {dataset}: {e}"
        ) from e
    values = np.frombuffer(raw, dtype="<f4")
    if values.size != arr.shape[0] * width:
        raise TransformError(
            f"expected {arr.shape[0]} x {width} float32 values after ZLIB decoding, got {values.size} for key "
            f"{key!r} in {dataset}; hint: check the width in the dataset's features.json"
        )
    return values.reshape(-1, width).astype(np.float32)


def zeros(t: int, n: int) -> np.ndarray:
    """``[t, n] float32`` zeros: a ``None`` entry of OpenVLA's state_obs_keys, or padded action dims."""
    return np.zeros((t, n), dtype=np.float32)


def state_proprio(state_obs_keys: Sequence[str | None], pieces: Mapping[str, np.ndarray], t: int) -> np.ndarray:
    """OpenVLA's ``restructure``: ``[T, P] float32`` = the named observation pieces in order, ``[T, 1]`` zeros
    for each ``None``. A piece may be ``[T]`` (one column) or ``[T, W]``; values are cast to float32."""
    parts = []
    for key in state_obs_keys:
        if key is None:
            parts.append(zeros(t, 1))
            continue
        piece = np.asarray(pieces[key])
        parts.append((piece[:, None] if piece.ndim == 1 else piece).astype(np.float32))
    return np.concatenate(parts, axis=1) if parts else zeros(t, 0)


def invert_clip01(g: np.ndarray) -> np.ndarray:
    """``[T, 1]`` or ``[T]`` -> same shape float32: ``1 - clip(g, 0, 1)`` (gripper 1 = closed, maybe -1..1)."""
    g = np.asarray(g, dtype=np.float32)
    return invert_gripper_actions(np.clip(g.reshape(-1), np.float32(0.0), np.float32(1.0))).reshape(g.shape)


def trajectory(
    action: np.ndarray, proprio: np.ndarray, dataset: str, step_index: np.ndarray | None = None, counted: bool = True
) -> Trajectory:
    """The ``Trajectory`` (contiguous float32). Zero steps: ``EmptyTrajectoryError`` carrying it when OpenVLA
    counts such a trajectory (``counted``), else the 0-step trajectory itself (OpenVLA fails on the episode)."""
    t = action.shape[0]
    if step_index is None:
        step_index = np.arange(t, dtype=np.int64)
    traj = Trajectory(
        action=np.ascontiguousarray(action, dtype=np.float32),
        proprio=np.ascontiguousarray(proprio, dtype=np.float32),
        step_index=np.asarray(step_index, dtype=np.int64),
    )
    if t == 0 and counted:
        raise EmptyTrajectoryError(
            f"expected at least one step after {dataset}, got 0; hint: OpenVLA keeps this episode as an "
            f"empty trajectory (counted in num_trajectories, no transitions)",
            traj,
        )
    return traj
