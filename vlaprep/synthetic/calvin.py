"""Synthetic CALVIN split trees, in the on-disk format of the public CALVIN datasets.

Layout written by `generate_calvin` (see the CALVIN reference notes)::

    <output_dir>/training/
        episode_XXXXXXX.npz            # one frame each; 7-digit global frame id, gaps between segments
        ep_start_end_ids.npy           # int64 [N, 2] inclusive [start, end]
        ep_lens.npy                    # int64 [N] = end - start + 1
        lang_annotations/auto_lang_ann.npy   # pickled dict, half-open windows [start, end)
        scene_info.npy                 # pickled {'calvin_scene_D': [first, last]} (training only)
        statistics.yaml
        .hydra/merged_config.yaml
    <output_dir>/validation/           # same, without scene_info.npy

Frame file keys (``np.savez_compressed``)::

    actions     [7]  float64  absolute target TCP of frame t+1: xyz (m), euler xyz (rad, wrapped to
                              [-pi, pi)), gripper +-1; the last frame of a segment extrapolates
    rel_actions [7]  float64  calvin_env ``to_relative_action(actions, robot_obs)`` (see `rel_actions`)
    robot_obs   [15] float64  tcp pos(3), tcp euler(3, wrapped), gripper width(1), joints(7),
                              gripper action(1, +-1, the one applied on the way into this frame)
    scene_obs   [24] float64  sliding door, drawer, button, switch, lightbulb, green light,
                              red / blue / pink block poses (xyz + euler each)
    rgb_static  [image_static, image_static, 3] uint8
    rgb_gripper [image_gripper, image_gripper, 3] uint8

What a reader can rely on (and what tests check):
- Segments are 120..260 frames (a short split is one segment); gaps of 150..600 ids separate them;
  validation ids start far after training's. Two stray frame files per split lie in gaps / after
  the last segment; no segment and no window references them.
- Language windows are half-open ``[start, end)`` of length 64 or 33..48 (shorter only if a segment
  is shorter), inside one segment; ``end`` may be the segment end + 1. Every segment has one window
  ending there. Windows may overlap. ``indx`` holds tuples of Python ints.
- The roll angle sits near +-pi (as in CALVIN, where the tool points down), so it wraps; the first
  segment of each split is guaranteed to cross +-pi. Per-frame motion saturates ``rel_actions`` at
  +-1 on a few percent of values.
- Deterministic for a seed (array contents; zip timestamps inside ``.npz`` files differ).

Fault injection (both off by default, both in ``training``):
- ``missing_frame_in_window``: the frame in the middle of the first window is deleted.
- ``window_past_segment``: one extra window ends 10 frames past its segment's end + 1, i.e. its
  last 10 frames do not exist.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib

import numpy as np
import yaml

TRAINING = "training"
VALIDATION = "validation"
SCENE = "calvin_scene_D"
EMB_DIM = 384
FRAME_TEMPLATE = "episode_{:07d}.npz"
MIN_SEGMENT = 50
SEGMENT_RANGE = (120, 260)  # inclusive
GAP_RANGE = (150, 600)  # inclusive
MAX_REL_POS = 0.02
MAX_REL_ORN = 0.05

# task -> annotation variants (CALVIN style: lower case, no punctuation).
TASKS: dict[str, tuple[str, ...]] = {
    "push_red_block_left": ("push the red block to the left", "slide the red block towards the left side"),
    "push_blue_block_right": ("push the blue block to the right", "go push the blue block to the right"),
    "rotate_pink_block_left": ("rotate the pink block to the left", "take the pink block and turn it left"),
    "lift_red_block_table": ("lift the red block from the table", "pick up the red block on the table"),
    "open_drawer": ("open the drawer", "pull the handle to open the drawer"),
    "close_drawer": ("close the drawer", "push the handle to close the drawer"),
    "move_slider_left": ("push the sliding door to the left side", "move the door all the way to the left"),
    "move_slider_right": ("push the sliding door to the right side", "slide the door to the right"),
    "turn_on_lightbulb": ("use the switch to turn on the light bulb", "move the switch up to turn on the yellow light"),
    "turn_off_led": ("press the button to turn off the led light", "push the button to turn off the green light"),
    "stack_block": ("stack the blocks on top of each other", "place the block on top of another block"),
    "push_into_drawer": ("push the object into the drawer", "slide the block into the drawer"),
}

_HOME_JOINTS = np.array([-1.21, 1.03, 1.49, -2.43, -0.82, 1.60, 0.77])


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Wraps radians to [-pi, pi)."""
    return (a + np.pi) % (2 * np.pi) - np.pi


def rel_actions(actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """calvin_env ``to_relative_action``: [..., 7] absolute actions + [..., 15] obs -> [..., 7]."""
    rel_pos = np.clip(actions[..., :3] - robot_obs[..., :3], -MAX_REL_POS, MAX_REL_POS) / MAX_REL_POS
    d_orn = wrap_angle(actions[..., 3:6] - robot_obs[..., 3:6])
    rel_orn = np.clip(d_orn, -MAX_REL_ORN, MAX_REL_ORN) / MAX_REL_ORN
    return np.concatenate([rel_pos, rel_orn, actions[..., 6:7]], axis=-1)


# ----------------------------------------------------------------------------------------------
# Physics of one segment (pure NumPy)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Segment:
    robot_obs: np.ndarray  # [L, 15] float64
    scene_obs: np.ndarray  # [L, 24] float64
    actions: np.ndarray  # [L, 7] float64


def _ar_walk(rng: np.random.Generator, n: int, dims: int, vel_std: float, burst_p: float, burst: float) -> np.ndarray:
    """[n, dims] per-frame displacements: AR(1) velocity with stationary std `vel_std` plus bursts."""
    rho = 0.9
    kicks = rng.normal(0.0, vel_std * np.sqrt(1 - rho**2), size=(n, dims))
    vel = np.empty((n, dims))
    v = rng.normal(0.0, vel_std, size=dims)
    for t in range(n):
        v = rho * v + kicks[t]
        vel[t] = v
    bursts = rng.random((n, dims)) < burst_p
    vel[bursts] += rng.choice([-1.0, 1.0], size=int(bursts.sum())) * burst * rng.uniform(1.0, 2.0, size=int(bursts.sum()))
    return vel


def _gripper_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] gripper action +-1 with plateaus of 25..90 frames."""
    out = np.empty(n)
    g = rng.choice([-1.0, 1.0])
    t = 0
    while t < n:
        k = int(rng.integers(25, 91))
        out[t : t + k] = g
        g = -g
        t += k
    return out


def _segment(rng: np.random.Generator, n: int, cross_pi: bool) -> _Segment:
    # n + 1 states: the last one is only the extrapolated target of the segment's last action.
    m = n + 1
    lo, hi = np.array([-0.25, -0.35, 0.40]), np.array([0.25, 0.05, 0.70])
    pos = np.empty((m, 3))
    p = rng.uniform(lo + 0.05, hi - 0.05)
    vel = _ar_walk(rng, m, 3, vel_std=0.007, burst_p=0.03, burst=0.02)
    for t in range(m):
        pos[t] = p
        step = vel[t]
        nxt = p + step
        out = (nxt < lo) | (nxt > hi)
        step[out] = -step[out]  # bounce off the workspace limits
        vel[t] = step
        p = p + step

    dorn = _ar_walk(rng, m, 3, vel_std=0.012, burst_p=0.02, burst=0.05)
    euler = np.empty((m, 3))  # unwrapped
    e = np.array([np.pi + rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.1), rng.uniform(-np.pi, np.pi)])
    home = e.copy()
    pull = np.array([0.05, 0.05, 0.0])  # roll and pitch stay near the tool-down pose
    for t in range(m):
        euler[t] = e
        e = e + dorn[t] - pull * (e - home)
    if cross_pi:
        # Roll drifts through pi (unwrapped) from below to above: the wrapped value jumps.
        t = np.arange(m) - m // 2
        euler[:, 0] = np.pi + 0.004 * t + 0.01 * np.sin(t / 7.0)
    euler_w = wrap_angle(euler)

    grip_act = _gripper_actions(rng, m)  # action chosen at frame t
    width = np.empty(m)
    w = 0.08 if grip_act[0] > 0 else 0.04
    for t in range(m):
        width[t] = w
        target = 0.08 if grip_act[t] > 0 else 0.04  # closes on a block ~4 cm wide
        w = w + 0.3 * (target - w)
    width += rng.normal(0.0, 2e-4, size=m)
    applied = np.concatenate([grip_act[:1], grip_act[:-1]])  # robot_obs[14]: the previous action

    mix = rng.normal(0.0, 1.0, size=(7, 4))
    feats = np.concatenate([pos - pos[0], np.sin(euler[:, 2:3])], axis=1)  # [m, 4]
    joints = _HOME_JOINTS + feats @ mix.T + rng.normal(0.0, 1e-3, size=(m, 7))

    robot_obs = np.concatenate([pos, euler_w, width[:, None], joints, applied[:, None]], axis=1)  # [m, 15]

    # Scene: door, drawer, button, switch, lightbulb, green light, three block poses.
    scene = np.zeros((m, 24))
    scene[:, 0] = np.clip(0.15 + np.cumsum(rng.normal(0, 0.002, m)), 0.0, 0.3)
    scene[:, 1] = np.clip(0.05 + np.cumsum(rng.normal(0, 0.002, m)), 0.0, 0.22)
    scene[:, 2] = 0.0
    scene[:, 3] = np.clip(np.cumsum(rng.normal(0, 0.001, m)), 0.0, 0.088)
    scene[:, 4] = float(rng.random() < 0.5)
    scene[:, 5] = float(rng.random() < 0.5)
    for b in range(3):
        base = 6 + 6 * b
        scene[:, base : base + 3] = [rng.uniform(-0.25, 0.25), rng.uniform(-0.15, 0.0), 0.46]
        scene[:, base + 5] = rng.uniform(-np.pi, np.pi)
    # The red block follows the tcp while the gripper is closed and stays where it was released.
    block = scene[0, 6:9].copy()
    for t in range(m):
        if grip_act[t] < 0:
            block = pos[t] - [0.0, 0.0, 0.03]
        scene[t, 6:9] = block

    # actions[t] = absolute target pose of frame t+1 (wrapped euler) and the gripper action at t.
    actions = np.concatenate([robot_obs[1:, :6], grip_act[:-1, None]], axis=1)  # [n, 7]
    return _Segment(robot_obs=robot_obs[:-1], scene_obs=scene[:-1], actions=actions)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

_BLOCK_COLORS = np.array([[200, 40, 40], [40, 70, 200], [230, 120, 190]], dtype=np.int16)


def _disc(img: np.ndarray, cx: float, cy: float, r: float, color) -> None:
    s = img.shape[0]
    y0, y1 = max(0, int(cy - r)), min(s, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r)), min(s, int(cx + r) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1)[:, None]
    xx = np.arange(x0, x1)[None, :]
    img[y0:y1, x0:x1][(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = color


def _render_static(rng: np.random.Generator, robot_obs: np.ndarray, scene_obs: np.ndarray, size: int) -> np.ndarray:
    """[L, S, S, 3] uint8: table, drawer, blocks and the tcp seen from above."""
    n = robot_obs.shape[0]
    pad = max(2, size // 10)
    tile = np.clip(rng.normal(0, 6, size=(size + pad, size + pad, 1)), -18, 18).astype(np.int16)
    rows = np.arange(size)[:, None, None]
    base = np.broadcast_to(np.array([150, 120, 90], np.int16) - (rows * 30) // size, (size, size, 3))
    offsets = rng.integers(0, pad + 1, size=(n, 2))
    out = np.empty((n, size, size, 3), np.uint8)
    to_px = lambda x, y: ((x + 0.3) / 0.6 * size, (0.1 - y) / 0.5 * size)  # noqa: E731
    for t in range(n):
        oy, ox = offsets[t]
        img = base + tile[oy : oy + size, ox : ox + size]  # [S, S, 3] int16
        drawer = int(scene_obs[t, 1] / 0.22 * size * 0.25)
        img[size - size // 8 - drawer : size, : size // 3] = (110, 80, 50)
        img[: size // 12, : size // 12] = (240, 240, 80) if scene_obs[t, 4] > 0.5 else (60, 60, 40)
        for b in range(3):
            cx, cy = to_px(scene_obs[t, 6 + 6 * b], scene_obs[t, 7 + 6 * b])
            _disc(img, cx, cy, size * 0.05, _BLOCK_COLORS[b])
        cx, cy = to_px(robot_obs[t, 0], robot_obs[t, 1])
        _disc(img, cx, cy, size * (0.03 + 0.1 * (0.7 - robot_obs[t, 2])), (90, 90, 90))
        np.clip(img, 0, 255, out=img)
        out[t] = img
    return out


def _render_gripper(rng: np.random.Generator, robot_obs: np.ndarray, size: int) -> np.ndarray:
    """[L, S, S, 3] uint8: the two fingers (gap = gripper width) over a height-dependent floor."""
    n = robot_obs.shape[0]
    out = np.empty((n, size, size, 3), np.uint8)
    noise = rng.integers(-8, 9, size=(n, size, size, 1), dtype=np.int16)
    for t in range(n):
        shade = int(60 + 200 * np.clip(0.7 - robot_obs[t, 2], 0.0, 0.3))
        img = np.full((size, size, 3), (shade, shade - 20, shade - 40), np.int16) + noise[t]
        gap = int(robot_obs[t, 6] / 0.08 * size * 0.4)
        finger = max(1, size // 8)
        left = size // 2 - gap // 2 - finger
        right = size // 2 + gap // 2
        img[size // 2 :, max(0, left) : max(0, left + finger)] = (30, 30, 30)
        img[size // 2 :, right : right + finger] = (30, 30, 30)
        np.clip(img, 0, 255, out=img)
        out[t] = img
    return out


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SplitLayout:
    segments: tuple[tuple[int, int], ...]  # inclusive (start, end)
    strays: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]  # half-open
    tasks: tuple[str, ...]
    anns: tuple[str, ...]


def _segment_lengths(rng: np.random.Generator, total: int) -> list[int]:
    lengths = []
    remaining = total
    while remaining > 0:
        length = int(rng.integers(SEGMENT_RANGE[0], SEGMENT_RANGE[1] + 1))
        if remaining - length < MIN_SEGMENT:
            length = remaining
        lengths.append(length)
        remaining -= length
    return lengths


def _windows(rng: np.random.Generator, start: int, end: int) -> list[tuple[int, int]]:
    """Half-open windows inside inclusive segment [start, end]; the first one ends at end + 1."""
    seg_len = end - start + 1
    out = []
    for i in range(max(1, seg_len // 40)):
        if seg_len >= 64 and rng.random() < 0.5:
            length = 64
        else:
            length = int(rng.integers(min(33, seg_len), min(48, seg_len) + 1))
        if i == 0:
            w_start = end + 1 - length
        else:
            w_start = int(rng.integers(start, end + 2 - length))
        if (w_start, w_start + length) not in out:  # overlaps are fine, exact duplicates are not
            out.append((w_start, w_start + length))
    return out


def _layout(rng: np.random.Generator, total: int, first_id: int, window_past_segment: bool) -> _SplitLayout:
    segments = []
    cur = first_id
    for length in _segment_lengths(rng, total):
        segments.append((cur, cur + length - 1))
        cur += length + int(rng.integers(GAP_RANGE[0], GAP_RANGE[1] + 1))
    last_end = segments[-1][1]
    if len(segments) >= 2:
        gap_start, gap_end = segments[0][1], segments[1][0]
        strays = (gap_start + (gap_end - gap_start) // 2, last_end + 57)
    else:
        strays = (last_end + 57, last_end + 131)
    windows = [w for s, e in segments for w in _windows(rng, s, e)]
    if window_past_segment:
        s, e = segments[0]
        windows.append((e + 11 - 40, e + 11))  # frames e+1 .. e+10 do not exist
    windows.sort()
    task_names = list(TASKS)
    tasks, anns = [], []
    for _ in windows:
        task = task_names[int(rng.integers(len(task_names)))]
        tasks.append(task)
        anns.append(TASKS[task][int(rng.integers(len(TASKS[task])))])
    return _SplitLayout(tuple(segments), strays, tuple(windows), tuple(tasks), tuple(anns))


def _embedding(ann: str) -> np.ndarray:
    """[384] float32 unit vector, a fixed function of the text (stands in for MiniLM)."""
    v = np.random.default_rng(zlib.crc32(ann.encode("utf-8"))).normal(size=EMB_DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _write_frame(path: pathlib.Path, actions, rel, robot_obs, scene_obs, rgb_static, rgb_gripper) -> None:
    np.savez_compressed(
        path,
        actions=actions,
        rel_actions=rel,
        robot_obs=robot_obs,
        scene_obs=scene_obs,
        rgb_static=rgb_static,
        rgb_gripper=rgb_gripper,
    )


def _write_split(
    split_dir: pathlib.Path,
    layout: _SplitLayout,
    rng: np.random.Generator,
    image_static: int,
    image_gripper: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writes frames, ids and annotations; returns all robot_obs, scene_obs, actions for statistics."""
    split_dir.mkdir(parents=True, exist_ok=False)
    all_robot, all_scene, all_actions = [], [], []

    def emit(ids: range, seg: _Segment) -> None:
        rel = rel_actions(seg.actions, seg.robot_obs)
        static = _render_static(rng, seg.robot_obs, seg.scene_obs, image_static)
        gripper = _render_gripper(rng, seg.robot_obs, image_gripper)
        for i, frame_id in enumerate(ids):
            _write_frame(split_dir / FRAME_TEMPLATE.format(frame_id), seg.actions[i], rel[i],
                         seg.robot_obs[i], seg.scene_obs[i], static[i], gripper[i])

    for k, (start, end) in enumerate(layout.segments):
        seg = _segment(rng, end - start + 1, cross_pi=(k == 0))
        emit(range(start, end + 1), seg)
        all_robot.append(seg.robot_obs)
        all_scene.append(seg.scene_obs)
        all_actions.append(seg.actions)
    for stray in layout.strays:  # valid frames that no segment or window references
        emit(range(stray, stray + 1), _segment(rng, 1, cross_pi=False))

    ids = np.array(layout.segments, dtype=np.int64).reshape(-1, 2)
    np.save(split_dir / "ep_start_end_ids.npy", ids)
    np.save(split_dir / "ep_lens.npy", ids[:, 1] - ids[:, 0] + 1)

    lang_dir = split_dir / "lang_annotations"
    lang_dir.mkdir()
    emb = np.stack([_embedding(a) for a in layout.anns])[:, None, :] if layout.anns else np.zeros((0, 1, EMB_DIM), np.float32)
    ann = {
        "language": {"ann": list(layout.anns), "task": list(layout.tasks), "emb": emb.astype(np.float32)},
        "info": {"indx": [(int(s), int(e)) for s, e in layout.windows], "episodes": []},
    }
    np.save(lang_dir / "auto_lang_ann.npy", ann, allow_pickle=True)
    return np.concatenate(all_robot), np.concatenate(all_scene), np.concatenate(all_actions)


def _statistics(robot_obs: np.ndarray, scene_obs: np.ndarray, actions: np.ndarray) -> dict:
    target = "calvin_models.calvin_agent.utils.transforms.NormalizeVector"
    as_list = lambda a: [round(float(x), 6) for x in a]  # noqa: E731
    return {
        "robot_obs": [{"_target_": target, "mean": as_list(robot_obs.mean(0)), "std": as_list(robot_obs.std(0))}],
        "scene_obs": [{"_target_": target, "mean": as_list(scene_obs.mean(0)), "std": as_list(scene_obs.std(0))}],
        "act_min_bound": as_list(actions[:, :6].min(0)) + [-1.0],
        "act_max_bound": as_list(actions[:, :6].max(0)) + [1.0],
    }


def _merged_config(seed: int, image_static: int, image_gripper: int) -> dict:
    return {
        "cameras": {
            "static": {
                "_target_": "calvin_env.camera.static_camera.StaticCamera",
                "name": "static", "fov": 10, "aspect": 1, "nearval": 0.01, "farval": 10,
                "width": image_static, "height": image_static,
                "look_from": [2.871, -2.166, 2.147], "look_at": [-0.431, -0.012, 0.5], "up_vector": [0.4, 0.0, 0.918],
            },
            "gripper": {
                "_target_": "calvin_env.camera.gripper_camera.GripperCamera",
                "name": "gripper", "fov": 75, "aspect": 1, "nearval": 0.01, "farval": 2,
                "width": image_gripper, "height": image_gripper,
            },
        },
        "robot": {
            "_target_": "calvin_env.robot.robot.Robot",
            "filename": "franka_panda/panda_longer_finger.urdf",
            "base_position": [-0.34, -0.46, 0.24], "base_orientation": [0, 0, 0],
            "initial_joint_positions": [float(x) for x in _HOME_JOINTS],
            "max_joint_force": 200.0, "gripper_force": 200, "use_target_pose": True,
            "euler_obs": True, "max_rel_pos": MAX_REL_POS, "max_rel_orn": MAX_REL_ORN,
        },
        "scene": {"_target_": "calvin_env.scene.play_table_scene.PlayTableScene", "name": SCENE},
        "env": {"_target_": "calvin_env.envs.play_table_env.PlayTableSimEnv", "control_freq": 30, "use_egl": False},
        "synthetic": {"generator": "vlaprep.synthetic.calvin", "seed": int(seed)},
    }


def generate_calvin(
    output_dir: str | pathlib.Path,
    frames: int = 600,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_static: int = 200,
    image_gripper: int = 84,
    *,
    missing_frame_in_window: bool = False,
    window_past_segment: bool = False,
) -> pathlib.Path:
    """Writes ``output_dir/training`` and ``output_dir/validation`` in CALVIN's format; returns ``output_dir``.

    Args:
      output_dir: root of the split tree; the split folders must not exist yet.
      frames: frames referenced by segments, over both splits (strays come on top, 2 per split).
      seed: everything is a deterministic function of the seed.
      val_fraction: share of ``frames`` in ``validation``; each split needs >= MIN_SEGMENT frames.
      image_static, image_gripper: side of the square ``rgb_static`` / ``rgb_gripper`` images.
      missing_frame_in_window: delete the middle frame of the first training window.
      window_past_segment: add a training window whose last 10 frames do not exist.
    """
    n_val = int(round(frames * val_fraction))
    n_train = frames - n_val
    if n_train < MIN_SEGMENT or n_val < MIN_SEGMENT:
        raise ValueError(
            f"expected at least {MIN_SEGMENT} frames in each split, got training={n_train}, validation={n_val} "
            f"from frames={frames!r}, val_fraction={val_fraction!r}; raise frames or adjust val_fraction"
        )
    if image_static < 8 or image_gripper < 8:
        raise ValueError(f"expected image sizes >= 8, got image_static={image_static!r}, image_gripper={image_gripper!r}")

    output_dir = pathlib.Path(output_dir)
    top = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    train_first = int(top.integers(0, 400_000))
    layouts = {TRAINING: _layout(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))),
                                 n_train, train_first, window_past_segment)}
    val_first = layouts[TRAINING].strays[-1] + int(top.integers(50_000, 150_000))
    layouts[VALIDATION] = _layout(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))),
                                  n_val, val_first, False)

    stats = None
    for k, (split, layout) in enumerate(layouts.items()):
        split_dir = output_dir / split
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, k)))
        robot_obs, scene_obs, actions = _write_split(split_dir, layout, rng, image_static, image_gripper)
        if stats is None:  # CALVIN ships the training statistics in both splits
            stats = _statistics(robot_obs, scene_obs, actions)
        (split_dir / "statistics.yaml").write_text(yaml.safe_dump(stats, sort_keys=False))
        (split_dir / ".hydra").mkdir()
        (split_dir / ".hydra" / "merged_config.yaml").write_text(
            yaml.safe_dump(_merged_config(seed, image_static, image_gripper), sort_keys=False)
        )
        if split == TRAINING:
            first, last = layout.segments[0][0], layout.segments[-1][1]
            np.save(split_dir / "scene_info.npy", {SCENE: [int(first), int(last)]}, allow_pickle=True)
    if missing_frame_in_window:
        start, end = layouts[TRAINING].windows[0]
        (output_dir / TRAINING / FRAME_TEMPLATE.format(start + (end - start) // 2)).unlink()
    return output_dir
