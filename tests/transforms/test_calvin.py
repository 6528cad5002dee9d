"""CALVIN transforms: calvin_env's relative actions (hand values, wrap-around), the recompute check,
and RoboVLMs' normalization."""

import math

import numpy as np
import pytest

from vlaprep.transforms import calvin
from vlaprep.transforms.base import TransformError


def calvin_env_to_relative_action(action, robot_obs, max_pos=0.02, max_orn=0.05):
    """Per-frame re-implementation of calvin_env's to_relative_action (independent of the module)."""
    rel_pos = np.clip(action[:3] - robot_obs[:3], -max_pos, max_pos) / max_pos
    diff = action[3:6] - robot_obs[3:6]
    rel_orn = np.clip((diff + math.pi) % (2 * math.pi) - math.pi, -max_orn, max_orn) / max_orn
    return np.concatenate([rel_pos, rel_orn, action[-1:]])


def _obs(pos, orn):
    obs = np.zeros(15)
    obs[:3], obs[3:6] = pos, orn
    obs[7:14] = np.arange(7) * 0.1  # joints, unused by the relative action
    obs[14] = 1.0
    return obs


def _episode(seed=0, t=6):
    rng = np.random.default_rng(seed)
    robot_obs = np.stack([_obs(rng.uniform(-0.5, 0.5, 3), rng.uniform(-math.pi, math.pi, 3)) for _ in range(t)])
    actions = np.zeros((t, 7))
    actions[:, :3] = robot_obs[:, :3] + rng.uniform(-0.04, 0.04, (t, 3))
    # Orientation targets near the current euler, some across the +-pi seam.
    actions[:, 3:6] = np.mod(robot_obs[:, 3:6] + rng.uniform(-0.1, 0.1, (t, 3)) + math.pi, 2 * math.pi) - math.pi
    actions[:, 6] = rng.choice([-1.0, 1.0], t)
    rel = np.stack([calvin_env_to_relative_action(actions[i], robot_obs[i]) for i in range(t)])
    return {"actions": actions, "robot_obs": robot_obs, "rel_actions": rel}


def test_relative_actions_hand_values_with_wraparound():
    robot_obs = np.stack(
        [
            _obs([0.1, 0.2, 0.3], [3.1, 0.0, -3.1]),
            _obs([0.0, 0.0, 0.0], [3.13, math.pi, -math.pi]),
        ]
    )
    actions = np.array(
        [
            [0.11, 0.15, 0.3, -3.1, 0.01, 3.1, -1.0],
            [0.005, -0.03, 0.0, -3.13, -math.pi, math.pi, 1.0],
        ]
    )
    out = calvin.relative_actions(actions, robot_obs)
    assert out.dtype == np.float32 and out.shape == (2, 7)
    seam = (2 * math.pi - 6.26) / 0.05  # 3.13 -> -3.13 is a +0.0232 rad turn, not -6.26
    expected = np.array(
        [
            # pos: +0.01 -> 0.5, -0.05 clipped -> -1, 0; orn: -6.2 wraps to +0.083 -> clipped +1,
            # 0.01 -> 0.2, +6.2 wraps to -0.083 -> -1; gripper raw.
            [0.5, -1.0, 0.0, 1.0, 0.2, -1.0, -1.0],
            # orn: d = -2pi wraps to 0 (-pi - pi = -2pi); d = +2pi wraps to 0.
            [0.25, -1.0, 0.0, seam, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_relative_actions_exactly_pi_wraps_to_minus_pi():
    # d = +pi and d = -pi both land on -pi ([-pi, pi) interval) and saturate at -1.
    robot_obs = np.stack([_obs([0, 0, 0], [0.0, math.pi, 0.0])])
    actions = np.array([[0, 0, 0, math.pi, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(calvin.relative_actions(actions, robot_obs)[0, 3:6], [-1.0, -1.0, 0.0])


def test_relative_actions_matches_calvin_env_per_frame():
    ep = _episode(seed=3, t=50)
    np.testing.assert_array_equal(
        calvin.relative_actions(ep["actions"], ep["robot_obs"]), ep["rel_actions"].astype(np.float32)
    )


def test_relative_actions_bad_shape():
    with pytest.raises(TransformError, match=r"expected shape \[T, 15\], got \(2, 14\) for key 'robot_obs'"):
        calvin.relative_actions(np.zeros((2, 7)), np.zeros((2, 14)))


def test_calvin_transform():
    rel = np.array([[0.1, -0.2, 0.3, -0.4, 0.5, -1.0, -1.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.25, 1.0]])
    robot_obs = np.arange(30, dtype=np.float64).reshape(2, 15)
    traj = calvin.calvin_transform({"rel_actions": rel, "robot_obs": robot_obs})
    np.testing.assert_array_equal(
        traj.action,
        np.array([[0.1, -0.2, 0.3, -0.4, 0.5, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.25, 1.0]], np.float32),
    )
    assert traj.action.dtype == np.float32 and traj.proprio.dtype == np.float32
    np.testing.assert_array_equal(traj.proprio, robot_obs.astype(np.float32))
    np.testing.assert_array_equal(traj.step_index, np.array([0, 1], np.int64))


def test_calvin_transform_empty_and_missing():
    traj = calvin.calvin_transform({"rel_actions": np.zeros((0, 7)), "robot_obs": np.zeros((0, 15))})
    assert traj.action.shape == (0, 7) and traj.proprio.shape == (0, 15)
    with pytest.raises(TransformError, match=r"expected step key 'robot_obs', got keys \['rel_actions'\]"):
        calvin.calvin_transform({"rel_actions": np.zeros((1, 7))})


def test_calvin_recomputed_matches_stored():
    ep = _episode(seed=1)
    recomputed = calvin.calvin_recomputed_transform(ep)
    stored = calvin.calvin_transform(ep)
    np.testing.assert_array_equal(recomputed.action, stored.action)
    np.testing.assert_array_equal(recomputed.proprio, stored.proprio)
    np.testing.assert_array_equal(recomputed.step_index, np.arange(6))


def test_calvin_recomputed_accepts_float32_rounding():
    ep = _episode(seed=2)
    ep["rel_actions"] = ep["rel_actions"].astype(np.float32)
    ep["rel_actions"][0, 0] += 5e-6  # under the 1e-5 tolerance
    calvin.calvin_recomputed_transform(ep)


def test_calvin_recomputed_mismatch_raises_with_step_dim_and_values():
    ep = _episode(seed=1)
    ep["rel_actions"] = ep["rel_actions"].copy()
    original = ep["rel_actions"][2, 4]
    ep["rel_actions"][2, 4] += 1e-3
    stored = ep["rel_actions"][2, 4]
    with pytest.raises(TransformError) as info:
        calvin.calvin_recomputed_transform(ep)
    msg = str(info.value)
    assert "at step 2, dim 4" in msg
    assert f"stored={stored!r}" in msg
    assert f"recomputed={original!r}" in msg  # same float64 ops as the per-frame reference
    assert "1 element(s) differ" in msg


def test_calvin_recomputed_nan_is_a_mismatch():
    ep = _episode(seed=1)
    ep["rel_actions"] = ep["rel_actions"].copy()
    ep["rel_actions"][0, 0] = np.nan
    with pytest.raises(TransformError, match="at step 0, dim 0"):
        calvin.calvin_recomputed_transform(ep)


def test_robovlms_normalize_action():
    a = np.array([[0.65, -0.8, 0.325, 0.0, 1.0, -0.65, 5.0]])
    np.testing.assert_allclose(
        calvin.robovlms_normalize_action(a), [[1.0, -1.0, 0.5, 0.0, 1.0, -1.0, 5.0]], rtol=0, atol=1e-12
    )
    # Without maintain_last the gripper is clipped and scaled too.
    np.testing.assert_allclose(
        calvin.robovlms_normalize_action(a, maintain_last=False)[0, -1], 1.0, rtol=0, atol=1e-12
    )
    # General bounds: [0, 2] -> [-1, 1].
    np.testing.assert_allclose(
        calvin.robovlms_normalize_action(np.array([0.0, 1.0, 3.0]), low=0.0, high=2.0, maintain_last=False),
        [-1.0, 0.0, 1.0],
    )
    with pytest.raises(ValueError, match="expected low < high"):
        calvin.robovlms_normalize_action(a, low=1.0, high=1.0)


def test_calvin_robovlms_transform():
    rel = np.array([[0.65, -0.8, 0.325, 0.0, 1.0, -0.13, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    traj = calvin.calvin_robovlms_transform({"rel_actions": rel, "robot_obs": np.zeros((2, 15))})
    np.testing.assert_allclose(
        traj.action, [[1.0, -1.0, 0.5, 0.0, 1.0, -0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], rtol=0, atol=1e-6
    )
    # Equal to the brief's formula clip(rel, +-0.65) / 0.65 up to float32 rounding.
    ep = _episode(seed=4, t=40)
    traj = calvin.calvin_robovlms_transform(ep)
    np.testing.assert_allclose(traj.action[:, :6], np.clip(ep["rel_actions"][:, :6], -0.65, 0.65) / 0.65, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(traj.action[:, 6], (ep["rel_actions"][:, 6] + 1) / 2)
