#!/usr/bin/env bash
# Single-host GPU run: every local GPU joins the ('data',) mesh; the global batch is split over them.
#   pip install -e . "jax[cuda12]"
#   launch/gpu_single_host.sh configs/cifar10.py /data/runs/c10 --config.train.batch_size=512
# SIGTERM (e.g. from a scheduler) checkpoints the current step and exits 143; rerun to resume.
set -euo pipefail
config=${1:?usage: launch/gpu_single_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
workdir=${2:?usage: launch/gpu_single_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
mkdir -p "$workdir"
export TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m contrastood.main --config="$config" --workdir="$workdir" --alsologtostderr "$@"
