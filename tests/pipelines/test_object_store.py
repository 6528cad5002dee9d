"""``gs://`` datasets and outputs: the same bytes as local runs, through Beam's GCS filesystem.

The bucket is a local ``gcp-storage-emulator`` (see ``tests/conftest.py``); the real google-cloud-storage
client and Beam's ``GCSFileSystem`` do every read and write. The expected outputs are the same pipeline's
outputs on local paths, which the rest of the suite checks against NumPy.
"""

import json

import pytest

from vlaprep import paths
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
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


@pytest.mark.timeout(400)
def test_shards_on_gcs_identical_to_local(tmp_path, gcs_prefix, rlds_dir):
    from vlaprep.pipelines.shards.job import run_shards
    from vlaprep.pipelines.shards.publish import verify_output
    from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

    build_llama_like_tokenizer(tmp_path / "tok")
    spec = get_spec("bridge_orig")
    run_stats([DatasetInput("bridge_orig", str(rlds_dir), spec)], str(tmp_path / "stats"), **QUIET)
    remote_in = paths.join(gcs_prefix, "in")
    paths.copy_tree(str(rlds_dir), paths.join(remote_in, "rlds"))
    paths.copy_tree(str(tmp_path / "tok"), paths.join(remote_in, "tok"))
    paths.copy_file(str(tmp_path / "stats" / "dataset_statistics.json"), paths.join(remote_in, "dataset_statistics.json"))
    options = dict(heldout_fraction=0.3, image_size=16, target_shard_mb=0.02, **QUIET)
    local = run_shards([DatasetInput("bridge_orig", str(rlds_dir), spec)], str(tmp_path / "stats" / "dataset_statistics.json"),
                       str(tmp_path / "tok"), str(tmp_path / "local"), **options)
    out = paths.join(gcs_prefix, "shards")
    for _ in range(2):  # the second run replaces the first in place (publish over an existing output)
        remote = run_shards([DatasetInput("bridge_orig", paths.join(remote_in, "rlds"), spec)],
                            paths.join(remote_in, "dataset_statistics.json"), paths.join(remote_in, "tok"), out, **options)
    # Input fingerprints record how the inputs were seen (BLAKE2b of local files, the store's CRC32C of
    # objects), so they differ by location; everything else in the manifest is identical.
    for manifest in (remote.manifest, local.manifest):
        assert len(manifest["inputs"]["datasets"]["bridge_orig"].pop("rows_fingerprint")) == 64
    assert remote.manifest == local.manifest
    assert len(local.manifest["files"]) >= 3
    for entry in local.manifest["files"] + [local.manifest["quarantine"]]:
        assert paths.read_bytes(paths.join(out, entry["path"])) == (tmp_path / "local" / entry["path"]).read_bytes()
    verify_output(out)
    local_names = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert [n for n, _ in paths.list_files(out)] == local_names  # no staging, spill or old copies left in the bucket


@pytest.mark.timeout(600)
def test_run_publishes_versions_in_the_bucket_and_matches_local(tmp_path, gcs_prefix, rlds_dir, calvin_dir):
    """`vlaprep run` with datasets and output in the bucket: every stage (validation fetches the held-out
    split), the LATEST pointer, and reuse on the next run; the same bytes as a local run."""
    import yaml

    from vlaprep.pipelines.run_job import load_run_config, run_pipeline_config, status
    from vlaprep.synthetic.model import build_tiny_llava
    from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

    build_llama_like_tokenizer(tmp_path / "tok")
    build_tiny_llava(tmp_path / "model", tmp_path / "tok", image_size=16)
    paths.copy_tree(str(rlds_dir), paths.join(gcs_prefix, "rlds"))
    paths.copy_tree(str(calvin_dir), paths.join(gcs_prefix, "calvin"))

    def config(output, rlds, calvin):
        doc = {
            "output": output, "tokenizer": str(tmp_path / "tok"), "model": str(tmp_path / "model"),
            "datasets": [{"name": "bridge_orig", "path": rlds}, {"name": "calvin", "path": calvin}],
            "shards": {"image_size": 16, "heldout_fraction": 0.3, "target_shard_mb": 0.05},
            "validate": {"max_samples": 4, "batch_size": 4}, "beam_args": IN_PROCESS,
        }
        path = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return load_run_config(str(path))

    local = run_pipeline_config(config(str(tmp_path / "out"), str(rlds_dir), str(calvin_dir)), log=lambda m: None)
    out = paths.join(gcs_prefix, "runs")
    remote_config = config(out, paths.join(gcs_prefix, "rlds"), paths.join(gcs_prefix, "calvin"))
    remote = run_pipeline_config(remote_config, log=lambda m: None)
    assert remote["accounting"] == local["accounting"] and remote["splits"] == local["splits"]
    latest = json.loads(paths.read_text(paths.join(out, "LATEST")))
    assert latest["version"] == remote["version"]
    vdir = paths.join(out, "versions", remote["version"])
    local_vdir = tmp_path / "out" / "versions" / local["version"]
    assert paths.read_bytes(paths.join(vdir, "stats/dataset_statistics.json")) == (local_vdir / "stats/dataset_statistics.json").read_bytes()
    manifests = [json.loads(paths.read_text(paths.join(vdir, "shards/manifest.json"))),
                 json.loads((local_vdir / "shards/manifest.json").read_text())]
    for manifest in manifests:  # input fingerprints differ by location (see the shards test); nothing else
        for entry in manifest["inputs"]["datasets"].values():
            entry.pop("rows_fingerprint")
    assert manifests[0] == manifests[1]
    report = json.loads(paths.read_text(paths.join(vdir, "validation", "validation_report.json")))
    local_report = json.loads((local_vdir / "validation" / "validation_report.json").read_text())
    assert report["round_trip"] == local_report["round_trip"] and report["shards"] == paths.join(vdir, "shards")
    logs = []
    assert run_pipeline_config(remote_config, log=logs.append) == remote
    assert any("nothing to do" in line for line in logs)
    assert status(out).startswith(f"{out}: published {remote['version']}")


def test_bucket_fingerprints_follow_content_not_names(gcs_prefix):
    """Remote digests come from the store's checksums: equal bytes give equal digests under any name;
    a rewrite with other bytes changes them; nothing missing goes unnoticed."""
    from vlaprep.pipelines import fingerprint

    a, b, c = (paths.join(gcs_prefix, "d", n) for n in ("a.bin", "sub/b.bin", "c.bin"))
    paths.write_bytes_atomic(a, b"same bytes")
    paths.write_bytes_atomic(b, b"same bytes")
    paths.write_bytes_atomic(c, b"other bytes")
    found = fingerprint.digests([a, b, c])
    assert found[a] == found[b] != found[c]
    assert found[a][0] == len(b"same bytes") and found[a][1].startswith("store:crc32c:")
    paths.write_bytes_atomic(a, b"same bytez")
    assert fingerprint.digests([a])[a] != found[a]
    with pytest.raises(FileNotFoundError):
        fingerprint.digests([a, paths.join(gcs_prefix, "d", "missing.bin")])


@pytest.mark.timeout(300)
def test_incremental_stats_in_the_bucket(tmp_path, gcs_prefix, rlds_dir, calvin_dir):
    """A changed object in one dataset recomputes that dataset only; the result equals a local scratch run."""
    import numpy as np

    rlds, calvin = paths.join(gcs_prefix, "rlds"), paths.join(gcs_prefix, "calvin")
    paths.copy_tree(str(rlds_dir), rlds)
    paths.copy_tree(str(calvin_dir), calvin)
    inputs = [DatasetInput("bridge_orig", rlds, get_spec("bridge_orig")), DatasetInput("calvin", calvin, get_spec("calvin"))]
    out = paths.join(gcs_prefix, "stats")
    first = run_stats(inputs, out, **QUIET)
    # Change one CALVIN frame's relative action, in the bucket and in a local copy for the reference.
    local_copy = tmp_path / "calvin"
    paths.copy_tree(calvin, str(local_copy))
    from vlaprep.pipelines.sources.calvin import calvin_frame_path, list_calvin_windows

    window = list_calvin_windows(str(local_copy))[0]
    frame = local_copy / calvin_frame_path(window.split_dir, window.start + 1)
    with np.load(frame) as z:
        data = dict(z)
    data["rel_actions"] = np.clip(data["rel_actions"] + 0.25, -1, 1)
    np.savez(frame, **data)
    paths.copy_file(str(frame), paths.join(calvin, frame.relative_to(local_copy).as_posix()))
    again = run_stats(inputs, out, **QUIET)
    assert again.reused == ["bridge_orig"] and again.computed == ["calvin"]
    scratch = run_stats([inputs[0], DatasetInput("calvin", str(local_copy), get_spec("calvin"))], str(tmp_path / "scratch"), **QUIET)
    assert paths.read_bytes(paths.join(out, "dataset_statistics.json")) == (tmp_path / "scratch" / "dataset_statistics.json").read_bytes()
    assert scratch.statistics["calvin"]["action"] != first.statistics["calvin"]["action"]  # the edit is visible
