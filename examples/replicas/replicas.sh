#!/usr/bin/env bash
# Two gateway replicas behind HAProxy on one machine, sharing PostgreSQL and Redis (docs/deployment.md).
#
#   replicas.sh start             the backend (the simulator, unless BACKEND_URL is given), both replicas, HAProxy
#   replicas.sh rolling-restart   each replica in turn: drained by SIGTERM, started again, back in HAProxy
#   replicas.sh stop              everything start started
#
# Settings (environment): RUN_DIR (/tmp/inference-gateway-replicas), LB_PORT (8000), REPLICA_PORTS ("8001 8002"),
# STATS_PORT (8404), BACKEND_URL, BACKEND_PORT (8100), INFERENCE_GATEWAY_DATABASE_URL (a PostgreSQL database that
# exists; default postgresql+asyncpg://postgres@127.0.0.1:5432/inference_gateway), REDIS_URL
# (redis://127.0.0.1:6379/0), REDIS_PREFIX (inference-gateway:), INFERENCE_GATEWAY_DEV_TOKEN, PYTHON (python3 of the
# gateway's environment).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_DIR="${RUN_DIR:-/tmp/inference-gateway-replicas}"
LB_PORT="${LB_PORT:-8000}"
STATS_PORT="${STATS_PORT:-8404}"
read -r -a PORTS <<< "${REPLICA_PORTS:-8001 8002}"
BACKEND_PORT="${BACKEND_PORT:-8100}"
PYTHON="${PYTHON:-python3}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
REDIS_PREFIX="${REDIS_PREFIX:-inference-gateway:}"
export INFERENCE_GATEWAY_DATABASE_URL="${INFERENCE_GATEWAY_DATABASE_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/inference_gateway}"
export INFERENCE_GATEWAY_LIMITS_REDIS_URL="${INFERENCE_GATEWAY_LIMITS_REDIS_URL:-$REDIS_URL}"
export INFERENCE_GATEWAY_RELAY_REDIS_URL="${INFERENCE_GATEWAY_RELAY_REDIS_URL:-$REDIS_URL}"
export INFERENCE_GATEWAY_REDIS_URL="${INFERENCE_GATEWAY_REDIS_URL:-$REDIS_URL}"
export INFERENCE_GATEWAY_STATE_DIR="$RUN_DIR/state"
export RUN_DIR LB_BIND="127.0.0.1:$LB_PORT" STATS_BIND="127.0.0.1:$STATS_PORT"
export REPLICA1="127.0.0.1:${PORTS[0]}" REPLICA2="127.0.0.1:${PORTS[1]}"
HAPROXY="${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}"

log() { printf '[replicas] %s\n' "$*" >&2; }

# Wait until "$@" succeeds, at most $1 seconds.
wait_for() {
    local seconds=$1; shift
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# The body of a 200 answer from URL $1, or a failure (the gateway's Python, so that nothing else is needed).
fetch() {
    "$PYTHON" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1" 2>/dev/null
}
ready() { fetch "http://127.0.0.1:$1/resource_server/ready" > /dev/null; }
# HAProxy's view of server r$1 in its statistics (CSV: proxy, server, ..., status in the 18th field).
in_haproxy() { fetch "http://$STATS_BIND/stats;csv" | awk -F, -v s="r$1" '$1 == "replicas" && $2 == s { print $18 }' | grep -qx UP; }
running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_replica() {
    local index=$1 port=${PORTS[$(($1 - 1))]}
    log "replica r$index on port $port"
    "$PYTHON" -m gateway.cli serve --host 127.0.0.1 --port "$port" --config "$RUN_DIR/gateway.yaml" \
        --log-level info >> "$RUN_DIR/r$index.log" 2>&1 &
    echo $! > "$RUN_DIR/r$index.pid"
    wait_for 60 ready "$port" || { log "r$index is not ready; see $RUN_DIR/r$index.log"; exit 1; }
}

# SIGTERM: the replica refuses new connections at once (HAProxy sends those to the other), lets the requests and
# streams in flight finish (server.drain_timeout), and gives up its batch leases.
stop_pid_file() {
    local file=$1
    if running "$file"; then
        kill -TERM "$(cat "$file")"
        wait_for 90 bash -c "! kill -0 $(cat "$file") 2>/dev/null" || kill -KILL "$(cat "$file")"
    fi
    rm -f "$file"
}

# The database must exist; the gateway makes its tables.
ensure_database() {
    "$PYTHON" - "$INFERENCE_GATEWAY_DATABASE_URL" <<'PY'
import asyncio, sys
import asyncpg

url = sys.argv[1].replace("postgresql+asyncpg://", "postgresql://", 1)
server, name = url.rsplit("/", 1)

async def main() -> None:
    connection = await asyncpg.connect(server + "/postgres")
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()

asyncio.run(main())
PY
}

start() {
    ensure_database
    mkdir -p "$RUN_DIR" "$INFERENCE_GATEWAY_STATE_DIR/batch-files"
    if [[ -z "${BACKEND_URL:-}" ]]; then
        log "simulator on port $BACKEND_PORT"
        "$PYTHON" -m gateway.simulator --model facebook/opt-125m --tpot 0.005 --port "$BACKEND_PORT" >> "$RUN_DIR/backend.log" 2>&1 &
        echo $! > "$RUN_DIR/backend.pid"
        BACKEND_URL="http://127.0.0.1:$BACKEND_PORT/v1"
        wait_for 30 fetch "http://127.0.0.1:$BACKEND_PORT/health" > /dev/null
    fi
    sed -e "s|@BACKEND_URL@|$BACKEND_URL|" -e "s|@REDIS_PREFIX@|$REDIS_PREFIX|" \
        -e "s|@STATE_DIR@|$INFERENCE_GATEWAY_STATE_DIR|" "$HERE/gateway.yaml" > "$RUN_DIR/gateway.yaml"
    if [[ -z "${INFERENCE_GATEWAY_DEV_TOKEN:-}" ]]; then
        INFERENCE_GATEWAY_DEV_TOKEN="$("$PYTHON" -m gateway.cli dev-token --config "$RUN_DIR/gateway.yaml")"
    fi
    export INFERENCE_GATEWAY_DEV_TOKEN
    start_replica 1
    start_replica 2
    "$HAPROXY" -c -q -f "$HERE/haproxy.cfg"
    "$HAPROXY" -D -p "$RUN_DIR/haproxy.pid" -f "$HERE/haproxy.cfg"
    wait_for 30 in_haproxy 1
    wait_for 30 in_haproxy 2
    log "up: http://$LB_BIND/resource_server/v1 (statistics: http://$STATS_BIND/stats)"
    log "token: export MY_TOKEN=\$(cat $INFERENCE_GATEWAY_STATE_DIR/dev-token)  (unless you gave INFERENCE_GATEWAY_DEV_TOKEN)"
}

rolling_restart() {
    export INFERENCE_GATEWAY_DEV_TOKEN="${INFERENCE_GATEWAY_DEV_TOKEN:-$("$PYTHON" -m gateway.cli dev-token --config "$RUN_DIR/gateway.yaml")}"
    for index in 1 2; do
        log "restarting r$index"
        stop_pid_file "$RUN_DIR/r$index.pid"
        start_replica "$index"
        # The next one goes only once HAProxy sends traffic to this one again.
        wait_for 30 in_haproxy "$index" || { log "HAProxy does not see r$index up"; exit 1; }
    done
    log "rolling restart done"
}

stop() {
    stop_pid_file "$RUN_DIR/haproxy.pid"
    for index in 1 2; do stop_pid_file "$RUN_DIR/r$index.pid"; done
    stop_pid_file "$RUN_DIR/backend.pid"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    rolling-restart) rolling_restart ;;
    stop) stop ;;
    *) echo "usage: $0 start|rolling-restart|stop" >&2; exit 2 ;;
esac
