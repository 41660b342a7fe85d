#!/usr/bin/env bash
# Scaling matrix of the catch-up bench's tag-heavy shape (benches/catchup.rs with
# W2C_BENCH_SHAPE=tags): changes x keys per change, then delete rules per table.
# One `cargo bench --bench catchup` per run (built once first), against the local
# services (deploy/local/services.sh start all). Prints one table line per run;
# each run's whole output is kept in the log directory. Slow (the 1.6M-change
# runs take minutes each); not run in CI.
#
# Usage: deploy/local/bench-scaling.sh
#
# Env (defaults in brackets):
#   W2C_SCALING_CHANGES        changes of the changes x keys matrix [100000 400000 1600000]
#   W2C_SCALING_KEYS           keys per change (key templates of the one delete rule) [1 10 100]
#   W2C_SCALING_RULES          delete rules on the changed table, 1 key each [1 100 10000]
#   W2C_SCALING_RULES_CHANGES  changes of the rules rows [100000]
#   W2C_SCALING_MANY_RULES     from this many rules on, a rules row uses ... [1000]
#   W2C_SCALING_MANY_RULES_CHANGES  ... this many changes instead [1000]: with
#                              10,000 rules (10,000 keys per change) the daemon
#                              needs ~15 ms of CPU per change, so 1,000 changes
#                              take ~20 s
#   W2C_SCALING_LOG_DIR        where each run's output goes [a new /tmp/w2c-scaling.XXXXXX]
#   W2C_SCALING_MATRIX         "keys", "rules" or "all" [all]
# and everything benches/catchup.rs reads (W2C_BENCH_WRITERS, W2C_BENCH_OTHER_EVERY,
# W2C_BENCH_CONSUME, WAL2CACHE_TEST_PG / _REDIS / _KAFKA, CARGO_TARGET_DIR...).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

export WAL2CACHE_TEST_PG="${WAL2CACHE_TEST_PG:-postgres://postgres@127.0.0.1:54320/postgres}"
export WAL2CACHE_TEST_REDIS="${WAL2CACHE_TEST_REDIS:-redis://127.0.0.1:63790}"
export WAL2CACHE_TEST_KAFKA="${WAL2CACHE_TEST_KAFKA:-127.0.0.1:19092}"
export W2C_BENCH_SHAPE=tags

read -r -a changes_list <<<"${W2C_SCALING_CHANGES:-100000 400000 1600000}"
read -r -a keys_list <<<"${W2C_SCALING_KEYS:-1 10 100}"
read -r -a rules_list <<<"${W2C_SCALING_RULES:-1 100 10000}"
rules_changes="${W2C_SCALING_RULES_CHANGES:-100000}"
many_rules="${W2C_SCALING_MANY_RULES:-1000}"
many_rules_changes="${W2C_SCALING_MANY_RULES_CHANGES:-1000}"
matrix="${W2C_SCALING_MATRIX:-all}"
log_dir="${W2C_SCALING_LOG_DIR:-$(mktemp -d /tmp/w2c-scaling.XXXXXX)}"
mkdir -p "$log_dir"

echo "building the bench and the daemon (cargo bench --bench catchup --no-run)..." >&2
cargo bench --bench catchup --no-run >&2

header() {
    printf '%-10s %-6s %-6s %14s %14s %7s %11s %11s %11s %13s %10s  %s\n' \
        changes keys rules "pg changes/s" "daemon ch/s" ratio "daemon µs" "redis µs" "broker µs" "walsender µs" "per batch" "checks / note"
}

run_one() {
    local changes=$1 keys=$2 rules=$3 note=${4:-}
    local log="$log_dir/catchup-c${changes}-k${keys}-r${rules}.log"
    local line
    if W2C_BENCH_ROWS="$changes" W2C_BENCH_KEYS="$keys" W2C_BENCH_RULES="$rules" \
        cargo bench --bench catchup >"$log" 2>&1; then
        :
    fi
    line="$(grep '^result:' "$log" | tail -n 1 || true)"
    if [[ -z "$line" ]]; then
        printf '%-10s %-6s %-6s %14s  failed: see %s\n' "$changes" "$keys" "$rules" "-" "$log"
        return
    fi
    printf '%-10s %-6s %-6s %14s %14s %7s %11s %11s %11s %13s %10s  %s\n' \
        "$changes" "$keys" "$rules" \
        "$(bench_field pg_rate "$line")" "$(bench_field daemon_rate "$line")" "$(bench_field ratio "$line")" \
        "$(bench_field daemon_us "$line")" "$(bench_field redis_us "$line")" "$(bench_field broker_us "$line")" \
        "$(bench_field walsender_us "$line")" "$(bench_field per_batch "$line")" "$(bench_field checks "$line")${note:+; $note}"
}

echo "logs: $log_dir"
echo "tag-heavy catch-up: ${W2C_BENCH_WRITERS:-4} writers, 1 tag shared by every row, every ${W2C_BENCH_OTHER_EVERY:-10}th change republished on another table; CPU in µs per change; per batch: changes per batch the daemon applied"
if [[ "$matrix" == all || "$matrix" == keys ]]; then
    echo "== changes x keys per change (1 delete rule) =="
    header
    for changes in "${changes_list[@]}"; do
        for keys in "${keys_list[@]}"; do
            run_one "$changes" "$keys" 1
        done
    done
fi
if [[ "$matrix" == all || "$matrix" == rules ]]; then
    echo "== delete rules on the changed table (1 key each) =="
    header
    for rules in "${rules_list[@]}"; do
        if ((rules >= many_rules)); then
            echo "note: $rules rules: $many_rules_changes changes instead of $rules_changes (10,000 keys per change: ~15 ms of daemon CPU each)"
            run_one "$many_rules_changes" 1 "$rules" "$many_rules_changes changes only (10,000 keys per change)"
        else
            run_one "$rules_changes" 1 "$rules"
        fi
    done
fi
