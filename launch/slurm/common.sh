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

# wait_healthy NAME URL PID TIMEOUT_S LOGFILE: poll URL every 2 s, bounded by TIMEOUT_S and a try count; fail
# at once, naming the teacher and quoting its log, if its srun step (PID) exits first.
wait_healthy() {
  local name=$1 url=$2 pid=$3 timeout_s=$4 logfile=$5 begin=$SECONDS try rc
  for ((try = 0; try <= timeout_s / 2; try++)); do
    if http_ok "$url"; then
      log "teacher $name healthy at $url after $((SECONDS - begin)) s"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0; wait "$pid" || rc=$?
      log "ERROR: teacher $name exited (code $rc) before $url answered; its log $logfile ends:"
      tail -n 20 "$logfile" >&2 || true
      return 1
    fi
    ((SECONDS - begin < timeout_s)) || break
    sleep 2
  done
  log "ERROR: teacher $name not healthy at $url after $((SECONDS - begin)) s (TEACHER_WAIT_S=$timeout_s); its log" \
      "$logfile ends:"
  tail -n 20 "$logfile" >&2 || true
  return 1
}
