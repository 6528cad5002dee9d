"""CALVIN transforms (calvin_env's relative actions, OpenVLA-style gripper, RoboVLMs' normalization).

``steps`` holds the per-frame keys of CALVIN's ``episode_XXXXXXX.npz`` files stacked along T:

  actions:     [T, 7]   absolute target TCP of the next frame: xyz (m), euler xyz (rad), gripper +-1
  rel_actions: [T, 7]   calvin_env ``to_relative_action`` of (actions, robot_obs), already in [-1, 1]
  robot_obs:   [T, 15]  tcp pos(3), tcp euler(3), gripper width(1), arm joints(7), gripper action(1)

Every transform returns action ``[T, 7] float32`` (6 relative EEF dims + gripper mapped -1/+1 -> 0/1),
proprio = robot_obs ``[T, 15] float32`` and step_index = ``arange(T)``. Files may hold float64 (the
writer's dtype); arithmetic is float64 and only the result is float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlaprep.transforms.base import Trajectory, TransformError
from vlaprep.transforms.steps import check_lengths, require_keys

CALVIN_KEYS = ("rel_actions", "robot_obs")
CALVIN_RECOMPUTED_KEYS = ("actions", "robot_obs", "rel_actions")

# calvin_env to_relative_action: positions clipped to +-2 cm ("scaling factor 50"), orientations to
# +-0.05 rad ("scaling factor 20"), then divided so saturation is exactly +-1.
MAX_REL_POS = 0.02
MAX_REL_ORN = 0.05
# Largest |stored - recomputed| rel_actions difference accepted by calvin_recomputed_transform: wide
# enough for float32 storage rounding (~6e-8 on values in [-1, 1]), far below any real relabelling.
RECOMPUTE_ATOL = 1e-5
# RoboVLMs' CALVIN config: normalize_action(a, -0.65, 0.65, maintain_last=True).
ROBOVLMS_LOW = -0.65
ROBOVLMS_HIGH = 0.65


def _read(steps: Mapping[str, np.ndarray], key: str, width: int, dataset: str) -> np.ndarray:
    """``steps[key]`` as ``[T, width] float64`` (float64 so recomputation matches calvin_env)."""
    arr = np.asarray(steps[key])
    if arr.ndim != 2 or arr.shape[1] != width:
        raise TransformError(
            f"expected shape [T, {width}], got {arr.shape!r} for key {key!r} in {dataset}; "
            f"hint: stack the per-frame ({width},) vectors along a leading time axis"
        )
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise TransformError(f"expected numeric values, got dtype {arr.dtype!r} for key {key!r} in {dataset}") from e


def _relative_actions64(a: np.ndarray, obs: np.ndarray, max_pos: float, max_orn: float) -> np.ndarray:
    """``[T, 7]``, ``[T, 15]`` float64 -> ``[T, 7] float64`` (the formula of ``relative_actions``)."""
    rel_pos = np.clip(a[:, :3] - obs[:, :3], -max_pos, max_pos) / max_pos
    d_orn = np.mod((a[:, 3:6] - obs[:, 3:6]) + np.pi, 2 * np.pi) - np.pi
    rel_orn = np.clip(d_orn, -max_orn, max_orn) / max_orn
    return np.concatenate([rel_pos, rel_orn, a[:, 6:7]], axis=1)


def relative_actions(actions, robot_obs, max_pos: float = MAX_REL_POS, max_orn: float = MAX_REL_ORN) -> np.ndarray:
    """calvin_env ``to_relative_action`` for a whole episode: ``[T, 7]`` + ``[T, 15]`` -> ``[T, 7] float32``.

    rel_pos = clip(actions[:3] - robot_obs[:3], +-max_pos) / max_pos
    rel_orn = clip(wrap(actions[3:6] - robot_obs[3:6]), +-max_orn) / max_orn, wrap(d) = (d + pi) % 2pi - pi
    gripper = actions[6] (raw +-1)
    The euler difference is wrapped into [-pi, pi) first, so 3.1 -> -3.1 is a +0.083 rad turn, not -6.2.
    """
    name = "relative_actions"
    a = _read({"actions": actions}, "actions", 7, name)
    obs = _read({"robot_obs": robot_obs}, "robot_obs", 15, name)
    check_lengths(name, actions=a, robot_obs=obs)
    return _relative_actions64(a, obs, max_pos, max_orn).astype(np.float32)


def robovlms_normalize_action(
    a, low: float = ROBOVLMS_LOW, high: float = ROBOVLMS_HIGH, maintain_last: bool = True
) -> np.ndarray:
    """RoboVLMs ``normalize_action``: ``[..., D]`` -> ``[..., D] float64``.

    ``2 * (clip(a, low, high) - low) / (high - low) - 1``; with ``maintain_last`` the last dim (gripper)
    is returned raw, unclipped. With the defaults this is ``clip(a, +-0.65) / 0.65`` up to rounding.
    """
    a = np.asarray(a, dtype=np.float64)
    if not high > low:
        raise ValueError(f"expected low < high, got low={low!r}, high={high!r} for robovlms_normalize_action")
    res = 2.0 * (np.clip(a, low, high) - low) / (high - low) - 1.0
    if maintain_last:
        res[..., -1] = a[..., -1]
    return res


def _gripper01(g: np.ndarray) -> np.ndarray:
    """CALVIN gripper -1 (close) / +1 (open) -> 0 / 1, as OpenVLA's calvin and taco_play transforms."""
    return (g + 1.0) / 2.0


def _calvin_trajectory(rel: np.ndarray, robot_obs: np.ndarray) -> Trajectory:
    """``rel: [T, 7] float64``, ``robot_obs: [T, 15] float64`` -> Trajectory (float32)."""
    action = np.concatenate([rel[:, :6], _gripper01(rel[:, 6:7])], axis=1)
    return Trajectory(
        action=action.astype(np.float32),
        proprio=robot_obs.astype(np.float32),
        step_index=np.arange(rel.shape[0], dtype=np.int64),
    )


def calvin_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """Stored ``rel_actions`` dims 0..5 + gripper (g + 1) / 2; proprio = robot_obs ``[T, 15]``."""
    name = "calvin_transform"
    require_keys(steps, CALVIN_KEYS, name)
    rel = _read(steps, "rel_actions", 7, name)
    obs = _read(steps, "robot_obs", 15, name)
    check_lengths(name, rel_actions=rel, robot_obs=obs)
    return _calvin_trajectory(rel, obs)


def calvin_recomputed_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """As ``calvin_transform`` but with rel_actions recomputed from ``actions`` + ``robot_obs``.

    The recomputation is checked against the stored ``rel_actions``: any element more than
    ``RECOMPUTE_ATOL`` (1e-5) away raises TransformError naming the step, dim and both values, so a
    corrupted or differently-processed split is caught rather than silently relabelled.
    """
    name = "calvin_recomputed_transform"
    require_keys(steps, CALVIN_RECOMPUTED_KEYS, name)
    a = _read(steps, "actions", 7, name)
    obs = _read(steps, "robot_obs", 15, name)
    stored = _read(steps, "rel_actions", 7, name)
    check_lengths(name, actions=a, robot_obs=obs, rel_actions=stored)
    # float64 for both the comparison and the output (cast once at the end).
    rel = _relative_actions64(a, obs, MAX_REL_POS, MAX_REL_ORN)
    # NaN never compares close, so a NaN on either side is reported too.
    bad = ~(np.abs(rel - stored) <= RECOMPUTE_ATOL)
    if bad.any():
        step, dim = (int(i) for i in np.argwhere(bad)[0])
        raise TransformError(
            f"expected stored rel_actions within {RECOMPUTE_ATOL} of the recomputed value, got "
            f"stored={stored[step, dim]!r} vs recomputed={rel[step, dim]!r} at step {step}, dim {dim} "
            f"({int(bad.sum())} element(s) differ) for key 'rel_actions' in {name}; hint: use "
            f"calvin_transform to train on the stored values as they are"
        )
    return _calvin_trajectory(rel, obs)


def calvin_robovlms_transform(steps: Mapping[str, np.ndarray]) -> Trajectory:
    """RoboVLMs' processing: ``clip(rel_actions[:, :6], +-0.65) / 0.65`` + gripper (g + 1) / 2.

    (RoboVLMs' continuous heads use ``(g + 1) // 2``; identical on CALVIN's +-1 grippers.)
    """
    name = "calvin_robovlms_transform"
    require_keys(steps, CALVIN_KEYS, name)
    rel = _read(steps, "rel_actions", 7, name)
    obs = _read(steps, "robot_obs", 15, name)
    check_lengths(name, rel_actions=rel, robot_obs=obs)
    return _calvin_trajectory(robovlms_normalize_action(rel, maintain_last=True), obs)
