"""Other layouts of the same formats: an RT-1-style RLDS dataset (action dict, language under
observation, raw pixel tensors instead of JPEG, a zlib-encoded tensor) read through a YAML registry
entry, and the built-in `fractal20220817_data` entry on the same data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlaprep.pipelines.sources import resolve_dataset
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.schemas.episode import Episode
from vlaprep.transforms.registry import get_spec, load_registry_yaml

IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def _episodes(n: int):
    rng = np.random.default_rng(42)
    out = []
    for i in range(n):
        t = 4 + i % 5
        out.append({
            "world_vector": rng.normal(size=(t, 3)).astype(np.float32) * 0.1,
            "rotation_delta": rng.normal(size=(t, 3)).astype(np.float32) * 0.1,
            "gripper": rng.choice([-1.0, 0.0, 1.0], size=(t, 1)).astype(np.float32),
            "pose": rng.normal(size=(t, 7)).astype(np.float32),
            "closed": rng.integers(0, 2, size=(t, 1)).astype(np.float32),
            "image": rng.integers(0, 255, size=(t, 8, 8, 3), dtype=np.uint8),
            "text": f"Pick Object {i}",
        })
    return out


class _Rt1Like(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "fractal20220817_data"
    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "steps": tfds.features.Dataset({
                "action": {
                    "world_vector": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    "rotation_delta": tfds.features.Tensor(shape=(3,), dtype=np.float32, encoding=tfds.features.Encoding.ZLIB),
                    "gripper_closedness_action": tfds.features.Tensor(shape=(1,), dtype=np.float32),
                },
                "observation": {
                    "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                    "base_pose_tool_reached": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                    "gripper_closed": tfds.features.Tensor(shape=(1,), dtype=np.float32),
                    "natural_language_instruction": tfds.features.Text(),
                },
                "is_first": np.bool_,
            }),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, ep in enumerate(_episodes(9)):
            steps = []
            for t in range(len(ep["pose"])):
                steps.append({
                    "action": {"world_vector": ep["world_vector"][t], "rotation_delta": ep["rotation_delta"][t],
                               "gripper_closedness_action": ep["gripper"][t]},
                    "observation": {"image": ep["image"][t], "base_pose_tool_reached": ep["pose"][t],
                                    "gripper_closed": ep["closed"][t], "natural_language_instruction": ep["text"]},
                    "is_first": t == 0,
                })
            yield i, {"steps": steps}


@pytest.fixture(scope="module")
def rt1(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt1")
    builder = _Rt1Like(data_dir=str(root))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=2))
    return root / "fractal20220817_data" / "0.1.0"


def test_encoded_tensors_and_raw_pixels_decode(rt1):
    spec = get_spec("fractal20220817_data")
    dataset = resolve_dataset(spec.name, str(rt1), spec)
    episodes = [e for u in dataset.units for e in dataset.iter_episodes(u, ("primary",)) if isinstance(e, Episode)]
    assert len(episodes) == 9
    expected = {ep["text"]: ep for ep in _episodes(9)}
    for e in episodes:
        ref = expected[e.language]
        np.testing.assert_array_equal(e.steps["action/rotation_delta"], ref["rotation_delta"])  # zlib-decoded
        np.testing.assert_array_equal(e.images["primary"], ref["image"])  # raw pixels kept as an array
        assert e.language == ref["text"]  # from observation/natural_language_instruction, case kept


def test_builtin_fractal_entry_statistics(rt1, tmp_path):
    result = run_stats([DatasetInput("fractal20220817_data", str(rt1), get_spec("fractal20220817_data"))],
                       str(tmp_path), beam_args=IN_PROCESS, log=lambda m: None)
    entry = result.statistics["fractal20220817_data"]
    eps = _episodes(9)
    assert entry["num_trajectories"] == 9
    assert entry["num_transitions"] == sum(len(e["pose"]) for e in eps)
    wv = np.concatenate([e["world_vector"] for e in eps])
    assert entry["action"]["min"][:3] == [float(v) for v in wv.min(0)]
    # rel2abs gripper -> values in {0, 0.5, 1}; OpenVLA's rule on -1/0/+1 commands
    assert set(np.unique(np.round(np.array([entry["action"]["min"][6], entry["action"]["max"][6]]), 3))) <= {0.0, 0.5, 1.0}


def test_yaml_registry_entry_on_the_same_data(rt1, tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text(
        "datasets:\n"
        "  my_rt1:\n"
        "    format: rlds\n"
        "    action_keys: [action/world_vector, action/rotation_delta, action/gripper_closedness_action]\n"
        "    action_dim: 7\n"
        "    gripper: clip01\n"
        "    state_keys: [observation/base_pose_tool_reached]\n"
        "    primary_image: observation/image\n"
        "    language_key: observation/natural_language_instruction\n"
    )
    spec = load_registry_yaml(str(registry))["my_rt1"]
    result = run_stats([DatasetInput("my_rt1", str(rt1), spec)], str(tmp_path / "out"), with_proprio=True,
                       beam_args=IN_PROCESS, log=lambda m: None)
    entry = result.statistics["my_rt1"]
    eps = _episodes(9)
    action = np.concatenate([np.concatenate([e["world_vector"], e["rotation_delta"], np.clip(e["gripper"], 0, 1)], 1) for e in eps])
    assert entry["action"]["max"] == [float(v) for v in action.max(0)]
    assert entry["action"]["min"] == [float(v) for v in action.min(0)]
    assert len(entry["proprio"]["mean"]) == 7
