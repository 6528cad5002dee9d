"""``--mixture NAME --data-dir ROOT`` (and run.yaml ``mixture:`` + ``data_dir:``): OpenVLA's named mixtures
expand into their datasets and weights, found under ROOT as TFDS finds them; a missing one is one line."""

from __future__ import annotations

import json

import pytest

from vlaprep.pipelines import cli, job, run_job
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import REGISTRY

IN_MEMORY = "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner"
# OpenVLA's mixtures.py: "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)]
#                        "rtx": [("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ...]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("oxe")
    generate_rlds(root, name="bridge_orig", episodes=5, image_size=16, max_steps=6, seed=1)
    generate_rlds(root, layout="fractal20220817_data", episodes=5, image_size=16, seed=2)
    return root


def test_mixture_expands_to_openvla_datasets_and_weights(root):
    inputs = job.resolve_inputs(mixture="bridge_rt_1", data_dir=str(root))
    assert [(i.name, i.weight) for i in inputs] == [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)]
    assert all(i.spec is REGISTRY[i.name] for i in inputs)
    assert inputs[1].path.startswith(str(root / "fractal20220817_data"))  # ROOT/NAME/<version>
    # an explicit --dataset of the mixture replaces its path, keeps its weight
    explicit = job.resolve_inputs([f"bridge_orig={inputs[0].path}"], mixture="bridge_rt_1", data_dir=str(root))
    assert [i.name for i in explicit] == ["bridge_orig", "fractal20220817_data"]


def test_stats_with_a_mixture_computes_every_dataset(root, tmp_path, capsys):
    assert cli.main(["stats", "--mixture", "bridge_rt_1", "--data-dir", str(root), "--output", str(tmp_path), IN_MEMORY]) == 0
    statistics = json.loads((tmp_path / "dataset_statistics.json").read_text())
    assert sorted(statistics) == ["bridge_orig", "fractal20220817_data"]


def test_a_missing_mixture_dataset_is_one_line_or_skipped(root, tmp_path, capsys):
    # "rtx" lists kuka, which is not under ROOT
    assert cli.main(["stats", "--mixture", "rtx", "--data-dir", str(root), "--output", str(tmp_path / "a"), IN_MEMORY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'kuka'" in err[0] and "--skip-missing" in err[0]
    assert not (tmp_path / "a" / "dataset_statistics.json").exists()
    assert cli.main(["stats", "--mixture", "rtx", "--data-dir", str(root), "--skip-missing", "--output",
                     str(tmp_path / "b"), IN_MEMORY]) == 0
    statistics = json.loads((tmp_path / "b" / "dataset_statistics.json").read_text())
    assert sorted(statistics) == ["bridge_orig", "fractal20220817_data"]
    assert "skipped" in capsys.readouterr().err


def test_unknown_mixture_and_half_a_mixture_are_one_line(root, tmp_path, capsys):
    assert cli.main(["stats", "--mixture", "nope", "--data-dir", str(root), "--output", str(tmp_path)]) == 2
    assert cli.main(["stats", "--mixture", "bridge", "--output", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "OXE_NAMED_MIXTURES" in lines[0] and "--data-dir" in lines[1]


def test_run_config_mixture(root, tmp_path):
    config = tmp_path / "run.yaml"
    (tmp_path / "tok").mkdir()
    config.write_text(f"output: out\ntokenizer: tok\nmixture: bridge_rt_1\ndata_dir: {root}\n")
    loaded = run_job.load_run_config(str(config))
    inputs = run_job._dataset_inputs(loaded)
    assert [(i.name, i.weight) for i in inputs] == [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)]
    config.write_text("output: out\ntokenizer: tok\nmixture: not_a_mixture\ndata_dir: x\n")
    with pytest.raises(run_job.RunConfigError, match="OXE_NAMED_MIXTURES"):
        run_job.load_run_config(str(config))
