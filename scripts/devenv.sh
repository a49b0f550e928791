#!/usr/bin/env bash
# Development environment for StakePro: the virtualenv, Redis and PostgreSQL.
#
#   scripts/devenv.sh venv       create .venv and install requirements.lock when it changed
#   scripts/devenv.sh browser    install Debian chromium (Playwright browsers are not downloaded)
#   scripts/devenv.sh redis-bin  make sure the redis-server binary exists (the tests start one)
#   scripts/devenv.sh redis      reuse the Redis at REDIS_URL, or start our own in .data/redis
#   scripts/devenv.sh postgres   reuse the PostgreSQL at DATABASE_URL, or start our own in
#                                .data/pg; then create the URL's database if missing
#   scripts/devenv.sh rabbitmq   reuse the RabbitMQ of an amqp:// BROKER_URL or TEST_AMQP_URL (default
#                                127.0.0.1:5672, the tests' one), or start it (rabbitmq-server
#                                -detached, installing the Debian package when missing)
#   scripts/devenv.sh services   redis + postgres (+ rabbitmq when BROKER_URL is amqp://)
#   scripts/devenv.sh stop-own   stop only the servers this script started
#
# Quiet on success, except one line per service saying whether it was reused or started.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$REPO_ROOT/.data"
REDIS_DIR="$DATA_DIR/redis"
REDIS_PIDFILE="$REDIS_DIR/redis.pid"
PG_DATA="$DATA_DIR/pg"
PG_RUN="$DATA_DIR/pg-run"
PG_LOG="$PG_RUN/postgres.log"
DEFAULT_REDIS_URL="redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL="postgresql://root@127.0.0.1:5432/stakepro"
DEFAULT_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2F"
RABBIT_MARK="$DATA_DIR/rabbitmq.started-by-devenv"
APT_UPDATED=0
LOCKED=0

log() { printf 'devenv: %s\n' "$*"; }
warn() { printf 'devenv: warning: %s\n' "$*" >&2; }
die() { printf 'devenv: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- helpers

# Run a command as root: directly when we are root, else through non-interactive sudo.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $* (not root and no sudo)"
    fi
}

apt_available() {
    command -v apt-get >/dev/null 2>&1 || return 1
    [[ $EUID -eq 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

# apt_install PKG... : install Debian packages quietly; `apt-get update` once per run.
apt_install() {
    apt_available || die "cannot install $* : apt-get is unavailable (or no root/sudo)"
    local out="$DATA_DIR/apt.log"
    mkdir -p "$DATA_DIR"
    if [[ $APT_UPDATED -eq 0 ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update \
            >"$out" 2>&1 || { cat "$out" >&2; die "apt-get update failed"; }
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
        install --no-install-recommends "$@" >"$out" 2>&1 \
        || { tail -n 30 "$out" >&2; die "apt-get install $* failed (full log: $out)"; }
}

# Decode %XX escapes of a URL component.
urldecode() { local s="${1//+/ }"; printf '%b' "${s//%/\\x}"; }

# parse_url URL DEFAULT_PORT : sets URL_SCHEME URL_USER URL_PASS URL_HOST URL_PORT URL_PATH.
parse_url() {
    local re='^([a-zA-Z][a-zA-Z0-9+.-]*)://(([^:@/]*)(:([^@/]*))?@)?([^:/?]+)(:([0-9]+))?(/([^?]*))?(\?.*)?$'
    [[ $1 =~ $re ]] || die "cannot parse URL: $1"
    URL_SCHEME="${BASH_REMATCH[1]}"
    URL_USER="$(urldecode "${BASH_REMATCH[3]}")"
    URL_PASS="$(urldecode "${BASH_REMATCH[5]}")"
    URL_HOST="${BASH_REMATCH[6]}"
    URL_PORT="${BASH_REMATCH[8]:-$2}"
    URL_PATH="$(urldecode "${BASH_REMATCH[10]}")"
}

# Only a server on this machine can be started by us.
require_local_host() {
    case "$1" in
        127.*|localhost|::1) ;;
        *) die "$2 at $1:$3 does not answer, and $1 is not a local address: cannot start one" ;;
    esac
}

# wait_for SECONDS CMD... : retry CMD every 0.2s until it succeeds or time runs out.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Serialise concurrent runs (two `make test` at once must not both start a server).
# The servers we start get `9>&-` so they do not inherit (and keep holding) this lock.
lock_data_dir() {
    ((LOCKED == 0)) || return 0
    LOCKED=1
    mkdir -p "$DATA_DIR"
    exec 9>"$DATA_DIR/.devenv.lock"
    flock -w 300 9 || die "timed out waiting for another devenv.sh run ($DATA_DIR/.devenv.lock)"
}

# ---------------------------------------------------------------- venv / browser

ensure_python() {
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
}

cmd_venv() {
    local venv="$REPO_ROOT/.venv" stamp="$REPO_ROOT/.venv/.installed" out site
    if [[ ! -x $venv/bin/python ]]; then
        ensure_python
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"   # Debian's python3 lacks ensurepip until python3-venv is installed
            apt_install python3-venv
            python3 -m venv "$venv" || die "python3 -m venv $venv failed"
        fi
    fi
    [[ $REPO_ROOT/requirements.lock -nt $stamp ]] || return 0
    out="$venv/pip-install.log"
    # Exactly what the lock file names, each file checked against its hash: a fresh clone
    # builds the same today and next year. `make update-deps` refreshes the lock on purpose.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
        --no-deps -r "$REPO_ROOT/requirements.lock" >"$out" 2>&1 \
        || { tail -n 40 "$out" >&2; die "pip install -r requirements.lock failed (full log: $out)"; }
    # The project itself runs from the checkout: a .pth file puts it on the path (no build
    # step, no unpinned build dependencies). An older editable install is removed first.
    "$venv/bin/python" -m pip uninstall -q -y stakepro >/dev/null 2>&1 || true
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    printf '%s\n' "$REPO_ROOT" >"$site/stakepro.pth"
    touch "$stamp"
}

cmd_browser() {
    command -v chromium >/dev/null 2>&1 && return 0
    if ! apt_available; then
        warn "chromium is missing and apt-get is unavailable: browser tests will not find it"
        return 0
    fi
    apt_install chromium
    log "installed chromium: $(command -v chromium)"
}

# ---------------------------------------------------------------- redis

ensure_redis_cli() { command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools; }
cmd_redis_bin() { command -v redis-server >/dev/null 2>&1 || apt_install redis-server; }

redis_answers() {
    [[ "$(timeout 5 redis-cli --no-auth-warning -u "$1" ping 2>/dev/null)" == PONG ]]
}

# Prints the pid of the redis-server answering at URL.
redis_server_pid() {
    timeout 5 redis-cli --no-auth-warning -u "$1" info server 2>/dev/null \
        | sed -n 's/^process_id:\([0-9]*\).*/\1/p'
}

# Prints the pid of our own redis-server when it is running.
own_redis_pid() {
    local pid
    [[ -f $REDIS_PIDFILE ]] || return 1
    pid="$(<"$REDIS_PIDFILE")"
    [[ $pid =~ ^[0-9]+$ ]] && grep -qa redis-server "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

cmd_redis() {
    local url="${REDIS_URL:-$DEFAULT_REDIS_URL}" bind pid
    parse_url "$url" 6379
    [[ $URL_SCHEME == redis ]] || die "REDIS_URL must be redis://host:port/db, got: $url"
    lock_data_dir
    ensure_redis_cli
    if redis_answers "$url"; then
        if pid="$(own_redis_pid)" && [[ "$(redis_server_pid "$url")" == "$pid" ]]; then
            log "redis: reused our own (pid $pid) at $URL_HOST:$URL_PORT"
        else
            log "redis: reused the server at $URL_HOST:$URL_PORT"
        fi
        return 0
    fi
    require_local_host "$URL_HOST" Redis "$URL_PORT"
    if pid="$(own_redis_pid)"; then
        die "our own Redis (pid $pid) runs but not at $URL_HOST:$URL_PORT; run 'scripts/devenv.sh stop-own' first"
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        cmd_redis_bin
        # The Debian package may have started its own service at this address.
        if redis_answers "$url"; then
            log "redis: reused the server at $URL_HOST:$URL_PORT (started by the redis-server package)"
            return 0
        fi
    fi
    bind="$URL_HOST"; [[ $bind == localhost ]] && bind=127.0.0.1
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_PIDFILE"
    local args=(--daemonize yes --bind "$bind" --port "$URL_PORT"
        --dir "$REDIS_DIR" --appendonly yes --appendfsync always --save ""
        --logfile "$REDIS_DIR/redis.log" --pidfile "$REDIS_PIDFILE")
    [[ -n $URL_PASS ]] && args+=(--requirepass "$URL_PASS")
    redis-server "${args[@]}" >/dev/null 9>&- \
        || die "redis-server failed to start (log: $REDIS_DIR/redis.log)"
    if ! wait_for 20 redis_answers "$url"; then
        tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
        die "our own Redis at $URL_HOST:$URL_PORT did not answer (log: $REDIS_DIR/redis.log)"
    fi
    log "redis: started our own at $URL_HOST:$URL_PORT (data: .data/redis, pid $(own_redis_pid))"
}

stop_own_redis() {
    local pid
    if ! pid="$(own_redis_pid)"; then
        rm -f "$REDIS_PIDFILE"
        return 0
    fi
    kill -TERM "$pid"
    wait_for 30 bash -c "! kill -0 $pid" || die "our own Redis (pid $pid) did not stop"
    rm -f "$REDIS_PIDFILE"
    log "redis: stopped our own (pid $pid)"
}

# ---------------------------------------------------------------- postgres

PG_BIN=""
find_pg_bin() {
    local d
    PG_BIN=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb && -x $d/pg_ctl ]] && PG_BIN="$d"   # glob is sorted: newest wins
    done
    [[ -n $PG_BIN ]]
}

ensure_pg_client() {
    if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
        apt_install postgresql-client
    fi
}

# Run the server-side tools as the postgres OS user when we are root (initdb refuses root).
as_pg_owner() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_ready() { pg_isready -q -t 3 -h "$URL_HOST" -p "$URL_PORT"; }

# psql_as DB ARGS... : as the URL's user, on the URL's server.
psql_as() {
    local db="$1"; shift
    PGPASSWORD="$URL_PASS" PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 \
        -h "$URL_HOST" -p "$URL_PORT" -U "$PG_USER" -d "$db" "$@"
}

pg_login_works() { psql_as postgres -Atc 'select 1' >/dev/null 2>&1; }

own_pg_running() { [[ -n $PG_BIN && -f $PG_DATA/PG_VERSION ]] && as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

# The port our own cluster listens on (line 4 of postmaster.pid).
own_pg_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null; }

init_own_pg() {
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    mkdir -p "$PG_DATA"
    chmod go+x "$DATA_DIR"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "the postgres OS user is missing (install postgresql)"
        chown postgres: "$PG_DATA"
        runuser -u postgres -- test -w "$PG_DATA" \
            || die "the postgres OS user cannot reach $PG_DATA (check the permissions of its parents)"
    fi
    chmod 700 "$PG_DATA"
    as_pg_owner "$PG_BIN/initdb" -D "$PG_DATA" --auth=trust -U "$PG_USER" -E UTF8 --no-locale \
        >"$DATA_DIR/initdb.log" 2>&1 \
        || { cat "$DATA_DIR/initdb.log" >&2; die "initdb into $PG_DATA failed"; }
    echo "include_if_exists = 'stakepro.conf'" | as_pg_owner tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

start_own_pg() {
    local listen="$URL_HOST"
    local sock="$PG_RUN/.s.PGSQL.$URL_PORT"
    ((${#sock} < 100)) || die "socket path too long for PostgreSQL ($sock); move the checkout"
    mkdir -p "$PG_RUN"
    [[ $EUID -eq 0 ]] && chown postgres: "$PG_RUN"
    # Rewritten on every start so the address always follows DATABASE_URL.
    printf "listen_addresses = '%s'\nport = %s\nunix_socket_directories = '%s'\n" \
        "$listen" "$URL_PORT" "$PG_RUN" | as_pg_owner tee "$PG_DATA/stakepro.conf" >/dev/null
    as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 9>&- \
        || { tail -n 20 "$PG_LOG" >&2 || true; die "pg_ctl start failed (log: $PG_LOG)"; }
    wait_for 30 pg_login_works \
        || { tail -n 20 "$PG_LOG" >&2 || true; die "our own PostgreSQL does not accept $PG_USER"; }
}

create_database() {
    local db="$1" exists
    [[ -n $db ]] || return 0
    exists="$(psql_as postgres -At -v db="$db" <<<"select 1 from pg_database where datname = :'db';")" \
        || die "cannot query databases on $URL_HOST:$URL_PORT as $PG_USER"
    [[ $exists == 1 ]] && return 0
    if ! psql_as postgres -v db="$db" <<<'create database :"db";' >/dev/null 2>&1; then
        # Another process may have created it meanwhile.
        exists="$(psql_as postgres -At -v db="$db" <<<"select 1 from pg_database where datname = :'db';")"
        [[ $exists == 1 ]] || die "cannot create database $db on $URL_HOST:$URL_PORT as $PG_USER"
    fi
}

cmd_postgres() {
    local url="${DATABASE_URL:-$DEFAULT_DATABASE_URL}" rc=0
    parse_url "$url" 5432
    case "$URL_SCHEME" in
        postgres|postgresql|postgresql+asyncpg) ;;
        *) die "DATABASE_URL must be postgresql://user@host:port/db, got: $url" ;;
    esac
    PG_USER="${URL_USER:-$(id -un)}"
    lock_data_dir
    ensure_pg_client
    find_pg_bin || true
    pg_ready || rc=$?
    if ((rc == 1)); then   # rejecting connections: starting up or shutting down
        wait_for 30 pg_ready && rc=0 || rc=$?
    fi
    if ((rc == 0)); then
        pg_login_works || die "PostgreSQL at $URL_HOST:$URL_PORT answers but does not accept user $PG_USER (check DATABASE_URL)"
        if own_pg_running && [[ "$(own_pg_port)" == "$URL_PORT" ]]; then
            log "postgres: reused our own at $URL_HOST:$URL_PORT"
        else
            log "postgres: reused the server at $URL_HOST:$URL_PORT"
        fi
    else
        require_local_host "$URL_HOST" PostgreSQL "$URL_PORT"
        if ! find_pg_bin; then
            apt_install postgresql
            find_pg_bin || die "postgresql is installed but no initdb under /usr/lib/postgresql/*/bin"
            # The Debian package may have started its own cluster at this address.
            if pg_ready && pg_login_works; then
                log "postgres: reused the server at $URL_HOST:$URL_PORT (started by the postgresql package)"
                create_database "$URL_PATH"
                return 0
            fi
        fi
        if own_pg_running; then
            die "our own PostgreSQL runs on port $(own_pg_port), not $URL_HOST:$URL_PORT; run 'scripts/devenv.sh stop-own' first"
        fi
        init_own_pg
        start_own_pg
        log "postgres: started our own at $URL_HOST:$URL_PORT (data: .data/pg, version $(<"$PG_DATA/PG_VERSION"))"
    fi
    create_database "$URL_PATH"
}

stop_own_pg() {
    find_pg_bin || return 0
    own_pg_running || return 0
    local port
    port="$(own_pg_port)"
    as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null \
        || die "pg_ctl stop failed for our own PostgreSQL in $PG_DATA"
    log "postgres: stopped our own (port $port)"
}

# ---------------------------------------------------------------- rabbitmq

# The broker's address: an amqp:// BROKER_URL, else TEST_AMQP_URL (the tests'), else the local one.
amqp_url() {
    case "${BROKER_URL:-}" in
        amqp://*|amqps://*) printf '%s' "$BROKER_URL" ;;
        *) printf '%s' "${TEST_AMQP_URL:-$DEFAULT_AMQP_URL}" ;;
    esac
}

port_answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

cmd_rabbitmq() {
    local url
    url="$(amqp_url)"
    parse_url "$url" 5672
    if port_answers "$URL_HOST" "$URL_PORT"; then
        log "rabbitmq: reused the server at $URL_HOST:$URL_PORT"
        return 0
    fi
    require_local_host "$URL_HOST" RabbitMQ "$URL_PORT"
    [[ $URL_PORT == 5672 ]] || die "RabbitMQ at $URL_HOST:$URL_PORT does not answer; only the default port 5672 can be started here"
    command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
    # The Debian package may have started it already.
    if ! wait_for 5 port_answers "$URL_HOST" "$URL_PORT"; then
        mkdir -p "$DATA_DIR"
        as_root rabbitmq-server -detached >/dev/null 2>&1 || die "rabbitmq-server -detached failed"
        : >"$RABBIT_MARK"
        wait_for 90 port_answers "$URL_HOST" "$URL_PORT" \
            || die "RabbitMQ did not answer at $URL_HOST:$URL_PORT within 90 s (logs: /var/log/rabbitmq/)"
    fi
    log "rabbitmq: started the system's server at $URL_HOST:$URL_PORT"
}

stop_own_rabbitmq() {
    [[ -e $RABBIT_MARK ]] || return 0
    as_root rabbitmqctl stop >/dev/null 2>&1 || warn "rabbitmqctl stop failed"
    rm -f "$RABBIT_MARK"
    log "rabbitmq: stopped the server this script started"
}

# ---------------------------------------------------------------- main

usage() {
    sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}

main() {
    (($# == 1)) || usage
    case "$1" in
        venv) cmd_venv ;;
        browser) cmd_browser ;;
        redis-bin) cmd_redis_bin ;;
        redis) cmd_redis ;;
        postgres) cmd_postgres ;;
        rabbitmq) cmd_rabbitmq ;;
        services)
            cmd_redis; cmd_postgres
            case "${BROKER_URL:-}" in amqp://*|amqps://*) cmd_rabbitmq ;; esac ;;
        stop-own) lock_data_dir; stop_own_redis; stop_own_pg; stop_own_rabbitmq ;;
        -h|--help|help) usage 0 ;;
        *) printf 'devenv: unknown command: %s\n' "$1" >&2; usage ;;
    esac
}

main "$@"
