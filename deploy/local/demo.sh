#!/usr/bin/env bash
# The demo: starts the local services (installing what is missing), loads the
# example schema into the demo database, checks the example rules, creates the
# publication and the slot, and runs the daemon (`wal2cache run`) on the example rules
# while a small writer changes rows every two seconds and a watcher prints what Redis
# holds for product 1. Stop it with Ctrl-C (the daemon drains and exits 0).
#
# DEMO_SECONDS=N stops it by itself after N seconds.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

bash "$ROOT/deploy/local/services.sh" start all

DEMO_URL="postgres://$PG_APP_ROLE:$PG_APP_PASSWORD@$HOST:$PG_PORT/$PG_APP_DB"
CONFIG="$ROOT/deploy/local/wal2cache.toml"

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
            "$(redis-cli -h "$HOST" -p "$REDIS_PORT" GET shop:product:json:v3:1)"
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
