#!/usr/bin/env bash
# Build and run the vlaprep Dataflow Flex Template. See infra/dataflow/README.md (and its "Open gaps").
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: infra/dataflow/launch.sh [--dry-run] images|build|run
       infra/dataflow/launch.sh --help

  images   docker build + push the worker image ($IMAGE, infra/container/Dockerfile) and the
           launcher image ($LAUNCHER_IMAGE, infra/dataflow/Dockerfile), from the repository root
  build    gcloud dataflow flex-template build: write the template spec to $TEMPLATE_PATH
  run      gcloud dataflow flex-template run: start one job from the template

  --dry-run  print the commands (shell-quoted, one per line) instead of running them

Environment (required):
  PROJECT    GCP project id
  REGION     Dataflow region, e.g. us-central1
  BUCKET     bucket name (no gs://) for the template spec, temp and staging files
  IMAGE      worker image WITH a pinned tag, e.g. us-central1-docker.pkg.dev/my-project/vlaprep/vlaprep-worker:0.1.0

Environment (optional):
  LAUNCHER_IMAGE  launcher image (default: IMAGE's repository + "-flex-launcher", same tag)
  TEMPLATE_PATH   template spec (default: gs://$BUCKET/templates/vlaprep-flex-<tag>.json)

Environment for `run`:
  VLAPREP_COMMAND  stats (default) or shards
  DATASETS         NAME=gs://PATH[,NAME=gs://PATH...]                  (required)
  OUTPUT           gs:// output directory                               (required)
  STATISTICS       gs://.../dataset_statistics.json                     (shards)
  TOKENIZER        gs:// tokenizer directory                            (shards)
  MACHINE_TYPE     default n2-standard-8 for stats, n2-highmem-8 for shards
  DISK_SIZE_GB     default 100 for stats, 200 for shards
  NUM_WORKERS      initial workers (default 5)
  MAX_WORKERS      autoscaling ceiling (default 100)
  JOB_NAME         default vlaprep-<command>-<UTC timestamp>
  EXTRA_PARAMETERS more template parameters, "name=value~name=value" (e.g. "proprio=true~force=true")
EOF
}

DRY_RUN=0
ACTION=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    images|build|run)
      [[ -z "$ACTION" ]] || { echo "launch.sh: error: expected one action, got '$ACTION' and '$1'" >&2; exit 2; }
      ACTION="$1"; shift ;;
    *) echo "launch.sh: error: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$ACTION" ]] || { usage >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || { echo "launch.sh: error: expected \$$name to be set (see --help)" >&2; exit 2; }
  done
}

require PROJECT REGION BUCKET IMAGE

# A pinned tag (not latest): workers and launcher must not drift apart between runs, and the launcher
# image name and the template path are derived from the tag.
if [[ ! "$IMAGE" =~ :[A-Za-z0-9_][A-Za-z0-9_.-]*$ || "$IMAGE" =~ :latest$ || "$IMAGE" == *@* ]]; then
  echo "launch.sh: error: expected IMAGE with a pinned tag (not :latest, not a digest), got '$IMAGE'" >&2
  exit 2
fi
IMAGE_TAG="${IMAGE##*:}"
LAUNCHER_IMAGE="${LAUNCHER_IMAGE:-${IMAGE%:*}-flex-launcher:${IMAGE_TAG}}"
TEMPLATE_PATH="${TEMPLATE_PATH:-gs://${BUCKET}/templates/vlaprep-flex-${IMAGE_TAG}.json}"

case "$ACTION" in
  images)
    run_cmd docker build -f "$REPO_ROOT/infra/container/Dockerfile" -t "$IMAGE" "$REPO_ROOT"
    run_cmd docker push "$IMAGE"
    run_cmd docker build -f "$REPO_ROOT/infra/dataflow/Dockerfile" -t "$LAUNCHER_IMAGE" "$REPO_ROOT"
    run_cmd docker push "$LAUNCHER_IMAGE"
    ;;

  build)
    run_cmd gcloud dataflow flex-template build "$TEMPLATE_PATH" \
      --project="$PROJECT" \
      --image="$LAUNCHER_IMAGE" \
      --sdk-language=PYTHON \
      --metadata-file="$REPO_ROOT/infra/dataflow/metadata.json"
    ;;

  run)
    VLAPREP_COMMAND="${VLAPREP_COMMAND:-stats}"
    require DATASETS OUTPUT
    case "$VLAPREP_COMMAND" in
      stats)  default_machine=n2-standard-8; default_disk=100 ;;
      shards) default_machine=n2-highmem-8;  default_disk=200; require STATISTICS TOKENIZER ;;
      *) echo "launch.sh: error: expected VLAPREP_COMMAND stats or shards, got '$VLAPREP_COMMAND'" >&2; exit 2 ;;
    esac
    MACHINE_TYPE="${MACHINE_TYPE:-$default_machine}"
    DISK_SIZE_GB="${DISK_SIZE_GB:-$default_disk}"
    NUM_WORKERS="${NUM_WORKERS:-5}"
    MAX_WORKERS="${MAX_WORKERS:-100}"
    JOB_NAME="${JOB_NAME:-vlaprep-${VLAPREP_COMMAND}-$(date -u +%Y%m%d-%H%M%S)}"

    # gcloud dict flags split on commas; DATASETS holds commas, so use "~" as the item delimiter
    # (gcloud topic escaping: --flag=^DELIM^k=v...). A value may not contain "~".
    params="command=${VLAPREP_COMMAND}~datasets=${DATASETS}~output=${OUTPUT}"
    params+="~sdk_container_image=${IMAGE}~disk_size_gb=${DISK_SIZE_GB}"
    if [[ "$VLAPREP_COMMAND" == shards ]]; then
      params+="~statistics=${STATISTICS}~tokenizer=${TOKENIZER}"
    fi
    if [[ -n "${EXTRA_PARAMETERS:-}" ]]; then
      params+="~${EXTRA_PARAMETERS}"
    fi

    run_cmd gcloud dataflow flex-template run "$JOB_NAME" \
      --project="$PROJECT" \
      --region="$REGION" \
      --template-file-gcs-location="$TEMPLATE_PATH" \
      --temp-location="gs://${BUCKET}/tmp" \
      --staging-location="gs://${BUCKET}/staging" \
      --worker-machine-type="$MACHINE_TYPE" \
      --num-workers="$NUM_WORKERS" \
      --max-workers="$MAX_WORKERS" \
      --additional-experiments=use_runner_v2 \
      --parameters="^~^${params}"
    ;;
esac
