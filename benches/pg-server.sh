# shellcheck shell=bash
# A throwaway PostgreSQL 15 server for the bench scripts: a new cluster on loopback, run by
# the postgres OS user (so the scripts that use it run as root). Sourced, not run:
#   . benches/pg-server.sh      (from the repository root, after `cd "$(dirname "$0")/.."`)
# It sets pgbin and defines the functions below; it starts nothing by itself.
#   pg_server DIR PORT SUPERUSER [SETTING...]   the whole start-up, for one plain server
#   pg_init / pg_listen / pg_start               its steps, for a server set up otherwise
#   pg_stop DATA                                 for the cleanup trap
#   as_pg CMD...                                 CMD as the postgres OS user
#   free_port                                    a loopback TCP port free at this instant

pgbin=/usr/lib/postgresql/15/bin

# as_pg CMD...: runs CMD as the postgres OS user. A script may redefine it after sourcing
# this file (side-by-side.sh clears the environment); the functions here then use that.
as_pg() { runuser -u postgres -- "$@"; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# pg_init DATA SUPERUSER [INITDB_ARG...]: a new cluster in DATA, trust authentication,
# SUPERUSER its bootstrap role. No fsync at initdb (-N): the cluster is thrown away.
pg_init() {
    local data=$1 user=$2
    shift 2
    as_pg "$pgbin/initdb" -D "$data" -A trust -U "$user" -N "$@" >/dev/null
}

# pg_listen DATA PORT SOCKET_DIR: appends to DATA's postgresql.conf that it listens on
# 127.0.0.1:PORT only, with its Unix socket in SOCKET_DIR.
pg_listen() {
    cat >> "$1/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$3'
EOF
}

# pg_start DATA LOG: starts the cluster in DATA, logging to LOG, and waits until it accepts
# connections.
pg_start() { as_pg "$pgbin/pg_ctl" -D "$1" -l "$2" -w -s start; }

# pg_stop DATA: stops the cluster in DATA at once if it runs; never fails, says nothing.
pg_stop() {
    [ -f "$1/postmaster.pid" ] || return 0
    as_pg "$pgbin/pg_ctl" -D "$1" -m immediate -w stop >/dev/null 2>&1 || true
}

# pg_server DIR PORT SUPERUSER [SETTING...]: the plain bench server. DIR is created for the
# postgres user and holds the cluster (DIR/data), its Unix socket and its log (DIR/log); it
# listens on 127.0.0.1:PORT, each SETTING ("name = value") is appended to postgresql.conf,
# and it runs when this returns. Stop it with `pg_stop DIR/data`.
pg_server() {
    local dir=$1 port=$2 user=$3
    shift 3
    mkdir -p "$dir"
    chown postgres "$dir"
    pg_init "$dir/data" "$user"
    pg_listen "$dir/data" "$port" "$dir"
    printf '%s\n' "$@" >> "$dir/data/postgresql.conf"
    pg_start "$dir/data" "$dir/log"
}
