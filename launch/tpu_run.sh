#!/usr/bin/env bash
# Runs one command on every worker of a TPU VM (pod) with jax.distributed switched on, or as N local processes.
#
#   bash launch/tpu_run.sh --tpu NAME --zone ZONE [--project P] [options] -- COMMAND [ARGS...]
#   bash launch/tpu_run.sh --local N [--local_devices K] [options] -- COMMAND [ARGS...]
#   bash launch/tpu_run.sh --tpu NAME --zone ZONE --kill              # only stop stale processes
#
# Pod mode (gcloud compute tpus tpu-vm ..., every step on --worker=all):
#   [--kill]  stop stale python processes of the project on each worker: python processes of the ssh user whose
#             working directory is under ~/musiclm_jax or whose environment has MUSICLM_DISTRIBUTED=1 (TERM, then
#             KILL after 10 s), so a crashed run no longer holds the TPU.
#   1. ship   tar the repository (git-tracked and untracked files, .gitignore honoured, logs/ left out) and scp
#             the tarball to every worker, then
#   2. set up unpack it over ~/musiclm_jax (files are overwritten, never deleted: outputs and .venv survive) and run
#             `bash launch/setup_env.sh tpu[,EXTRAS]` there (idempotent: an existing venv is reused). Per-worker
#             output: LOG_DIR/setup/<worker>.log.
#   3. run    `cd ~/musiclm_jax`, put .venv/bin first on PATH, export MUSICLM_DISTRIBUTED=1 (musiclm_jax.distributed
#             then calls jax.distributed.initialize(), which finds its peers from the TPU metadata), run COMMAND.
#             Logs, one per worker: gcloud's --output-directory writes LOG_DIR/<worker index>.log on this machine;
#             each worker also tees its output to ~/musiclm_jax/logs/tpu_run/<LOG_DIR's name>/<hostname>.log, a
#             copy that survives a dropped ssh connection.
#   COMMAND is an argument list, quoted word by word for the remote shell (bash): use `-- bash -c '...'` for
#   pipes or `&&`. It runs in the repository root, like local mode. Several workers over ssh need your key in
#   the agent first (`ssh-add ~/.ssh/google_compute_engine`, as gcloud documents for --worker=all).
#   The run is tied to the ssh sessions: if this script is interrupted, the remote processes may linger; use --kill.
#
# Local mode (--local N, for tests): N background processes of COMMAND on this machine, in the repository root,
#   with .venv/bin first on PATH, JAX_PLATFORMS=cpu, K CPU devices each (XLA_FLAGS, default K=4) and
#   MUSICLM_COORDINATOR=127.0.0.1:<free port>, MUSICLM_NUM_PROCESSES=N, MUSICLM_PROCESS_ID=i (jax.distributed over
#   loopback, gloo collectives). Process i writes LOG_DIR/process-i.log. If one fails the others are stopped; the
#   exit status is non-zero if any failed.
#
# Options:
#   --project P        gcloud project (default: gcloud's configured one)
#   --extras E         extra pip extras for setup_env.sh, comma-separated (pod mode always installs `tpu`)
#   --log_dir DIR      where logs go (relative: to the current directory; default: logs/tpu_run/<timestamp> in
#                      the repository)
#   --dry-run          print every command (`+ ` prefix, shell-quoted) and run nothing
#   --kill             pod mode: stop stale processes first (alone, without COMMAND: only that)
# Flags take `--flag VALUE` or `--flag=VALUE`.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="~/musiclm_jax"  # on each worker; a literal ~ expanded by the remote shell

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }  # the synopsis, on errors
help() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }  # this whole header
die() { echo "tpu_run.sh: $*" >&2; exit 2; }

TPU="" ZONE="" PROJECT="" EXTRAS="" LOG_DIR="" LOCAL="" LOCAL_DEVICES="" DRY_RUN=0 KILL=0
while [ $# -gt 0 ]; do
  arg="$1"
  case "$arg" in
    --) shift; break ;;
    --dry-run|--dry_run) DRY_RUN=1; shift; continue ;;
    --kill) KILL=1; shift; continue ;;
    -h|--help) help; exit 0 ;;
    --*=*) name="${arg%%=*}"; value="${arg#*=}"; shift ;;
    --tpu|--zone|--project|--extras|--log_dir|--local|--local_devices)
      [ $# -ge 2 ] && [[ "$2" != --* ]] || die "$arg needs a value"
      name="$arg"; value="$2"; shift 2 ;;
    *) usage; die "unknown argument '$arg' (the command goes after --)" ;;
  esac
  case "$name" in
    --tpu) TPU="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --extras) EXTRAS="$value" ;;
    --log_dir) LOG_DIR="$value" ;;
    --local) LOCAL="$value" ;;
    --local_devices) LOCAL_DEVICES="$value" ;;
    *) usage; die "unknown flag '$name'" ;;
  esac
done
COMMAND=("$@")

is_positive_int() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$((10#$1))" -gt 0 ]; }

# Prints a command shell-quoted (words that need it in single quotes), so a dry run can be pasted into a shell.
show() {
  local out="+" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  echo "$out"
}
# Shows a command, then runs it unless --dry-run.
run_cmd() {
  show "$@"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

RUN_ID="$(date +%Y%m%d-%H%M%S)"
if [ -n "$LOG_DIR" ] && [[ "$LOG_DIR" != /* ]]; then LOG_DIR="$PWD/$LOG_DIR"; fi  # a given one: from the caller's cwd
LOG_DIR="${LOG_DIR:-logs/tpu_run/$RUN_ID}"
cd "$REPO_DIR"

# ------------------------------------------------------------------------------------------------ local mode
if [ -n "$LOCAL" ]; then
  is_positive_int "$LOCAL" || die "--local needs a positive number of processes, got '$LOCAL'"
  LOCAL_DEVICES="${LOCAL_DEVICES:-4}"
  is_positive_int "$LOCAL_DEVICES" || die "--local_devices needs a positive number, got '$LOCAL_DEVICES'"
  [ -z "$TPU$ZONE$PROJECT" ] || die "--local runs on this machine; --tpu/--zone/--project are for TPU pods"
  [ "$KILL" = 0 ] || die "--kill is for TPU pods (local processes are stopped when one fails)"
  [ ${#COMMAND[@]} -gt 0 ] || die "no command given (put it after --)"
  N=$((10#$LOCAL))
  K=$((10#$LOCAL_DEVICES))
  PY=python3
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
  PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # Keep the caller's other XLA flags, replace any device count (a test harness may have set its own).
  XLA="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')"
  XLA="$(echo "$XLA --xla_force_host_platform_device_count=$K" | sed -E 's/^ +//; s/ +/ /g')"
  if [ -d .venv/bin ]; then PATH="$PWD/.venv/bin:$PATH"; fi
  for ((i = 0; i < N; i++)); do
    echo "$(show env JAX_PLATFORMS=cpu "XLA_FLAGS=$XLA" "MUSICLM_COORDINATOR=127.0.0.1:$PORT" \
      "MUSICLM_NUM_PROCESSES=$N" "MUSICLM_PROCESS_ID=$i" "${COMMAND[@]}") >$LOG_DIR/process-$i.log 2>&1 &"
  done
  if [ "$DRY_RUN" = 1 ]; then exit 0; fi
  mkdir -p "$LOG_DIR"
  # Job control puts each process in its own process group, so stopping one also stops what it started.
  set -m
  PIDS=()
  stop_all() {  # TERM every process group still running, KILL after 5 s
    local pid tries
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for ((tries = 0; tries < 50; tries++)); do
      local alive=0
      for pid in "${PIDS[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
      [ "$alive" = 1 ] || return 0
      sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  }
  trap 'echo "tpu_run.sh: interrupted, stopping processes" >&2; stop_all; exit 130' INT TERM
  for ((i = 0; i < N; i++)); do
    env JAX_PLATFORMS=cpu XLA_FLAGS="$XLA" MUSICLM_COORDINATOR="127.0.0.1:$PORT" MUSICLM_NUM_PROCESSES="$N" \
      MUSICLM_PROCESS_ID="$i" "${COMMAND[@]}" >"$LOG_DIR/process-$i.log" 2>&1 </dev/null &
    PIDS+=("$!")
  done
  set +m  # the groups stay; this only silences bash's job notices ("Terminated ...")
  # Poll rather than `wait -n`, which older bash (macOS 3.2) lacks; bash keeps each child's status for `wait`.
  DONE=()
  for ((i = 0; i < N; i++)); do DONE+=(0); done
  FAILED=0 REMAINING=$N
  while [ "$REMAINING" -gt 0 ]; do
    for ((i = 0; i < N; i++)); do
      if [ "${DONE[$i]}" = 1 ] || kill -0 "${PIDS[$i]}" 2>/dev/null; then continue; fi
      rc=0
      wait "${PIDS[$i]}" || rc=$?
      DONE[$i]=1
      REMAINING=$((REMAINING - 1))
      if [ "$rc" != 0 ] && [ "$FAILED" = 0 ]; then
        FAILED=1
        echo "tpu_run.sh: process $i failed (exit $rc); stopping the others. Last lines of its log:" >&2
        tail -n 20 "$LOG_DIR/process-$i.log" | sed 's/^/  | /' >&2
        stop_all
      fi
    done
    [ "$REMAINING" = 0 ] || sleep 0.2
  done
  trap - INT TERM
  echo "tpu_run.sh: $N processes $([ "$FAILED" = 0 ] && echo finished || echo FAILED); logs: $LOG_DIR/process-*.log"
  exit "$FAILED"
fi

# -------------------------------------------------------------------------------------------------- pod mode
[ -z "$LOCAL_DEVICES" ] || die "--local_devices only applies with --local"
[ -n "$TPU" ] || { usage; die "--tpu NAME is required (or --local N to run on this machine)"; }
[ -n "$ZONE" ] || { usage; die "--zone ZONE is required"; }
[ ${#COMMAND[@]} -gt 0 ] || [ "$KILL" = 1 ] || { usage; die "no command given (put it after --)"; }
command -v gcloud >/dev/null || [ "$DRY_RUN" = 1 ] || die "gcloud not found on PATH"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
TARGET=("--zone=$ZONE")
if [ -n "$PROJECT" ]; then TARGET+=("--project=$PROJECT"); fi
TARGET+=(--worker=all)

if [ "$KILL" = 1 ]; then
  # Matches process names (not command lines, which would include this very script's text) of the ssh user.
  KILL_SCRIPT='pids=""; for p in $(pgrep -u "$(id -u)" python || true); do
cwd=$(readlink "/proc/$p/cwd" 2>/dev/null || true);
if case "$cwd" in "$HOME/musiclm_jax"|"$HOME/musiclm_jax/"*) true;; *) false;; esac ||
tr "\0" "\n" <"/proc/$p/environ" 2>/dev/null | grep -qx MUSICLM_DISTRIBUTED=1; then pids="$pids $p"; fi; done;
if [ -n "$pids" ]; then echo "$(hostname): stopping$pids"; kill -TERM $pids 2>/dev/null || true;
for t in 1 2 3 4 5 6 7 8 9 10; do alive=""; for p in $pids; do kill -0 $p 2>/dev/null && alive="$alive $p"; done;
[ -z "$alive" ] && break; sleep 1; done; [ -z "$alive" ] || kill -KILL $alive 2>/dev/null || true;
else echo "$(hostname): no stale processes"; fi'
  run_cmd "${GCLOUD_TPU[@]}" ssh "$TPU" "${TARGET[@]}" --command="${KILL_SCRIPT//$'\n'/ }"
  if [ ${#COMMAND[@]} -eq 0 ]; then exit 0; fi
fi

SETUP_EXTRAS="tpu${EXTRAS:+,$EXTRAS}"
TARBALL="${TMPDIR:-/tmp}/musiclm_jax-$RUN_ID-$$.tgz"
REMOTE_LOG_DIR="logs/tpu_run/$(basename "$LOG_DIR")"
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$LOG_DIR/setup"
  trap 'rm -f "$TARBALL"' EXIT
fi

# 1. ship the code: in a git checkout the files git knows or would add (tracked + untracked, .gitignore honoured,
# so .venv, caches and run outputs stay home), without logs/; otherwise the tree minus the usual suspects.
if git -C "$REPO_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  FILE_LIST="${TARBALL%.tgz}.files"
  echo "+ git ls-files -z --cached --others --exclude-standard > $FILE_LIST  # existing files, logs/ left out"
  if [ "$DRY_RUN" = 0 ]; then
    trap 'rm -f "$TARBALL" "$FILE_LIST"' EXIT
    git -C "$REPO_DIR" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [ -e "$f" ] && [[ "$f" != logs/* ]]; then printf '%s\0' "$f"; fi
      done >"$FILE_LIST"
  fi
  run_cmd tar -czf "$TARBALL" -C "$REPO_DIR" --null -T "$FILE_LIST"
else
  run_cmd tar -czf "$TARBALL" --exclude=./.venv --exclude=./.git --exclude=./logs --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.egg-info' -C "$REPO_DIR" .
fi
run_cmd "${GCLOUD_TPU[@]}" scp "$TARBALL" "$TPU:musiclm_jax.tgz" "${TARGET[@]}"
# 2. unpack and set up the pinned environment (idempotent)
run_cmd "${GCLOUD_TPU[@]}" ssh "$TPU" "${TARGET[@]}" --output-directory="$LOG_DIR/setup" \
  --command="mkdir -p $REMOTE_DIR && tar -xzf ~/musiclm_jax.tgz -C $REMOTE_DIR && rm -f ~/musiclm_jax.tgz && \
cd $REMOTE_DIR && bash launch/setup_env.sh $SETUP_EXTRAS" || die "set-up failed on some worker; see $LOG_DIR/setup/"
# 3. run the command on every worker, jax.distributed on (gcloud writes each worker's output to LOG_DIR/<i>.log)
if [ "$DRY_RUN" = 0 ]; then echo "tpu_run.sh: running on all workers; follow with: tail -f $LOG_DIR/0.log"; fi
QUOTED="$(printf '%q ' "${COMMAND[@]}")"
rc=0
run_cmd "${GCLOUD_TPU[@]}" ssh "$TPU" "${TARGET[@]}" --output-directory="$LOG_DIR" \
  --command="cd $REMOTE_DIR && mkdir -p $REMOTE_LOG_DIR && export PATH=\"\$PWD/.venv/bin:\$PATH\" \
MUSICLM_DISTRIBUTED=1 && set -o pipefail && { ${QUOTED}; } 2>&1 | tee $REMOTE_LOG_DIR/\$(hostname).log" || rc=$?
if [ "$DRY_RUN" = 0 ]; then
  echo "tpu_run.sh: exit $rc; logs: $LOG_DIR/<worker>.log (setup: $LOG_DIR/setup/), on the workers:" \
    "$REMOTE_DIR/$REMOTE_LOG_DIR/<hostname>.log"
fi
exit "$rc"
