#!/usr/bin/env bash
# A throwaway PostgreSQL on 127.0.0.1 for tests/optimize/test_optimize_postgres.py.
#   .ci/postgres.sh [start]  installs PostgreSQL (.ci/apt-install.sh) if missing, starts a fresh cluster with
#                            user/db "obliteratus" (trust auth, loopback only) and prints its URL;
#   .ci/postgres.sh stop     stops it and deletes the cluster.
# The cluster lives in $OBLITERATUS_PG_DIR (default /tmp/obliteratus-pg) on port $OBLITERATUS_PG_PORT
# (default 55432). Usage: export OBLITERATUS_TEST_POSTGRES="$(.ci/postgres.sh)"; ...; .ci/postgres.sh stop
set -euo pipefail
DIR=${OBLITERATUS_PG_DIR:-/tmp/obliteratus-pg}
PORT=${OBLITERATUS_PG_PORT:-55432}

find_bin() {
    local ctl
    ctl=$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$ctl" ]]; then
        ctl=$(command -v pg_ctl || true)
    fi
    [[ -n "$ctl" ]] && dirname "$ctl"
}

as_owner() {  # PostgreSQL refuses to run as root: use the postgres system user then
    if [[ $(id -u) -eq 0 ]]; then
        su postgres -s /bin/bash -c "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}

if [[ "${1:-start}" == "stop" ]]; then
    BIN=$(find_bin) || exit 0
    [[ -d "$DIR/data" ]] && as_owner "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
    exit 0
fi

BIN=$(find_bin || true)
if [[ -z "$BIN" ]]; then
    "$(dirname "$0")/apt-install.sh" postgresql
    BIN=$(find_bin)
fi
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
fi

rm -rf "$DIR"
mkdir -p "$DIR"
[[ $(id -u) -eq 0 ]] && chown postgres "$DIR"
as_owner "$BIN/initdb" -D "$DIR/data" -U obliteratus --auth=trust >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/data/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=50" start >&2
as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U obliteratus obliteratus >&2
echo "postgresql://obliteratus@127.0.0.1:$PORT/obliteratus"
