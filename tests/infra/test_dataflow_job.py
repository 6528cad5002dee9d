"""DataflowRunner: the real runner builds, stages and describes vlaprep's jobs, without submitting.

With ``--template_location`` Beam's DataflowRunner does everything a submission does (pipeline proto,
staging to ``--staging_location``, the job description with workers, image and options) and writes the
job description there instead of calling the Dataflow API. Staging and template go to a local GCS
emulator bucket (``tests/conftest.py``); nothing leaves the machine.
"""

import json

import pytest

from vlaprep import paths
from vlaprep.pipelines.job import DatasetInput
from vlaprep.pipelines.stats.job import run_stats
from vlaprep.synthetic.rlds import generate_rlds
from vlaprep.synthetic.tokenizer import build_llama_like_tokenizer
from vlaprep.transforms.registry import get_spec

IMAGE = "us-central1-docker.pkg.dev/p/vlaprep/vlaprep-worker:0.1.0"
IN_PROCESS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_running_mode=in_memory"]


def dataflow_args(bucket: str, job: str) -> list:
    return [
        "--runner=DataflowRunner", "--project=vlaprep-test", "--region=us-central1",
        f"--temp_location={bucket}/tmp", f"--staging_location={bucket}/staging",
        f"--template_location={bucket}/templates/{job}.json", f"--sdk_container_image={IMAGE}", "--sdk_location=container",
        "--experiments=use_runner_v2", "--machine_type=n2-highmem-8", "--disk_size_gb=200", "--num_workers=3",
        "--max_num_workers=40", f"--job_name={job}",
    ]


def staged_pipeline(bucket: str, job: str):
    from apache_beam.portability.api import beam_runner_api_pb2

    staged = [n for n, _ in paths.list_files(paths.join(bucket, "staging")) if n.startswith(job) and n.endswith("/pipeline.pb")]
    assert len(staged) == 1, staged
    proto = beam_runner_api_pb2.Pipeline()
    proto.ParseFromString(paths.read_bytes(paths.join(bucket, "staging", staged[0])))
    return proto


def check_job_description(bucket: str, job: str) -> dict:
    description = json.loads(paths.read_text(paths.join(bucket, "templates", f"{job}.json")))
    assert description["name"] == job and description["type"] == "JOB_TYPE_BATCH"
    pool = description["environment"]["workerPools"][0]
    assert pool["machineType"] == "n2-highmem-8" and pool["diskSizeGb"] == 200 and pool["numWorkers"] == 3
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 40
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
    assert "use_runner_v2" in description["environment"]["experiments"]
    return description


@pytest.fixture(scope="module")
def rlds(tmp_path_factory):
    return generate_rlds(tmp_path_factory.mktemp("df-rlds"), episodes=6, seed=3, image_size=16, num_shards=2)


@pytest.mark.timeout(300)
def test_stats_job_is_built_and_staged_for_dataflow(gcs_prefix, rlds):
    paths.copy_tree(str(rlds), paths.join(gcs_prefix, "rlds"))
    out = paths.join(gcs_prefix, "stats")
    result = run_stats([DatasetInput("bridge_orig", paths.join(gcs_prefix, "rlds"), get_spec("bridge_orig"))], out,
                       beam_args=dataflow_args(gcs_prefix, "vlaprep-stats"), log=lambda m: None, wait=False)
    assert type(result.job).__name__ == "DataflowPipelineResult"
    check_job_description(gcs_prefix, "vlaprep-stats")
    names = {t.unique_name for t in staged_pipeline(gcs_prefix, "vlaprep-stats").components.transforms.values()}
    assert {"ListUnits", "ProjectUnits", "Statistics", "FinalizeStatistics"} <= names
    # Built, not run: nothing was published.
    assert not paths.isfile(paths.join(out, "dataset_statistics.json"))


@pytest.mark.timeout(300)
def test_shards_job_is_built_and_staged_for_dataflow(tmp_path, gcs_prefix, rlds):
    from vlaprep.pipelines.shards.job import run_shards

    inputs = [DatasetInput("bridge_orig", str(rlds), get_spec("bridge_orig"))]
    run_stats(inputs, str(tmp_path / "stats"), beam_args=IN_PROCESS, log=lambda m: None)
    build_llama_like_tokenizer(tmp_path / "tok")
    out = paths.join(gcs_prefix, "shards")
    result = run_shards(inputs, str(tmp_path / "stats" / "dataset_statistics.json"), str(tmp_path / "tok"), out,
                        image_size=16, beam_args=dataflow_args(gcs_prefix, "vlaprep-shards"), log=lambda m: None, wait=False)
    assert type(result.job).__name__ == "DataflowPipelineResult"
    check_job_description(gcs_prefix, "vlaprep-shards")
    names = {t.unique_name for t in staged_pipeline(gcs_prefix, "vlaprep-shards").components.transforms.values()}
    assert {"Read[bridge_orig]", "EncodeEpisodes", "WriteShards", "FinalizeShards"} <= names
    assert not paths.isfile(paths.join(out, "manifest.json"))
