#!/usr/bin/env bash
# Run a vlaprep command on a Spark cluster through Beam's portable runner. See infra/spark/README.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: infra/spark/run_on_spark.sh [--dry-run] COMMAND [vlaprep arguments...]
       infra/spark/run_on_spark.sh --help

COMMAND is a vlaprep pipeline command: stats, shards, validate or run. Its arguments are passed
unchanged; the Beam options for Spark are appended, e.g.

  SPARK_JOB_ENDPOINT=spark-beam-jobserver:8099 infra/spark/run_on_spark.sh \
      shards --dataset bridge_orig=/data/rlds/bridge_orig/1.0.0 \
             --statistics /data/out/stats/dataset_statistics.json \
             --tokenizer /data/models/tokenizer --output /data/out/shards

Every path must name the same files on this machine and on every SDK worker (a shared volume
mounted at the same path, e.g. /data): the vlaprep drivers read and write paths locally.

  --dry-run  print the vlaprep command line (shell-quoted) instead of running it

How the job reaches Spark (the first one set wins):
  SPARK_JOB_ENDPOINT    HOST:PORT of a Beam Spark job server deployed next to the cluster (port 8099)
                        -> --runner=PortableRunner --job_endpoint=...
    SPARK_ARTIFACT_ENDPOINT  HOST:PORT of its artifact service (default: same host, port 8098)
  SPARK_REST_URL        http://HOST:6066, the standalone master's REST submission endpoint: Beam
                        builds an uber jar and submits it there
                        -> --runner=SparkRunner --spark_submit_uber_jar --spark_rest_url=...
  SPARK_MASTER_URL      spark://HOST:7077; Beam starts a job server here from the jar (needs Java;
                        downloads the jar unless SPARK_JOB_SERVER_JAR)
                        -> --runner=SparkRunner --spark_master_url=...
    SPARK_JOB_SERVER_JAR path or URL of beam-runners-spark-3-job-server-<beam>.jar

Where the Python SDK workers run (the vlaprep worker image is the SDK environment):
  ENVIRONMENT_TYPE      EXTERNAL (default), DOCKER or PROCESS
  ENVIRONMENT_CONFIG    EXTERNAL: worker pool address (default localhost:50000, a worker pool next to
                        each executor); DOCKER: image (default $WORKER_IMAGE); PROCESS: JSON command
                        spec (default {"command": "/opt/apache/beam/boot"})
  WORKER_IMAGE          vlaprep worker image for DOCKER, pinned by tag

Parallelism:
  SDK_WORKER_PARALLELISM  --sdk_worker_parallelism: SDK worker processes per executor (default 1)
  (source splitting follows the cluster's spark.default.parallelism; see the README)

  VLAPREP               the vlaprep executable (default: vlaprep)
USAGE
}

DRY_RUN=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dry-run) DRY_RUN=1; shift ;;
esac
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
COMMAND="$1"
shift
case "$COMMAND" in
  stats|shards|validate|run) ;;
  *) echo "run_on_spark.sh: error: expected a pipeline command (stats, shards, validate, run), got '$COMMAND'" >&2; exit 2 ;;
esac

beam_args=()
if [[ -n "${SPARK_JOB_ENDPOINT:-}" ]]; then
  beam_args+=(
    --runner=PortableRunner
    "--job_endpoint=${SPARK_JOB_ENDPOINT}"
    "--artifact_endpoint=${SPARK_ARTIFACT_ENDPOINT:-${SPARK_JOB_ENDPOINT%:*}:8098}"
  )
elif [[ -n "${SPARK_REST_URL:-}" ]]; then
  beam_args+=(--runner=SparkRunner --spark_submit_uber_jar "--spark_rest_url=${SPARK_REST_URL}")
  [[ -z "${SPARK_JOB_SERVER_JAR:-}" ]] || beam_args+=("--spark_job_server_jar=${SPARK_JOB_SERVER_JAR}")
elif [[ -n "${SPARK_MASTER_URL:-}" ]]; then
  beam_args+=(--runner=SparkRunner "--spark_master_url=${SPARK_MASTER_URL}")
  [[ -z "${SPARK_JOB_SERVER_JAR:-}" ]] || beam_args+=("--spark_job_server_jar=${SPARK_JOB_SERVER_JAR}")
else
  echo "run_on_spark.sh: error: expected SPARK_JOB_ENDPOINT, SPARK_REST_URL or SPARK_MASTER_URL (see --help)" >&2
  exit 2
fi

ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-EXTERNAL}"
case "$ENVIRONMENT_TYPE" in
  EXTERNAL) environment_config="${ENVIRONMENT_CONFIG:-localhost:50000}" ;;
  DOCKER)
    environment_config="${ENVIRONMENT_CONFIG:-${WORKER_IMAGE:-}}"
    [[ -n "$environment_config" ]] || { echo "run_on_spark.sh: error: expected WORKER_IMAGE or ENVIRONMENT_CONFIG for DOCKER" >&2; exit 2; }
    ;;
  PROCESS)
    default_process='{"command": "/opt/apache/beam/boot"}'
    environment_config="${ENVIRONMENT_CONFIG:-$default_process}"
    ;;
  *) echo "run_on_spark.sh: error: expected ENVIRONMENT_TYPE EXTERNAL, DOCKER or PROCESS, got '$ENVIRONMENT_TYPE'" >&2; exit 2 ;;
esac
beam_args+=("--environment_type=${ENVIRONMENT_TYPE}" "--environment_config=${environment_config}")

[[ -z "${SDK_WORKER_PARALLELISM:-}" ]] || beam_args+=("--sdk_worker_parallelism=${SDK_WORKER_PARALLELISM}")

cmd=("${VLAPREP:-vlaprep}" "$COMMAND" "$@" "${beam_args[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  exec "${cmd[@]}"
fi
