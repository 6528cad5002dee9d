"""Each stage option is defined once (``pipelines/options.py``); the CLI, ``run.yaml`` and the Dataflow
template agree with that definition by construction. Checked here from the outside: the real argparse
parser, run_job's key tables, the launcher's tables and ``infra/dataflow/metadata.json``."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from vlaprep.pipelines import cli, run_job
from vlaprep.pipelines.options import OPTION_SETS, SHARD_OPTIONS, STATS_OPTIONS, VALIDATE_OPTIONS, Option, OptionSet
from vlaprep.pipelines.shards.options import ShardsArgumentError, check_options

INFRA = pathlib.Path(__file__).resolve().parents[2] / "infra"


def _subparser(command: str):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command]


def _launcher():
    spec = importlib.util.spec_from_file_location("launcher", INFRA / "dataflow" / "launcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda s: s.stage)
def test_cli_flags_are_the_option_set(options: OptionSet):
    actions = {a.dest: a for a in _subparser(options.stage)._actions}
    for o in options:
        action = actions[o.name]
        assert o.flag in action.option_strings
        assert action.default == o.default
        if o.kind is not bool:
            assert action.type is o.kind


@pytest.mark.parametrize(("options", "keys"), [
    (STATS_OPTIONS, run_job.STATS_KEYS), (SHARD_OPTIONS, run_job.SHARD_KEYS), (VALIDATE_OPTIONS, run_job.VALIDATE_KEYS),
], ids=["stats", "shards", "validate"])
def test_run_yaml_keys_are_the_option_set(options, keys):
    assert [k.name for k in keys] == list(options.names)


def test_template_parameters_are_the_option_sets():
    launcher = _launcher()
    params = {**launcher.VALUE_PARAMETERS, **launcher.BOOL_PARAMETERS}
    for options in (STATS_OPTIONS, SHARD_OPTIONS):
        for o in options:
            assert params[o.name] == (o.flag, (options.stage,))
    declared = {p["name"] for p in json.loads((INFRA / "dataflow" / "metadata.json").read_text())["parameters"]}
    assert set(STATS_OPTIONS.names) | set(SHARD_OPTIONS.names) <= declared


def test_shard_options_are_checked_by_the_stage_for_every_entry_point(tmp_path):
    # the same value is refused the same way by the stage's check, run.yaml and the CLI
    with pytest.raises(ShardsArgumentError, match="image-size"):
        check_options(image_size=100000)
    with pytest.raises(ShardsArgumentError, match="unknown"):
        check_options(image_sise=224)
    assert check_options()["image_size"] == SHARD_OPTIONS.defaults()["image_size"]
    config = tmp_path / "run.yaml"
    config.write_text("output: out\ntokenizer: tok\ndatasets: [{name: bridge_orig, path: data}]\nshards: {image_size: 100000}\n")
    with pytest.raises(run_job.RunConfigError, match="image-size.*shards.image_size"):
        run_job.load_run_config(str(config))


def test_an_option_set_refuses_a_name_twice():
    with pytest.raises(ValueError, match="once"):
        OptionSet("x", (Option("a", int, 1, "h"), Option("a", int, 2, "h")))


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "gpu", "expected --device auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("--batch-size", "0", "expected --batch-size >= 1, got 0"),
    ("--max-samples", "0", "expected --max-samples >= 1, got 0"),
])
def test_validate_options_are_one_line_user_errors(tmp_path, capsys, flag, value, message):
    argv = ["validate", "--shards", str(tmp_path), "--model", str(tmp_path), "--output", str(tmp_path / "v"), flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"vlaprep validate: error: {message}\n"
