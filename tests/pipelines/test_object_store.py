"""``gs://`` datasets and outputs: the same bytes as local runs, through Beam's GCS filesystem.

The bucket is a local ``gcp-storage-emulator`` (see ``tests/conftest.py``); the real google-cloud-storage
client and Beam's ``GCSFileSystem`` do every read and write. The expected outputs are the same pipeline's
outputs on local paths, which the rest of the suite checks against NumPy.
"""

import json

import pytest

from vlaprep import paths
from vlaprep.pipelines.stats_job import DatasetInput, run_stats
from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import get_spec

IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]
QUIET = dict(beam_args=IN_PROCESS, log=lambda m: None)


@pytest.fixture(scope="module")
def rlds_dir(tmp_path_factory):
    return generate_rlds(tmp_path_factory.mktemp("gcs-rlds"), episodes=10, seed=4, image_size=32, num_shards=3,
                         nan_episodes=1)


@pytest.fixture(scope="module")
def calvin_dir(tmp_path_factory):
    return generate_calvin(tmp_path_factory.mktemp("gcs-calvin"), frames=300, val_fraction=0.25, seed=2, image_static=32, image_gripper=16)


def test_paths_round_trip_on_the_bucket(gcs_prefix):
    target = paths.join(gcs_prefix, "a", "b.json")
    paths.write_bytes_atomic(target, b'{"x": 1}')
    paths.write_bytes_atomic(paths.join(gcs_prefix, "a", "c", "d.bin"), b"\x00" * 5)
    assert paths.read_bytes(target) == b'{"x": 1}'
    assert paths.list_files(gcs_prefix) == [("a/b.json", 8), ("a/c/d.bin", 5)]
    assert paths.listdir(paths.join(gcs_prefix, "a")) == ["b.json", "c"]
    assert paths.isdir(paths.join(gcs_prefix, "a", "c")) and not paths.isdir(paths.join(gcs_prefix, "zz"))
    with pytest.raises(RuntimeError):
        with paths.open_write_atomic(paths.join(gcs_prefix, "a", "failed.json")) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert not paths.exists(paths.join(gcs_prefix, "a", "failed.json"))  # an aborted upload never appears
    paths.remove_tree(paths.join(gcs_prefix, "a"))
    assert paths.list_files(gcs_prefix) == []


@pytest.mark.timeout(300)
def test_stats_on_gcs_identical_to_local(tmp_path, gcs_prefix, rlds_dir, calvin_dir):
    paths.copy_tree(str(rlds_dir), paths.join(gcs_prefix, "rlds"))
    paths.copy_tree(str(calvin_dir), paths.join(gcs_prefix, "calvin"))
    spec = get_spec("bridge_orig")

    def inputs(rlds, calvin):
        return [DatasetInput("bridge_orig", rlds, spec), DatasetInput("calvin", calvin, get_spec("calvin"))]

    local = run_stats(inputs(str(rlds_dir), str(calvin_dir)), str(tmp_path / "local"), **QUIET)
    out = paths.join(gcs_prefix, "stats")
    remote = run_stats(inputs(paths.join(gcs_prefix, "rlds"), paths.join(gcs_prefix, "calvin")), out, **QUIET)
    assert remote.computed == ["bridge_orig", "calvin"]
    for name in ("dataset_statistics.json", "quarantine.jsonl"):
        assert paths.read_bytes(paths.join(out, name)) == (tmp_path / "local" / name).read_bytes(), name
    assert len(local.quarantine) == 1  # the NaN episode, reported the same way from the bucket
    # No work directory is left behind in the bucket; projections and the cache are there.
    names = [n for n, _ in paths.list_files(out)]
    assert not [n for n in names if n.startswith(".stats-work-")]
    assert "dataset_statistics.cache.json" in names and any(n.startswith("stats_cache/bridge_orig/") for n in names)
    # A second run finds the cache in the bucket and reads nothing.
    again = run_stats(inputs(paths.join(gcs_prefix, "rlds"), paths.join(gcs_prefix, "calvin")), out, **QUIET)
    assert again.reused == ["bridge_orig", "calvin"] and again.computed == []
    assert json.loads(paths.read_text(paths.join(out, "dataset_statistics.json"))) == local.statistics
