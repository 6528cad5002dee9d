"""Model directories that cannot work fail before the pipeline starts, as one line naming the file (issue #15),
and OpenVLA checkpoints without OpenVLA's dependencies say what to install (one line, exit 2)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

import numpy as np
import pytest

from vlaprep.pipelines import cli
from vlaprep.pipelines.validate.layout import ValidationError
from vlaprep.pipelines.validate.model import check_model_dir
from vlaprep.pipelines.validate.openvla import check_openvla_dependencies
from vlaprep.synthetic.model import build_tiny_llava
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, helpers):
    root = tmp_path_factory.mktemp("dirs")
    tokenizer = build_llama_like_tokenizer(root / "tokenizer")
    build_tiny_llava(root / "llava", root / "tokenizer", image_size=32, hidden=64, layers=2)
    rng = np.random.default_rng(0)
    episodes, actions = helpers.bridge_like_episodes(rng, episodes=1, steps=3)
    stats = {"bridge_orig": helpers.statistics_entry(actions, [True] * 6 + [False])}
    stats_path = helpers.write_shards(root / "shards", episodes, stats, tokenizer)
    return {"root": root, "llava": str(root / "llava"), "shards": str(root / "shards"), "stats": stats_path,
            "tokenizer": str(root / "tokenizer")}


def cli_error(tiny, model_dir, capsys, *extra) -> str:
    argv = ["validate", "--shards", tiny["shards"], "--model", str(model_dir), "--output", str(tiny["root"] / "val"),
            "--statistics", tiny["stats"], "--device", "cpu", *extra]
    capsys.readouterr()  # drop what the test's own setup printed (progress bars)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def copy(tiny, tmp_path, name="model"):
    target = tmp_path / name
    shutil.copytree(tiny["llava"], target)
    return target


def test_the_intact_directory_passes(tiny):
    check_model_dir(tiny["llava"], "native")


def test_missing_config(tiny, tmp_path, capsys):
    model = copy(tiny, tmp_path)
    os.remove(model / "config.json")
    assert "config.json" in cli_error(tiny, model, capsys)


def test_missing_weights(tiny, tmp_path, capsys):
    model = copy(tiny, tmp_path)
    os.remove(model / "model.safetensors")
    err = cli_error(tiny, model, capsys)
    assert "model.safetensors" in err and "got none" in err


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_weights(tiny, tmp_path, capsys, keep):
    model = copy(tiny, tmp_path)
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    err = cli_error(tiny, model, capsys)
    assert str(path) in err and "truncated" in err


def test_truncated_header(tiny, tmp_path):
    model = copy(tiny, tmp_path)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValidationError, match="shorter than its header says"):
        check_model_dir(str(model), "native")


def test_sharded_weights_missing_or_truncated_shard(tiny, tmp_path, capsys):
    from vlaprep.pipelines.validate.model import image_text_auto_class

    model = tmp_path / "sharded"
    shutil.copytree(tiny["llava"], model)
    os.remove(model / "model.safetensors")
    image_text_auto_class().from_pretrained(tiny["llava"]).save_pretrained(model, max_shard_size="3MB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    check_model_dir(str(model), "native")
    last = model / shards[-1]
    last.write_bytes(last.read_bytes()[:-10])
    assert shards[-1] in cli_error(tiny, model, capsys)
    os.remove(model / shards[0])
    err = cli_error(tiny, model, capsys)
    assert shards[0] in err and "no such file" in err


def test_missing_tokenizer_and_processor(tiny, tmp_path, capsys):
    model = copy(tiny, tmp_path)
    os.remove(model / "tokenizer.json")
    err = cli_error(tiny, model, capsys)
    assert "tokenizer.json" in err and "tokenizer.model" in err
    model = copy(tiny, tmp_path, "model2")
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (model / name).exists():
            os.remove(model / name)
    assert "processor_config.json" in cli_error(tiny, model, capsys)


def test_unreadable_tokenizer_config(tiny, tmp_path, capsys):
    model = copy(tiny, tmp_path)
    (model / "tokenizer_config.json").write_text("{not json")
    assert "tokenizer_config.json" in cli_error(tiny, model, capsys)


# --------------------------------------------------------------------------------------------------
# OpenVLA layout: remote-code modules and OpenVLA's dependencies


@pytest.fixture
def openvla_layout(tiny, tmp_path):
    """An OpenVLA-layout directory: the checks run before any of its code is imported (stub modules)."""
    model = tmp_path / "openvla"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "openvla",
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
    }))
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(model / "model.safetensors"))
    shutil.copy(os.path.join(tiny["tokenizer"], "tokenizer.json"), model / "tokenizer.json")
    (model / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                     "AutoProcessor": "processing_prismatic.PrismaticProcessor"}}))
    for name in ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"):
        (model / name).write_text("# stub: never imported by these tests\n")
    return model


def test_openvla_layout_needs_its_code_and_preprocessor_config(openvla_layout, tiny, capsys):
    check_model_dir(str(openvla_layout), "remote_code")
    os.remove(openvla_layout / "processing_prismatic.py")
    err = cli_error(tiny, openvla_layout, capsys, "--trust-remote-code")
    assert "processing_prismatic.py" in err
    (openvla_layout / "processing_prismatic.py").write_text("# stub\n")
    os.remove(openvla_layout / "preprocessor_config.json")
    assert "preprocessor_config.json" in cli_error(tiny, openvla_layout, capsys, "--trust-remote-code")


def test_missing_timm_is_one_line_saying_what_to_install(openvla_layout, tiny, capsys, monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "timm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    err = cli_error(tiny, openvla_layout, capsys, "--trust-remote-code")
    assert "timm" in err and "pip install 'vlaprep[openvla]'" in err
    assert not (tiny["root"] / "val" / "validation_report.json").exists()


def test_dependency_check_names_the_problem():
    versions = {"timm": "0.9.16", "torchvision": "0.28.0"}

    def version_of(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    imported = []
    assert check_openvla_dependencies(version_of, imported.append) == versions and imported == ["torchvision", "timm"]
    versions["timm"] = "1.0.9"
    with pytest.raises(ValidationError, match=r"expected timm 0\.9\.10 or .*0\.9\.16 .*got timm 1\.0\.9; hint: pip install 'vlaprep\[openvla\]'"):
        check_openvla_dependencies(version_of, imported.append)
    versions["timm"] = "0.9.12"
    del versions["torchvision"]
    with pytest.raises(ValidationError, match="got no torchvision installed"):
        check_openvla_dependencies(version_of, imported.append)
    versions["torchvision"] = "0.28.0"

    def broken(name):  # the CUDA torchvision wheel against a CPU-only torch
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")

    with pytest.raises(ValidationError) as e:
        check_openvla_dependencies(version_of, broken)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert "RuntimeError: operator torchvision::nms does not exist" in message and "built for another torch" in message


def test_refused_without_trust_remote_code(openvla_layout, tiny, capsys):
    err = cli_error(tiny, openvla_layout, capsys)
    assert "--trust-remote-code" in err
