"""Shared fixtures: a local Google Cloud Storage emulator for the ``gs://`` code paths.

``gcs_bucket`` starts ``gcp-storage-emulator`` (a test dependency) on a loopback port, by pid, for the
session and points the real google-cloud-storage client, and through it Beam's GCS filesystem, at it
with ``STORAGE_EMULATOR_HOST``. Nothing leaves the machine.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    pytest.importorskip("apache_beam.io.gcp.gcsfilesystem", reason="needs apache-beam[gcp]")
    pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
         "--default-bucket=vlaprep-test"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.time() > deadline:
            raise TimeoutError("expected gcp-storage-emulator to listen within 60 s")
        time.sleep(0.2)
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    # Beam looks up Google default credentials before every GCS client (4 retries, ~20 s, then it
    # connects anonymously). There are none here: settle that lookup as "anonymous" up front.
    from apache_beam.internal.gcp import auth

    auth._Credentials._credentials = None
    auth._Credentials._credentials_init = True
    try:
        yield "gs://vlaprep-test"
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        auth._Credentials._credentials_init = False
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def gcs_prefix(gcs_emulator):
    """A fresh ``gs://vlaprep-test/<unique>`` prefix per test."""
    return f"{gcs_emulator}/{uuid.uuid4().hex[:12]}"

