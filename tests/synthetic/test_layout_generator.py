"""`generate_rlds(layout=...)` / `vlaprep generate rlds --layout NAME`: a real TFDS dataset in any OXE
dataset's on-disk layout, whose values exercise OpenVLA's transforms; impossible sizes are usage errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlaprep.pipelines.cli import main
from vlaprep.synthetic import layouts
from vlaprep.synthetic.layouts import SPECIAL_VALUES, generate_layout_rlds, image_shape
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.features import step_features

f32 = np.float32


def read_all(version_dir, skip_decoding=True):
    """{episode index in read order: flat steps} over every split (images / ZLIB stay bytes)."""
    builder = tfds.builder_from_directory(str(version_dir))
    decoders = {"steps": tfds.decode.SkipDecoding()} if skip_decoding else None
    out = []
    for ep in builder.as_dataset(split="all", decoders=decoders, shuffle_files=False):
        flat = {}

        def walk(tree, prefix=""):
            for k, v in tree.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}/")
                else:
                    flat[f"{prefix}{k}"] = v

        steps = ep["steps"] if skip_decoding else next(iter(ep["steps"].batch(1 << 20)))  # decoded: a nested Dataset
        walk(tfds.as_numpy(steps))
        out.append(flat)
    return out


@pytest.fixture(scope="module")
def all_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: generate_layout_rlds(root, name, episodes=4, seed=1, image_size=16) for name in layouts.layouts()}


def test_every_layout_is_written_with_its_features_splits_and_metadata(all_layouts):
    assert len(all_layouts) == 70
    for name, version in all_layouts.items():
        spec = layouts.layout(name)
        assert version.parent.name == name and version.name == "1.0.0"
        written = step_features(json.loads((version / "features.json").read_text()))
        want = {"/".join(f["path"]): f for f in spec["features"]}
        assert set(written) == set(want), name
        for key, f in want.items():
            got = written[key]
            if f["kind"] == "image":
                assert got["kind"] == "image" and got["shape"] == image_shape(f["shape"], 16), (name, key)
                assert got["dtype"] == f["dtype"], (name, key)
                assert got["encoding"] == (f.get("encoding") or ("png" if f["dtype"] != "uint8" else None)), (name, key)
            elif f["kind"] == "tensor":
                assert (got["shape"], got["dtype"]) == (tuple(f["shape"]), f["dtype"]), (name, key)
                assert got["encoding"] == ("zlib" if f.get("encoding") == "zlib" else "none"), (name, key)
            elif f["kind"] == "text":
                assert got["kind"] == "text", (name, key)
            else:  # Tensor(string)
                assert (got["kind"], got["dtype"]) == ("tensor", "string"), (name, key)
        info = tfds.builder_from_directory(str(version)).info
        assert list(info.splits) == spec["splits"][: len(info.splits)] and len(info.splits) == min(2, len(spec["splits"]))
        meta = info.features["episode_metadata"] if spec["episode_metadata"] else None
        assert (meta is not None) == bool(spec["episode_metadata"])


def test_episode_lengths_language_and_splits(all_layouts):
    version = all_layouts["libero_10_no_noops"]  # one split only: every episode in train
    episodes = read_all(version)
    lengths = sorted(len(ep["action"]) for ep in episodes)
    assert lengths == [1, 2, 3, 7]
    by_length = {len(ep["action"]): ep for ep in episodes}
    assert set(by_length[2]["language_instruction"]) == {b""}  # episode 1: empty instruction
    per_step = [t.decode() for t in by_length[7]["language_instruction"]]  # episode 3: changes along it
    assert per_step[0] == "" and len(set(per_step[1:])) == 1 and per_step[1]
    for ep in episodes:
        n = len(ep["action"])
        np.testing.assert_array_equal(ep["is_first"], np.arange(n) == 0)
        np.testing.assert_array_equal(ep["is_last"], np.arange(n) == n - 1)
    bridge = tfds.builder_from_directory(str(all_layouts["bridge_orig"])).info
    assert bridge.splits["train"].num_examples == 3 and bridge.splits["val"].num_examples == 1


def test_language_table_instruction_is_int32_code_points(all_layouts):
    for ep in read_all(all_layouts["language_table"]):
        codes = ep["observation/instruction"]
        assert codes.dtype == np.int32 and codes.shape[1] == 512
        text = "".join(chr(c) for c in codes[-1] if c)
        assert text == "" or text in layouts.INSTRUCTIONS


def test_kuka_state_is_zlib_compressed_float32(all_layouts):
    import zlib

    raw = read_all(all_layouts["kuka"])
    decoded = read_all(all_layouts["kuka"], skip_decoding=False)
    for ep in raw:
        values = ep["observation/clip_function_input/base_pose_tool_reached"]
        assert values.dtype == object  # bytes, as OpenVLA reads them
        rows = np.stack([np.frombuffer(zlib.decompress(v), "<f4") for v in values])
        assert rows.shape == (len(values), 7)
        match = [d for d in decoded if len(d["action/world_vector"]) == len(values)
                 and np.array_equal(d["observation/clip_function_input/base_pose_tool_reached"], rows)]
        assert match


def test_values_hit_every_gripper_threshold_and_quaternions_are_unit(tmp_path):
    version = generate_layout_rlds(tmp_path, "furniture_bench_dataset_converted_externally_to_rlds", episodes=12,
                                   image_size=8, max_steps=30)
    action = np.concatenate([ep["action"] for ep in read_all(version)])
    grip = action[:, -1]
    for threshold in (0.05, 0.95, 0.1, -0.1, 0.0, 1.0):
        t = f32(threshold)
        assert (grip == t).any() and (grip == np.nextafter(t, f32(-1))).any() and (grip == np.nextafter(t, f32(2))).any(), threshold
    assert ((grip > 0.05) & (grip < 0.95)).any() and (grip > 1).any() and (grip < 0).any()
    q = action[:, 3:7].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    s = f32(np.sqrt(0.5))
    assert any(np.array_equal(r, [0, s, 0, s]) for r in action[:, 3:7])  # a gimbal lock
    assert any(np.array_equal(r, [0, 0, 0, 1]) for r in action[:, 3:7])  # the identity
    assert set(layouts.quaternion_slices(layouts.layout("cmu_playing_with_food"))) == {"action"}
    assert f32(0.95) in np.asarray(SPECIAL_VALUES, f32)


def test_same_seed_same_bytes(tmp_path):
    a = generate_layout_rlds(tmp_path / "a", "droid", episodes=3, seed=4, image_size=8)
    b = generate_layout_rlds(tmp_path / "b", "droid", episodes=3, seed=4, image_size=8)
    c = generate_layout_rlds(tmp_path / "c", "droid", episodes=3, seed=5, image_size=8)
    names = sorted(p.name for p in a.glob("*.tfrecord-*"))
    assert names and names == sorted(p.name for p in b.glob("*.tfrecord-*"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names)


def test_generate_rlds_delegates_and_rejects_bridge_only_options(tmp_path):
    version = generate_rlds(tmp_path, layout="toto", episodes=2, image_size=8, num_shards=2)
    assert version == tmp_path / "toto" / "1.0.0"
    assert len(list(version.glob("toto-train.tfrecord-*"))) == 1  # capped at the split's one episode
    assert generate_rlds(tmp_path, name="my_toto", layout="toto", episodes=1, image_size=8).parent.name == "my_toto"
    with pytest.raises(ValueError, match=r"Bridge-only options \['nan_episodes'\]"):
        generate_rlds(tmp_path / "x", layout="toto", nan_episodes=1)
    with pytest.raises(KeyError, match="expected an OXE layout name, got 'nope'"):
        generate_layout_rlds(tmp_path, "nope")


@pytest.mark.parametrize("bad", [dict(episodes=0), dict(image_size=0), dict(image_size=100_000), dict(num_shards=0),
                                 dict(max_steps=2)])
def test_layout_generator_rejects_impossible_sizes(tmp_path, bad):
    with pytest.raises(ValueError, match="expected"):
        generate_layout_rlds(tmp_path, "toto", **{"image_size": 8, **bad})


# --- CLI ---------------------------------------------------------------------------------------------
def test_cli_generate_layout(tmp_path, capsys):
    assert main(["generate", "rlds", "--layout", "bc_z", "--output", str(tmp_path), "--episodes", "3",
                 "--image-size", "8"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path == str(tmp_path / "bc_z" / "1.0.0")
    written = step_features(json.loads((tmp_path / "bc_z" / "1.0.0" / "features.json").read_text()))
    assert written["action/future/target_close"]["shape"] == (10,)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rlds", "--episodes", "-1"], "expected --episodes >= 1, got -1"),
        (["rlds", "--image-size", "0"], "expected --image-size between 8 and 4096 pixels, got 0"),
        (["rlds", "--image-size", "100000"], "expected --image-size between 8 and 4096 pixels, got 100000"),
        (["rlds", "--shards", "0"], "expected --shards >= 1, got 0"),
        (["rlds", "--layout", "nope"], "expected --layout to be one of OpenVLA's OXE datasets, got 'nope'"),
        (["calvin", "--frames", "0"], "expected --frames >= 248 (each split needs 50 frames), got 0"),
    ],
)
def test_cli_rejects_impossible_sizes_with_one_line(tmp_path, capsys, argv, message):
    fmt, *rest = argv
    assert main(["generate", fmt, "--output", str(tmp_path / "out"), *rest]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("vlaprep generate: error: ")
    assert not (tmp_path / "out").exists()


def test_cli_existing_output_is_one_line(tmp_path, capsys):
    argv = ["generate", "rlds", "--layout", "toto", "--output", str(tmp_path), "--episodes", "1", "--image-size", "8"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err
