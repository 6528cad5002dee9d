#!/usr/bin/env bash
# Run a vlaprep command on a Flink cluster through Beam's portable runner. See infra/flink/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: infra/flink/run_on_flink.sh [--dry-run] COMMAND [vlaprep arguments...]
       infra/flink/run_on_flink.sh --help

COMMAND is a vlaprep pipeline command: stats, shards, validate or run. Its arguments are passed
unchanged; the Beam options for Flink are appended, e.g.

  FLINK_JOB_ENDPOINT=flink-beam-jobserver:8099 infra/flink/run_on_flink.sh \
      stats --dataset bridge_orig=/data/rlds/bridge_orig/1.0.0 --output /data/out/stats

Every path must name the same files on this machine and on every SDK worker (a shared volume
mounted at the same path, e.g. /data): the vlaprep drivers read and write paths locally.

  --dry-run  print the vlaprep command line (shell-quoted) instead of running it

How the job reaches Flink (one of):
  FLINK_JOB_ENDPOINT    HOST:PORT of a Beam Flink job server deployed next to the cluster (port 8099)
                        -> --runner=PortableRunner --job_endpoint=...
    FLINK_ARTIFACT_ENDPOINT  HOST:PORT of its artifact service (default: same host, port 8098)
  FLINK_MASTER          HOST:PORT of the Flink REST endpoint (8081); Beam starts a job server here
                        from the jar (needs Java; downloads the jar unless FLINK_JOB_SERVER_JAR)
                        -> --runner=FlinkRunner --flink_master=...
    FLINK_VERSION        Flink minor the cluster runs, one Beam publishes a runner for (e.g. 1.20)
    FLINK_JOB_SERVER_JAR path or URL of beam-runners-flink-<version>-job-server-<beam>.jar

Where the Python SDK workers run (the vlaprep worker image is the SDK environment):
  ENVIRONMENT_TYPE      EXTERNAL (default), DOCKER or PROCESS
  ENVIRONMENT_CONFIG    EXTERNAL: worker pool address (default localhost:50000, the TaskManager's
                        sidecar); DOCKER: image (default $WORKER_IMAGE); PROCESS: JSON command spec
                        (default {"command": "/opt/apache/beam/boot"})
  WORKER_IMAGE          vlaprep worker image for DOCKER, pinned by tag

Parallelism:
  PARALLELISM             --parallelism (default: the cluster's parallelism.default)
  MAX_PARALLELISM         --max_parallelism
  SDK_WORKER_PARALLELISM  --sdk_worker_parallelism: SDK worker processes per TaskManager (default 1)

  VLAPREP               the vlaprep executable (default: vlaprep)
EOF
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
  *) echo "run_on_flink.sh: error: expected a pipeline command (stats, shards, validate, run), got '$COMMAND'" >&2; exit 2 ;;
esac

beam_args=()
if [[ -n "${FLINK_JOB_ENDPOINT:-}" ]]; then
  beam_args+=(
    --runner=PortableRunner
    "--job_endpoint=${FLINK_JOB_ENDPOINT}"
    "--artifact_endpoint=${FLINK_ARTIFACT_ENDPOINT:-${FLINK_JOB_ENDPOINT%:*}:8098}"
  )
elif [[ -n "${FLINK_MASTER:-}" ]]; then
  beam_args+=(--runner=FlinkRunner "--flink_master=${FLINK_MASTER}")
  [[ -z "${FLINK_VERSION:-}" ]] || beam_args+=("--flink_version=${FLINK_VERSION}")
  [[ -z "${FLINK_JOB_SERVER_JAR:-}" ]] || beam_args+=("--flink_job_server_jar=${FLINK_JOB_SERVER_JAR}")
else
  echo "run_on_flink.sh: error: expected FLINK_JOB_ENDPOINT (deployed job server) or FLINK_MASTER (see --help)" >&2
  exit 2
fi

ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-EXTERNAL}"
case "$ENVIRONMENT_TYPE" in
  EXTERNAL) environment_config="${ENVIRONMENT_CONFIG:-localhost:50000}" ;;
  DOCKER)
    environment_config="${ENVIRONMENT_CONFIG:-${WORKER_IMAGE:-}}"
    [[ -n "$environment_config" ]] || { echo "run_on_flink.sh: error: expected WORKER_IMAGE or ENVIRONMENT_CONFIG for DOCKER" >&2; exit 2; }
    ;;
  PROCESS)
    default_process='{"command": "/opt/apache/beam/boot"}'
    environment_config="${ENVIRONMENT_CONFIG:-$default_process}"
    ;;
  *) echo "run_on_flink.sh: error: expected ENVIRONMENT_TYPE EXTERNAL, DOCKER or PROCESS, got '$ENVIRONMENT_TYPE'" >&2; exit 2 ;;
esac
beam_args+=("--environment_type=${ENVIRONMENT_TYPE}" "--environment_config=${environment_config}")

[[ -z "${PARALLELISM:-}" ]] || beam_args+=("--parallelism=${PARALLELISM}")
[[ -z "${MAX_PARALLELISM:-}" ]] || beam_args+=("--max_parallelism=${MAX_PARALLELISM}")
[[ -z "${SDK_WORKER_PARALLELISM:-}" ]] || beam_args+=("--sdk_worker_parallelism=${SDK_WORKER_PARALLELISM}")

cmd=("${VLAPREP:-vlaprep}" "$COMMAND" "$@" "${beam_args[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  exec "${cmd[@]}"
fi
