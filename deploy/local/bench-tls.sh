#!/usr/bin/env bash
# What TLS costs the catch-up: the tag-heavy catch-up bench (benches/catchup.rs with
# W2C_BENCH_SHAPE=tags) against the plain services and against their TLS variants
# (PostgreSQL verify-full, Redis rediss://, Kafka SSL through stunnel), interleaved
# round by round so that both see the same host. Prints one line per run, then the
# median rate of each and what TLS costs: 1 - median(TLS) / median(plain). This
# host's rates vary up to 1.5x between identical runs; compare medians of several
# rounds, never two single runs. Starts the services it needs (`services.sh start all`
# and `start tls`); not run in CI (each run writes 200,000 transactions first).
#
# Usage: deploy/local/bench-tls.sh
#
# Env (defaults in brackets):
#   W2C_TLS_ROUNDS      rounds of one plain and one TLS run [3]
#   W2C_TLS_LOG_DIR     where each run's whole output goes [a new /tmp/w2c-tls.XXXXXX]
# and everything benches/catchup.rs reads (W2C_BENCH_ROWS, W2C_BENCH_KAFKA_PROPS,
# W2C_BENCH_CONSUME, CARGO_TARGET_DIR...). The services' URLs come from
# `services.sh env` and `services.sh env tls`.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

rounds="${W2C_TLS_ROUNDS:-3}"
log_dir="${W2C_TLS_LOG_DIR:-$(mktemp -d /tmp/w2c-tls.XXXXXX)}"
mkdir -p "$log_dir"
export W2C_BENCH_SHAPE=tags

bash deploy/local/services.sh start all >&2
bash deploy/local/services.sh start tls >&2
plain_env="$(bash deploy/local/services.sh env)"
tls_env="$(bash deploy/local/services.sh env tls)"

echo "building the bench and the daemon (cargo bench --bench catchup --no-run)..." >&2
cargo bench --bench catchup --no-run >&2

# median of the numbers on stdin (one per line)
median() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "?"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

printf '%-6s %-6s %14s %11s %11s %11s %13s %10s  %s\n' \
    round mode "daemon ch/s" "daemon µs" "redis µs" "broker µs" "walsender µs" "per batch" "checks / log"
plain_rates=()
tls_rates=()
for round in $(seq 1 "$rounds"); do
    for mode in plain tls; do
        log="$log_dir/round${round}-${mode}.log"
        if [[ "$mode" == plain ]]; then settings="$plain_env"; else settings="$tls_env"; fi
        (eval "$settings"; cargo bench --bench catchup) >"$log" 2>&1 || true
        line="$(grep '^result:' "$log" | tail -n 1 || true)"
        if [[ -z "$line" ]]; then
            printf '%-6s %-6s  failed: see %s\n' "$round" "$mode" "$log"
            continue
        fi
        rate="$(bench_field daemon_rate "$line")"
        if [[ "$mode" == plain ]]; then plain_rates+=("$rate"); else tls_rates+=("$rate"); fi
        printf '%-6s %-6s %14s %11s %11s %11s %13s %10s  %s %s\n' "$round" "$mode" "$rate" \
            "$(bench_field daemon_us "$line")" "$(bench_field redis_us "$line")" "$(bench_field broker_us "$line")" \
            "$(bench_field walsender_us "$line")" "$(bench_field per_batch "$line")" "$(bench_field checks "$line")" "$log"
    done
done

plain_median="$(printf '%s\n' "${plain_rates[@]}" | median)"
tls_median="$(printf '%s\n' "${tls_rates[@]}" | median)"
echo "median changes/s: plain $plain_median (${#plain_rates[@]} runs), TLS $tls_median (${#tls_rates[@]} runs)"
if [[ "$plain_median" == "?" || "$tls_median" == "?" ]]; then
    echo "TLS cost: unknown (a mode has no successful run)"
    exit 1
fi
awk -v p="$plain_median" -v t="$tls_median" 'BEGIN {
    printf "TLS cost: %.1f%% of the plain rate (target under 15%%)\n", (1 - t / p) * 100 }'
