"""The synthetic RLDS generator writes a real TFDS dataset that TFDS itself reads back."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vlaprep.synthetic import rlds
from vlaprep.synthetic.rlds import generate_rlds

SIZE = 32


def read_split(version_dir: pathlib.Path, split: str) -> dict[int, dict]:
    """episode_id -> {"file_path": str, "steps": dict of stacked numpy arrays or None when empty}."""
    builder = tfds.builder_from_directory(str(version_dir))
    out = {}
    for ep in builder.as_dataset(split=split, shuffle_files=False):
        batches = list(ep["steps"].batch(100_000).as_numpy_iterator())
        eid = int(ep["episode_metadata"]["episode_id"])
        assert eid not in out, f"duplicate episode_id {eid}"
        out[eid] = {
            "file_path": ep["episode_metadata"]["file_path"].numpy().decode(),
            "steps": batches[0] if batches else None,
        }
    return out


def shard_files(version_dir: pathlib.Path, name: str, split: str) -> list[pathlib.Path]:
    return sorted(version_dir.glob(f"{name}-{split}.tfrecord-*"))


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> pathlib.Path:
    return generate_rlds(tmp_path_factory.mktemp("rlds"), episodes=20, image_size=SIZE)


@pytest.fixture(scope="module")
def train(ds) -> dict[int, dict]:
    return read_split(ds, "train")


@pytest.fixture(scope="module")
def val(ds) -> dict[int, dict]:
    return read_split(ds, "val")


def test_layout_and_split_counts(ds, train, val):
    assert ds.name == "1.0.0" and ds.parent.name == "bridge_orig"
    names = sorted(p.name for p in ds.iterdir())
    assert names == [
        "bridge_orig-train.tfrecord-00000-of-00001",
        "bridge_orig-val.tfrecord-00000-of-00001",
        "dataset_info.json",
        "features.json",
    ]
    info = tfds.builder_from_directory(str(ds)).info
    assert info.splits["train"].num_examples == 18
    assert info.splits["val"].num_examples == 2
    assert sorted(train) == list(range(18))
    assert sorted(val) == [18, 19]


def test_feature_spec(ds):
    features = tfds.builder_from_directory(str(ds)).info.features
    steps = features["steps"]
    assert isinstance(steps, tfds.features.Dataset)
    obs = steps.feature["observation"]
    for cam in ("image_0", "image_1"):
        assert isinstance(obs[cam], tfds.features.Image)
        assert obs[cam].shape == (SIZE, SIZE, 3)
        assert obs[cam].encoding_format == "jpeg"
    assert obs["state"].shape == (7,) and obs["state"].np_dtype == np.float32
    assert steps.feature["action"].shape == (7,) and steps.feature["action"].np_dtype == np.float32
    assert isinstance(steps.feature["language_instruction"], tfds.features.Text)
    for key in ("is_first", "is_last", "is_terminal"):
        assert steps.feature[key].np_dtype == np.bool_
    for key in ("reward", "discount"):
        assert steps.feature[key].np_dtype == np.float32 and steps.feature[key].shape == ()
    meta = features["episode_metadata"]
    assert isinstance(meta["file_path"], tfds.features.Text)
    assert meta["episode_id"].np_dtype == np.int32


def test_decoded_step_values(train, val):
    for eps in (train, val):
        for eid, ep in eps.items():
            s = ep["steps"]
            n = len(s["action"])
            assert 3 <= n <= 60
            assert s["observation"]["image_0"].shape == (n, SIZE, SIZE, 3)
            assert s["observation"]["image_0"].dtype == np.uint8
            assert s["observation"]["image_1"].shape == (n, SIZE, SIZE, 3)
            assert s["observation"]["state"].dtype == np.float32 and s["observation"]["state"].shape == (n, 7)
            assert s["action"].dtype == np.float32 and s["action"].shape == (n, 7)
            np.testing.assert_array_equal(s["is_first"], np.arange(n) == 0)
            np.testing.assert_array_equal(s["is_last"], np.arange(n) == n - 1)
            np.testing.assert_array_equal(s["is_terminal"], np.arange(n) == n - 1)
            np.testing.assert_array_equal(s["reward"], (np.arange(n) == n - 1).astype(np.float32))
            np.testing.assert_array_equal(s["discount"], np.ones(n, np.float32))
            assert len(set(s["language_instruction"].tolist())) == 1
            assert f"traj{eid:07d}" in ep["file_path"]
            assert np.isfinite(s["action"]).all() and np.isfinite(s["observation"]["state"]).all()


def test_action_is_state_delta(train):
    errors, gripper = [], []
    for ep in train.values():
        s = ep["steps"]
        state, action = s["observation"]["state"].astype(np.float64), s["action"].astype(np.float64)
        errors.append(np.abs(action[:-1, :6] - np.diff(state[:, :6], axis=0)))
        gripper.append(action[:, 6])
        grip_state = state[:, 6]
        assert ((grip_state >= 0) & (grip_state <= 1)).all()
    err = np.concatenate(errors)  # [N, 6]
    # Noise is 1e-4 m / 1e-3 rad; about 1 % of steps carry heavy-tailed outliers.
    assert np.median(err[:, :3]) < 3e-4 and np.median(err[:, 3:]) < 3e-3
    assert (err[:, :3] < 1e-3).mean() > 0.95
    g = np.concatenate(gripper)
    assert ((g >= 0) & (g <= 1)).all()
    assert (g == 0.0).any() and (g == 1.0).any(), "exact gripper plateaus (ties) expected"
    assert ((g > 0.05) & (g < 0.95)).any(), "in-between gripper values expected"


def test_images_depend_on_state(train):
    s = train[0]["steps"]
    imgs = s["observation"]["image_0"].astype(np.int16)
    assert imgs.std() > 5  # textured
    assert np.abs(imgs[0] - imgs[-1]).mean() > 1  # frames differ


def test_language(train, val):
    instructions = [ep["steps"]["language_instruction"][0].decode() for ep in {**train, **val}.values()]
    empty = sum(i == "" for i in instructions)
    assert 1 <= empty <= 4
    nonempty = [i for i in instructions if i]
    assert set(nonempty) <= set(rlds.INSTRUCTIONS)
    assert len(set(nonempty)) > 1
    assert any(i != i.lower() for i in rlds.INSTRUCTIONS)  # mixed case in the vocabulary


def test_jpeg_size_at_256_is_realistic():
    ep = rlds._episode(0, 0, 6, 3, 60, 256, False)
    sizes = [len(tf.io.encode_jpeg(img, quality=95).numpy()) for img in ep.image_0]
    assert 15_000 < np.mean(sizes) < 35_000


def test_deterministic_bytes_for_a_seed(tmp_path):
    kwargs = dict(episodes=4, image_size=16, max_steps=8)
    a = generate_rlds(tmp_path / "a", seed=7, **kwargs)
    b = generate_rlds(tmp_path / "b", seed=7, **kwargs)
    c = generate_rlds(tmp_path / "c", seed=8, **kwargs)
    files_a = sorted(p.name for p in a.glob("*.tfrecord-*"))
    assert files_a == sorted(p.name for p in b.glob("*.tfrecord-*"))
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in files_a)


def test_episode_content_does_not_depend_on_episode_count(tmp_path):
    small = read_split(generate_rlds(tmp_path / "s", episodes=3, image_size=8, max_steps=6), "train+val")
    large = read_split(generate_rlds(tmp_path / "l", episodes=6, image_size=8, max_steps=6), "train+val")
    for k in range(3):
        np.testing.assert_array_equal(small[k]["steps"]["action"], large[k]["steps"]["action"])
        np.testing.assert_array_equal(small[k]["steps"]["observation"]["state"], large[k]["steps"]["observation"]["state"])


def test_num_shards_option(tmp_path):
    version = generate_rlds(tmp_path, name="sharded", episodes=10, image_size=8, max_steps=4, num_shards=3)
    train_files = shard_files(version, "sharded", "train")
    assert [p.name for p in train_files] == [f"sharded-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    assert len(shard_files(version, "sharded", "val")) == 1  # capped at the split's single episode
    assert sorted(read_split(version, "train")) == list(range(9))


def test_default_shard_count_grows_with_episodes(tmp_path):
    version = generate_rlds(tmp_path, name="many", episodes=60, image_size=8, min_steps=1, max_steps=1)
    assert len(shard_files(version, "many", "train")) == 2  # round(54 / 25)
    assert len(shard_files(version, "many", "val")) == 1
    info = tfds.builder_from_directory(str(version)).info
    assert info.splits["train"].num_shards == 2 and info.splits["train"].num_examples == 54


def test_two_calls_same_process_and_other_names(tmp_path):
    a = generate_rlds(tmp_path / "a", episodes=2, image_size=8, max_steps=3)
    b = generate_rlds(tmp_path / "b", episodes=2, image_size=8, max_steps=3)
    c = generate_rlds(tmp_path / "a", name="fractal20220817_data", episodes=2, image_size=8, max_steps=3)
    assert a.exists() and b.exists() and c == tmp_path / "a" / "fractal20220817_data" / "1.0.0"
    assert shard_files(c, "fractal20220817_data", "train")
    assert tfds.builder_from_directory(str(c)).info.features["steps"].feature["observation"]["image_0"].shape == (8, 8, 3)
    with pytest.raises(FileExistsError):
        generate_rlds(tmp_path / "a", episodes=2, image_size=8)


def test_single_episode_has_no_val_split(tmp_path):
    version = generate_rlds(tmp_path, episodes=1, image_size=8, max_steps=3)
    assert list(tfds.builder_from_directory(str(version)).info.splits) == ["train"]


def test_fault_injection(tmp_path):
    version = generate_rlds(tmp_path, episodes=6, image_size=8, max_steps=5, nan_episodes=2, short_episodes=(0, 1, 2))
    train = read_split(version, "train")
    # Regular train ids 0..4, val 5, then the short episodes 6, 7, 8 in train.
    assert sorted(train) == [0, 1, 2, 3, 4, 6, 7, 8]
    assert sorted(read_split(version, "val")) == [5]
    assert train[6]["steps"] is None  # a valid record with an empty steps dataset
    assert len(train[7]["steps"]["action"]) == 1 and len(train[8]["steps"]["action"]) == 2
    np.testing.assert_array_equal(train[8]["steps"]["is_first"], [True, False])
    np.testing.assert_array_equal(train[8]["steps"]["is_last"], [False, True])
    nan_counts = {k: int(np.isnan(ep["steps"]["action"]).sum()) for k, ep in train.items() if ep["steps"] is not None}
    assert nan_counts == {0: 1, 1: 1, 2: 0, 3: 0, 4: 0, 7: 0, 8: 0}
    assert all(np.isfinite(ep["steps"]["observation"]["state"]).all() for ep in train.values() if ep["steps"] is not None)


@pytest.mark.parametrize("bad", [dict(episodes=0), dict(min_steps=0), dict(min_steps=5, max_steps=4),
                                 dict(num_shards=0), dict(nan_episodes=100), dict(short_episodes=(-1,))])
def test_invalid_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_rlds(tmp_path, image_size=8, **{"episodes": 4, **bad})
