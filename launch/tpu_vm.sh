#!/usr/bin/env bash
# Train a dlfx config on a Cloud TPU VM or pod slice: create it, ship the code, install dlfx[tpu],
# run `dlfx train` on every worker (logs streamed here), copy worker 0's workdir to the bucket, then
# delete the VM.
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --accelerator TYPE --version RUNTIME \
#       --checkpoint-dir gs://BUCKET/PATH [--results gs://BUCKET/PATH] [--project ID] [--spot] [--keep] \
#       [--git URL] -- CONFIG [dlfx train arguments ...]
#
# e.g. launch/tpu_vm.sh --name dlfx-gpt --zone us-central2-b --accelerator v4-16 \
#        --version tpu-ubuntu2204-base --checkpoint-dir gs://my-bucket/runs/gpt -- configs/char_gpt.py
#
# Code: by default the committed HEAD of this repository (git archive) is copied to every worker;
# with --git URL every worker clones URL instead. Checkpoints go straight to GCS through Orbax
# (config.train.checkpoint_dir). The rest of the workdir (config.json, metrics.jsonl, events/, plots/,
# status.json, data.json) is written on worker 0 and copied with `gsutil -m rsync -r` to --results
# (default: CHECKPOINT_DIR/workdir) whenever the script ends, a failed or interrupted run included,
# before the VM is deleted. Read it back with `gsutil -m rsync -r RESULTS runs/x` and `dlfx runs|plot`.
# On a pod slice every worker runs the same command and JAX finds its peers itself
# (DLFX_DISTRIBUTED=1 makes dlfx call jax.distributed.initialize()).
set -euo pipefail

dry_run=0 name="" zone="" accelerator="" version="" project="" spot=0 keep=0 git_url="" ckpt="" results=""
usage() {
  echo "usage: launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --accelerator TYPE --version RUNTIME" \
       "--checkpoint-dir gs://... [--results gs://...] [--project ID] [--spot] [--keep] [--git URL]" \
       "-- CONFIG [dlfx train args ...]" >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --checkpoint-dir) ckpt=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --git) git_url=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$accelerator" && -n "$version" && $# -ge 1 ]] || usage
[[ "$ckpt" == gs://* ]] || { echo "tpu_vm.sh: --checkpoint-dir must be a gs:// path (TPU VM disks are lost with the VM)" >&2; exit 2; }
results=${results:-${ckpt%/}/workdir}
[[ "$results" == gs://* ]] || { echo "tpu_vm.sh: --results must be a gs:// path (TPU VM disks are lost with the VM)" >&2; exit 2; }
config=$1
shift

run() {  # print the command; execute it unless --dry-run
  printf '%q ' "$@"
  echo
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

gcloud_args=(--zone "$zone")
[[ -n "$project" ]] && gcloud_args+=(--project "$project")
create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" --accelerator-type "$accelerator" --version "$version")
[[ $spot -eq 1 ]] && create+=(--spot)
ssh=(gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all)

copy_results=(gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=0
              --command "gsutil -m rsync -r dlfx/runs/tpu $(printf '%q' "$results")")
finish() {  # the workdir reaches the bucket before the VM (and its disk) goes, whatever happened
  "${copy_results[@]}" || echo "tpu_vm.sh: copying the workdir to $results failed" >&2
  if [[ $keep -eq 0 ]]; then
    gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet
  fi
}

run "${create[@]}"
if [[ $dry_run -eq 0 ]]; then
  trap finish EXIT
fi
if [[ -n "$git_url" ]]; then
  run "${ssh[@]}" --command "rm -rf dlfx && git clone --depth 1 $(printf '%q' "$git_url") dlfx"
else
  tarball=$(mktemp -d)/dlfx.tar.gz
  run git archive --format=tar.gz --prefix=dlfx/ -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:dlfx.tar.gz" "${gcloud_args[@]}" --worker=all
  run "${ssh[@]}" --command "rm -rf dlfx && tar xzf dlfx.tar.gz"
fi
run "${ssh[@]}" --command "cd dlfx && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
train="cd dlfx && DLFX_DISTRIBUTED=1 .venv/bin/dlfx train --config $(printf '%q' "$config") --workdir runs/tpu"
train+=" --config.train.checkpoint_dir=$(printf '%q' "$ckpt")"
for arg in "$@"; do
  train+=" $(printf '%q' "$arg")"
done
run "${ssh[@]}" --command "$train"
if [[ $dry_run -eq 1 ]]; then
  run "${copy_results[@]}"
fi
if [[ $keep -eq 1 ]]; then
  echo "tpu_vm.sh: --keep: delete it with: gcloud compute tpus tpu-vm delete $name --zone $zone --quiet"
elif [[ $dry_run -eq 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet
fi
