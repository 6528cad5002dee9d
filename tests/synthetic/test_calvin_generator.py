"""The synthetic CALVIN generator writes split trees in CALVIN's on-disk format."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import yaml

from vlaprep.synthetic.calvin import generate_calvin

STATIC, GRIPPER = 32, 16
KEYS = {
    "actions": ((7,), np.float64),
    "rel_actions": ((7,), np.float64),
    "robot_obs": ((15,), np.float64),
    "scene_obs": ((24,), np.float64),
    "rgb_static": ((STATIC, STATIC, 3), np.uint8),
    "rgb_gripper": ((GRIPPER, GRIPPER, 3), np.uint8),
}
SPLITS = ("training", "validation")


def frame_path(split_dir: pathlib.Path, frame_id: int) -> pathlib.Path:
    return split_dir / f"episode_{frame_id:07d}.npz"


def load_ann(split_dir: pathlib.Path) -> dict:
    return np.load(split_dir / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()


def load_frames(split_dir: pathlib.Path) -> dict[int, dict[str, np.ndarray]]:
    """All referenced frames (enumerated from ep_start_end_ids.npy, never a glob)."""
    out = {}
    for start, end in np.load(split_dir / "ep_start_end_ids.npy"):
        for f in range(int(start), int(end) + 1):
            with np.load(frame_path(split_dir, f)) as z:
                out[f] = {k: z[k] for k in z.files}
    return out


def reference_rel_actions(actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """calvin_env to_relative_action, written out independently of the generator."""
    rel = np.empty(7)
    for i in range(3):
        rel[i] = min(max(actions[i] - robot_obs[i], -0.02), 0.02) * 50.0
    for i in range(3, 6):
        d = actions[i] - robot_obs[i]
        d = np.arctan2(np.sin(d), np.cos(d))  # wrap to [-pi, pi]
        rel[i] = min(max(d, -0.05), 0.05) * 20.0
    rel[6] = actions[6]
    return rel


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    return generate_calvin(tmp_path_factory.mktemp("calvin"), frames=600, image_static=STATIC, image_gripper=GRIPPER)


@pytest.fixture(scope="module")
def frames(root) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    return {split: load_frames(root / split) for split in SPLITS}


def test_split_tree(root):
    for split in SPLITS:
        d = root / split
        for name in ("ep_start_end_ids.npy", "ep_lens.npy", "lang_annotations/auto_lang_ann.npy",
                     "statistics.yaml", ".hydra/merged_config.yaml"):
            assert (d / name).is_file(), f"{split}/{name} missing"
        assert yaml.safe_load((d / ".hydra" / "merged_config.yaml").read_text())["cameras"]["static"]["width"] == STATIC
        stats = yaml.safe_load((d / "statistics.yaml").read_text())
        assert len(stats["robot_obs"][0]["mean"]) == 15 and len(stats["scene_obs"][0]["std"]) == 24
        assert all(re.fullmatch(r"episode_\d{7}\.npz", p.name) for p in d.glob("episode_*"))
    assert not (root / "validation" / "scene_info.npy").exists()
    scene = np.load(root / "training" / "scene_info.npy", allow_pickle=True).item()
    ids = np.load(root / "training" / "ep_start_end_ids.npy")
    assert scene == {"calvin_scene_D": [int(ids[:, 0].min()), int(ids[:, 1].max())]}


def test_frame_keys_dtypes_shapes(frames):
    for split in SPLITS:
        for f, frame in frames[split].items():
            assert set(frame) == set(KEYS), f
            for key, (shape, dtype) in KEYS.items():
                assert frame[key].shape == shape and frame[key].dtype == dtype, (split, f, key)


def test_segments(root, frames):
    total = 0
    starts = []
    for split in SPLITS:
        d = root / split
        ids = np.load(d / "ep_start_end_ids.npy")
        lens = np.load(d / "ep_lens.npy")
        assert ids.ndim == 2 and ids.shape[1] == 2 and np.issubdtype(ids.dtype, np.integer)
        np.testing.assert_array_equal(lens, ids[:, 1] - ids[:, 0] + 1)
        assert (ids[1:, 0] - ids[:-1, 1] > 100).all(), "gaps between segments expected"
        total += int(lens.sum())
        starts.append(int(ids[0, 0]))
        assert len(frames[split]) == lens.sum()
    assert total == 600
    assert starts[1] > starts[0] and starts[0] > 0


def test_stray_files_exist_and_are_unreferenced(root):
    for split in SPLITS:
        d = root / split
        ids = np.load(d / "ep_start_end_ids.npy")
        referenced = {f for s, e in ids for f in range(int(s), int(e) + 1)}
        on_disk = {int(p.stem.split("_")[1]) for p in d.glob("episode_*.npz")}
        strays = on_disk - referenced
        assert len(strays) == 2 and referenced <= on_disk
        for s, e in load_ann(d)["info"]["indx"]:
            assert not strays & set(range(s, e))
        with np.load(frame_path(d, min(strays))) as z:
            assert set(z.files) == set(KEYS)


def test_language_annotations(root):
    for split in SPLITS:
        d = root / split
        ann = load_ann(d)
        assert set(ann) == {"language", "info"}
        assert set(ann["language"]) == {"ann", "task", "emb"} and set(ann["info"]) == {"indx", "episodes"}
        n = len(ann["info"]["indx"])
        assert n >= 2 and ann["info"]["episodes"] == []
        assert len(ann["language"]["ann"]) == len(ann["language"]["task"]) == n
        assert all(type(a) is str and a for a in ann["language"]["ann"] + ann["language"]["task"])
        emb = ann["language"]["emb"]
        assert emb.dtype == np.float32 and emb.shape == (n, 1, 384)
        ids = np.load(d / "ep_start_end_ids.npy")
        at_end = 0
        for window in ann["info"]["indx"]:
            assert type(window) is tuple and all(type(v) is int for v in window)
            s, e = window
            assert e - s == 64 or 33 <= e - s <= 48
            seg = [(a, b) for a, b in ids if a <= s <= b]
            assert len(seg) == 1, f"window {window} not inside one segment"
            assert e - 1 <= seg[0][1]
            at_end += e == seg[0][1] + 1
            assert all(frame_path(d, f).exists() for f in range(s, e))
        assert at_end >= len(ids), "every segment has a window ending at its end + 1"
        # Same annotation -> same embedding.
        first = {}
        for a, v in zip(ann["language"]["ann"], emb):
            np.testing.assert_array_equal(first.setdefault(a, v), v)


def test_rel_actions_follow_calvin_env_formula(frames):
    rel = []
    for split in SPLITS:
        for frame in frames[split].values():
            expected = reference_rel_actions(frame["actions"], frame["robot_obs"])
            np.testing.assert_allclose(frame["rel_actions"], expected, rtol=0, atol=1e-9)
            rel.append(frame["rel_actions"])
    rel = np.array(rel)
    saturated = np.abs(rel[:, :6]) == 1.0
    assert 0.0 < saturated.mean() < 0.15
    assert saturated[:, :3].any() and saturated[:, 3:].any()
    assert set(np.unique(rel[:, 6])) == {-1.0, 1.0}


def test_physics(root, frames):
    for split in SPLITS:
        ids = np.load(root / split / "ep_start_end_ids.npy")
        for k, (s, e) in enumerate(ids):
            obs = np.stack([frames[split][f]["robot_obs"] for f in range(s, e + 1)])
            act = np.stack([frames[split][f]["actions"] for f in range(s, e + 1)])
            np.testing.assert_array_equal(act[:-1, :6], obs[1:, :6])  # absolute target of frame t+1
            np.testing.assert_array_equal(obs[1:, 14], act[:-1, 6])  # applied gripper action
            assert set(np.unique(obs[:, 14])) <= {-1.0, 1.0}
            assert ((obs[:, 3:6] >= -np.pi) & (obs[:, 3:6] < np.pi)).all()
            assert ((act[:, 3:6] >= -np.pi) & (act[:, 3:6] < np.pi)).all()
            assert ((obs[:, 6] > 0.0) & (obs[:, 6] < 0.1)).all()
            if k == 0:  # roll crosses +-pi
                assert (obs[:, 3] > 3.0).any() and (obs[:, 3] < -3.0).any()


def test_images_depend_on_state(frames):
    train = list(frames["training"].values())
    a, b = train[0], train[100]
    assert not np.array_equal(a["rgb_static"], b["rgb_static"])
    assert a["rgb_static"].std() > 5


def test_deterministic_for_a_seed(tmp_path):
    kwargs = dict(frames=200, val_fraction=0.3, image_static=16, image_gripper=8)
    a = generate_calvin(tmp_path / "a", seed=3, **kwargs)
    b = generate_calvin(tmp_path / "b", seed=3, **kwargs)
    c = generate_calvin(tmp_path / "c", seed=4, **kwargs)
    for split in SPLITS:
        names = sorted(p.name for p in (a / split).rglob("*") if p.is_file())
        assert names == sorted(p.name for p in (b / split).rglob("*") if p.is_file())
        for p in (a / split).glob("episode_*.npz"):
            with np.load(p) as za, np.load(b / split / p.name) as zb:
                for key in KEYS:
                    np.testing.assert_array_equal(za[key], zb[key])
        for name in ("ep_start_end_ids.npy", "lang_annotations/auto_lang_ann.npy", "statistics.yaml"):
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes()
        assert (a / split / "ep_start_end_ids.npy").read_bytes() != (c / split / "ep_start_end_ids.npy").read_bytes()


def test_missing_frame_in_window(tmp_path):
    root = generate_calvin(tmp_path, frames=200, val_fraction=0.3, image_static=8, image_gripper=8,
                           missing_frame_in_window=True)
    d = root / "training"
    missing = [f for s, e in load_ann(d)["info"]["indx"] for f in range(s, e) if not frame_path(d, f).exists()]
    assert len(set(missing)) == 1


def test_window_past_segment(tmp_path):
    root = generate_calvin(tmp_path, frames=200, val_fraction=0.3, image_static=8, image_gripper=8,
                           window_past_segment=True)
    d = root / "training"
    ids = np.load(d / "ep_start_end_ids.npy")
    past = []
    for s, e in load_ann(d)["info"]["indx"]:
        seg_end = [b for a, b in ids if a <= s <= b][0]
        if e > seg_end + 1:
            past.append((s, e, seg_end))
    assert len(past) == 1
    s, e, seg_end = past[0]
    assert e == seg_end + 11
    assert not any(frame_path(d, f).exists() for f in range(seg_end + 1, e))


def test_too_few_frames_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="frames in each split"):
        generate_calvin(tmp_path, frames=100, val_fraction=0.2)
