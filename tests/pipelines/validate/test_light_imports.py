"""The plain core of the validate package imports neither Beam nor torch nor transformers (checked in a fresh
interpreter: this test process has imported them already)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("apache_beam", "torch", "transformers")


@pytest.mark.parametrize("module", ["layout", "read", "metrics"])
def test_plain_modules_import_no_beam_torch_or_transformers(module):
    probe = (
        "import json, sys\n"
        f"import vlaprep.pipelines.validate.{module}\n"
        f"print(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}} & set({list(HEAVY)!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
