#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the storage and queue tests, as a normal user, on a local port.
#
#   eval "$(bash .ci/postgres.sh start)"   # prints `export LORALAB_TEST_PG_URL=...; export LORALAB_PG_DIR=...`
#   bash .ci/postgres.sh stop              # stops it and removes its folder
#
# Needs Debian's `postgresql` package (initdb, pg_ctl). Run as root, it runs the server as the `postgres` user
# (PostgreSQL refuses to run as root); otherwise as the calling user. Trust authentication on 127.0.0.1 only.
set -euo pipefail
PORT="${LORALAB_PG_PORT:-55432}"
# The first port from $PORT on that nothing listens on (another cluster, an earlier run).
while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -n "$BIN" ] || { echo "no PostgreSQL binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

case "${1:-}" in
  start)
    DIR="$(mktemp -d /tmp/loralab-pg.XXXXXX)"
    [ "$(id -u)" = 0 ] && chown postgres "$DIR"
    as_pg "'$BIN/initdb' -D '$DIR/data' -A trust -U postgres -E UTF8 >'$DIR/initdb.log' 2>&1"
    as_pg "'$BIN/pg_ctl' -D '$DIR/data' -l '$DIR/server.log' -w -o \"-p $PORT -k '$DIR' -c listen_addresses=127.0.0.1 -c fsync=off\" start >/dev/null"
    echo "export LORALAB_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
    echo "export LORALAB_PG_DIR=$DIR"
    ;;
  stop)
    DIR="${LORALAB_PG_DIR:?set LORALAB_PG_DIR (printed by start)}"
    as_pg "'$BIN/pg_ctl' -D '$DIR/data' -m fast -w stop >/dev/null" || true
    rm -rf "$DIR"
    ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
