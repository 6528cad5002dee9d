"""Portability: the job-server protocol Flink and Spark use, with workers in a separate process.

Starts Beam's Python job service and an EXTERNAL worker pool on loopback ports (bounded time, stopped by
pid), runs the statistics and shard pipelines through ``PortableRunner`` and compares the outputs byte for
byte with the in-process runner's.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.transforms.registry import get_spec

IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"expected a service on port {port} within {timeout}s")


@pytest.fixture(scope="module")
def portable_services():
    job_port, pool_port = _free_port(), _free_port()
    # The worker pool starts SDK harnesses with `python` from PATH: make that this venv's interpreter.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": path}
    procs = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True),
    ]
    try:
        _wait_for_port(job_port, procs[0])
        _wait_for_port(pool_port, procs[1])
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_rlds(tmp_path_factory.mktemp("portable"), episodes=12, seed=9, image_size=32, num_shards=3,
                         nan_episodes=1, short_episodes=(2,))


@pytest.mark.timeout(300)
def test_stats_identical_through_job_service_and_external_workers(tmp_path, dataset, portable_services):
    inputs = [DatasetInput("bridge_orig", str(dataset), get_spec("bridge_orig"))]
    local = run_stats(inputs, str(tmp_path / "local"), beam_args=IN_PROCESS, log=lambda m: None)
    remote = run_stats(inputs, str(tmp_path / "portable"), beam_args=portable_services, log=lambda m: None)
    assert remote.computed == ["bridge_orig"]
    assert (tmp_path / "local/dataset_statistics.json").read_bytes() == (tmp_path / "portable/dataset_statistics.json").read_bytes()
    assert (tmp_path / "local/quarantine.jsonl").read_bytes() == (tmp_path / "portable/quarantine.jsonl").read_bytes()
    assert len(local.quarantine) == 1  # the NaN episode; the 2-step one is an empty trajectory OpenVLA counts


@pytest.mark.timeout(400)
def test_shards_identical_through_job_service_and_external_workers(tmp_path, dataset, portable_services):
    from vlaprep.pipelines.shards.job import run_shards
    from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

    inputs = [DatasetInput("bridge_orig", str(dataset), get_spec("bridge_orig"))]
    run_stats(inputs, str(tmp_path / "stats"), beam_args=IN_PROCESS, log=lambda m: None)
    build_llama_like_tokenizer(tmp_path / "tok")
    outputs = {}
    for name, args in (("local", IN_PROCESS), ("portable", portable_services)):
        result = run_shards(inputs, str(tmp_path / "stats" / "dataset_statistics.json"), str(tmp_path / "tok"),
                            str(tmp_path / name), heldout_fraction=0.3, image_size=16, target_shard_mb=0.05,
                            beam_args=args, log=lambda m: None)
        outputs[name] = result.manifest
    assert outputs["local"] == outputs["portable"]
    assert len(outputs["local"]["files"]) >= 2
    for entry in outputs["local"]["files"]:
        assert (tmp_path / "local" / entry["path"]).read_bytes() == (tmp_path / "portable" / entry["path"]).read_bytes()


@pytest.mark.timeout(300)
def test_no_wait_submits_then_the_job_publishes_without_the_driver(tmp_path, dataset, portable_services):
    """`--no-wait` (Flex Template launches, schedulers): the CLI exits once the job service has the job;
    the job's last step writes the outputs, byte for byte what a waiting in-process run writes."""
    inputs = [DatasetInput("bridge_orig", str(dataset), get_spec("bridge_orig"))]
    run_stats(inputs, str(tmp_path / "local"), beam_args=IN_PROCESS, log=lambda m: None)
    out = tmp_path / "submitted"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "vlaprep"), "stats", "--dataset", f"bridge_orig={dataset}",
         "--output", str(out), "--no-wait", *portable_services],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("submitted "), done.stdout
    deadline = time.time() + 240
    target = out / "dataset_statistics.json"
    while not target.exists() and time.time() < deadline:
        time.sleep(0.25)
    assert target.read_bytes() == (tmp_path / "local/dataset_statistics.json").read_bytes()
    cache = out / "dataset_statistics.cache.json"
    while not cache.exists() and time.time() < deadline:  # written right after the statistics
        time.sleep(0.1)
    assert (out / "quarantine.jsonl").read_bytes() == (tmp_path / "local/quarantine.jsonl").read_bytes()
