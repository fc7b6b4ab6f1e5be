#!/usr/bin/env bash
# A local Prefect stack for this project: server + `rapm-local` process pool + deployments from
# prefect.yaml + one worker + a zombie-run automation. `up` is idempotent and only starts what is
# missing, so after a worker died `up` again brings a new one; `down` stops exactly the processes
# `up` started (their PIDs are in the state dir), nothing found by name.
#
#   scripts/stack.sh up | down | env
#
# Knobs (environment): RAPM_STATE_DIR (default <project>/.state), RAPM_PREFECT_PORT (4200),
# RAPM_WORK_POOL (rapm-local), RAPM_ZOMBIE_AFTER_S (seconds without a heartbeat before a running
# flow run is marked Crashed; default 90, heartbeats every 30 s).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${RAPM_STATE_DIR:-$ROOT/.state}
PORT=${RAPM_PREFECT_PORT:-4200}
POOL=${RAPM_WORK_POOL:-rapm-local}
ZOMBIE_AFTER_S=${RAPM_ZOMBIE_AFTER_S:-90}
BIN=$ROOT/.venv/bin
RUN=$STATE/prefect-stack  # PIDs, logs, the env file

export PREFECT_HOME=$STATE/prefect
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export RAPM_PROJECT_DIR=$ROOT  # prefect.yaml's working directory, resolved when deploying
# A cold SQLite database on a 2-core machine answers slowly while migrating and while a run is
# busy on the CPU; the defaults (20 s start-up, 10 s connect) fail spuriously there.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export PREFECT_API_REQUEST_TIMEOUT=120
export PREFECT_SERVER_DATABASE_TIMEOUT=60
export PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT=30
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1

log() { printf 'stack: %s\n' "$*" >&2; }

alive() {  # alive NAME: the process recorded as NAME is running
  [[ -s $RUN/$1.pid ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null
}

start_bg() {  # start_bg NAME CMD...: own process group (job control), so one signal stops it and its children
  local name=$1; shift
  bash -c 'set -m; nohup "$@" >>"$0" 2>&1 </dev/null & echo $! >"$0.pid"' "$RUN/$name.log" "$@"
  mv "$RUN/$name.log.pid" "$RUN/$name.pid"
}

stop() {  # stop NAME: TERM its process group, KILL it after 20 s
  local name=$1 pid i
  [[ -s $RUN/$name.pid ]] || return 0
  pid=$(cat "$RUN/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ($pid) ignored SIGTERM for 20 s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "$RUN/$name.pid"
}

wait_healthy() {
  local t0=$SECONDS
  until curl -fs -o /dev/null --max-time 5 "$PREFECT_API_URL/health"; do
    alive server || { log "server exited; see $RUN/server.log"; tail -n 20 "$RUN/server.log" >&2; return 1; }
    ((SECONDS - t0 < 120)) || { log "server not healthy after 120 s; see $RUN/server.log"; return 1; }
    sleep 0.5
  done
  log "server healthy at $PREFECT_API_URL ($((SECONDS - t0)) s)"
}

configure() {
  # The pool (one GPU: concurrency 1, later runs wait in Scheduled/Late) and Prefect's documented
  # zombie detection: a flow run whose heartbeats stop (its worker or machine died) is marked
  # Crashed, which frees the pool's slot and makes `prefect flow-run retry` possible; flow runs
  # send heartbeats every 30 s (prefect.yaml). One interpreter instead of five CLI calls: each
  # costs ~3 s idle and ~15 s on a busy 2-core machine.
  "$BIN/python" - "$POOL" "$ZOMBIE_AFTER_S" <<'PY'
import sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

pool, after = sys.argv[1], int(sys.argv[2])
with get_client(sync_client=True) as client:
    try:
        client.read_work_pool(pool)
        client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=1))
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=pool, type="process", concurrency_limit=1,
            base_job_template=ProcessWorker.get_default_base_job_template()))
    name = "rapm-crash-zombie-flow-runs"
    # Replaced only when its window changed: a new automation has not seen the heartbeats that
    # came before it, so it would never notice a run that had already died (the usual case when
    # `up` runs again to replace a dead worker).
    existing = client.read_automations_by_name(name)
    if existing and all(a.trigger.within.total_seconds() == after for a in existing):
        sys.exit(0)
    for old in existing:
        client.delete_automation(old.id)
    client.create_automation(AutomationCore.model_validate({
        "name": name, "description": f"Mark a running flow run Crashed when its heartbeats stop for {after} s",
        "trigger": {"type": "event", "posture": "Proactive", "threshold": 1, "within": after,
                    "match": {"prefect.resource.id": "prefect.flow-run.*"},
                    "after": ["prefect.flow-run.heartbeat"],
                    "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                               "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
                    "for_each": ["prefect.resource.id"]},
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"No heartbeat for {after} s: its worker or process died. "
                                "Resume it with `prefect flow-run retry <run>`."}]}))
PY
}

write_env() {
  cat >"$RUN/env" <<ENV
export PREFECT_HOME=$PREFECT_HOME
export PREFECT_API_URL=$PREFECT_API_URL
export PREFECT_API_REQUEST_TIMEOUT=$PREFECT_API_REQUEST_TIMEOUT
ENV
}

up() {
  mkdir -p "$RUN" "$PREFECT_HOME"
  local t0=$SECONDS
  if alive server; then
    log "server already running ($(cat "$RUN/server.pid"))"
  else
    if curl -fs -o /dev/null --max-time 2 "$PREFECT_API_URL/health"; then
      log "port $PORT already serves a Prefect API that this stack did not start; pick another RAPM_PREFECT_PORT"
      return 1
    fi
    start_bg server "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT"
    log "started server ($(cat "$RUN/server.pid")), log $RUN/server.log"
  fi
  wait_healthy
  write_env

  local t1=$SECONDS
  configure
  (cd "$ROOT" && "$BIN/prefect" --no-prompt deploy --all) >"$RUN/deploy.log" 2>&1 \
    || { log "prefect deploy failed; see $RUN/deploy.log"; tail -n 30 "$RUN/deploy.log" >&2; return 1; }
  log "pool $POOL (concurrency 1) and deployments ready ($((SECONDS - t1)) s): $(grep -c "Deployment '" "$RUN/deploy.log" || true) deployed"

  if alive worker; then
    log "worker already running ($(cat "$RUN/worker.pid"))"
  else
    # The worker starts flow runs with its own interpreter, so starting it from .venv makes every
    # flow run use the project's environment.
    PREFECT_WORKER_QUERY_SECONDS=2 start_bg worker \
      "$BIN/prefect" worker start --pool "$POOL" --type process --install-policy never --name "rapm-worker-$$"
    log "started worker ($(cat "$RUN/worker.pid")), log $RUN/worker.log"
  fi
  log "up in $((SECONDS - t0)) s. UI: http://127.0.0.1:$PORT  — for prefect commands in your shell:"
  cat "$RUN/env"
  echo "# or: source ${RUN#"$ROOT"/}/env"
}

down() {
  stop worker
  stop server
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) cat "$RUN/env" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
