#!/usr/bin/env bash
# The demo: starts the local services (installing what is missing), loads the
# example schema into the demo database, checks the example rules, creates the
# publication and the slot, and runs the daemon (`wal2cache run`) on the example rules
# while a small writer changes rows every two seconds and a watcher prints what Redis
# holds for product 1. Stop it with Ctrl-C (the daemon drains and exits 0).
#
# DEMO_SECONDS=N stops it by itself after N seconds. DEMO_TLS=1 runs it over TLS to
# all three (the TLS variants of services.sh): PostgreSQL verify-full with SCRAM,
# Redis over rediss:// as an ACL user, Kafka over SASL_SSL with SCRAM, each password
# in a file; the config is written to .local/demo-tls/wal2cache.toml.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

bash "$ROOT/deploy/local/services.sh" start all

DEMO_URL="postgres://$PG_APP_ROLE:$PG_APP_PASSWORD@$HOST:$PG_PORT/$PG_APP_DB"
CONFIG="$ROOT/deploy/local/wal2cache.toml"
REDIS_CLI=(redis-cli -h "$HOST" -p "$REDIS_PORT")

if [[ "${DEMO_TLS:-}" == 1 ]]; then
    bash "$ROOT/deploy/local/services.sh" start tls
    dir="$LOCAL/demo-tls"
    mkdir -p -- "$dir"
    printf '%s\n' "$PG_APP_PASSWORD" >"$dir/pg-password"
    printf '%s\n' "$REDIS_TLS_PASSWORD" >"$dir/redis-password"
    printf '%s\n' "$KAFKA_SASL_PASSWORD" >"$dir/kafka-password"
    chmod 0600 -- "$dir"/*-password
    CONFIG="$dir/wal2cache.toml"
    cat >"$CONFIG" <<EOF
# Written by deploy/local/demo.sh (DEMO_TLS=1): the demo over TLS to all three.
name = "demo-db"

[postgres]
url = "postgres://$PG_APP_ROLE@localhost:$PG_TLS_PORT/$PG_APP_DB?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.pem"
password_file = "pg-password"
slot = "wal2cache"
publication = "wal2cache"

[rules]
path = "$ROOT/rules/example.toml"

[redis]
url = "rediss://$REDIS_TLS_USER@localhost:$REDIS_TLS_PORT/0"
password_file = "redis-password"
ca_file = "$TLS_DIR/ca.pem"

[kafka]
brokers = "localhost:$KAFKA_TLS_PORT"
topic = "wal2cache.invalidations"
sasl_password_file = "kafka-password"
[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-256"
"sasl.username" = "$KAFKA_SASL_USER"
"ssl.ca.location" = "$TLS_DIR/ca.pem"
"linger.ms" = "0"
EOF
    DEMO_URL="postgres://$PG_APP_ROLE:$PG_APP_PASSWORD@localhost:$PG_TLS_PORT/$PG_APP_DB?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.pem"
    REDIS_CLI=(redis-cli -h localhost -p "$REDIS_TLS_PORT" --tls --cacert "$TLS_DIR/ca.pem"
        --user "$REDIS_TLS_USER" --pass "$REDIS_TLS_PASSWORD" --no-auth-warning)
    log_ok "over TLS: config $CONFIG"
fi

log_info "loading the example schema into $PG_APP_DB"
for migration in "$ROOT"/migrations/*.sql; do
    PGOPTIONS="-c client_min_messages=warning" psql -q -v ON_ERROR_STOP=1 "$DEMO_URL" -f "$migration"
done

log_info "building wal2cache"
cargo build --locked --release --quiet
BIN="$ROOT/target/release/wal2cache"

"$BIN" check --config "$CONFIG"
"$BIN" setup --config "$CONFIG"

writer() {
    local i=0
    psql -q "$DEMO_URL" -c "INSERT INTO categories VALUES (1, 'mugs') ON CONFLICT DO NOTHING" >/dev/null
    while true; do
        i=$((i + 1))
        psql -q "$DEMO_URL" >/dev/null <<SQL || true
INSERT INTO products (id, slug, category_id, name, price)
     VALUES ($i % 5, 'mug-' || $i % 5, 1, 'Mug ' || $i, 9.50)
ON CONFLICT (id) DO UPDATE SET price = products.price + 1, slug = 'mug-' || $i;
UPDATE tenant_settings SET settings = jsonb_set(settings, '{n}', to_jsonb($i)) WHERE tenant_id = 1;
INSERT INTO tenant_settings VALUES (1, '{"theme": "dark"}') ON CONFLICT DO NOTHING;
SQL
        sleep 2
    done
}

watcher() {
    while true; do
        sleep 2
        printf 'redis: shop:product:json:v3:1 = %s\n' \
            "$("${REDIS_CLI[@]}" GET shop:product:json:v3:1)"
    done
}

writer &
WRITER=$!
watcher &
WATCHER=$!
DAEMON=""
cleanup() {
    kill "$WRITER" "$WATCHER" 2>/dev/null || true
    if [[ -n "$DAEMON" ]]; then kill "$DAEMON" 2>/dev/null || true; fi
    wait 2>/dev/null || true
}
trap cleanup EXIT

log_info "wal2cache run (Ctrl-C to stop); in another shell: $BIN tail --config $CONFIG"
if [[ -n "${DEMO_SECONDS:-}" ]]; then
    WAL2CACHE_LOG=info "$BIN" run --config "$CONFIG" &
    DAEMON=$!
    sleep "$DEMO_SECONDS"
    kill -TERM "$DAEMON"
    wait "$DAEMON"
    DAEMON=""
else
    WAL2CACHE_LOG=info "$BIN" run --config "$CONFIG"
fi
