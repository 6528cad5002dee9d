"""``vlaprep run --config run.yaml``: statistics -> shards -> validation for a list of datasets.

Outputs in the config's ``output`` directory (immutable versions + an atomic pointer):
  LATEST                      {"version", "fingerprints" per stage, "history"}: replaced last, atomically
  current -> versions/<version>   convenience symlink, replaced right after LATEST
  versions/<version>/stats/        dataset_statistics.json (+ cache, quarantine, histograms)
  versions/<version>/shards/       train/ heldout/ quarantine/ manifest.json
  versions/<version>/validation/   validation_report.json, predictions.jsonl
  versions/<version>/run_summary.json   accounting and headline numbers
  versions/<version>/.vlaprep-version.json   marker: vlaprep created this directory (retention's licence)
  .vlaprep.lock                    local outputs: held (flock) by the one run working on OUT
Training jobs read ``LATEST`` and then ``versions/<version>/shards`` (``vlaprep.loader`` does this).

A stage is reused when the fingerprint of its inputs is unchanged (statistics also per dataset, see
``stats.job``): shards depend on the datasets' content, the statistics file, the tokenizer files and
the shard options; validation on the shards manifest, the model files and the validation options.

Nothing lost, nothing deleted that is not ours:
  * A version is built in a private ``versions/.building-<random>/`` and published by renaming it onto
    ``versions/<version>`` only when that name is free. A published version is never rewritten: when a
    concurrent run with the same inputs published it first, this run's build is discarded and the
    published one is used (same fingerprints -> same bytes).
  * Retention deletes a version only when it is beyond ``keep_versions`` in the history of ``LATEST``,
    carries the marker file, is not the version ``LATEST`` names now, and is not a ``.building-*``
    directory. Anything else under ``versions/`` (``my_model_v1/``, versions published before markers
    existed) is never touched; remove those by hand.
  * Local outputs: a run holds an exclusive, non-blocking ``flock`` on ``OUT/.vlaprep.lock`` from before
    it reads ``LATEST`` until it has published; a second run on the same ``OUT`` fails at once (one
    line naming the holder's host, pid and start time). The build of a run that failed or was killed
    (same host, owner process gone) is resumed by the next run of the same version (its finished
    statistics are kept, the rest rebuilt) or deleted by the next run of another version.
  * Object stores (``gs://``): Beam's filesystems have no lock and no conditional create, so two runs
    on one ``OUT`` are not serialized. The guarantee there rests on the two points above: finished
    work is never deleted (a staging prefix is never removed by another run, a published version is
    never rewritten, retention keeps what ``LATEST`` names) and ``LATEST`` always names a complete
    version (``run_summary.json`` is moved last and ``LATEST`` written after it). Two overlapping
    runs with different inputs both publish; the later ``LATEST`` wins and the other version stays
    in the history. A run copying an unchanged stage from a version that an overlapping run's
    retention deletes fails loudly (keep ``keep_versions`` >= 2 where runs may overlap). Staging
    prefixes of killed remote runs are reported by ``vlaprep status``, never deleted automatically.

Config (YAML), checked entirely (types, values, shard options) before any stage runs::

    output: runs/demo
    tokenizer: path/to/tokenizer          # local Hugging Face tokenizer directory
    model: path/to/model                  # optional: no validation stage without it
    registry: my_registry.yaml            # optional, custom datasets
    datasets:
      - {name: bridge_orig, path: data/bridge_orig/1.0.0, weight: 1.0}
      - {name: calvin, path: data/calvin}
    stats: {proprio: false}
    shards: {heldout_fraction: 0.05, seed: 0, image_size: 224, cameras: primary, target_shard_mb: 256,
             action_chunk: 1, normalization: bounds_q99, action_encoding: uniform, allow_empty: false}
    validate: {split: heldout, batch_size: 8, device: auto, max_samples: 256}
    beam_args: ["--direct_num_workers=2"]   # any Beam pipeline options; the command line adds to them
    trust_remote_code: false                # true only for checkpoints that ship code (OpenVLA)
    keep_versions: 3                        # published versions kept (newest first)

Relative paths are resolved against the config file's directory. Every key is declared once, in the
``*_KEYS`` tables below (name, YAML type, value check, default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import socket
import time
from typing import Any, Callable, Mapping, Sequence

import yaml

from vlaprep import paths
from vlaprep.errors import OutputError, UsageError, UserError
from vlaprep.paths import confined
from vlaprep.pipelines import fingerprint
from vlaprep.pipelines.options import SHARD_OPTIONS, STATS_OPTIONS, VALIDATE_OPTIONS, Option
from vlaprep.pipelines.shards.options import ShardsArgumentError, check_options
from vlaprep.pipelines.job import (
    DatasetInput,
    dataset_input,
    load_registry,
    mixture_inputs,
    pid_alive,
    resolve_datasets,
    write_json_atomic,
)
from vlaprep.pipelines.sources import ResolvedDataset
from vlaprep.pipelines.stats.cache import dataset_fingerprint
from vlaprep.pipelines.stats.job import run_stats, summary_table
from vlaprep.schemas import layout
from vlaprep.schemas.layout import (
    CURRENT_LINK,
    LATEST_FILE,
    MANIFEST_FILE,
    SHARDS_STAGE_DIR,
    STATISTICS_CACHE_FILE,
    STATISTICS_FILE,
    STATS_STAGE_DIR,
    VALIDATION_REPORT_FILE,
    VALIDATION_STAGE_DIR,
    VERSIONS_DIR,
)

SUMMARY_FILE = "run_summary.json"
VERSION_MARKER = ".vlaprep-version.json"  # in every version directory vlaprep creates
MARKER_FORMAT = "vlaprep.version"
LOCK_FILE = ".vlaprep.lock"
STAGING_PREFIX = ".building-"  # versions/.building-<random>/: a version being built, never read
_OWNER_FILE = ".owner.json"  # in a local staging directory: {"host", "pid", "started"}; removed before publishing
_STAGES = (STATS_STAGE_DIR, SHARDS_STAGE_DIR, VALIDATION_STAGE_DIR)


class RunConfigError(UserError):
    """The run config is malformed: reported as one line."""


class OutputBusyError(OutputError):
    """Another ``vlaprep run`` holds the output directory's lock."""


# --------------------------------------------------------------------------------------------------
# The config: one declarative table per section
# --------------------------------------------------------------------------------------------------

REQUIRED = object()


class _Bad(Exception):
    """Raised by a key's check: ``expected`` (what the key must be) or a complete ``reason``."""

    def __init__(self, expected: str | None = None, hint: str = "", reason: str | None = None):
        super().__init__(expected or reason)
        self.expected, self.hint, self.reason = expected, hint, reason


# A check: (value, key path, source file) -> the value to store; raises _Bad (or RunConfigError for nesting).
Check = Callable[[Any, str, str], Any]


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of ``run.yaml``: its name, how its value is checked, its default when absent, and whether
    it is a path (resolved against the config file's directory)."""

    name: str
    check: Check
    default: Any = REQUIRED
    path: bool = False


_YAML_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping", type(None): "null"}


def _shown(value: Any) -> str:
    kind = next((name for t, name in _YAML_TYPES.items() if type(value) is t), type(value).__name__)
    if isinstance(value, (dict, list)):
        text = repr(value)
        return f"{kind} {text if len(text) <= 80 else text[:77] + '...'}"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value] + ("" if value is None else " (a boolean)")
    return f"{value!r} ({kind})"


def _error(key: str, source: str, bad: _Bad, value: Any) -> RunConfigError:
    text = bad.reason or f"expected {bad.expected}, got {_shown(value)}"
    return RunConfigError(f"{text} for {key} in {source}" + (f"; hint: {bad.hint}" if bad.hint else ""))


def parse_section(raw: Any, keys: Sequence[Key], where: str, source: str) -> dict:
    """``raw`` (a YAML mapping, or null for {}) checked against ``keys`` -> {name: checked value}.

    Absent keys get their default when it is not ``REQUIRED``; unknown keys are an error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _error(where or "the top level", source, _Bad("a mapping"), raw)
    known = {k.name for k in keys}
    unknown = sorted((k for k in raw if k not in known), key=str)
    if unknown:
        inside = f" in {where}" if where else ""
        raise RunConfigError(f"expected keys among {sorted(known)}{inside}, got unknown {unknown} in {source}")
    out = {}
    for key in keys:
        name = f"{where}.{key.name}" if where else key.name
        if key.name not in raw:
            if key.default is REQUIRED:
                raise RunConfigError(f"expected {name!r} in {source}, got none; hint: see the layout in `vlaprep run --help`"
                                     " and pipelines/run_job.py")
            out[key.name] = key.default
            continue
        value = raw[key.name]
        try:
            out[key.name] = key.check(value, name, source)
        except _Bad as bad:
            raise _error(name, source, bad, value) from bad.__cause__  # the stage's own error, if any
    return out


def _given(raw: Any, keys: Sequence[Key], where: str, source: str) -> dict:
    """Like ``parse_section`` but only the keys the user wrote (run_shards' defaults stay its own, and
    the stage fingerprints of an unchanged config stay the same)."""
    checked = parse_section(raw, [dataclasses.replace(k, default=None) for k in keys], where, source)
    return {k: checked[k] for k in (raw or {})}


def boolean(value, key, source):
    if not isinstance(value, bool):
        raise _Bad("a boolean (true or false)", "write true or false without quotes")
    return value


def integer(minimum: int | None = None) -> Check:
    def check(value, key, source):
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise _Bad("an integer" + (f" >= {minimum}" if minimum is not None else ""))
        return value
    return check


def number(test: Callable[[float], bool] = lambda x: True, what: str = "", stored=lambda x: x) -> Check:
    """A finite int or float (never a bool or a string) for which ``test`` holds."""
    def check(value, key, source):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not test(value):
            raise _Bad(f"a finite number{what}")
        return stored(value)
    return check


def string(value, key, source):
    if not isinstance(value, str) or not value:
        raise _Bad("a non-empty string")
    return value


def optional(check: Check) -> Check:
    return lambda value, key, source: None if value is None else check(value, key, source)


def one_of(*choices: str, pattern: str | None = None, shown: str = "") -> Check:
    """One of ``choices`` (or a string matching ``pattern``, described by ``shown``)."""
    def check(value, key, source):
        if not isinstance(value, str) or not (value in choices or (pattern and re.fullmatch(pattern, value))):
            raise _Bad("one of " + ", ".join([repr(c) for c in choices] + ([shown] if shown else [])))
        return value
    return check


def string_list(value, key, source):
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Bad("a list of strings", 'e.g. ["--direct_num_workers=2"]')
    return tuple(value)


def mapping_of(keys: Sequence[Key], only_given: bool = False) -> Check:
    parse = _given if only_given else parse_section
    return lambda value, key, source: parse(value, keys, key, source)


# -- shards: YAML types here; the values are checked by the shard stage's own option checks ---------


def check_shard_options(options: Mapping[str, Any]) -> None:
    """The shard stage's own check of its options (``shards.options.check_options``). Raises ShardsArgumentError."""
    check_options(**options)


def shard_option(base: Check) -> Check:
    """``base`` (the YAML type), then the shard stage's own check of this one option (the others at
    their defaults), so the message names the key."""
    def check(value, key, source):
        value = base(value, key, source)
        try:
            check_shard_options({key.rsplit(".", 1)[-1]: value})
        except ShardsArgumentError as e:
            text, _, hint = str(e).partition("; hint: ")
            raise _Bad(reason=text, hint=hint) from e
        return value
    return check


def cameras(value, key, source):
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        return value
    raise _Bad("a string or a list of strings", "primary or [primary, wrist]")


def datasets(value, key, source):
    if not isinstance(value, list) or not value:
        raise _Bad("a non-empty list of {name, path, weight} mappings")
    out, seen = [], set()
    for i, entry in enumerate(value):
        checked = parse_section(entry, DATASET_KEYS, f"{key}[{i}]", source)
        if checked["name"] in seen:
            raise _Bad(reason=f"expected each dataset name once, got {checked['name']!r} twice",
                       hint="list a dataset once; weight sets its share")
        seen.add(checked["name"])
        out.append(checked)
    return tuple(out)


def _shards_section(value, key, source):
    given = _given(value, SHARD_KEYS, key, source)
    try:
        check_shard_options(given)  # invariants between options, if the shard stage has any
    except ShardsArgumentError as e:
        raise _Bad(reason=str(e)) from e
    return given


def _yaml_type(option: Option) -> Check:
    """How a ``run.yaml`` value of this option is typed (the stage checks what it must be)."""
    base = {bool: boolean, int: integer(), float: number(), str: string}[option.kind]
    if option.yaml_list:
        base = cameras
    if option.choices:
        base = one_of(*option.choices)
    return optional(base) if option.nullable else base


# The sections' keys come from the stages' option sets (pipelines/options.py): one definition each.
STATS_KEYS = tuple(Key(o.name, _yaml_type(o), o.default) for o in STATS_OPTIONS)

SHARD_KEYS = tuple(
    Key(o.name, _yaml_type(o) if o.kind is bool else shard_option(_yaml_type(o))) for o in SHARD_OPTIONS
)

def _validate_type(option: Option) -> Check:
    if option.name == "device":  # auto, cpu, cuda or cuda:N
        return one_of("auto", "cpu", "cuda", pattern=r"cuda:\d+", shown="'cuda:N'")
    if option.kind is int:
        return optional(integer(1)) if option.nullable else integer(1)
    return _yaml_type(option)


VALIDATE_KEYS = tuple(Key(o.name, _validate_type(o), o.default) for o in VALIDATE_OPTIONS)

DATASET_KEYS = (
    Key("name", string),
    Key("path", string, path=True),
    Key("weight", number(lambda x: x > 0, " > 0", stored=float), 1.0),
)

TOP_KEYS = (
    Key("output", string, path=True),
    Key("tokenizer", string, path=True),
    Key("model", optional(string), None, path=True),  # no validation stage without it
    Key("registry", optional(string), None, path=True),
    Key("datasets", datasets, ()),  # and/or a named mixture:
    Key("mixture", optional(string), None),  # one of OpenVLA's OXE_NAMED_MIXTURES
    Key("data_dir", optional(string), None, path=True),  # where the mixture's datasets are: ROOT/NAME/VERSION
    Key("skip_missing", boolean, False),  # leave out (and say) mixture datasets missing under data_dir
    Key("stats", mapping_of(STATS_KEYS, only_given=True), {}),
    Key("shards", _shards_section, {}),
    Key("validate", mapping_of(VALIDATE_KEYS, only_given=True), {}),
    Key("beam_args", optional(string_list), ()),
    Key("trust_remote_code", boolean, False),
    Key("keep_versions", integer(1), 3),
)


def option(section: Mapping[str, Any], keys: Sequence[Key], name: str) -> Any:
    """A section's value for ``name``, or the table's default."""
    return section[name] if name in section else next(k.default for k in keys if k.name == name)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A checked ``run.yaml`` (see ``TOP_KEYS``); paths resolved. Sections hold the keys the user wrote."""

    output: str
    tokenizer: str
    model: str | None
    registry: str | None
    datasets: tuple[dict, ...]
    stats: dict
    shards: dict
    validate: dict
    beam_args: tuple[str, ...]
    trust_remote_code: bool = False
    keep_versions: int = 3
    mixture: str | None = None
    data_dir: str | None = None
    skip_missing: bool = False
    source: str = "the run config"

    def __post_init__(self):
        # Valid by construction, also when built in code: the same tables as the YAML.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        if isinstance(self.datasets, tuple):
            values["datasets"] = list(self.datasets)
        if not values["datasets"]:
            del values["datasets"]  # a mixture alone is fine (checked below)
        checked = parse_section(values, TOP_KEYS, "", self.source)
        object.__setattr__(self, "datasets", tuple(checked["datasets"]))
        object.__setattr__(self, "beam_args", tuple(checked["beam_args"] or ()))
        if not self.datasets and self.mixture is None:
            raise RunConfigError(f"expected 'datasets' or 'mixture' in {self.source}, got neither; hint: see the layout "
                                 "in pipelines/run_job.py")
        if (self.mixture is None) != (self.data_dir is None):
            raise RunConfigError(f"expected 'mixture' and 'data_dir' together in {self.source}, got only one of them")
        if self.mixture is not None:
            from vlaprep.transforms.mixtures import UnknownMixtureError, mixture

            try:
                mixture(self.mixture)
            except UnknownMixtureError as e:
                raise RunConfigError(f"{e.args[0]} (mixture in {self.source})") from None


def _resolve(base: str, path: str | None) -> str | None:
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) or "://" in path else os.path.normpath(os.path.join(base, path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key!r} twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str) -> Any:
    if os.path.isdir(path):
        raise RunConfigError(f"expected a run config file, got the directory {path!r}; hint: pass the run.yaml file")
    try:
        data = paths.read_bytes(path)
    except FileNotFoundError:
        raise RunConfigError(f"expected a run config file, got {path!r}, which does not exist") from None
    except OSError as e:
        raise RunConfigError(f"expected a readable run config file, got {e.strerror or e} for {path!r}; "
                             "hint: check its permissions") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunConfigError(f"expected a UTF-8 YAML text file, got undecodable bytes at offset {e.start} in {path}; "
                             "hint: is this the run.yaml?") from e
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}"
        elif getattr(e, "position", None) is not None:  # ReaderError: a character YAML does not allow
            where = f"line {text.count(chr(10), 0, e.position) + 1}"
        else:
            where = "an unknown position"
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        raise RunConfigError(f"expected valid YAML in {path}, got an error at {where}: {' '.join(str(problem).split())}; "
                             "hint: fix the YAML there") from e


def load_run_config(path: str) -> RunConfig:
    """``run.yaml`` -> RunConfig; raises RunConfigError (one line naming the key and the file)."""
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    values = parse_section(raw, TOP_KEYS, "", path)
    base = os.path.dirname(os.path.abspath(path))

    def resolved(section: dict, keys: Sequence[Key]) -> dict:
        return {**section, **{k.name: _resolve(base, section[k.name]) for k in keys if k.path and k.name in section}}

    values = resolved(values, TOP_KEYS)
    values["datasets"] = tuple(resolved(d, DATASET_KEYS) for d in values["datasets"] or ())
    return RunConfig(**values, source=path)


# --------------------------------------------------------------------------------------------------
# Inputs and fingerprints
# --------------------------------------------------------------------------------------------------


def _dataset_inputs(config: RunConfig) -> list[DatasetInput]:
    """The config's datasets (``datasets:`` and/or ``mixture:`` + ``data_dir:``), named and checked against the
    registry (``pipelines/job``; ``resolve_datasets`` reads them)."""
    try:
        registry = load_registry(config.registry, "registry")
        inputs = [dataset_input(e["name"], e["path"], registry, e["weight"], f"datasets in {config.source}")
                  for e in config.datasets]
        if config.mixture is not None:
            listed = {i.name for i in inputs}
            inputs += [i for i in mixture_inputs(config.mixture, config.data_dir, registry, config.skip_missing)
                       if i.name not in listed]
    except UsageError as e:
        raise RunConfigError(f"{e} (in {config.source})") from e
    for name in ("tokenizer", "model"):
        directory = getattr(config, name)
        if directory is not None and not paths.isdir(directory):
            raise RunConfigError(f"expected an existing directory, got {directory!r} for {name} in {config.source}")
    return inputs


def _dir_fingerprint(path: str) -> list:
    return fingerprint.files_fingerprint([paths.join(path, n) for n, _ in paths.list_files(path)], path)


def stage_fingerprints(config: RunConfig, inputs: Sequence[ResolvedDataset]) -> dict:
    """Fingerprints of what each stage reads, computable before running anything."""
    proprio = option(config.stats, STATS_KEYS, "proprio")
    datasets_fp = {i.name: dataset_fingerprint(i, proprio) for i in inputs}
    stats_fp = fingerprint.combine("stats", datasets_fp, config.stats)
    shards_fp = fingerprint.combine("shards", stats_fp, _dir_fingerprint(config.tokenizer), config.shards,
                                    {i.name: i.weight for i in inputs})
    fps = {"stats": stats_fp, "shards": shards_fp}
    if config.model:
        fps["validate"] = fingerprint.combine("validate", shards_fp, _dir_fingerprint(config.model), config.validate)
    return fps


# --------------------------------------------------------------------------------------------------
# The published state: LATEST, versions, the lock
# --------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if paths.isfile(path):
        return json.loads(paths.read_text(path))
    return {}


def read_latest(output: str) -> dict:
    """The published pointer ``{"version", "fingerprints", "history"}``, or {} before the first publish.

    Read with ``vlaprep.schemas.layout.parse_latest``; raises OutputError (one line) for a ``LATEST`` that
    is not such a document."""
    path = paths.join(output, LATEST_FILE)
    if not paths.isfile(path):
        return {}
    try:
        text = paths.read_bytes(path).decode("utf-8")
        latest = layout.parse_latest(text, output)
    except UnicodeDecodeError as e:
        raise _damaged_latest(path, f"unusable content ({_brief(e)})") from e
    except layout.ManifestError as e:
        # Not JSON, or a version escaping versions/ (the error has a cause); else JSON of another shape.
        got = f"unusable content ({_brief(e.__cause__)})" if e.__cause__ is not None else _shown(json.loads(text))
        raise _damaged_latest(path, got) from e
    history = latest.get("history", [])
    if not isinstance(latest.get("fingerprints", {}), dict) or not (
            isinstance(history, list) and all(isinstance(v, str) for v in history)):
        raise _damaged_latest(path, _shown(latest))
    return latest


def _brief(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _damaged_latest(path: str, got: str) -> OutputError:
    return OutputError(
        f"expected {path} to be a vlaprep pointer {{\"version\", \"fingerprints\", \"history\"}}, got {got}; "
        "hint: it was edited or damaged: restore it, or delete it and rerun `vlaprep run` (versions/ is left as it is)"
    )


def latest_version_dir(output: str) -> str | None:
    latest = read_latest(output)
    return layout.version_dir(output, latest["version"]) if latest else None


def _complete(vdir: str) -> bool:
    """A version directory that was published whole: ``run_summary.json`` is its last file."""
    return paths.isfile(paths.join(vdir, SUMMARY_FILE))


def _ours(vdir: str) -> bool:
    """vlaprep created this version directory (its marker names it)."""
    try:
        marker = json.loads(paths.read_text(paths.join(vdir, VERSION_MARKER)))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and marker.get("version") == paths.basename(vdir)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())


@contextlib.contextmanager
def output_lock(output: str, log=print):
    """Hold ``OUT/.vlaprep.lock`` (exclusive, non-blocking flock) for local outputs; raise
    OutputBusyError naming the holder when another process holds it. Object stores: no lock (see the
    module docstring). The file stays (removing it would let two runs lock different files); its
    content, the holder, is emptied on release."""
    if paths.is_remote(output):
        yield
        return
    import fcntl

    path = os.path.join(output, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:  # being written this very moment
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            raise OutputBusyError(
                f"expected no other `vlaprep run` on {output}, got one holding {path} (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}); hint: wait for it to finish "
                "(a scheduler firing twice: forbid concurrent runs); nothing was changed"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log(f"[run] {path}: this filesystem has no flock ({e.strerror}); runs on {output} are not serialized")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _finished_staging(versions_root: str, log) -> list[str]:
    """Local ``versions/.building-*`` whose run is over: abandoned by a run that failed, or owned by a
    process of this host that is gone (killed). Others (a live run, another machine) are reported."""
    if not os.path.isdir(versions_root):
        return []
    host, finished = socket.gethostname(), []
    for name in sorted(os.listdir(versions_root)):
        if not name.startswith(STAGING_PREFIX):
            continue
        directory = os.path.join(versions_root, name)
        try:
            with open(os.path.join(directory, _OWNER_FILE)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}
        owner = owner if isinstance(owner, dict) else {}
        if owner.get("abandoned") is True or (
            owner.get("host") == host and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"])
        ):
            finished.append(directory)
        else:
            log(f"[run] left alone: {directory} (a run in progress or one on another machine; delete it once no run uses it)")
    return finished


def _marker_version(directory: str) -> str | None:
    try:
        marker = json.loads(paths.read_text(paths.join(directory, VERSION_MARKER)))
    except (OSError, ValueError):
        return None
    return marker.get("version") if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _resumable(staging: str) -> None:
    """Keep what an interrupted build of the same version finished and a rerun reuses: its statistics
    (per-dataset cache, per-unit projections); drop everything else (shards, validation, temp files)."""
    for name in os.listdir(staging):
        if name not in (STATS_STAGE_DIR, VERSION_MARKER, _OWNER_FILE):
            paths.remove_tree(os.path.join(staging, name))
    for directory, _dirs, names in os.walk(os.path.join(staging, STATS_STAGE_DIR)):
        for name in names:
            if name.startswith(".tmp-"):  # an atomic write that never completed
                os.unlink(os.path.join(directory, name))


def _link_tree(src: str, dst: str) -> None:
    """Carry an unchanged stage over into the new version: hard links (published files are immutable);
    in an object store, server-side copies."""
    if paths.is_remote(dst):
        paths.remove_tree(dst)
        paths.copy_tree(src, dst)
        return
    import shutil

    tmp = f"{dst}.carry-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _dirs, names in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(tmp, rel), exist_ok=True)
        for name in names:
            a, b = os.path.join(root, name), os.path.join(tmp, rel, name)
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _relocate(document: Any, old: str, new: str) -> Any:
    """Every string under ``old`` (a path) rewritten under ``new``: outputs name the published version,
    never the staging directory they were built in."""
    if isinstance(document, dict):
        return {k: _relocate(v, old, new) for k, v in document.items()}
    if isinstance(document, list):
        return [_relocate(v, old, new) for v in document]
    if isinstance(document, str) and (document == old or document.startswith(old.rstrip("/") + "/")
                                      or document.startswith(old.rstrip(os.sep) + os.sep)):
        return new + document[len(old):]
    return document


def _publish_version(staging: str, vdir: str, log) -> bool:
    """Move ``staging`` onto ``vdir`` if that name is free; True if moved. False: a complete version is
    already there (a concurrent run with the same inputs published it), which is kept untouched."""
    if paths.is_remote(vdir):
        if _complete(vdir):
            return False
        if paths.isdir(vdir):
            log(f"[run] {vdir} holds an incomplete move (same fingerprints, same bytes): completing it")
        # No rename in object stores: move the stages, then the marker, run_summary.json last.
        for name in sorted(paths.listdir(staging), key=lambda n: n == SUMMARY_FILE):
            paths.move(paths.join(staging, name), paths.join(vdir, name))
        paths.remove_tree(staging)
        return True
    if os.path.lexists(vdir):
        if _complete(vdir):
            return False
        raise OutputError(
            f"expected {vdir} to be absent or a complete vlaprep version, got an entry without {SUMMARY_FILE}; "
            "hint: move it away and rerun (nothing was published)")
    try:
        os.rename(staging, vdir)  # refuses a non-empty target: never onto another version
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and _complete(vdir):
            return False
        raise
    paths.fsync_dir(os.path.dirname(vdir))
    return True


def _point_current(output: str, version: str) -> None:
    """``OUT/current`` -> ``versions/<version>`` for people and tools that prefer a path; replaced atomically."""
    if paths.is_remote(output):
        return  # object stores have no symlinks; LATEST is the pointer
    link = os.path.join(output, CURRENT_LINK)
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join(VERSIONS_DIR, version), tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # a filesystem without symlinks still has LATEST, the source of truth


def _apply_retention(output: str, history: Sequence[str], keep_versions: int, log) -> list[str]:
    """Delete the versions of ``history`` beyond the first ``keep_versions`` that vlaprep created
    (marker), except the one ``LATEST`` names now. Nothing else under ``versions/`` is touched."""
    versions_root = paths.join(output, VERSIONS_DIR)
    current = read_latest(output).get("version")
    removed = []
    for name in history[keep_versions:]:
        if name == current or name.startswith(STAGING_PREFIX):
            continue
        vdir = confined(versions_root, name, LATEST_FILE)
        if not (paths.exists(vdir) or paths.isdir(vdir)):
            continue
        if not _ours(vdir):
            log(f"[run] retention: left alone {vdir} (no {VERSION_MARKER}: not created by this vlaprep; delete it by hand)")
            continue
        paths.remove_tree(vdir)
        removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_pipeline_config(config: RunConfig, beam_args: Sequence[str] = (), force: bool = False, log=print) -> dict:
    """Run the three stages into a staging directory, publish it as an immutable version, then ``LATEST``.

    ``OUT/versions/<version>/{stats,shards,validation}`` where ``version`` is derived from the stage
    fingerprints (same inputs and options -> same version). Stages whose fingerprint equals the
    previous version's are carried over by hard links; statistics are also reused per dataset. The
    version is built in ``versions/.building-*`` and renamed into place when every stage succeeded;
    only then is ``OUT/LATEST`` replaced (temp + rename): a reader that follows it never sees a
    half-written version, and an interrupted run leaves the previous version published. Versions
    beyond ``keep_versions`` (newest first) that vlaprep created are then deleted.
    """
    started = time.time()
    args = list(config.beam_args) + list(beam_args)
    inputs = _dataset_inputs(config)  # every user error before any work
    local = not paths.is_remote(config.output)
    if (os.path.lexists(config.output) and not os.path.isdir(config.output)) if local else paths.isfile(config.output):
        raise OutputError(f"expected a directory, got a file {config.output!r} for output in {config.source}")
    versions_root = paths.join(config.output, VERSIONS_DIR)
    paths.makedirs(versions_root)
    with output_lock(config.output, log):
        return _run_locked(config, inputs, args, force, log, started)


def _run_locked(config: RunConfig, inputs, args, force: bool, log, started: float) -> dict:
    from vlaprep.pipelines.shards.job import run_shards, summary  # at call time: tests interpose on it

    versions_root = paths.join(config.output, VERSIONS_DIR)
    local = not paths.is_remote(config.output)
    inputs = resolve_datasets(inputs)  # once: the stages and the fingerprints share what it read
    fps = stage_fingerprints(config, inputs)
    version = "v-" + fingerprint.combine(fps)[:16]
    latest = read_latest(config.output)
    previous = latest_version_dir(config.output)
    if previous and not _complete(previous):
        log(f"[run] {LATEST_FILE} names {latest['version']}, but {previous} is missing or incomplete: building from the sources")
        previous = None
    previous_fps = latest.get("fingerprints", {}) if previous else {}
    vdir = paths.join(versions_root, version)
    unchanged = latest.get("version") == version and previous and not force
    if latest.get("version") == version and previous and force:
        # A published version is immutable: a forced rebuild of the same inputs gets its own directory.
        version = f"{version}-r{int(time.time())}"
        vdir = paths.join(versions_root, version)
    built = not force and _complete(vdir)
    # Builds whose run is over (under the lock no other local run is building): the one of this very
    # version is resumed (its finished statistics are reused), the others deleted.
    resume = None
    for directory in _finished_staging(versions_root, log) if local else []:
        if resume is None and not (unchanged or built or force) and _marker_version(directory) == version:
            resume = directory
        else:
            paths.remove_tree(directory)
            log(f"[run] removed {directory}: the build of an interrupted run")
    if unchanged:
        log(f"[run] {version} is published and its inputs are unchanged: nothing to do")
        return _read_json(paths.join(vdir, SUMMARY_FILE))
    if built:
        log(f"[run] {version} was built before and is complete: publishing it again")
        return _publish(config, version, fps, latest, log)

    if resume is not None:
        staging = resume
        _resumable(staging)
        log(f"[run] resuming the interrupted build of {version} in {staging}")
    else:
        staging = paths.make_temp_dir(versions_root, STAGING_PREFIX)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    try:
        if resume is None:
            if local:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; a published version gets the usual mode
            write_json_atomic(paths.join(staging, VERSION_MARKER), {"format": MARKER_FORMAT, "version": version})
        if local:
            write_json_atomic(paths.join(staging, _OWNER_FILE), owner)
        stats_dir, shards_dir, val_dir = (paths.join(staging, d) for d in _STAGES)
        summary_doc: dict[str, Any] = {
            "version": version,
            "datasets": {i.name: {"path": i.path, "weight": i.weight} for i in inputs},
            "stages": {},
        }
        log(f"[run] building {version} in {staging}")
        log(f"[run] 1/3 statistics for {', '.join(i.name for i in inputs)}")
        if previous and not force and paths.isfile(paths.join(previous, STATS_STAGE_DIR, STATISTICS_CACHE_FILE)) and not paths.isfile(paths.join(stats_dir, STATISTICS_CACHE_FILE)):
            paths.makedirs(stats_dir)  # per-dataset reuse: unchanged datasets are not re-read
            paths.copy_file(paths.join(previous, STATS_STAGE_DIR, STATISTICS_CACHE_FILE), paths.join(stats_dir, STATISTICS_CACHE_FILE))
        proprio = option(config.stats, STATS_KEYS, "proprio")
        stats = run_stats(inputs, stats_dir, with_proprio=proprio, force=force, beam_args=args, log=log)
        log(summary_table(stats))
        summary_doc["stages"]["stats"] = {"computed": stats.computed, "reused": stats.reused, "quarantined": len(stats.quarantine)}

        statistics_file = paths.join(stats_dir, STATISTICS_FILE)

        def carry_over(stage: str, directory: str, marker: str) -> bool:
            """Reuse a whole stage of the previous version when its input fingerprint is unchanged."""
            if not previous or force or previous_fps.get(stage) != fps[stage] or not paths.isfile(paths.join(previous, directory, marker)):
                return False
            log(f"[run] {stage}: inputs unchanged (fingerprint {fps[stage][:12]}), carried over from {latest['version']}")
            _link_tree(paths.join(previous, directory), paths.join(staging, directory))
            summary_doc["stages"][stage] = {"reused": True}
            return True

        if not carry_over("shards", SHARDS_STAGE_DIR, MANIFEST_FILE):
            log("[run] 2/3 shards (tokenize, resize images, write Parquet)")
            # Datasets whose rows are unchanged are read back from the previous version's shards.
            reuse = paths.join(previous, SHARDS_STAGE_DIR) if previous and not force else None
            result = run_shards(inputs, statistics_file, config.tokenizer, shards_dir, beam_args=args, log=log,
                                reuse_from=reuse,
                                **config.shards)
            log(summary(result))
            summary_doc["stages"]["shards"] = {"reused": False, "seconds": round(result.seconds, 2)}
        manifest = layout.read_manifest(shards_dir)
        summary_doc["accounting"] = manifest.accounting
        summary_doc["splits"] = manifest.splits

        if config.model:
            from vlaprep.pipelines.validate.job import run_validate, summary_text

            report_path = paths.join(val_dir, VALIDATION_REPORT_FILE)
            if not carry_over("validate", VALIDATION_STAGE_DIR, VALIDATION_REPORT_FILE):
                log("[run] 3/3 validation (model inference over held-out episodes)")
                v = {k.name: option(config.validate, VALIDATE_KEYS, k.name) for k in VALIDATE_KEYS}
                run_validate(shards_dir, config.model, val_dir, trust_remote_code=config.trust_remote_code,
                             beam_args=args, log=log, **v)
                # The report names where the shards are: the published version, not this staging directory.
                report = _relocate(_read_json(report_path), staging, vdir)
                write_json_atomic(report_path, report)
                summary_doc["stages"]["validate"] = {"reused": False}
            report = _read_json(report_path)
            log(summary_text(report))
            summary_doc["validation"] = {
                "report": paths.relpath(report_path, staging),
                "exact_accuracy": report.get("model", {}).get("overall", {}).get("exact_accuracy"),
            }
        else:
            log("[run] 3/3 validation skipped: no `model` in the config")
        summary_doc["seconds"] = round(time.time() - started, 2)
        if local:
            os.unlink(os.path.join(staging, _OWNER_FILE))
        write_json_atomic(paths.join(staging, SUMMARY_FILE), summary_doc)
        published = _publish_version(staging, vdir, log)
    except BaseException:
        try:
            if not (local and os.path.isdir(staging)):
                raise OSError("nothing to resume")
            # Nothing is published from it; the next run on OUT resumes it (same version) or deletes it.
            write_json_atomic(paths.join(staging, _OWNER_FILE), {**owner, "abandoned": True})
        except OSError:
            paths.remove_tree(staging)
        raise
    if not published:
        log(f"[run] {version} was published meanwhile by another run with the same inputs: "
            "keeping it untouched, discarding this build")
        paths.remove_tree(staging)
        summary_doc = _read_json(paths.join(vdir, SUMMARY_FILE))
    _publish(config, version, fps, latest, log)
    return summary_doc


def _publish(config: RunConfig, version: str, fps: dict, latest_at_start: dict, log) -> dict:
    """Point ``LATEST`` (then ``current``) at the complete ``versions/<version>``, then apply retention."""
    vdir = paths.join(config.output, VERSIONS_DIR, version)
    latest = read_latest(config.output)  # now: an overlapping run (object stores) may have published since
    history = [version] + [v for v in latest.get("history", latest_at_start.get("history", [])) if v != version]
    if latest.get("version") != version or latest.get("history", [])[: config.keep_versions] != history[: config.keep_versions]:
        write_json_atomic(paths.join(config.output, LATEST_FILE),
                          {"version": version, "fingerprints": fps, "history": history[: config.keep_versions]})
    _point_current(config.output, version)
    removed = _apply_retention(config.output, history, config.keep_versions, log)
    if removed:
        log(f"[run] retention: removed {', '.join(removed)} (keeping {config.keep_versions} versions)")
    log(f"[run] published {version}: {paths.join(config.output, LATEST_FILE)} -> {vdir}")
    return _read_json(paths.join(vdir, SUMMARY_FILE))


# --------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------


def status(config_or_output: str) -> str:
    """What is published, from which inputs, and (given the config) what a run would redo.

    Raises a UserError (one line) for a config that is not a run config and for an output whose
    ``LATEST`` is damaged or names a missing version."""
    if not paths.is_remote(config_or_output) and not os.path.isdir(config_or_output):
        config = load_run_config(config_or_output)
        output = config.output
        fps = stage_fingerprints(config, resolve_datasets(_dataset_inputs(config)))
    else:
        config, output, fps = None, config_or_output, {}
    latest = read_latest(output)
    if not latest:
        return f"{output}: nothing published yet (no {LATEST_FILE})"
    vdir = latest_version_dir(output)
    if not _complete(vdir):
        raise OutputError(
            f"expected {LATEST_FILE} to name a complete version, got {latest['version']!r} whose {vdir} is missing or "
            f"incomplete (no {SUMMARY_FILE}) in {output}; hint: nothing usable is published: rerun `vlaprep run "
            f"--config run.yaml` to rebuild and republish it")
    summary_doc = _read_json(paths.join(vdir, SUMMARY_FILE))
    published = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(paths.getmtime(paths.join(output, LATEST_FILE))))
    lines = [f"{output}: published {latest['version']} at {published} (kept: {', '.join(latest.get('history', []))})"]
    for name, d in summary_doc.get("datasets", {}).items():
        lines.append(f"  input {name}: {d['path']} (weight {d['weight']})")
    for stage in ("stats", "shards", "validate"):
        fp = latest.get("fingerprints", {}).get(stage)
        if fp is None:
            lines.append(f"  {stage:9} not part of this version")
            continue
        if fps:
            redo = "up to date" if fps.get(stage) == fp else "would be recomputed (inputs changed)"
        else:
            redo = "pass the run config to see what a run would redo"
        lines.append(f"  {stage:9} fingerprint {fp[:12]}  {redo}")
    for split, s_ in summary_doc.get("splits", {}).items():
        lines.append(f"  shards/{split}: {s_['files']} files, {s_['episodes']} episodes, {s_['rows']} rows")
    for name, acc in summary_doc.get("accounting", {}).items():
        lines.append(f"  {name}: read {acc['read']}, train {acc['train']}, heldout {acc['heldout']}, quarantined {acc['quarantined']}")
    versions_root = paths.join(output, VERSIONS_DIR)
    for name in paths.listdir(versions_root) if paths.isdir(versions_root) else []:
        if name.startswith(STAGING_PREFIX):
            lines.append(f"  building: {paths.join(versions_root, name)} (a run in progress, or left by a killed one)")
    return "\n".join(lines)
