#!/usr/bin/env bash
# Runs ON each Cloud TPU VM worker (launch/tpu_vm.sh installs it with the package and calls it over
# `gcloud compute tpus tpu-vm ssh --worker=...`). Keeps at most one detached job per name, with a log
# per worker, so a training run survives the ssh session that started it.
#
#   bash launch/tpu_worker.sh start  [--job=NAME] -- COMMAND [ARG...]  start detached, return at once
#   bash launch/tpu_worker.sh run    [--job=NAME] -- COMMAND [ARG...]  start, follow the log, exit with its status
#   bash launch/tpu_worker.sh attach [--job=NAME]                      follow a running job until it exits
#   bash launch/tpu_worker.sh stop   [--job=NAME] [--timeout=SECONDS]  SIGTERM, wait for the exit
#   bash launch/tpu_worker.sh status [--job=NAME]
#   bash launch/tpu_worker.sh logs   [--job=NAME] [--lines=N] [--follow]
#   bash launch/tpu_worker.sh check-idle                              exit 1 if any job is running
#
# The job name defaults to `run`. Files, in $CONTRASTOOD_LOG_DIR (default ~/contrastood-logs):
#   JOB-worker-W.log  the job's stdout and stderr, appended across restarts, with a start and an
#                     exit line per run (W = the TPU worker number from the VM metadata, or the
#                     hostname; $CONTRASTOOD_WORKER_ID overrides it)
#   JOB.pid           the supervisor's pid; JOB.exit the last exit status; JOB.lock is flock'ed by
#                     the supervisor and the job for as long as either runs (that is what "running"
#                     means here, so stale pid files after a reboot cannot fool it).
# `stop` sends SIGTERM: contrastood.main checkpoints the current step and exits 143, and running the
# same command again resumes from the workdir.
set -euo pipefail

SELF=${BASH_SOURCE[0]}
LOG_DIR=${CONTRASTOOD_LOG_DIR:-$HOME/contrastood-logs}

die() { echo "tpu_worker.sh: error: $*" >&2; exit 2; }

worker_id() {
  if [[ -n ${CONTRASTOOD_WORKER_ID:-} ]]; then echo "$CONTRASTOOD_WORKER_ID"; return; fi
  local id=""
  id=$(curl -sf --max-time 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null) || id=""
  if [[ $id =~ ^[0-9]+$ ]]; then echo "$id"; else hostname; fi
}

log_file() { echo "$LOG_DIR/$1-worker-$(worker_id).log"; }

# Succeeds (and prints the supervisor pid, if known) while job $1 runs.
is_running() {
  local lock="$LOG_DIR/$1.lock"
  [[ -e $lock ]] || return 1
  if flock -n "$lock" true; then return 1; fi
  cat "$LOG_DIR/$1.pid" 2>/dev/null || echo "?"
}

header() {  # worker, host and state of job $1, one line
  local pid state
  if pid=$(is_running "$1"); then
    state="running (pid $pid)"
  elif [[ -f $LOG_DIR/$1.exit ]]; then
    state="exited with status $(cat "$LOG_DIR/$1.exit")"
  else
    state="not started"
  fi
  echo "worker $(worker_id) ($(hostname)): job '$1' $state"
}

parse_job() {  # sets JOB, TIMEOUT, LINES, FOLLOW; leaves the command after `--` in CMD
  JOB=run TIMEOUT=600 LINES=50 FOLLOW=0 CMD=()
  while (($#)); do
    case $1 in
      --job=*) JOB=${1#*=} ;;
      --timeout=*) TIMEOUT=${1#*=} ;;
      --lines=*) LINES=${1#*=} ;;
      --follow) FOLLOW=1 ;;
      --) shift; CMD=("$@"); break ;;
      *) die "unknown argument '$1'" ;;
    esac
    shift
  done
  [[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job must be a plain name, got '$JOB'"
  [[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"
  [[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
}

cmd_start() {
  ((${#CMD[@]})) || die "start needs a command after '--'"
  mkdir -p "$LOG_DIR"
  local lock="$LOG_DIR/$JOB.lock" log pid
  log=$(log_file "$JOB")
  exec 9>>"$lock"
  if ! flock -n 9; then
    echo "$(header "$JOB"); not starting a second one (stop it first: bash $SELF stop --job=$JOB)" >&2
    exit 3
  fi
  rm -f "$LOG_DIR/$JOB.exit" "$LOG_DIR/$JOB.pid"
  # The supervisor inherits fd 9 and with it the lock; setsid + nohup detach it from this session.
  nohup setsid bash "$SELF" _supervise "$JOB" "$log" -- "${CMD[@]}" </dev/null >/dev/null 2>&1 &
  exec 9>&-
  for _ in $(seq 200); do  # the pid file, or the exit file of a job that already ended
    [[ -s $LOG_DIR/$JOB.pid || -f $LOG_DIR/$JOB.exit ]] && break
    sleep 0.05
  done
  pid=$(cat "$LOG_DIR/$JOB.pid" 2>/dev/null || echo "?")
  echo "worker $(worker_id) ($(hostname)): started job '$JOB' (pid $pid), log $log" >&2
}

cmd__supervise() {
  local job=$1 log=$2 child rc
  shift 3  # JOB LOG --
  set +e
  { printf '[tpu_worker] %s worker %s (%s): job %s starting:' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      "$(worker_id)" "$(hostname)" "$job"
    printf ' %q' "$@"; echo; } >>"$log"
  echo "$$" >"$LOG_DIR/$job.pid"  # after the first log line: `run` waits for this file, then tails
  "$@" >>"$log" 2>&1 </dev/null &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait was only interrupted by a forwarded signal
  done
  echo "$rc" >"$LOG_DIR/$job.exit"
  printf '[tpu_worker] %s job %s exited with status %s%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$job" \
    "$rc" "$([[ $rc == 143 ]] && echo ' (SIGTERM: checkpoint saved; rerun to resume)')" >>"$log"
  rm -f "$LOG_DIR/$job.pid"
  exit "$rc"
}

stream() {  # print job $1's log from byte $2 on, as it grows, until the job is no longer running
  local job=$1 offset=$2 log size running
  log=$(log_file "$job")
  while :; do
    running=0
    if is_running "$job" >/dev/null; then running=1; fi
    size=$(wc -c 2>/dev/null <"$log" || echo 0)
    if ((size > offset)); then
      tail -c "+$((offset + 1))" "$log" | head -c "$((size - offset))"
      offset=$size
    fi
    ((running)) || return 0
    sleep 0.5
  done
}

follow() {  # stream job $1's log from byte $2; exit with the job's status
  stream "$1" "$2"
  [[ -f $LOG_DIR/$1.exit ]] || die "job '$1' left no exit status"
  exit "$(cat "$LOG_DIR/$1.exit")"
}

cmd_run() {
  local log offset
  log=$(log_file "$JOB")
  offset=$(wc -c 2>/dev/null <"$log" || echo 0)
  cmd_start >/dev/null
  follow "$JOB" "$offset"
}

cmd_attach() {
  local log size
  header "$JOB"
  is_running "$JOB" >/dev/null || exit 1
  log=$(log_file "$JOB")
  size=$(wc -c 2>/dev/null <"$log" || echo 0)
  head -c "$size" "$log" 2>/dev/null | tail -n "$LINES"
  follow "$JOB" "$size"
}

cmd_stop() {
  local pid
  if ! pid=$(is_running "$JOB"); then
    header "$JOB"
    return 0
  fi
  [[ $pid =~ ^[0-9]+$ ]] || die "job '$JOB' runs but its pid file is missing"
  echo "worker $(worker_id) ($(hostname)): SIGTERM to job '$JOB' (pid $pid); waiting up to ${TIMEOUT}s" \
    "for the checkpoint"
  kill -TERM "$pid"
  local deadline=$((SECONDS + TIMEOUT))
  while is_running "$JOB" >/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "still running after ${TIMEOUT}s; check the log: $(log_file "$JOB")" >&2
      return 1
    fi
    sleep 0.2
  done
  header "$JOB"
}

cmd_status() {
  local log
  header "$JOB"
  log=$(log_file "$JOB")
  if [[ -s $log ]]; then echo "  last line: $(tail -n 1 "$log")"; fi
}

cmd_logs() {
  local log size
  log=$(log_file "$JOB")
  echo "==> $(header "$JOB"), $log <=="
  [[ -f $log ]] || return 0
  size=$(wc -c 2>/dev/null <"$log" || echo 0)
  head -c "$size" "$log" | tail -n "$LINES"
  if ((FOLLOW)); then stream "$JOB" "$size"; fi
}

cmd_check_idle() {
  local lock job busy=0
  [[ -d $LOG_DIR ]] || return 0
  for lock in "$LOG_DIR"/*.lock; do
    [[ -e $lock ]] || continue
    job=$(basename "$lock" .lock)
    if is_running "$job" >/dev/null; then
      echo "$(header "$job"); stop it first (bash $SELF stop --job=$job)" >&2
      busy=1
    fi
  done
  return "$busy"
}

(($#)) || die "usage: bash $SELF start|run|attach|stop|status|logs|check-idle [--job=NAME] [-- COMMAND...]"
command=$1
shift
case $command in
  _supervise) cmd__supervise "$@" ;;
  start) parse_job "$@"; cmd_start ;;
  run) parse_job "$@"; cmd_run ;;
  attach) parse_job "$@"; cmd_attach ;;
  stop) parse_job "$@"; cmd_stop ;;
  status) parse_job "$@"; cmd_status ;;
  logs) parse_job "$@"; cmd_logs ;;
  check-idle) cmd_check_idle ;;
  *) die "unknown command '$command' (start, run, attach, stop, status, logs, check-idle)" ;;
esac
