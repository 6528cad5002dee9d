"""`vlaprep run` / `vlaprep status` with a bad run.yaml, a bad config file or a damaged output: every
case through the real CLI entry, exit 2, exactly one stderr line naming the key, and nothing done (no
stage runs, nothing written under the output)."""

import builtins
import errno
import inspect
import json
import os

import pytest
import yaml

from vlaprep import paths
from vlaprep.pipelines import cli, run_job
from vlaprep.pipelines.shards.options import ShardsArgumentError
from vlaprep.pipelines.run_job import RunConfig, RunConfigError, load_run_config
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real 4-episode RLDS dataset and tokenizer: the bad configs below would otherwise run."""
    root = tmp_path_factory.mktemp("runcfg")
    generate_rlds(root / "rlds", episodes=4, seed=5, image_size=32, num_shards=1)
    build_llama_like_tokenizer(root / "tok")
    return root


def base_config(root) -> dict:
    return {
        "output": str(root / "out"),
        "tokenizer": str(root / "tok"),
        "datasets": [{"name": "bridge_orig", "path": str(root / "rlds" / "bridge_orig" / "1.0.0")}],
        "shards": {"image_size": 16, "heldout_fraction": 0.25},
        "validate": {"max_samples": 4},
    }


def one_error_line(capsys, command="run") -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlaprep {command}: error: "), lines[0]
    return lines[0]


def _with(root, **changes) -> dict:
    doc = base_config(root)
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            doc[section] = {**(doc.get(section) or {}), sub: value}
        else:
            doc[section] = value
    return doc


def _dataset(root, **fields):
    return [{"name": "bridge_orig", "path": str(root / "rlds" / "bridge_orig" / "1.0.0"), **fields}]


# (id, changes to the valid config, text the one-line error must contain)
BAD = [
    ("remote-code-string-false", {"trust_remote_code": "false"}, "trust_remote_code"),
    ("remote-code-string-no", {"trust_remote_code": "no"}, "trust_remote_code"),
    ("remote-code-int", {"trust_remote_code": 0}, "trust_remote_code"),
    ("keep-string", {"keep_versions": "abc"}, "keep_versions"),
    ("keep-zero", {"keep_versions": 0}, "keep_versions"),
    ("keep-bool", {"keep_versions": True}, "keep_versions"),
    ("keep-float", {"keep_versions": 2.5}, "keep_versions"),
    ("beam-args-string", {"beam_args": "--direct_num_workers=2"}, "beam_args"),
    ("beam-args-ints", {"beam_args": [1, 2]}, "beam_args"),
    ("stats-yes", {"stats": True}, "stats"),
    ("stats-unknown", {"stats": {"proprio": False, "histograms": True}}, "histograms"),
    ("stats-proprio-string", {"stats": {"proprio": "true"}}, "stats.proprio"),
    ("output-list", {"output": ["a", "b"]}, "for output"),
    ("tokenizer-int", {"tokenizer": 3}, "for tokenizer"),
    ("model-bool", {"model": True}, "for model"),
    ("unknown-top", {"shard": {"seed": 1}}, "shard"),
    ("datasets-empty", {"datasets": []}, "for datasets"),
    ("datasets-string", {"datasets": "bridge_orig"}, "for datasets"),
    ("datasets-no-path", {"datasets": [{"name": "bridge_orig"}]}, "datasets[0].path"),
    ("datasets-unknown", {"datasets": "extra"}, "sampling"),
    ("dataset-name-int", {"datasets": [{"name": 7, "path": "."}]}, "datasets[0].name"),
    ("duplicate-dataset", {"datasets": "dup"}, "'bridge_orig' twice"),
    ("weight-abc", {"datasets": ("weight", "abc")}, "datasets[0].weight"),
    ("weight-inf", {"datasets": ("weight", float("inf"))}, "datasets[0].weight"),
    ("weight-nan", {"datasets": ("weight", float("nan"))}, "datasets[0].weight"),
    ("weight-bool", {"datasets": ("weight", True)}, "datasets[0].weight"),
    ("weight-negative", {"datasets": ("weight", -1)}, "datasets[0].weight"),
    ("shards-not-mapping", {"shards": "image_size=16"}, "for shards"),
    ("shards-unknown", {"shards__resize": 16}, "resize"),
    ("encoding-bogus", {"shards__action_encoding": "bogus"}, "shards.action_encoding"),
    ("encoding-int", {"shards__action_encoding": 5}, "shards.action_encoding"),
    ("normalization-bogus", {"shards__normalization": "bounds_q42"}, "shards.normalization"),
    ("cameras-wrist-only", {"shards__cameras": "wrist"}, "shards.cameras"),
    ("cameras-twice", {"shards__cameras": ["primary", "primary"]}, "shards.cameras"),
    ("image-size-string", {"shards__image_size": "16"}, "shards.image_size"),
    ("image-size-zero", {"shards__image_size": 0}, "shards.image_size"),
    ("image-size-bool", {"shards__image_size": True}, "shards.image_size"),
    ("heldout-one", {"shards__heldout_fraction": 1.0}, "shards.heldout_fraction"),
    ("heldout-nan", {"shards__heldout_fraction": float("nan")}, "shards.heldout_fraction"),
    ("seed-float", {"shards__seed": 1.5}, "shards.seed"),
    ("target-zero", {"shards__target_shard_mb": 0}, "shards.target_shard_mb"),
    ("target-inf", {"shards__target_shard_mb": float("inf")}, "shards.target_shard_mb"),
    ("target-string", {"shards__target_shard_mb": "64"}, "shards.target_shard_mb"),
    ("chunk-zero", {"shards__action_chunk": 0}, "shards.action_chunk"),
    ("split-bogus", {"validate__split": "validation"}, "validate.split"),
    ("batch-zero", {"validate__batch_size": 0}, "validate.batch_size"),
    ("batch-string", {"validate__batch_size": "8"}, "validate.batch_size"),
    ("batch-bool", {"validate__batch_size": True}, "validate.batch_size"),
    ("device-gpu", {"validate__device": "gpu"}, "validate.device"),
    ("max-samples-zero", {"validate__max_samples": 0}, "validate.max_samples"),
    ("max-samples-float", {"validate__max_samples": 2.5}, "validate.max_samples"),
    ("validate-unknown", {"validate__trust_remote_code": True}, "trust_remote_code"),
]


def _bad_doc(root, changes):
    changes = dict(changes)
    datasets = changes.pop("datasets", None)
    doc = _with(root, **changes)
    if isinstance(datasets, tuple):
        doc["datasets"] = _dataset(root, **{datasets[0]: datasets[1]})
    elif datasets == "dup":
        doc["datasets"] = _dataset(root) * 2
    elif datasets == "extra":
        doc["datasets"] = _dataset(root, sampling=0.5)
    elif datasets is not None:
        doc["datasets"] = datasets
    return doc


@pytest.mark.parametrize("changes,named", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_value_is_one_line_naming_the_key_and_nothing_runs(inputs, tmp_path, capsys, changes, named):
    doc = _bad_doc(inputs, changes)
    if "output" not in changes:
        doc["output"] = str(tmp_path / "out")  # a fresh output: nothing may appear in it
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["run", "--config", str(path)]) == 2
    line = one_error_line(capsys)
    assert named in line, line
    assert "run.yaml" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(RunConfigError):
        load_run_config(str(path))


def test_hint_of_a_quoted_boolean(inputs, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_with(inputs, trust_remote_code="false")))
    assert cli.main(["run", "--config", str(path)]) == 2
    assert one_error_line(capsys) == (
        f"vlaprep run: error: expected a boolean (true or false), got 'false' (a string) for trust_remote_code in "
        f"{path}; hint: write true or false without quotes")


def test_remote_code_string_is_refused_also_when_built_in_code(inputs):
    """`bool("false")` is True: a RunConfig built in code must refuse the string too, never turn it on."""
    good = load_run_config_from(inputs, base_config(inputs))
    assert good.trust_remote_code is False
    with pytest.raises(RunConfigError, match="trust_remote_code"):
        RunConfig(**{f: getattr(good, f) for f in ("output", "tokenizer", "model", "registry", "datasets", "stats",
                                                   "shards", "validate", "beam_args")}, trust_remote_code="false")
    enabled = load_run_config_from(inputs, _with(inputs, trust_remote_code=True))
    assert enabled.trust_remote_code is True


def load_run_config_from(root, doc, name="ok.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(doc))
    return load_run_config(str(path))


def test_valid_config_is_typed_and_keeps_only_the_written_options(inputs):
    doc = _with(inputs, beam_args=["--direct_num_workers=1"], keep_versions=2, stats={"proprio": True})
    doc["datasets"] = _dataset(inputs, weight=2)
    doc["shards"]["cameras"] = ["primary", "wrist"]
    doc["validate"] = {"device": "cuda:1", "max_samples": None}
    config = load_run_config_from(inputs, doc)
    assert config.datasets == ({"name": "bridge_orig", "path": doc["datasets"][0]["path"], "weight": 2.0},)
    assert type(config.datasets[0]["weight"]) is float
    assert config.beam_args == ("--direct_num_workers=1",) and config.keep_versions == 2
    assert config.stats == {"proprio": True}
    assert config.shards == {"image_size": 16, "heldout_fraction": 0.25, "cameras": ["primary", "wrist"]}
    assert config.validate == {"device": "cuda:1", "max_samples": None}
    assert config.model is None and config.registry is None and config.trust_remote_code is False
    assert run_job.option(config.validate, run_job.VALIDATE_KEYS, "batch_size") == 8  # the table's default


def test_tables_match_the_stages_parameters():
    """A key added to a table reaches its stage: the shard keys are exactly the options run_shards checks
    (it refuses any other) and the validate keys are run_validate parameters."""
    from vlaprep.pipelines.shards.options import check_options
    from vlaprep.pipelines.validate.job import run_validate

    from vlaprep.pipelines.options import SHARD_OPTIONS

    defaults = SHARD_OPTIONS.defaults()
    check_options(**{k.name: defaults[k.name] for k in run_job.SHARD_KEYS})  # every key is an option it takes
    with pytest.raises(ShardsArgumentError, match="unknown"):
        check_options(**{k.name: defaults[k.name] for k in run_job.SHARD_KEYS}, not_an_option=1)
    assert {k.name for k in run_job.VALIDATE_KEYS} <= set(inspect.signature(run_validate).parameters)


def test_bad_shard_option_fails_before_statistics(inputs, tmp_path, capsys):
    """`shards: {action_encoding: bogus}` (and a value only the shard stage's own checks refuse) fail
    before any stage: no statistics directory, no output at all."""
    for shards, key in (({"action_encoding": "bogus"}, "shards.action_encoding"),
                        ({"normalization": "fixed:1,-1"}, "shards.normalization")):
        doc = _with(inputs, shards=shards)
        doc["output"] = str(tmp_path / "out")
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert cli.main(["run", "--config", str(path)]) == 2
        assert key in one_error_line(capsys)
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.rglob("dataset_statistics.json"))


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("output: out\ntokenizer: tok\ndatasets: [{name: bridge_orig, path: .}\nshards: {}\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    line = one_error_line(capsys)
    assert f"expected valid YAML in {path}" in line and "line 4" in line, line


def test_key_written_twice_is_refused(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("output: out\ntokenizer: tok\noutput: elsewhere\ndatasets: [{name: bridge_orig, path: .}]\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    line = one_error_line(capsys)
    assert "'output' twice" in line and "line 3" in line, line


def test_config_that_is_a_directory(tmp_path, capsys):
    assert cli.main(["run", "--config", str(tmp_path)]) == 2
    assert "directory" in one_error_line(capsys)


def test_unreadable_config(tmp_path, capsys, monkeypatch):
    """Permission denied on the config (injected at its one open(): tests may run as root)."""
    path = tmp_path / "run.yaml"
    path.write_text("output: out\n")

    def denied(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(paths, "open", denied, raising=False)
    assert cli.main(["run", "--config", str(path)]) == 2
    line = one_error_line(capsys)
    assert "Permission denied" in line and str(path) in line, line


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", b"output: out\x00\x01\n"],
                         ids=["binary", "nul-bytes"])
@pytest.mark.parametrize("command", ["run", "status"])
def test_binary_config(tmp_path, capsys, content, command):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    argv = ["run", "--config", str(path)] if command == "run" else ["status", str(path)]
    assert cli.main(argv) == 2
    assert str(path) in one_error_line(capsys, command)


@pytest.mark.parametrize("text,named", [
    ("{{{{ not: yaml", "valid YAML"),
    ("- a\n- list\n", "expected a mapping"),
    ("just a sentence\n", "expected a mapping"),
    ("name: my_model\nlayers: 32\n", "unknown ['layers', 'name']"),
], ids=["not-yaml", "list", "scalar", "other-mapping"])
def test_status_on_a_file_that_is_not_a_run_config(tmp_path, capsys, text, named):
    path = tmp_path / "notes.yaml"
    path.write_text(text)
    assert cli.main(["status", str(path)]) == 2
    assert named in one_error_line(capsys, "status")


def test_status_when_latest_names_a_missing_version(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "versions").mkdir(parents=True)
    (out / "LATEST").write_text(json.dumps({"version": "v-0123456789abcdef", "fingerprints": {}, "history": ["v-0123456789abcdef"]}))
    assert cli.main(["status", str(out)]) == 2
    line = one_error_line(capsys, "status")
    assert "v-0123456789abcdef" in line and "missing" in line and "rerun" in line, line
    assert "published v-" not in line


@pytest.mark.parametrize("latest", [b"{not json", b"[1, 2]", b'{"version": 3}', b'{"version": "../../etc"}', b"\xff\xfe\x00"],
                         ids=["not-json", "list", "int-version", "escapes", "binary"])
def test_status_on_garbage_latest(tmp_path, capsys, latest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "LATEST").write_bytes(latest)
    assert cli.main(["status", str(out)]) == 2
    assert str(out / "LATEST") in one_error_line(capsys, "status")


def test_run_on_garbage_latest_touches_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "versions" / "v-old").mkdir(parents=True)
    (out / "LATEST").write_text("{truncated")
    doc = base_config(inputs)
    doc["output"] = str(out)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["run", "--config", str(path)]) == 2
    assert str(out / "LATEST") in one_error_line(capsys)
    assert sorted(os.listdir(out / "versions")) == ["v-old"]
    assert (out / "LATEST").read_text() == "{truncated"
