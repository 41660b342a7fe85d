#!/usr/bin/env bash
# `wal2cache backfill` of a 5-column table (1,000,000 rows by default) into Redis,
# beside a baseline measured in the same run: the same rows read with
# `COPY (SELECT ...) TO STDOUT`, one plain `SET key value` per row, piped into
# `redis-cli --pipe` (no versions, no JSON, no TTL): what this machine can move from
# PostgreSQL to Redis at most. Prints rows/s of both, their ratio (target >= 0.5)
# and the backfill's peak RSS (target < 100 MB). Runs against the local services
# (deploy/local/services.sh start pg redis); the release binary is built first.
# Not run in CI (minutes).
#
# Usage: deploy/local/bench-backfill.sh
#
# Env (defaults in brackets):
#   W2C_BENCH_ROWS        rows of the table [1000000]
#   W2C_BENCH_ROUNDS      baseline + backfill rounds, interleaved [3]
#   W2C_BENCH_BIN         the wal2cache binary to run [this checkout's, built first]
#   WAL2CACHE_TEST_PG     admin URL of the server [postgres://postgres@127.0.0.1:54320/postgres]
#   WAL2CACHE_TEST_REDIS  [redis://127.0.0.1:63790]
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT"

pg_admin="${WAL2CACHE_TEST_PG:-postgres://postgres@127.0.0.1:54320/postgres}"
redis_url="${WAL2CACHE_TEST_REDIS:-redis://127.0.0.1:63790}"
rows="${W2C_BENCH_ROWS:-1000000}"
rounds="${W2C_BENCH_ROUNDS:-3}"
db="w2c_bench_backfill"
pg_db="${pg_admin%/*}/$db"
redis_hostport="${redis_url#redis://}"
redis_host="${redis_hostport%:*}"
redis_port="${redis_hostport##*:}"
work="$(mktemp -d /tmp/w2c-bench-backfill.XXXXXX)"
trap 'rm -rf "$work"' EXIT

if [[ -n "${W2C_BENCH_BIN:-}" ]]; then
    bin="$W2C_BENCH_BIN"
else
    echo "building the release binary (cargo build --release)..." >&2
    cargo build --release --quiet >&2
    bin="$ROOT/target/release/wal2cache"
fi

rcli() { redis-cli -h "$redis_host" -p "$redis_port" "$@"; }

# Every key of the run (values, version sidecars) unlinked.
clean_redis() {
    local pattern
    for pattern in 'bfb:*' 'bfv:*' '{bfv:*'; do
        rcli --scan --pattern "$pattern" | xargs -r -n 10000 redis-cli -h "$redis_host" -p "$redis_port" UNLINK >/dev/null
    done
}

echo "creating $db with $rows rows..." >&2
PGOPTIONS="-c client_min_messages=warning" psql -q -X "$pg_admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
psql -q -X "$pg_db" >/dev/null <<SQL
CREATE TABLE bench_rows (
    id bigint PRIMARY KEY,
    qty int NOT NULL,
    name text NOT NULL,
    price numeric(10, 2) NOT NULL,
    updated_at timestamptz NOT NULL
);
INSERT INTO bench_rows
SELECT i, i % 1000, 'name-' || i, (i % 10000) / 100.0, '2026-01-01'::timestamptz + i * interval '1 second'
FROM generate_series(1, $rows) i;
VACUUM ANALYZE bench_rows;
SQL

cat >"$work/rules.toml" <<'RULES'
[[rule]]
name = "row"
table = "public.bench_rows"
keys = ["bfv:{id}"]
action = "republish"
ttl = "1h"
RULES
cat >"$work/wal2cache.toml" <<CONFIG
name = "bench-backfill"
[postgres]
url = "$pg_db"
slot = "w2c_bench_backfill"
publication = "w2c_bench_backfill"
[rules]
path = "$work/rules.toml"
[redis]
url = "$redis_url"
[kafka]
brokers = "127.0.0.1:19092"
topic = "w2c.bench.backfill"
CONFIG
psql -q -X "$pg_db" -c "CREATE PUBLICATION w2c_bench_backfill FOR TABLE bench_rows" >/dev/null

# seconds since the epoch, with nanoseconds
now() { date +%s.%N; }

# CPU seconds redis-server has used (user + system)
redis_cpu() { rcli INFO cpu | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'; }

baseline() {
    clean_redis
    local start end cpu0 cpu1
    cpu0=$(redis_cpu)
    start=$(now)
    psql -X -q "$pg_db" -c "COPY (SELECT 'SET bfb:' || id || ' ' || qty || '|' || name || '|' || price || '|' || extract(epoch FROM updated_at) FROM bench_rows) TO STDOUT" \
        | rcli --pipe >"$work/pipe.out"
    end=$(now)
    cpu1=$(redis_cpu)
    grep -q "errors: 0, replies: $rows" "$work/pipe.out" || {
        cat "$work/pipe.out" >&2
        echo "the baseline did not write $rows keys" >&2
        exit 1
    }
    echo "$start $end $cpu0 $cpu1" | awk -v n="$rows" '{ printf "%.0f %.2f\n", n / ($2 - $1), ($4 - $3) * 1e6 / n }'
}

# Runs the backfill under /usr/bin/time; prints "rows_per_s peak_rss_kib
# redis_us_per_row".
backfill() {
    clean_redis
    local start end cpu0 cpu1
    cpu0=$(redis_cpu)
    start=$(now)
    WAL2CACHE__LOG__FORMAT=text /usr/bin/time -f "%M" -o "$work/rss" \
        "$bin" backfill --config "$work/wal2cache.toml" >"$work/backfill.out" 2>"$work/backfill.err"
    end=$(now)
    cpu1=$(redis_cpu)
    grep -q "backfill done: $rows rows, $rows keys written, 0 refused" "$work/backfill.out" || {
        cat "$work/backfill.out" "$work/backfill.err" >&2
        echo "the backfill did not write $rows keys" >&2
        exit 1
    }
    local written
    written=$(rcli --scan --pattern 'bfv:*' | wc -l)
    [[ "$written" -eq "$rows" ]] || {
        echo "Redis holds $written backfilled keys, not $rows" >&2
        exit 1
    }
    echo "$start $end $(cat "$work/rss") $cpu0 $cpu1" | awk -v n="$rows" '{ printf "%.0f %d %.2f\n", n / ($2 - $1), $3, ($5 - $4) * 1e6 / n }'
}

printf '%-6s %16s %16s %7s %14s %22s\n' round "baseline rows/s" "backfill rows/s" ratio "peak RSS MiB" "Redis CPU µs/row b/w"
ratios=()
for round in $(seq 1 "$rounds"); do
    read -r base base_us < <(baseline)
    read -r ours rss ours_us < <(backfill)
    awk -v r="$round" -v b="$base" -v o="$ours" -v m="$rss" -v bu="$base_us" -v ou="$ours_us" \
        'BEGIN { printf "%-6s %16d %16d %7.2f %14.1f %10.2f / %-10.2f\n", r, b, o, o / b, m / 1024, bu, ou }'
    ratios+=("$(awk -v b="$base" -v o="$ours" 'BEGIN { printf "%.4f", o / b }')")
done
# The baseline's rate moves by up to half between rounds on a busy host: the median
# ratio is the figure to judge.
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ r[NR] = $1 } END { m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2; printf "median ratio over %d rounds: %.2f\n", NR, m }'
echo "targets: ratio >= 0.5, peak RSS < 100 MB" >&2
clean_redis
[[ -n "${W2C_BENCH_KEEP:-}" ]] || psql -q -X "$pg_admin" -c "DROP DATABASE $db" >/dev/null
