#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the store tests, print its URL.
#   eval "$(bash scripts/postgres.sh start DIR)"   -> exports DMSC_FED_TEST_PG_URL and PG_DIR
#   bash scripts/postgres.sh stop DIR               -> stops it (by the postmaster's PID) and removes DIR
# PostgreSQL comes from Debian's packages (installed with apt-get when missing).
set -euo pipefail
cmd="${1:?start|stop}"
dir="${2:?directory}"
find_bin() {
  for d in /usr/local/bin /usr/lib/postgresql/*/bin; do
    if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
  done
  return 1
}
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$cmd" in
  start)
    if ! find_bin initdb >/dev/null; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
      else
        echo "echo 'PostgreSQL is not installed: store tests run on SQLite only' >&2"
        exit 0
      fi
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then useradd --system --no-create-home postgres; fi
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$(find_bin initdb)" -D "$dir/data" -U dmsc --auth=trust -E UTF8 >/dev/null
    as_pg "$(find_bin pg_ctl)" -D "$dir/data" -l "$dir/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null
    echo "export DMSC_FED_TEST_PG_URL=postgresql+psycopg2://dmsc@127.0.0.1:$port/postgres PG_DIR=$dir"
    ;;
  stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
      pid=$(head -1 "$dir/data/postmaster.pid")
      kill -INT "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
    ;;
esac
