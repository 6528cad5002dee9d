"""What every stage's job shares: its dataset inputs (named, or a named mixture), Beam options with
network-free local defaults, the log the CLI prints progress to, the output directory's up-front write
check and atomic JSON writes.

Dataset inputs are named here for ``vlaprep stats``, ``vlaprep shards`` and ``vlaprep run`` alike:
``NAME=PATH`` pairs, and OpenVLA's named mixtures (``--mixture NAME --data-dir ROOT``: each dataset at
``ROOT/NAME/<version>``, the newest version holding ``dataset_info.json``, as ``tfds.builder(NAME,
data_dir=ROOT)`` finds it). A ``DatasetInput`` is the request; ``resolve_datasets`` turns it, once per
command, into the ``ResolvedDataset`` (metadata read, units planned) every stage works from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import uuid
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from vlaprep import paths
from vlaprep.errors import OutputError, UsageError, describe_environment_error
from vlaprep.paths import write_bytes_atomic
from vlaprep.pipelines.sources import ResolvedDataset, SourceError, resolve_dataset
from vlaprep.pipelines.sources.rlds import resolve_rlds_version_dir
from vlaprep.transforms.registry import DatasetSpec, get_spec, merged_registry

# Local runs must never reach for the network: the plain DirectRunner first tries to download Prism.
DEFAULT_BEAM_ARGS = (
    "--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",
    "--default_sdk_harness_log_level=WARNING",
)
# Worker processes cost ~4 s to start (each imports Beam and the pipeline's modules) and then read in
# parallel; below this much input one in-process worker finishes first (measured: benchmarks/).
PARALLEL_MIN_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class DatasetInput:
    """One dataset a run asks for: its registry name, where it is, its registry entry, its mixture weight
    (not read yet: ``resolve_datasets``)."""

    name: str
    path: str
    spec: DatasetSpec
    weight: float = 1.0


def resolve_datasets(items: Sequence[DatasetInput | ResolvedDataset]) -> list[ResolvedDataset]:
    """Each requested dataset located, checked against its registry entry and planned (``SourceError``
    before any work); already resolved ones pass through, so a command that runs several stages
    (``vlaprep run``) reads each dataset's metadata once."""
    return [i if isinstance(i, ResolvedDataset) else resolve_dataset(i.name, i.path, i.spec, i.weight) for i in items]


def beam_options(beam_args: Sequence[str], input_bytes: int | None = None) -> PipelineOptions:
    """PipelineOptions from the pass-through flags, with network-free local defaults when no runner is named.

    Default: Beam's FnApiRunner with one worker process per core, or in-process when ``input_bytes`` is
    known to be below ``PARALLEL_MIN_BYTES`` (or there is one core). ``--direct_running_mode`` and
    ``--direct_num_workers`` override the choice; ``--runner`` replaces all of it.
    """
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args = list(DEFAULT_BEAM_ARGS) + args
        cores = os.cpu_count() or 1
        if not any(a.startswith("--direct_running_mode") for a in args):
            small = input_bytes is not None and input_bytes < PARALLEL_MIN_BYTES
            args.append("--direct_running_mode=" + ("in_memory" if small or cores == 1 else "multi_processing"))
        if not any(a.startswith("--direct_num_workers") for a in args):
            # in_memory runs one worker whatever this says (and Beam warns on stderr when it is not 1).
            in_memory = "--direct_running_mode=in_memory" in args
            args.append(f"--direct_num_workers={1 if in_memory else cores}")
    return PipelineOptions(args)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a reused pid counts as alive: the safe direction for
    deciding that an owner of staging files is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_registry(registry_file: str | None, where: str = "--registry") -> dict[str, DatasetSpec]:
    try:
        return merged_registry(registry_file)
    except (ValueError, OSError) as e:  # yaml errors are ValueErrors too
        raise UsageError(f"expected a readable registry YAML for {where} {registry_file!r}, got: {' '.join(str(e).split())}") from e


def dataset_input(name: str, path: str, registry: dict, weight: float = 1.0, where: str = "--dataset") -> DatasetInput:
    """One input, its name checked against the registry and its path against the filesystem."""
    try:
        spec = get_spec(name, registry)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    if not (paths.exists(path) or paths.isdir(path)):
        raise UsageError(f"expected an existing path for dataset {name!r}, got {path!r} ({where})")
    return DatasetInput(name, path, spec, float(weight))


def mixture_inputs(name: str, data_dir: str, registry: dict, skip_missing: bool = False, log=stderr_log) -> list[DatasetInput]:
    """OpenVLA's named mixture ``name`` -> its datasets (with their weights) under ``data_dir``.

    Each dataset is ``data_dir/<dataset>`` (its version found as TFDS does). A dataset of the mixture
    that is not there fails at once naming it, or is skipped (and said) with ``skip_missing``.
    """
    from vlaprep.transforms.mixtures import UnknownMixtureError, expand_mixture

    try:
        expansion = expand_mixture(name, registry)
    except UnknownMixtureError as e:
        raise UsageError(str(e.args[0])) from None
    for dataset, _weight, reason in expansion.skipped:
        log(f"[mixture] {name}: {dataset} left out as OpenVLA does ({reason})")
    out, missing = [], []
    for dataset, weight in expansion.datasets:
        root = paths.join(data_dir, dataset)
        if not paths.isdir(root):
            missing.append(dataset)
            continue
        try:
            version_dir = resolve_rlds_version_dir(root)
        except SourceError:
            missing.append(dataset)
            continue
        out.append(DatasetInput(dataset, version_dir, registry[dataset], float(weight)))
    if missing and not skip_missing:
        raise UsageError(
            f"expected every dataset of mixture {name!r} under {data_dir!r} (as <name>/<version>), got none for "
            f"{missing!r}; hint: download them, or pass --skip-missing to leave them out"
        )
    if missing:
        log(f"[mixture] {name}: skipped {len(missing)} missing under {data_dir}: {', '.join(missing)} (--skip-missing)")
    if not out:
        raise UsageError(f"expected at least one dataset of mixture {name!r} under {data_dir!r}, got none")
    return out


def resolve_inputs(
    dataset_args: Sequence[str] = (),
    registry_file: str | None = None,
    mixture: str | None = None,
    data_dir: str | None = None,
    skip_missing: bool = False,
    log=stderr_log,
) -> list[DatasetInput]:
    """``--dataset NAME=PATH`` pairs and/or ``--mixture NAME --data-dir ROOT`` -> the run's inputs (each
    dataset once; an explicit ``--dataset`` wins over the mixture's copy of it, keeping the mixture's weight)."""
    registry = load_registry(registry_file)
    explicit, seen = [], set()
    for value in dataset_args or []:
        if "=" not in value:
            raise UsageError(f"expected --dataset NAME=PATH, got {value!r}")
        name, path = value.split("=", 1)
        if name in seen:
            raise UsageError(f"expected each dataset once, got {name!r} twice")
        seen.add(name)
        explicit.append(dataset_input(name, path, registry))
    if (mixture is None) != (data_dir is None):
        raise UsageError("expected --mixture NAME and --data-dir ROOT together, got only one of them")
    inputs = list(explicit)
    if mixture is not None:
        weights = {}
        for item in mixture_inputs(mixture, data_dir, registry, skip_missing, log):
            weights[item.name] = item.weight
            if item.name not in seen:
                inputs.append(item)
        inputs = [dataclasses.replace(i, weight=weights.get(i.name, i.weight)) for i in inputs]
    if not inputs:
        raise UsageError("expected at least one --dataset NAME=PATH or --mixture NAME --data-dir ROOT")
    return inputs


PROBE_PREFIX = ".write-probe-"  # check_output_dir's probe file, removed at once


def write_json_atomic(path: str, document, indent: int | None = 2) -> None:
    write_bytes_atomic(path, json.dumps(document, indent=indent).encode())


def check_output_dir(output_dir: str, what: str) -> None:
    """Create ``output_dir`` (the ``what`` of a command, for messages) and write and remove a probe file
    there, before any Beam work.

    Raises ``OutputError`` naming the path when it is a file, a parent is a file, it is not writable
    (read-only, permissions) or the disk is full, instead of failing in the pipeline's last step.
    Object stores (no directories): one probe object written and deleted.
    """
    probe_name = f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if paths.is_remote(output_dir):
        try:
            probe = paths.join(output_dir, probe_name)
            write_bytes_atomic(probe, b"vlaprep write probe\n")
            paths.remove_tree(probe)
        except OSError as e:  # Beam's filesystems raise BeamIOError (an IOError) for refused writes
            raise OutputError(f"expected a writable {what} {output_dir!r}, got {type(e).__name__}: {e}") from e
        return
    local = output_dir[len("file://"):] if output_dir.startswith("file://") else output_dir
    if os.path.lexists(local) and not os.path.isdir(local):
        raise OutputError(
            f"expected the {what} {output_dir!r} to be a directory, got a file (or a broken link); "
            "hint: choose another --output"
        )
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the {what} {output_dir!r}: {describe_environment_error(e)}") from e
    probe = os.path.join(local, probe_name)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"vlaprep write probe\n")
        finally:
            os.close(fd)
            if os.path.lexists(probe):
                os.unlink(probe)
    except OSError as e:
        where = OSError(e.errno, e.strerror or os.strerror(e.errno or 0), output_dir)
        raise OutputError(f"expected a writable {what} directory, got {describe_environment_error(where)}") from e
