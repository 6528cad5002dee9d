"""Offline checks of infra/: what can be verified without Docker, a cluster or a cloud project.

- YAML manifests parse; the CronJob is a daily, non-overlapping ``vlaprep run --config`` whose
  config comes from the ConfigMap in the same file and loads with vlaprep's own ``load_run_config``.
- The Flex Template metadata parses, every parameter is documented and validated, and the launcher
  turns template parameters into a command line vlaprep's own parser accepts.
- Dockerfiles pin exact base images; the worker image's Beam version is the venv's and its Python
  is inside pyproject's requires-python; the files they copy build a complete wheel.
- Shell scripts pass ``bash -n``, start with ``set -euo pipefail``, and their ``--dry-run`` output is
  a vlaprep command line whose Beam options Beam itself parses and validates.
- Every ``--flag=`` written anywhere under infra/ is a real Beam pipeline option (checked against the
  parser Beam builds from all PipelineOptions subclasses), a vlaprep/launcher flag, or on an explicit
  allow-list of non-Beam tools' flags. Beam flags are written as ``--flag=value`` in these files so
  that this check sees them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.util
import io
import json
import os
import py_compile
import re
import shlex
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Flags matched by FLAG_RE in infra/ that belong to other tools, not to Beam's PipelineOptions.
# (vlaprep's own flags and the Flex launcher's are taken from their argument parsers.)
NON_BEAM_FLAGS = {
    "--service_port": "apache_beam.runners.worker.worker_pool_main (worker pool server flag)",
    "--id": "/opt/apache/beam/boot, the SDK harness boot binary (started by the runner)",
    "--control_endpoint": "/opt/apache/beam/boot, the SDK harness boot binary (started by the runner)",
    "--image": "gcloud dataflow flex-template build",
    "--parameters": "gcloud dataflow flex-template run",
    "--format": "gcloud storage buckets describe",
    "--platform": "docker buildx build",
    "--from": "kubectl create job --from=cronjob/...",
    "--flag": "prose: the generic form --flag=value",
}
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z_]+)=([^\s`'\"|)\],]*)")
PLACEHOLDER_RE = re.compile(r"^(|[A-Z][A-Z0-9_]*|<[^>]*>|\.\.\.)$")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def beam_parser():
    """The argparse parser Beam itself builds from every PipelineOptions subclass."""
    from apache_beam.options.pipeline_options import PipelineOptions

    captured = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=captured.append)
    return captured[0]


@functools.cache
def beam_flags() -> frozenset:
    return frozenset(beam_parser()._option_string_actions)


def beam_value_error(flag: str, value: str) -> str | None:
    """None if Beam's parser accepts ``flag=value``, else why not."""
    action = beam_parser()._option_string_actions[flag]
    if action.nargs == 0:
        return f"{flag} takes no value"
    if "$" in value:
        return None  # a shell variable: the scripts' dry runs check the expanded values
    if action.choices is None and (PLACEHOLDER_RE.match(value) or "{" in value):
        return None  # a documented placeholder (N, REGION, <...>), not a literal value
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            beam_parser().parse_known_args([f"{flag}={value}"])
    except SystemExit:
        return f"Beam's parser rejects {flag}={value}"
    if flag == "--runner" and "." not in value:
        from apache_beam.options.pipeline_options import StandardOptions

        known = {p.rsplit(".", 1)[-1].lower() for p in StandardOptions.ALL_KNOWN_RUNNERS}
        if value.lower() not in known and value.lower() + "runner" not in known:
            return f"--runner={value} is not a runner Beam knows"
    return None


@functools.cache
def vlaprep_parser():
    from vlaprep.pipelines.cli import build_parser

    return build_parser()


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


@functools.cache
def vlaprep_flags() -> frozenset:
    flags = set()
    stack = [vlaprep_parser()]
    while stack:
        parser = stack.pop()
        flags.update(parser._option_string_actions)
        stack.extend(sub for _, sub in _subparsers(parser))
    return frozenset(flags)


def vlaprep_command_flags(command: str) -> frozenset:
    return frozenset(dict(_subparsers(vlaprep_parser()))[command]._option_string_actions)


@functools.cache
def launcher():
    return _load_module(INFRA / "dataflow" / "launcher.py", "vlaprep_flex_launcher")


@functools.cache
def launcher_flags() -> frozenset:
    return frozenset(launcher().build_parser()._option_string_actions)


def check_vlaprep_argv(argv: list[str]) -> tuple:
    """Parse a ``vlaprep ...`` argv the way vlaprep's main does; check its Beam options with Beam.

    Returns (parsed vlaprep args, Beam args, PipelineOptions)."""
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.transforms import environments

    assert Path(argv[0]).name == "vlaprep", argv
    args, beam_args = vlaprep_parser().parse_known_args(argv[1:])
    stray = [a for a in beam_args if not a.startswith("--")]
    assert not stray, f"vlaprep would reject {stray!r} (Beam options must be --flag=value) in {argv!r}"
    for arg in beam_args:
        flag, _, value = arg.partition("=")
        assert flag in beam_flags(), f"{flag} is not a Beam option (in {argv!r})"
        if "=" in arg:
            assert beam_value_error(flag, value) is None, beam_value_error(flag, value)
    options = PipelineOptions(beam_args)
    options.get_all_options()  # argparse type/choice errors would exit here
    portable = options.view_as(PortableOptions)
    errors = portable.validate(PipelineOptionsValidator(options, None))
    assert not errors, errors
    if portable.environment_type:
        environments.Environment.from_options(portable)  # parses environment_config per type
    return args, beam_args, options


def run_script(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=60)


def dry_run_lines(script: Path, *args: str, env: dict) -> list[list[str]]:
    result = run_script(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def text_files():
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


def yaml_files():
    return sorted(p for p in text_files() if p.suffix in (".yaml", ".yml"))


def shell_scripts():
    return sorted(p for p in text_files() if p.suffix == ".sh")


def dockerfiles():
    return sorted(p for p in text_files() if p.name == "Dockerfile")


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pod_specs(doc: dict):
    """Pod specs inside a Deployment / CronJob / Job / Pod document."""
    kind = doc.get("kind")
    if kind == "CronJob":
        yield doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield doc["spec"]


@functools.cache
def cronjob_file() -> tuple:
    docs = k8s_docs(INFRA / "schedules" / "cronjob.yaml")
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    return docs, by_kind


# --------------------------------------------------------------------------------------------------
# the flag checker itself
# --------------------------------------------------------------------------------------------------


def test_beam_option_parser_is_complete_and_rejects_typos():
    flags = beam_flags()
    for real in ("--runner", "--flink_master", "--spark_master_url", "--spark_job_server_jar", "--job_endpoint",
                 "--environment_type", "--environment_config", "--sdk_container_image", "--experiments",
                 "--temp_location", "--staging_location", "--max_num_workers", "--machine_type", "--disk_size_gb",
                 "--region", "--project", "--direct_num_workers", "--parallelism", "--sdk_worker_parallelism"):
        assert real in flags, real
    for fake in ("--flink_mastr", "--sdk_container", "--worker_machine", "--image", "--service_port"):
        assert fake not in flags, fake
    assert beam_value_error("--autoscaling_algorithm", "FAST") is not None
    assert beam_value_error("--flink_version", "1.7") is not None
    assert beam_value_error("--direct_num_workers", "eight") is not None
    assert beam_value_error("--runner", "FlinkRunnr") is not None
    assert beam_value_error("--runner", "DataflowRunner") is None
    assert beam_value_error("--num_workers", "N") is None  # placeholder in prose


def test_allow_list_holds_only_non_beam_flags_that_are_used():
    used = {m.group(1) for path in text_files() for m in FLAG_RE.finditer(path.read_text())}
    for flag in NON_BEAM_FLAGS:
        assert flag not in beam_flags(), f"{flag} is a Beam option: remove it from NON_BEAM_FLAGS"
        assert flag in used, f"{flag} is allow-listed but no longer used under infra/: remove it"


def test_every_flag_in_infra_is_a_real_option():
    problems = []
    for path in text_files():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in FLAG_RE.finditer(line):
                flag, value = m.group(1), m.group(2)
                where = f"{path.relative_to(REPO)}:{lineno}: {m.group(0)}"
                if flag in beam_flags():
                    error = beam_value_error(flag, value)
                    if error:
                        problems.append(f"{where}: {error}")
                elif flag in vlaprep_flags() or flag in launcher_flags() or flag in NON_BEAM_FLAGS:
                    continue
                else:
                    problems.append(f"{where}: {flag} is neither a Beam option nor a vlaprep/launcher flag")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# YAML manifests
# --------------------------------------------------------------------------------------------------


def test_yaml_files_exist_and_parse():
    files = yaml_files()
    assert {p.name for p in files} >= {"cronjob.yaml", "worker-pool-sidecar.yaml"}
    for path in files:
        docs = k8s_docs(path)
        assert docs, f"{path} holds no YAML document"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path}: {doc!r:.200}"
            assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without metadata.name"


def _image_is_pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    m = re.search(r":([A-Za-z0-9_][A-Za-z0-9_.-]*)$", image.split("/")[-1])
    if not m or m.group(1) == "latest":
        return False
    tag = m.group(1)
    return bool(re.search(r"\d+\.\d+\.\d+", tag) or re.search(r"\d{8}", tag))


def test_manifest_images_are_pinned_and_worker_tag_is_the_vlaprep_version():
    version = PYPROJECT["project"]["version"]
    for path in yaml_files():
        for doc in k8s_docs(path):
            for spec in pod_specs(doc):
                for container in spec.get("containers", []) + spec.get("initContainers", []):
                    image = container["image"]
                    assert _image_is_pinned(image), f"{path.name}: {container['name']} image {image!r} is not pinned"
                    if "vlaprep-worker" in image:
                        assert image.endswith(f":{version}"), f"{path.name}: expected vlaprep-worker:{version}, got {image}"
    airflow = _load_module(INFRA / "schedules" / "airflow_dag.py", "vlaprep_airflow_dag")
    assert airflow.IMAGE.endswith(f":{version}")


def _cronjob_container():
    _, by_kind = cronjob_file()
    (cronjob,) = by_kind["CronJob"]
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return cronjob, container


def test_cronjob_is_a_daily_nonoverlapping_vlaprep_run():
    cronjob, container = _cronjob_container()
    spec = cronjob["spec"]
    fields = str(spec.get("schedule", "")).split()
    assert len(fields) == 5, f"expected a 5-field cron schedule, got {spec.get('schedule')!r}"
    assert spec["concurrencyPolicy"] == "Forbid"
    command = container.get("command", []) + container.get("args", [])
    assert command[0] == "vlaprep" and "run" in command, command
    assert command[command.index("run") + 1 :][:1] == ["--config"], command
    args, beam_args = vlaprep_parser().parse_known_args(command[1:])
    assert args.command == "run" and not beam_args
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_cronjob_config_and_volumes_come_from_the_same_file():
    docs, by_kind = cronjob_file()
    cronjob, container = _cronjob_container()
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    mounts = [m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{config_path} is not under any volume mount"
    volume = volumes[mounts[0]["name"]]
    (configmap,) = by_kind["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert os.path.basename(config_path) in configmap["data"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {d["metadata"]["name"] for d in by_kind["PersistentVolumeClaim"]}
    cache = {e["name"]: e["value"] for e in container.get("env", [])}.get("VLAPREP_CACHE_DIR", "")
    assert any(cache.startswith(m["mountPath"] + "/") for m in container["volumeMounts"] if m["name"] in volumes
               and "persistentVolumeClaim" in volumes[m["name"]]), f"VLAPREP_CACHE_DIR {cache!r} is not on the volume"


def test_cronjob_run_config_loads_with_vlaprep(tmp_path):
    run_job = pytest.importorskip("vlaprep.pipelines.run_job")
    _, by_kind = cronjob_file()
    _, container = _cronjob_container()
    (configmap,) = by_kind["ConfigMap"]
    config_path = tmp_path / "run.yaml"
    config_path.write_text(configmap["data"]["run.yaml"])
    config = run_job.load_run_config(str(config_path))
    assert os.path.isabs(config.output) and config.output.startswith("/data/")
    assert all(d["path"].startswith("/data/") for d in config.datasets)
    check_vlaprep_argv(["vlaprep", "run", "--config", "/config/run.yaml", *config.beam_args])
    workers = [a.split("=", 1)[1] for a in config.beam_args if a.startswith("--direct_num_workers=")]
    if not any(a.startswith("--runner") for a in config.beam_args):
        # local runner in the pod: os.cpu_count() is the node's, so the worker count must be pinned
        assert workers == [str(container["resources"]["requests"]["cpu"])], (workers, container["resources"])


def test_flink_manifest_sidecar_and_job_server_versions_agree():
    import apache_beam
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    docs = k8s_docs(INFRA / "flink" / "worker-pool-sidecar.yaml")
    containers = {c["name"]: c for d in docs for spec in pod_specs(d) for c in spec["containers"]}
    sidecar = containers["beam-worker-pool"]
    command = sidecar.get("command", []) + sidecar.get("args", [])
    assert "apache_beam.runners.worker.worker_pool_main" in command
    assert "--service_port=50000" in command
    assert {p["containerPort"] for p in sidecar["ports"]} == {50000}
    jobserver = containers["beam-jobserver"]["image"]
    m = re.fullmatch(r"apache/beam_flink(\d+\.\d+)_job_server:(.+)", jobserver)
    assert m, jobserver
    assert m.group(2) == apache_beam.__version__
    assert m.group(1) in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert containers["taskmanager"]["image"].startswith(f"flink:{m.group(1)}."), containers["taskmanager"]["image"]
    # the job server, the TaskManagers and the SDK workers share the artifact/data volume
    for name in ("taskmanager", "beam-worker-pool", "beam-jobserver"):
        assert "/data" in {v["mountPath"] for v in containers[name]["volumeMounts"]}, name
    assert any(a.startswith("--artifacts-dir=/data/") for a in containers["beam-jobserver"]["args"])


# --------------------------------------------------------------------------------------------------
# Airflow DAG
# --------------------------------------------------------------------------------------------------


def test_airflow_dag_compiles_imports_and_matches_the_cronjob(tmp_path):
    path = INFRA / "schedules" / "airflow_dag.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "dag.pyc"), doraise=True)
    dag_module = _load_module(path, "vlaprep_airflow_dag_check")
    cronjob, container = _cronjob_container()
    assert dag_module.IMAGE == container["image"]
    assert dag_module.COMMAND == container["command"]
    assert dag_module.RUN_ARGUMENTS == container["args"]
    assert dag_module.SCHEDULE == cronjob["spec"]["schedule"]
    assert dag_module.ENV == {e["name"]: e["value"] for e in container["env"]}
    assert dag_module.REQUESTS == {k: v for k, v in container["resources"]["requests"].items() if k in ("cpu", "memory")}
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert dag_module.DATA_CLAIM in {v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert dag_module.CONFIG_MAP in {v.get("configMap", {}).get("name") for v in pod["volumes"]}
    args, _ = vlaprep_parser().parse_known_args(dag_module.STATUS_ARGUMENTS)
    assert args.command == "status"
    if importlib.util.find_spec("airflow") is None:
        assert not hasattr(dag_module, "dag")
        with pytest.raises(ImportError, match="apache-airflow"):
            dag_module.build_dag()
    else:  # pragma: no cover - Airflow is not in the project's venv
        assert dag_module.dag.dag_id == dag_module.DAG_ID


# --------------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, rest)] with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def from_images(path: Path) -> list[str]:
    """FROM images with ${ARG} defaults (declared before the first FROM) substituted."""
    defaults, images = {}, []
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and not images:
            name, _, default = rest.partition("=")
            defaults[name] = default.strip().strip('"')
        elif word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], image)
            images.append(image)
    return images


def arg_default(path: Path, name: str) -> str:
    values = [rest.partition("=")[2].strip('"') for word, rest in dockerfile_instructions(path)
              if word == "ARG" and rest.partition("=")[0] == name and "=" in rest]
    assert values, f"{path}: no ARG {name}=default"
    assert len(set(values)) == 1, values
    return values[0]


def copy_sources(path: Path) -> list[tuple[str, str]]:
    out = []
    for word, rest in dockerfile_instructions(path):
        if word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            out.extend((src, parts[-1]) for src in parts[:-1])
    return out


def _python_minor_ok(minor: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return f"{minor}.0" in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_every_from_line_is_pinned():
    assert dockerfiles(), "no Dockerfile under infra/"
    for path in dockerfiles():
        images = from_images(path)
        assert images, f"{path}: no FROM"
        for image in images:
            assert _image_is_pinned(image), f"{path}: FROM {image} is not pinned to an exact version"


def test_worker_image_matches_the_venvs_beam_and_pyprojects_python():
    import apache_beam

    path = INFRA / "container" / "Dockerfile"
    (image,) = from_images(path)
    m = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\d+\.\d+\.\d+)", image)
    assert m, f"expected FROM apache/beam_pythonX.Y_sdk:A.B.C, got {image}"
    assert m.group(2) == apache_beam.__version__, f"image Beam {m.group(2)} != venv Beam {apache_beam.__version__}"
    assert _python_minor_ok(m.group(1)), f"Python {m.group(1)} is outside requires-python"
    assert arg_default(path, "BEAM_VERSION") == apache_beam.__version__
    entrypoints = [rest for word, rest in dockerfile_instructions(path) if word == "ENTRYPOINT"]
    assert entrypoints in ([], ['["/opt/apache/beam/boot"]']), entrypoints


def test_launcher_image_matches_the_worker_image():
    import apache_beam

    path = INFRA / "dataflow" / "Dockerfile"
    (image,) = from_images(path)
    m = re.fullmatch(r"gcr\.io/dataflow-templates-base/python(\d)(\d+)-template-launcher-base:(\S+)", image)
    assert m, image
    launcher_python = f"{m.group(1)}.{m.group(2)}"
    (worker,) = from_images(INFRA / "container" / "Dockerfile")
    assert f"beam_python{launcher_python}_sdk" in worker, (launcher_python, worker)
    assert _python_minor_ok(launcher_python)
    assert arg_default(path, "BEAM_VERSION") == apache_beam.__version__
    env = " ".join(rest for word, rest in dockerfile_instructions(path) if word == "ENV")
    py_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", env).group(1)
    assert ("infra/dataflow/launcher.py", py_file) in copy_sources(path)
    assert not [w for w, _ in dockerfile_instructions(path) if w == "ENTRYPOINT"], "keep the launcher base's ENTRYPOINT"


def _dockerignore_included(patterns: list[str], relpath: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern matches a path or its parents."""
    included = True
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.rstrip("/")
        matched = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if pattern.startswith("**/"):
            matched = matched or any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        if matched:
            included = negate
    return included


def _package_dirs() -> set[str]:
    return set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())


def test_dockerfile_copies_are_the_package_dirs_and_survive_the_ignore_file():
    readme = PYPROJECT["project"]["readme"]
    for path in dockerfiles():
        sources = [src for src, _ in copy_sources(path)]
        package_sources = {s.rstrip("/") for s in sources if (REPO / s).is_dir()}
        assert package_sources == _package_dirs(), (path, package_sources, _package_dirs())
        assert {"pyproject.toml", readme} <= set(sources), path
        ignore = Path(str(path) + ".dockerignore")
        assert ignore.is_file(), f"{path}: expected {ignore.name} next to it (the build context is the repo root)"
        patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
        for src in sources:
            target = REPO / src
            assert target.exists(), f"{path}: COPY {src} does not exist"
            files = [target] if target.is_file() else [f for f in target.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                assert _dockerignore_included(patterns, rel), f"{ignore.name} excludes {rel}, which {path.name} copies"
        for heavy in (".venv/bin/python", "tests/infra/test_infra_files.py", ".git/HEAD", "demo_out/x"):
            assert not _dockerignore_included(patterns, heavy), f"{ignore.name} lets {heavy} into the context"


@pytest.mark.timeout(300)
def test_copied_files_build_a_complete_wheel(tmp_path):
    """`pip install .` in the image sees only what the Dockerfile copies: that must build the whole package."""
    src = tmp_path / "src"
    for source, _ in copy_sources(INFRA / "container" / "Dockerfile"):
        target = REPO / source
        dest = src / source.rstrip("/")
        if target.is_dir():
            import shutil

            shutil.copytree(target, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(target.read_bytes())
    out = tmp_path / "wheel"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, env=env, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("vlaprep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"
    for schema in (REPO / "schemas").glob("*.json"):
        assert f"vlaprep/schemas/{schema.name}" in names, f"{schema.name} missing from the wheel"
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert entry_points and "vlaprep = vlaprep.pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points[0]).decode()

    # What ships to workers (this wheel, via the image or --extra_package) runs the pipeline by itself:
    # the driver and two worker processes import vlaprep from the installed wheel only, not this checkout.
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    from vlaprep.pipelines.job import DatasetInput
    from vlaprep.pipelines.stats.job import run_stats
    from vlaprep.synthetic.rlds import generate_rlds
    from vlaprep.transforms.registry import get_spec

    data = generate_rlds(tmp_path / "rlds", episodes=6, seed=4, image_size=16, num_shards=2)
    run_stats([DatasetInput("bridge_orig", str(data), get_spec("bridge_orig"))], str(tmp_path / "reference"),
              beam_args=["--direct_running_mode=in_memory", "--direct_num_workers=1"], log=lambda m: None)
    script = (
        "import sys, vlaprep\n"
        f"assert vlaprep.__file__.startswith({str(site)!r}), vlaprep.__file__\n"
        "from vlaprep.pipelines.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run_env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", script, "stats", "--dataset", f"bridge_orig={data}", "--output", str(tmp_path / "shipped"),
         "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = (tmp_path / "shipped" / "dataset_statistics.json").read_bytes()
    assert shipped == (tmp_path / "reference" / "dataset_statistics.json").read_bytes()


# --------------------------------------------------------------------------------------------------
# Flex Template: metadata.json and the launcher
# --------------------------------------------------------------------------------------------------


@functools.cache
def metadata() -> dict:
    return json.loads((INFRA / "dataflow" / "metadata.json").read_text())


def test_metadata_parses_and_documents_every_parameter():
    meta = metadata()
    assert meta["name"] and meta["description"]
    names = [p.get("name") for p in meta["parameters"]]
    assert len(names) == len(set(names)), names
    for param in meta["parameters"]:
        for key in ("name", "label", "helpText"):
            assert isinstance(param.get(key), str) and param[key].strip(), f"{param.get('name')}: missing {key}"
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", param["name"]), param["name"]
        assert isinstance(param.get("isOptional", False), bool)
        for regex in param.get("regexes", []):
            re.compile(regex)
        known = f"--{param['name']}" in launcher_flags() or f"--{param['name']}" in beam_flags()
        assert known, f"template parameter {param['name']!r} is neither a launcher flag nor a Beam option"
    required = {p["name"] for p in meta["parameters"] if not p.get("isOptional", False)}
    assert required == {"command", "datasets", "output"}, required


REGEX_EXAMPLES = {
    "command": (["stats", "shards"], ["run", "validate", ""]),
    "datasets": (["bridge_orig=gs://b/rlds/bridge_orig/1.0.0", "a=gs://b/x,taco_play=gs://b/y/0.1.0"],
                 ["bridge_orig=/data/x", "gs://b/x", "a=gs://b/x,", "a=gs://b/x,b"]),
    "output": (["gs://my-bucket/vlaprep/stats", "gs://my-bucket"], ["/data/out", "gs://", "s3://b/x"]),
    "proprio": (["true", "false"], ["yes", "1"]),
    "cameras": (["primary", "primary,wrist"], ["wrist"]),
    "normalization": (["bounds_q99", "bounds", "normal", "fixed:-1,1"], ["q99"]),
    "action_encoding": (["uniform", "mu_law", "mu_law:255"], ["mulaw"]),
    "heldout_fraction": (["0.05", "0", "1"], ["5%", "1.5"]),
    "sdk_container_image": (["us-central1-docker.pkg.dev/p/vlaprep/vlaprep-worker:0.1.0",
                             "localhost:5000/vlaprep-worker:0.1.0", "gcr.io/p/w@sha256:" + "a" * 64],
                            ["vlaprep-worker", "gcr.io/p/vlaprep-worker"]),
}


@pytest.mark.parametrize("name", sorted(REGEX_EXAMPLES))
def test_metadata_regexes_accept_documented_values_and_reject_others(name):
    (param,) = [p for p in metadata()["parameters"] if p["name"] == name]
    good, bad = REGEX_EXAMPLES[name]
    for value in good:
        assert all(re.fullmatch(r, value) for r in param["regexes"]), (name, value)
    for value in bad:
        assert not all(re.fullmatch(r, value) for r in param["regexes"]), (name, value)


def test_launcher_parameters_map_to_real_vlaprep_flags():
    module = launcher()
    for table in (module.VALUE_PARAMETERS, module.BOOL_PARAMETERS):
        for name, (flag, commands) in table.items():
            for command in commands:
                assert flag in vlaprep_command_flags(command), f"{name} -> {flag} is not a flag of vlaprep {command}"
    declared = {p["name"] for p in metadata()["parameters"]}
    template_params = {"command", "datasets"} | set(module.VALUE_PARAMETERS) | set(module.BOOL_PARAMETERS)
    assert template_params == declared - {"sdk_container_image", "disk_size_gb"}, template_params ^ declared


def test_launcher_output_is_a_command_line_vlaprep_accepts():
    module = launcher()
    stats = module.to_cli_argv([
        "--command=stats", "--datasets=bridge_orig=gs://b/rlds/bridge_orig/1.0.0,taco_play=gs://b/rlds/taco_play",
        "--output=gs://b/out", "--proprio=true", "--force=false",
        "--runner=DataflowRunner", "--project=p", "--region", "us-central1", "--sdk_container_image=r/w:0.1.0",
    ])
    args, beam_args, _ = check_vlaprep_argv(["vlaprep", *stats])
    assert args.command == "stats" and args.proprio and not args.force and args.no_wait
    assert args.dataset == ["bridge_orig=gs://b/rlds/bridge_orig/1.0.0", "taco_play=gs://b/rlds/taco_play"]
    assert beam_args == ["--runner=DataflowRunner", "--project=p", "--region=us-central1", "--sdk_container_image=r/w:0.1.0"]

    shards = module.to_cli_argv([
        "--command=shards", "--datasets=calvin=gs://b/calvin", "--output=gs://b/shards",
        "--statistics=gs://b/stats/dataset_statistics.json", "--tokenizer=gs://b/tok", "--heldout_fraction=0.1",
        "--seed=3", "--image_size=256", "--cameras=primary,wrist", "--target_shard_mb=128", "--action_chunk=4",
        "--normalization=fixed:-1,1", "--action_encoding=mu_law:255", "--disk_size_gb=200",
    ])
    args, beam_args, _ = check_vlaprep_argv(["vlaprep", *shards])
    assert (args.heldout_fraction, args.seed, args.image_size, args.action_chunk) == (0.1, 3, 256, 4)
    assert args.no_wait
    assert (args.cameras, args.normalization, args.action_encoding) == ("primary,wrist", "fixed:-1,1", "mu_law:255")
    assert beam_args == ["--disk_size_gb=200"]

    for bad in (["--command=shards", "--datasets=a=gs://x", "--output=gs://o"],
                ["--command=stats", "--datasets=a=gs://x", "--output=gs://o", "--tokenizer=gs://t"],
                ["--command=stats", "--datasets=a", "--output=gs://o"],
                ["--command=stats", "--datasets=a=gs://x", "--output=gs://o", "--proprio=yes"]):
        with pytest.raises(module.TemplateParameterError):
            module.to_cli_argv(bad)


# --------------------------------------------------------------------------------------------------
# shell scripts
# --------------------------------------------------------------------------------------------------


def test_shell_scripts_are_strict_and_parse():
    scripts = shell_scripts()
    assert {p.name for p in scripts} == {"launch.sh", "run_on_flink.sh", "run_on_spark.sh"}
    for path in scripts:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"
        lines = path.read_text().splitlines()
        assert lines[0] in ("#!/usr/bin/env bash", "#!/bin/bash"), f"{path}: shebang {lines[0]!r}"
        code = [line.strip() for line in lines[1:] if line.strip() and not line.lstrip().startswith("#")]
        assert code[0] == "set -euo pipefail", f"{path}: first statement is {code[0]!r}"
        assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
        help_run = run_script(path, "--help")
        assert help_run.returncode == 0 and "Usage:" in help_run.stdout, (path, help_run.stderr)


FLINK_ENVS = [
    {"FLINK_JOB_ENDPOINT": "flink-beam-jobserver:8099", "PARALLELISM": "16", "SDK_WORKER_PARALLELISM": "6"},
    {"FLINK_MASTER": "flink-jobmanager:8081", "FLINK_VERSION": "1.20", "ENVIRONMENT_TYPE": "DOCKER",
     "WORKER_IMAGE": "r/vlaprep-worker:0.1.0", "MAX_PARALLELISM": "128"},
    {"FLINK_MASTER": "flink-jobmanager:8081", "ENVIRONMENT_TYPE": "PROCESS",
     "FLINK_JOB_SERVER_JAR": "https://example.org/beam-runners-flink-1.20-job-server-2.77.0.jar"},
]
SPARK_ENVS = [
    {"SPARK_JOB_ENDPOINT": "spark-beam-jobserver:8099", "SDK_WORKER_PARALLELISM": "4"},
    {"SPARK_REST_URL": "http://spark-master:6066"},
    {"SPARK_MASTER_URL": "spark://spark-master:7077", "ENVIRONMENT_TYPE": "DOCKER", "WORKER_IMAGE": "r/vlaprep-worker:0.1.0"},
]
VLAPREP_COMMANDS = [
    ["stats", "--dataset", "bridge_orig=/data/rlds/bridge_orig/1.0.0", "--output", "/data/out dir/stats", "--proprio"],
    ["shards", "--dataset", "calvin=/data/calvin", "--statistics", "/data/s.json", "--tokenizer", "/data/tok", "--output", "/data/sh"],
    ["run", "--config", "/data/run.yaml"],
]


@pytest.mark.parametrize("script,envs", [("flink/run_on_flink.sh", FLINK_ENVS), ("spark/run_on_spark.sh", SPARK_ENVS)])
def test_runner_scripts_dry_run_is_a_valid_vlaprep_command(script, envs):
    from apache_beam.options.pipeline_options import PortableOptions

    path = INFRA / script
    for env in envs:
        for command in VLAPREP_COMMANDS:
            (argv,) = dry_run_lines(path, *command, env=env)
            args, beam_args, options = check_vlaprep_argv(argv)
            assert argv[1 : 1 + len(command)] == command, "the vlaprep arguments must pass through unchanged"
            portable = options.view_as(PortableOptions)
            assert portable.environment_type == env.get("ENVIRONMENT_TYPE", "EXTERNAL")
            if portable.environment_type == "EXTERNAL":
                assert portable.environment_config == "localhost:50000"  # the sidecar's --service_port
            if "FLINK_JOB_ENDPOINT" in env or "SPARK_JOB_ENDPOINT" in env:
                assert "--runner=PortableRunner" in beam_args and portable.job_endpoint.endswith(":8099")


@pytest.mark.parametrize("script", ["flink/run_on_flink.sh", "spark/run_on_spark.sh"])
def test_runner_scripts_refuse_incomplete_setups(script):
    path = INFRA / script
    assert run_script(path, "stats", "--output", "x").returncode == 2  # no endpoint given
    endpoint = {"FLINK_JOB_ENDPOINT": "h:8099", "SPARK_JOB_ENDPOINT": "h:8099"}
    assert run_script(path, "generate", "rlds", env=endpoint).returncode == 2  # not a pipeline command
    assert run_script(path, "stats", env={**endpoint, "ENVIRONMENT_TYPE": "DOCKER"}).returncode == 2  # no image
    assert run_script(path, "stats", env={**endpoint, "ENVIRONMENT_TYPE": "LOOPBACK"}).returncode == 2


LAUNCH_ENV = {"PROJECT": "my-project", "REGION": "us-central1", "BUCKET": "my-bucket",
              "IMAGE": "us-central1-docker.pkg.dev/my-project/vlaprep/vlaprep-worker:0.1.0"}


def _gcloud_dict(value: str) -> dict:
    """gcloud's dict flag syntax, with the ^DELIM^ alternate delimiter (gcloud topic escaping)."""
    delim = ","
    m = re.match(r"\^([^^]+)\^", value)
    if m:
        delim, value = m.group(1), value[m.end():]
    return dict(item.split("=", 1) for item in value.split(delim))


def test_launch_sh_builds_and_runs_the_template_with_declared_parameters():
    path = INFRA / "dataflow" / "launch.sh"
    (build,) = dry_run_lines(path, "build", env=LAUNCH_ENV)
    assert build[:4] == ["gcloud", "dataflow", "flex-template", "build"] and build[4].startswith("gs://my-bucket/")
    flags = dict(a.split("=", 1) for a in build[5:])
    assert flags["--sdk-language"] == "PYTHON" and Path(flags["--metadata-file"]) == INFRA / "dataflow" / "metadata.json"
    assert flags["--image"].endswith("vlaprep-worker-flex-launcher:0.1.0")

    images = dry_run_lines(path, "images", env=LAUNCH_ENV)
    dockerfiles_built = [Path(cmd[cmd.index("-f") + 1]) for cmd in images if cmd[:2] == ["docker", "build"]]
    assert set(dockerfiles_built) == set(dockerfiles()) and all(cmd[-1] == str(REPO) for cmd in images if cmd[1] == "build")

    declared = {p["name"]: p for p in metadata()["parameters"]}
    for extra in ({}, {"VLAPREP_COMMAND": "shards", "STATISTICS": "gs://my-bucket/s/dataset_statistics.json",
                       "TOKENIZER": "gs://my-bucket/tok", "EXTRA_PARAMETERS": "image_size=256~cameras=primary,wrist"}):
        env = {**LAUNCH_ENV, "DATASETS": "bridge_orig=gs://my-bucket/rlds/bridge_orig/1.0.0,taco_play=gs://my-bucket/t",
               "OUTPUT": "gs://my-bucket/out", **extra}
        (run,) = dry_run_lines(path, "run", env=env)
        assert run[:4] == ["gcloud", "dataflow", "flex-template", "run"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", run[4]), f"invalid Dataflow job name {run[4]!r}"
        flags = dict(a.split("=", 1) for a in run[5:])
        assert flags["--template-file-gcs-location"] == flags.get("--template-file-gcs-location")
        params = _gcloud_dict(flags["--parameters"])
        for name, value in params.items():
            assert name in declared, f"launch.sh passes undeclared template parameter {name!r}"
            for regex in declared[name].get("regexes", []):
                assert re.fullmatch(regex, value), f"{name}={value!r} fails the template's regex {regex!r}"
        missing = {n for n, p in declared.items() if not p.get("isOptional", False)} - set(params)
        assert not missing, missing
        cli = launcher().to_cli_argv([f"--{k}={v}" for k, v in params.items()] + ["--runner=DataflowRunner"])
        check_vlaprep_argv(["vlaprep", *cli])


def test_launch_sh_refuses_unpinned_images_and_missing_settings():
    path = INFRA / "dataflow" / "launch.sh"
    for image in ("us-central1-docker.pkg.dev/p/vlaprep/vlaprep-worker", "r/vlaprep-worker:latest",
                  "localhost:5000/vlaprep-worker"):
        assert run_script(path, "--dry-run", "build", env={**LAUNCH_ENV, "IMAGE": image}).returncode == 2, image
    assert run_script(path, "--dry-run", "build", env={k: v for k, v in LAUNCH_ENV.items() if k != "BUCKET"}).returncode == 2
    assert run_script(path, "--dry-run", "run", env=LAUNCH_ENV).returncode == 2  # no DATASETS/OUTPUT
    shards = {**LAUNCH_ENV, "VLAPREP_COMMAND": "shards", "DATASETS": "a=gs://b/a", "OUTPUT": "gs://b/o"}
    assert run_script(path, "--dry-run", "run", env=shards).returncode == 2  # no STATISTICS/TOKENIZER
    assert run_script(path, "--dry-run", "deploy", env=LAUNCH_ENV).returncode == 2
