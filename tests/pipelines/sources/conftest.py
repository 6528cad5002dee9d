"""Datasets the source tests share (written once per session by the generators), and a TestPipeline
runner that reads a source's two outputs back."""

import base64
import os
import pickle

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from vlaprep.synthetic.calvin import generate_calvin
from vlaprep.synthetic.rlds import generate_rlds


@pytest.fixture(scope="session")
def rlds(tmp_path_factory):
    return generate_rlds(tmp_path_factory.mktemp("rlds"), episodes=12, seed=5, image_size=24, num_shards=2)


@pytest.fixture(scope="session")
def calvin(tmp_path_factory):
    return generate_calvin(tmp_path_factory.mktemp("calvin") / "root", frames=300, seed=2, image_static=12, image_gripper=8)


@pytest.fixture
def collect():
    """Run a source in a TestPipeline; return (episodes, quarantine) read back from text sinks."""

    def run(transform, out_dir):
        with BeamTestPipeline() as p:
            result = p | transform
            for tag in ("episodes", "quarantine"):
                _ = (
                    result[tag]
                    | f"Pickle{tag}" >> beam.Map(lambda x: base64.b64encode(pickle.dumps(x)).decode())
                    | f"Write{tag}" >> beam.io.WriteToText(str(out_dir / tag / "part"))
                )
        out = []
        for tag in ("episodes", "quarantine"):
            items = []
            for name in sorted(os.listdir(out_dir / tag)):
                items += [pickle.loads(base64.b64decode(line)) for line in open(out_dir / tag / name) if line.strip()]
            out.append(items)
        return out

    return run
