#!/usr/bin/env bash
# Cloud TPU VM slices for contrastood: create, install, prepare data, train on every worker, follow
# the logs, forward TensorBoard, delete. Run from your machine (needs gcloud, git, tar; nothing else).
#
#   launch/tpu_vm.sh --help                        every subcommand and option
#   launch/tpu_vm.sh all --dry-run --name=c10 --zone=us-central2-b --accelerator=v4-32 \
#       --bucket=gs://my-bucket --config=configs/cifar10.py
#
# --dry-run (or DRY_RUN=1) prints every gcloud command, fully expanded and shell-quoted, one per line
# (local steps as `# ...` comments), and runs nothing: gcloud need not even be installed.
set -euo pipefail

PROG=launch/tpu_vm.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=contrastood        # on each worker, relative to the home directory
REMOTE_TARBALL=contrastood.tar.gz
VENV_PYTHON=.venv/bin/python  # on each worker, relative to REMOTE_DIR (made by `install`)

usage() {
  cat <<EOF
usage: $PROG COMMAND [OPTIONS] [-- EXTRA contrastood.main ARGS]

Commands (each is safe to rerun):
  create        create the slice (gcloud compute tpus tpu-vm create); skipped if it exists,
                deleted and recreated if it is PREEMPTED or TERMINATED
  install       copy this working tree (git ls-files: tracked + untracked, not ignored) to every
                worker's ~/contrastood and install it with JAX for TPU into ~/contrastood/.venv, a
                Python --python-version environment made by uv (the TPU images' Python 3.10 is too
                old for jax 0.10); refuses while a job runs there
  prepare-data  download and prepare, once, every TFDS dataset the config names into
                --data-dir on the bucket, from worker 0 (or with --local, from this machine)
  train         on every worker: .venv/bin/python -m contrastood.main --config=CONFIG --workdir=WORKDIR
                --mode=MODE [overrides], detached (survives ssh), a log per worker;
                --attach follows the logs until the run exits
  status        whether the run is going on each worker, its exit status, the last log line
  logs          the last --lines of each worker's log (--follow, --output-dir=DIR for one file per worker)
  stop          SIGTERM the run on every worker: it checkpoints and exits 143; 'train' resumes it
  tensorboard   TensorBoard on worker 0 for WORKDIR, forwarded to http://localhost:PORT (Ctrl-C ends)
  delete        delete the slice (asks to confirm unless --yes; the workdir on gs:// is kept)
  all           create, install, prepare-data, train (rerun it after a spot slice was preempted:
                the slice is recreated and training resumes from the workdir)

Slice (all commands need --name and --zone):
  --name=NAME            TPU_NAME          slice name (lowercase letters, digits, hyphens)
  --zone=ZONE            TPU_ZONE          e.g. us-central2-b (v4), us-west4-a (v5e)
  --project=PROJECT      TPU_PROJECT       default: gcloud's configured project
  --accelerator=TYPE     TPU_ACCELERATOR   create/all: e.g. v4-32, v5litepod-16, v5p-32, v6e-16
  --version=VERSION      TPU_VERSION       runtime; default from the accelerator: v4 and older
                                           tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot | --preemptible TPU_SPOT=1 | TPU_PREEMPTIBLE=1
  --create-flag=FLAG     (repeatable) extra flag for tpu-vm create, e.g.
                         --create-flag=--service-account=SA@PROJECT.iam.gserviceaccount.com
  --internal-ip          TPU_INTERNAL_IP=1 ssh/scp to internal IPs (from a VM in the same VPC)
  --yes                  delete: without asking (create deletes a PREEMPTED/TERMINATED slice anyway)

Run:
  --bucket=gs://BUCKET   TPU_BUCKET        default base of --data-dir and --workdir
  --data-dir=gs://...    TPU_DATA_DIR      TFDS_DATA_DIR on the workers; default BUCKET/tensorflow_datasets
  --workdir=gs://...     TPU_WORKDIR       checkpoints, TensorBoard, reports; default BUCKET/contrastood/NAME
                                           (must be gs://: every worker reads and writes it)
  --config=PATH[:ARG]    TPU_CONFIG        relative to the repository; default configs/cifar10.py
  --mode=MODE            train (default), evaluate or clp
  --config.KEY=VALUE     (repeatable) config override, passed through verbatim; anything after
                         '--' is passed to contrastood.main verbatim too
  --datasets=A,B         prepare-data: these TFDS names instead of those the config names
  --local                prepare-data: run on this machine (needs tensorflow-datasets and gcloud
                         application-default credentials) instead of on worker 0
  --attach               train: follow the workers' logs until the run exits (detaching is safe)
  --python-version=X.Y   TPU_PYTHON_VERSION  install: the workers' venv Python; default 3.11
  --jax=SPEC             TPU_JAX           install: pip spec of JAX for TPU; default 'jax[tpu]'

Logs and TensorBoard:
  --worker=all|N         logs: which workers (default all)
  --job=NAME             logs/status/stop: run (default; train/evaluate/clp) or prepare-data
  --lines=N              logs: default 100
  --follow               logs: keep following (Ctrl-C stops following, not the run)
  --output-dir=DIR       logs: write DIR/WORKER.log per worker instead of printing
  --port=PORT            tensorboard: default 6006

  --dry-run              DRY_RUN=1  print the commands, run nothing
  -h, --help

A run's log on each worker: ~/contrastood-logs/run-worker-N.log. Preemption: SIGTERM (a spot or
preemptible slice being reclaimed, or 'stop') makes contrastood.main save a checkpoint and exit 143;
'train' (or 'all' on a recreated slice) with the same --workdir resumes from it.
EOF
}

SYNOPSIS="usage: $PROG COMMAND --name=NAME --zone=ZONE [OPTIONS] (see $PROG --help)"
die() {
  echo "$PROG: error: $*" >&2
  echo "$SYNOPSIS" >&2
  exit 2
}

is_true() { [[ ${1:-} =~ ^(1|true|yes|on)$ ]]; }

# --- options ------------------------------------------------------------------------------------
COMMAND=""
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-}
VERSION=${TPU_VERSION:-}
SPOT=${TPU_SPOT:-}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-}
INTERNAL_IP=${TPU_INTERNAL_IP:-}
BUCKET=${TPU_BUCKET:-}
DATA_DIR=${TPU_DATA_DIR:-}
WORKDIR=${TPU_WORKDIR:-}
CONFIG=${TPU_CONFIG:-configs/cifar10.py}
MODE=train
PYTHON_VERSION=${TPU_PYTHON_VERSION:-3.11}
JAX_SPEC=${TPU_JAX:-jax[tpu]}
DATASETS=""
LOCAL=""
ATTACH=""
YES=""
WORKER=all
JOB=run
LINES=100
FOLLOW=""
OUTPUT_DIR=""
PORT=6006
DRY=${DRY_RUN:-}
CREATE_FLAGS=()
PASSTHROUGH=()   # --config.KEY=VALUE overrides and everything after `--`

set_option() {  # FLAG VALUE
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator | --accelerator-type) ACCELERATOR=$2 ;;
    --version) VERSION=$2 ;;
    --create-flag) CREATE_FLAGS+=("$2") ;;
    --bucket) BUCKET=$2 ;;
    --data-dir) DATA_DIR=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --config) CONFIG=$2 ;;
    --mode) MODE=$2 ;;
    --datasets) DATASETS=$2 ;;
    --python-version) PYTHON_VERSION=$2 ;;
    --jax) JAX_SPEC=$2 ;;
    --worker) WORKER=$2 ;;
    --job) JOB=$2 ;;
    --lines) LINES=$2 ;;
    --output-dir) OUTPUT_DIR=$2 ;;
    --port) PORT=$2 ;;
    *) return 1 ;;
  esac
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --local) LOCAL=1 ;;
    --attach) ATTACH=1 ;;
    --follow) FOLLOW=1 ;;
    --yes) YES=1 ;;
    --config.*=*) PASSTHROUGH+=("$1") ;;
    --config.*) die "config overrides need '=': '$1=VALUE'" ;;
    --) shift; PASSTHROUGH+=("$@"); break ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" || die "unknown option '${1%%=*}'" ;;
    --*)
      if (($# < 2)) || [[ $2 == --* ]]; then
        set_option "$1" x || die "unknown option '$1'"
        die "option '$1' needs a value (write $1=VALUE for a value that starts with --)"
      fi
      set_option "$1" "$2" || die "unknown option '$1'"
      shift
      ;;
    -*) die "unknown option '$1'" ;;
    *)
      [[ -z $COMMAND ]] || die "unexpected argument '$1' (one command at a time; options need '=' or a value)"
      COMMAND=$1
      ;;
  esac
  shift
done

# --- quoting and running ------------------------------------------------------------------------
quote() {  # one word, quoted for a POSIX shell only if it needs it
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value': easier to read
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  elif [[ $s == *"'"* && ! $s =~ [\$\`\"\\!] ]]; then  # has ' but nothing special inside "..."
    printf '"%s"' "$s"
  else
    local q="'\\''"
    printf "'%s'" "${s//\'/$q}"
  fi
}

render() {  # argv -> one shell line
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

run() {  # print (dry run) or echo and execute one command
  if is_true "$DRY"; then
    render "$@"; echo
  else
    echo "+ $(render "$@")" >&2
    "$@"
  fi
}

note() {  # a comment in the dry run, a message otherwise
  if is_true "$DRY"; then echo "# $*"; else echo "$PROG: $*" >&2; fi
}

# --- validation ---------------------------------------------------------------------------------
require() {  # VALUE FLAG ENV WHAT
  [[ -n $1 ]] || die "'$COMMAND' needs $2 (or \$$3): $4"
}

default_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

check_gs() {  # VALUE FLAG
  [[ $1 =~ ^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$ ]] ||
    die "$2 must be gs://BUCKET[/PATH] with a valid bucket name (every worker reads and writes it), got '$1'"
}

validate_slice() {
  require "$NAME" --name TPU_NAME "the slice name, e.g. --name=contrastood-c10"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name must be lowercase letters, digits and hyphens, starting with a letter; got '$NAME'"
  require "$ZONE" --zone TPU_ZONE "the slice's zone, e.g. --zone=us-central2-b"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone looks wrong: '$ZONE' (e.g. us-central2-b)"
  [[ -z $PROJECT || $PROJECT =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]] || die "--project looks wrong: '$PROJECT'"
}

validate_create() {
  require "$ACCELERATOR" --accelerator TPU_ACCELERATOR "the accelerator type, e.g. --accelerator=v4-32"
  [[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "--accelerator looks wrong: '$ACCELERATOR' (e.g. v4-32, v5litepod-16, v5p-32, v6e-16)"
  if [[ -z $VERSION ]]; then
    VERSION=$(default_version "$ACCELERATOR") ||
      die "'$COMMAND' needs --version (or \$TPU_VERSION): no default runtime for '$ACCELERATOR'"
  fi
  if is_true "$SPOT" && is_true "$PREEMPTIBLE"; then die "--spot and --preemptible exclude each other"; fi
}

resolve_dirs() {  # NEED_DATA_DIR NEED_WORKDIR
  BUCKET=${BUCKET%/}
  [[ -z $BUCKET ]] || check_gs "$BUCKET" --bucket
  [[ -n $DATA_DIR || -z $BUCKET ]] || DATA_DIR=$BUCKET/tensorflow_datasets
  [[ -n $WORKDIR || -z $BUCKET ]] || WORKDIR=$BUCKET/contrastood/$NAME
  DATA_DIR=${DATA_DIR%/}
  WORKDIR=${WORKDIR%/}
  if (($1)); then
    require "$DATA_DIR" "--data-dir or --bucket" TPU_DATA_DIR \
      "where TFDS datasets live, e.g. --bucket=gs://my-bucket"
  fi
  if (($2)); then
    require "$WORKDIR" "--workdir or --bucket" TPU_WORKDIR \
      "the run's directory, e.g. --workdir=gs://my-bucket/runs/c10"
    check_gs "$WORKDIR" --workdir
  fi
  [[ -z $DATA_DIR ]] || check_gs "$DATA_DIR" --data-dir
}

validate_install() {
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version must be like 3.11; got '$PYTHON_VERSION'"
}

validate_config() {
  [[ $CONFIG != /* ]] || die "--config must be relative to the repository (it runs on the workers): '$CONFIG'"
  [[ -f $REPO/${CONFIG%%:*} ]] || die "--config: no such file in the repository: '${CONFIG%%:*}'"
  [[ $MODE =~ ^(train|evaluate|clp)$ ]] || die "--mode must be train, evaluate or clp; got '$MODE'"
}

# --- gcloud -------------------------------------------------------------------------------------
tpu_argv() {  # SUBCOMMAND POSITIONAL... [FLAGS] -> TPU_ARGV, with --zone [--project] after the positionals
  local npos=1
  if [[ $1 == scp ]]; then npos=2; fi  # SRC DEST
  TPU_ARGV=(gcloud compute tpus tpu-vm "${@:1:npos+1}" "--zone=$ZONE")
  [[ -z $PROJECT ]] || TPU_ARGV+=("--project=$PROJECT")
  TPU_ARGV+=("${@:npos+2}")
}

tpu() {  # SUBCOMMAND [ARGS]: run (or print) that gcloud command
  tpu_argv "$@"
  run "${TPU_ARGV[@]}"
}

ssh_opts() {  # extra ssh/scp flags
  SSH_OPTS=()
  if is_true "$INTERNAL_IP"; then SSH_OPTS+=(--internal-ip); fi
}

on_workers() {  # WORKERS REMOTE_COMMAND [more gcloud ssh args]
  local workers=$1 remote=$2
  shift 2
  ssh_opts
  tpu ssh "$NAME" "--worker=$workers" ${SSH_OPTS[@]+"${SSH_OPTS[@]}"} "--command=$remote" "$@"
}

worker_script() {  # ARGS -> the remote command line running launch/tpu_worker.sh
  render bash "$REMOTE_DIR/launch/tpu_worker.sh" "$@"
}

# --- commands -----------------------------------------------------------------------------------
cmd_create() {
  validate_create
  local create=("$NAME" "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
  if is_true "$SPOT"; then create+=(--spot); fi
  if is_true "$PREEMPTIBLE"; then create+=(--preemptible); fi
  create+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
  local state=""
  tpu_argv describe "$NAME" "--format=value(state)"
  if is_true "$DRY"; then
    run "${TPU_ARGV[@]}"
    note "create runs only if the slice does not exist; a PREEMPTED or TERMINATED one is deleted first"
  else
    echo "+ $(render "${TPU_ARGV[@]}")" >&2
    state=$("${TPU_ARGV[@]}" 2>/dev/null) || state=""  # not found (or no access: create will say)
  fi
  case $state in
    "") tpu create "${create[@]}" ;;
    PREEMPTED | TERMINATED)
      note "slice $NAME is $state: deleting it and creating it again"
      tpu delete "$NAME" --quiet
      tpu create "${create[@]}"
      ;;
    *) note "slice $NAME already exists (state $state); not creating it" ;;
  esac
}

cmd_install() {
  TARBALL=${TMPDIR:-/tmp}/contrastood-$NAME.tar.gz
  local tarball=$TARBALL
  note "local: pack $REPO (git ls-files --cached --others --exclude-standard) into $tarball"
  if ! is_true "$DRY"; then
    trap 'rm -f "$TARBALL"' EXIT  # also when a gcloud step fails
    git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO is not a git checkout; cannot list its files"
    local list
    list=$(mktemp)
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -e $REPO/$f || -L $REPO/$f ]]; then printf '%s\0' "$f"; fi  # skip files deleted locally
      done >"$list"
    tar -C "$REPO" -czf "$tarball" --null -T "$list"
    rm -f "$list"
  fi
  ssh_opts
  tpu scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all ${SSH_OPTS[@]+"${SSH_OPTS[@]}"}
  local new=$REMOTE_DIR.new
  local steps=(
    "rm -rf $new"
    "mkdir $new"
    "tar -xzf $REMOTE_TARBALL -C $new"
    "rm -f $REMOTE_TARBALL"
    "$(render bash "$new/launch/tpu_worker.sh" check-idle)"
    "rm -rf $REMOTE_DIR"
    "mv $new $REMOTE_DIR"
    "cd $REMOTE_DIR"
    "python3 -m pip install --user --quiet --upgrade uv"
    "$(render python3 -m uv venv --python "$PYTHON_VERSION" .venv)"
    "$(render python3 -m uv pip install --python "$VENV_PYTHON" -e . "$JAX_SPEC")"
  )
  local remote="" step
  for step in "${steps[@]}"; do remote+="${remote:+ && }$step"; done
  on_workers all "$remote"
  if ! is_true "$DRY"; then rm -f "$tarball"; fi
  note "local: remove $tarball"
}

prepare_args() {  # the prepare_tfds.py arguments after the script path; CONFIG_PATH given
  PREP_ARGS=("--config=$1" "--data_dir=$DATA_DIR")
  [[ -z $DATASETS ]] || PREP_ARGS+=("--datasets=$DATASETS")
  local arg
  for arg in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do  # only the config overrides
    if [[ $arg == --config.* ]]; then PREP_ARGS+=("$arg"); fi
  done
}

cmd_prepare_data() {
  if is_true "$LOCAL"; then
    prepare_args "$REPO/$CONFIG"
    note "local: prepare the datasets from this machine"
    run python3 "$REPO/launch/prepare_tfds.py" "${PREP_ARGS[@]}"
  else
    prepare_args "$CONFIG"
    on_workers 0 "cd $REMOTE_DIR && $(render bash launch/tpu_worker.sh run --job=prepare-data -- \
      "$VENV_PYTHON" launch/prepare_tfds.py "${PREP_ARGS[@]}")"
  fi
}

cmd_train() {
  local env=(env "PYTHONUNBUFFERED=1")
  if [[ -n $DATA_DIR ]]; then
    env+=("TFDS_DATA_DIR=$DATA_DIR")
  else
    note "no --data-dir/--bucket: TFDS datasets would be downloaded by every worker into ~/tensorflow_datasets"
  fi
  local main=("$VENV_PYTHON" -m contrastood.main "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE"
    --alsologtostderr ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
  local how=start
  if is_true "$ATTACH"; then how=run; fi
  on_workers all \
    "cd $REMOTE_DIR && $(render bash launch/tpu_worker.sh "$how" --job=run -- "${env[@]}" "${main[@]}")"
  note "every worker logs to ~/contrastood-logs/run-worker-N.log; follow with:" \
    "$PROG logs --follow --worker=0 --name=$NAME --zone=$ZONE"
  note "SIGTERM (preemption, or '$PROG stop') checkpoints and exits 143;" \
    "rerun 'train' (or 'all') to resume from $WORKDIR"
}

cmd_status() {
  on_workers all "$(worker_script status --job="$JOB")"
}

cmd_logs() {
  [[ $WORKER =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]] || die "--worker must be all, N, N-M or N,M,...; got '$WORKER'"
  [[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number; got '$LINES'"
  [[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job must be a plain name (run, prepare-data); got '$JOB'"
  local args=(logs "--job=$JOB" "--lines=$LINES")
  if is_true "$FOLLOW"; then args+=(--follow); fi
  local extra=()
  if [[ -n $OUTPUT_DIR ]]; then
    note "local: mkdir -p $OUTPUT_DIR (gcloud writes WORKER.log there, one file per worker)"
    if ! is_true "$DRY"; then mkdir -p "$OUTPUT_DIR"; fi
    extra+=("--output-directory=$OUTPUT_DIR")
  fi
  on_workers "$WORKER" "$(worker_script "${args[@]}")" ${extra[@]+"${extra[@]}"}
}

cmd_stop() {
  on_workers all "$(worker_script stop --job="$JOB" --timeout=600)"
}

cmd_tensorboard() {
  [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number; got '$PORT'"
  note "TensorBoard for $WORKDIR at http://localhost:$PORT (Ctrl-C ends it)"
  on_workers 0 "cd $REMOTE_DIR && $(render "$VENV_PYTHON" -m tensorboard.main "--logdir=$WORKDIR" \
    --host=localhost "--port=$PORT")" \
    -- -t -L "$PORT:localhost:$PORT"
}

cmd_delete() {
  if is_true "$YES"; then tpu delete "$NAME" --quiet; else tpu delete "$NAME"; fi
  note "the workdir and datasets on gs:// are kept"
}

# --- main ---------------------------------------------------------------------------------------
COMMANDS="create, install, prepare-data, train, status, logs, stop, tensorboard, delete, all"
[[ -n $COMMAND ]] || die "no command given ($COMMANDS)"
case $COMMAND in
  create | install | prepare-data | train | status | logs | stop | tensorboard | delete | all) ;;
  *) die "unknown command '$COMMAND' ($COMMANDS)" ;;
esac
validate_slice
case $COMMAND in
  install) validate_install ;;
  prepare-data) resolve_dirs 1 0; validate_config ;;
  train) resolve_dirs 0 1; validate_config ;;
  tensorboard) resolve_dirs 0 1 ;;
  all) validate_create; validate_install; resolve_dirs 1 1; validate_config ;;
esac
if [[ ${#PASSTHROUGH[@]} -gt 0 && ! $COMMAND =~ ^(prepare-data|train|all)$ ]]; then
  die "'$COMMAND' takes no config overrides or arguments after '--'"
fi

needs_gcloud=1
if is_true "$DRY" || { [[ $COMMAND == prepare-data ]] && is_true "$LOCAL"; }; then needs_gcloud=0; fi
if ((needs_gcloud)) && ! command -v gcloud >/dev/null; then
  die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)," \
    "or look at the commands with --dry-run"
fi

case $COMMAND in
  create) cmd_create ;;
  install) cmd_install ;;
  prepare-data) cmd_prepare_data ;;
  train) cmd_train ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  tensorboard) cmd_tensorboard ;;
  delete) cmd_delete ;;
  all)
    cmd_create
    cmd_install
    cmd_prepare_data
    cmd_train
    note "then: $PROG tensorboard --name=$NAME --zone=$ZONE --workdir=$WORKDIR;" \
      "when done: $PROG delete --name=$NAME --zone=$ZONE"
    ;;
esac
