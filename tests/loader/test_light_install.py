"""A training node installs ``vlaprep[loader]`` alone: no Apache Beam, no TensorFlow, and it reads shards.

Builds the project's wheel, a fresh isolated venv (no system or parent site-packages), and installs
``<wheel>[loader]`` with pip's own resolution (so the extras' metadata is what is tested), constrained to
the versions this environment already has so pip takes them from its local wheel directories and cache.
The shards are written here, in the main environment. About a minute (most of it unpacking torch).
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

_spec = importlib.util.spec_from_file_location("loader_test_module", pathlib.Path(__file__).with_name("test_loader.py"))
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEAVY = {"apache-beam", "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "transformers", "tokenizers"}

READ = r"""
import json, sys
from vlaprep.loader import ShardDataset, ShardLoader
root = sys.argv[1]
loader = ShardLoader(ShardDataset(root, seed=1, shuffle_buffer=4, history=2, mixture="manifest", batch_size=3),
                     batch_size=None, num_workers=2)
seq = [[d, e, int(s)] for b in loader for d, e, s in zip(b["dataset_name"], b["episode_id"], b["step_index"])]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("apache_beam", "tensorflow", "tensorflow_datasets", "transformers"))
print(json.dumps({"seq": seq, "heavy": heavy, "state": loader.state_dict()["complete"]}))
"""


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.light_install
@pytest.mark.timeout(1200)
def test_loader_extra_installs_without_beam_or_tensorflow_and_reads_shards(tmp_path):
    shards = tmp_path / "shards"
    tl.write_shards(shards, tl.FEW_FILES, row_group_size=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
         env=env, timeout=300)
    (wheel,) = wheels.glob("vlaprep-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env, timeout=300)  # isolated: no system site-packages
    py = venv / "bin" / "python"
    assert _run([str(py), "-c", "import sys; print(sys.prefix != sys.base_prefix)"]).strip() == "True"
    constraints = tmp_path / "constraints.txt"
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "vlaprep"})
    constraints.write_text("\n".join(pins) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--constraint", str(constraints), f"{wheel}[loader]"], env=env, timeout=1000)

    installed = {d["name"].lower() for d in json.loads(_run([str(py), "-m", "pip", "list", "--format=json"], env=env))}
    assert not installed & HEAVY, sorted(installed & HEAVY)
    assert {"torch", "pyarrow", "numpy", "pillow", "jsonschema", "vlaprep"} <= installed
    probe = _run([str(py), "-c", "import importlib.util as u; print([m for m in ('apache_beam', 'tensorflow') if u.find_spec(m)])"],
                 env=env)
    assert probe.strip() == "[]"

    out = json.loads(_run([str(py), "-c", READ, str(shards)], env=env, cwd=tmp_path, timeout=300).strip().splitlines()[-1])
    here = json.loads(_run([sys.executable, "-c", READ, str(shards)], cwd=tmp_path, timeout=300).strip().splitlines()[-1])
    assert out["heavy"] == [] and out["state"] is True
    assert out["seq"] == here["seq"] and len(out["seq"]) == len(tl.episode_rows([e for f in tl.FEW_FILES for e in f]))
