"""Airflow DAG: regenerate vlaprep outputs daily with ``vlaprep run --config /config/run.yaml``.

Two tasks in one pod image (the vlaprep worker image, infra/container/Dockerfile), both on the
shared volume and the run config of infra/schedules/cronjob.yaml:

  status      ``vlaprep status /config/run.yaml``: logs what the run would recompute (informational;
              its failure never blocks the run)
  regenerate  ``vlaprep run --config /config/run.yaml``: stats -> shards -> validate; stages and
              datasets whose input fingerprints are unchanged are reused

``max_active_runs=1`` plays the role of the CronJob's ``concurrencyPolicy: Forbid``.

Needs ``apache-airflow`` (2.4+, for ``schedule=``) and ``apache-airflow-providers-cncf-kubernetes``
(``container_resources`` and ``on_finish_action``: provider 7.0+). Without them this module still
imports (so tools and tests can read it) and defines no DAG; ``build_dag()`` then raises ImportError.
"""

from __future__ import annotations

import datetime

DAG_ID = "vlaprep_regenerate"
SCHEDULE = "17 3 * * *"  # daily, 03:17 UTC, same as the CronJob
NAMESPACE = "default"
IMAGE = "REGISTRY/vlaprep-worker:0.1.0"
COMMAND = ["vlaprep"]  # replaces the image's ENTRYPOINT (the Beam SDK boot binary)
RUN_ARGUMENTS = ["run", "--config", "/config/run.yaml"]
STATUS_ARGUMENTS = ["status", "/config/run.yaml"]
ENV = {"VLAPREP_CACHE_DIR": "/data/.vlaprep-cache"}
DATA_CLAIM = "vlaprep-data"
CONFIG_MAP = "vlaprep-run-config"
REQUESTS = {"cpu": "8", "memory": "32Gi"}
LIMITS = {"cpu": "8", "memory": "32Gi"}

try:
    from airflow import DAG
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s
except ImportError as e:  # no Airflow here: keep the module importable, build no DAG
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None


def build_dag():
    """The DAG object; raises ImportError naming the missing packages when Airflow is absent."""
    if _IMPORT_ERROR is not None:
        raise ImportError(
            f"expected apache-airflow and apache-airflow-providers-cncf-kubernetes to build the {DAG_ID!r} DAG, "
            f"got {_IMPORT_ERROR!r}; hint: pip install apache-airflow apache-airflow-providers-cncf-kubernetes"
        ) from _IMPORT_ERROR

    volumes = [
        k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=DATA_CLAIM)),
        k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=CONFIG_MAP)),
    ]
    volume_mounts = [
        k8s.V1VolumeMount(name="data", mount_path="/data"),
        k8s.V1VolumeMount(name="config", mount_path="/config", read_only=True),
    ]
    env_vars = [k8s.V1EnvVar(name=name, value=value) for name, value in ENV.items()]

    def pod_task(task_id, arguments, resources, **kwargs):
        return KubernetesPodOperator(
            task_id=task_id,
            name=f"vlaprep-{task_id}",
            namespace=NAMESPACE,
            image=IMAGE,
            cmds=COMMAND,
            arguments=arguments,
            env_vars=env_vars,
            volumes=volumes,
            volume_mounts=volume_mounts,
            container_resources=resources,
            get_logs=True,
            on_finish_action="delete_pod",
            **kwargs,
        )

    with DAG(
        dag_id=DAG_ID,
        schedule=SCHEDULE,
        start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 1, "retry_delay": datetime.timedelta(minutes=30)},
        tags=["vlaprep"],
        doc_md=__doc__,
    ) as dag:
        status = pod_task(
            "status",
            STATUS_ARGUMENTS,
            k8s.V1ResourceRequirements(requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "2Gi"}),
            retries=0,
        )
        regenerate = pod_task(
            "regenerate",
            RUN_ARGUMENTS,
            k8s.V1ResourceRequirements(requests=REQUESTS, limits=LIMITS),
            trigger_rule="all_done",  # run even when the informational status task failed
            execution_timeout=datetime.timedelta(hours=23),
        )
        status >> regenerate
    return dag


if _IMPORT_ERROR is None:
    dag = build_dag()
