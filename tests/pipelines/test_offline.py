"""Default local runs never reach for the network (Beam's plain DirectRunner would download Prism).

The CLI runs in a child interpreter with an audit hook (PEP 578) that records every ``socket.connect``
and ``socket.getaddrinfo``; only loopback and Unix sockets are allowed.
"""

import json
import subprocess
import sys

import pytest

from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer

AUDITED = r'''
import json, socket, sys
events = []
LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0")

def hook(event, args):
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address[0] not in LOCAL:
            events.append([event, str(address[0]), address[1]])
    elif event == "socket.getaddrinfo" and args[0] not in LOCAL and args[0] is not None:
        events.append([event, str(args[0]), args[1]])

sys.addaudithook(hook)
if sys.argv[1] == "--self-check":  # the hook must see an attempt to leave the machine
    s = socket.socket()
    s.settimeout(0.01)
    try:
        s.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed
    except OSError:
        pass
    code = 0
else:
    from vlaprep.pipelines.cli import main
    code = main(sys.argv[1:])
print("AUDIT " + json.dumps(events))
sys.exit(code)
'''


def run_audited(args):
    done = subprocess.run([sys.executable, "-c", AUDITED, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("AUDIT ")][-1]
    return json.loads(line[len("AUDIT "):])


def test_the_audit_hook_sees_outbound_connections():
    assert run_audited(["--self-check"]) == [["socket.connect", "192.0.2.1", 80]]


@pytest.mark.timeout(600)
def test_default_stats_and_shards_runs_stay_on_the_machine(tmp_path):
    data = generate_rlds(tmp_path / "rlds", episodes=6, seed=2, image_size=16, num_shards=2)
    build_llama_like_tokenizer(tmp_path / "tok")
    dataset = f"bridge_orig={data}"
    # No Beam options: vlaprep's own defaults pick the runner.
    assert run_audited(["stats", "--dataset", dataset, "--output", str(tmp_path / "stats")]) == []
    assert run_audited([
        "shards", "--dataset", dataset, "--statistics", str(tmp_path / "stats" / "dataset_statistics.json"),
        "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "shards"), "--image-size", "16",
    ]) == []
    assert (tmp_path / "shards" / "manifest.json").exists()
