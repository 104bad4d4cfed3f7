# Shared by launch/slurm/*.sbatch (sourced): logging, node lists, served-teacher command lines and health waits.

log() { echo "[$(date +%H:%M:%S) opd-slurm job ${SLURM_JOB_ID:-?}] $*" >&2; }

# nodes_of RANGE_START COUNT: COUNT hostnames of the allocation from index RANGE_START, comma-separated.
nodes_of() {
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n "$(($1 + 1)),$(($1 + $2))p" | paste -sd, -
}

# teacher_command KIND: the server's command line (in TEACHER_CMD, an array) for SGLang or vLLM, from the
# TEACHER_* variables; extra server flags come from TEACHER_ARGS (split on spaces).
teacher_command() {
  local extra=()
  read -r -a extra <<< "${TEACHER_ARGS:-}"
  case "$1" in
    sglang) TEACHER_CMD=("$TEACHER_PYTHON" -m sglang.launch_server --model-path "$TEACHER_MODEL"
                         --served-model-name "$TEACHER_NAME" --tp "$TEACHER_TP"
                         --host "$TEACHER_BIND" --port "$TEACHER_PORT" "${extra[@]}") ;;
    vllm)   TEACHER_CMD=("$TEACHER_PYTHON" -m vllm.entrypoints.openai.api_server --model "$TEACHER_MODEL"
                         --served-model-name "$TEACHER_NAME" --tensor-parallel-size "$TEACHER_TP"
                         --host "$TEACHER_BIND" --port "$TEACHER_PORT" "${extra[@]}") ;;
    *) log "TEACHER_KIND=$1: expected sglang, vllm or none"; return 2 ;;
  esac
}

# health_path KIND: the endpoint that answers 200 once the server can score (SGLang runs one generation for it).
health_path() { case "$1" in sglang) echo /health_generate ;; vllm) echo /health ;; esac; }

# http_ok URL: true when URL answers 200 within 5 s.
http_ok() {
  python3 -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)
except Exception:
    sys.exit(1)' "$1"
}

# rollout_command KIND: a rollout server's command line (in ROLLOUT_CMD) for the student's rollouts
# (rollout.engine: vllm | sglang, rollout/served.py): the ROLLOUT_* variables, plus what a rollout server needs:
# vLLM: the dev-mode weight-sync routes, behaviour log-probs after temperature/top-k/top-p, no sampling defaults from
# the checkpoint; SGLang: deterministic inference, without which it ignores the per-row sampling seeds.
rollout_command() {
  local extra=()
  read -r -a extra <<< "${ROLLOUT_ARGS:-}"
  case "$1" in
    vllm)   ROLLOUT_CMD=(env VLLM_SERVER_DEV_MODE=1 "$ROLLOUT_PYTHON" -m vllm.entrypoints.openai.api_server
                         --model "$ROLLOUT_MODEL" --served-model-name "$ROLLOUT_NAME"
                         --tensor-parallel-size "$ROLLOUT_TP" --host "$ROLLOUT_BIND" --port "$ROLLOUT_PORT"
                         --logprobs-mode processed_logprobs --generation-config vllm "${extra[@]}") ;;
    sglang) ROLLOUT_CMD=("$ROLLOUT_PYTHON" -m sglang.launch_server --model-path "$ROLLOUT_MODEL"
                         --served-model-name "$ROLLOUT_NAME" --tp "$ROLLOUT_TP" --host "$ROLLOUT_BIND"
                         --port "$ROLLOUT_PORT" --enable-deterministic-inference "${extra[@]}") ;;
    *) log "ROLLOUT_KIND=$1: expected vllm, sglang or none"; return 2 ;;
  esac
}

# wait_healthy NAME URL PID TIMEOUT_S LOGFILE [ROLE]: poll URL every 2 s, bounded by TIMEOUT_S and a try count;
# fail at once, naming the server (ROLE: teacher, the default, or rollout) and quoting its log, if its srun step
# (PID) exits first.
wait_healthy() {
  local name=$1 url=$2 pid=$3 timeout_s=$4 logfile=$5 role=${6:-teacher} begin=$SECONDS try rc
  for ((try = 0; try <= timeout_s / 2; try++)); do
    if http_ok "$url"; then
      log "$role $name healthy at $url after $((SECONDS - begin)) s"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0; wait "$pid" || rc=$?
      log "ERROR: $role $name exited (code $rc) before $url answered; its log $logfile ends:"
      tail -n 20 "$logfile" >&2 || true
      return 1
    fi
    ((SECONDS - begin < timeout_s)) || break
    sleep 2
  done
  log "ERROR: $role $name not healthy at $url after $((SECONDS - begin)) s (${role^^}_WAIT_S=$timeout_s); its log" \
      "$logfile ends:"
  tail -n 20 "$logfile" >&2 || true
  return 1
}
