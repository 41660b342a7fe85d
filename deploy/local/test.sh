#!/usr/bin/env bash
# Runs every test of wal2cache against real local services: installs what is
# missing (PostgreSQL 15, redis-server, the Tansu broker), starts them, then runs
# the test suite. Idempotent: services already running are reused.
#
# Usage: deploy/local/test.sh [extra cargo test arguments]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

bash "$ROOT/deploy/local/services.sh" start all
# The TLS variants, for the tests of TLS and authentication.
bash "$ROOT/deploy/local/services.sh" start tls
# The other PostgreSQL majors: 13, which every command must refuse, 16 and 17 for
# failover slots (tests/pg_versions.rs), and the version matrix at the end. Started
# first: their ports are in the kernel's ephemeral range, and once the suite has
# opened thousands of connections one of them may hold such a port as its source.
for major in 13 14 16 17 18; do
    bash "$ROOT/deploy/local/services.sh" start "pg$major"
done

export WAL2CACHE_TEST_PG="${WAL2CACHE_TEST_PG:-postgres://postgres@$HOST:$PG_PORT/postgres}"
export WAL2CACHE_TEST_REDIS="${WAL2CACHE_TEST_REDIS:-redis://$HOST:$REDIS_PORT}"
export WAL2CACHE_TEST_REDIS_CLUSTER="${WAL2CACHE_TEST_REDIS_CLUSTER:-redis://$HOST:${REDIS_CLUSTER_PORTS[0]}}"
export WAL2CACHE_TEST_KAFKA="${WAL2CACHE_TEST_KAFKA:-$HOST:$KAFKA_PORT}"
export WAL2CACHE_TEST_PG_TLS="${WAL2CACHE_TEST_PG_TLS:-postgres://$PG_TLS_ROLE:$PG_TLS_PASSWORD@localhost:$PG_TLS_PORT/postgres}"
export WAL2CACHE_TEST_TLS_DIR="${WAL2CACHE_TEST_TLS_DIR:-$TLS_DIR}"
export WAL2CACHE_TEST_REDIS_TLS="${WAL2CACHE_TEST_REDIS_TLS:-rediss://$REDIS_TLS_USER:$REDIS_TLS_PASSWORD@localhost:$REDIS_TLS_PORT}"
export WAL2CACHE_TEST_REDIS_CLUSTER_TLS="${WAL2CACHE_TEST_REDIS_CLUSTER_TLS:-rediss://$REDIS_TLS_USER:$REDIS_TLS_PASSWORD@localhost:${REDIS_CLUSTER_TLS_PORTS[0]}}"
export WAL2CACHE_TEST_KAFKA_TLS="${WAL2CACHE_TEST_KAFKA_TLS:-localhost:$KAFKA_TLS_PORT}"
export WAL2CACHE_TEST_KAFKA_SSL="${WAL2CACHE_TEST_KAFKA_SSL:-localhost:$KAFKA_SSL_PORT}"
for major in 13 16 17; do
    var="WAL2CACHE_TEST_PG$major"
    export "$var=${!var:-postgres://postgres@$HOST:$((PG_MAJOR_PORT_BASE + major))/postgres}"
done
export WAL2CACHE_TEST_KAFKA_SASL_USER="$KAFKA_SASL_USER"
export WAL2CACHE_TEST_KAFKA_SASL_PASSWORD="$KAFKA_SASL_PASSWORD"

# The test build (about 60 binaries) needs several GiB under target/; running out
# mid-link gives a confusing rustc error, so say it up front.
avail_kib=$(df -Pk "$ROOT" | awk 'NR == 2 { print $4 }')
if [ "${avail_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
    log_warn "only $((avail_kib / 1024)) MiB free on the disk of $ROOT; the test build needs about 8 GiB: free space (e.g. cargo clean in old checkouts) if the build fails with 'No space left on device'"
fi

log_info "the library builds without the daemon (feature split)"
cargo check --locked --lib --no-default-features

log_info "the L1 library builds without the daemon's dependencies (feature l1)"
cargo check --locked --lib --no-default-features --features l1
if cargo tree --locked --no-default-features --features l1 -e normal --prefix none |
    grep -Ei '^(tokio-postgres|postgres-protocol|pgwire-replication|redis|clap|config|tracing-subscriber|metrics-exporter-prometheus|humantime|rand|axum|serde_ignored) '; then
    die "feature l1 pulls in a daemon dependency"
fi

log_info "the L2 library builds without the Postgres side (feature l2)"
cargo check --locked --lib --no-default-features --features l2
if cargo tree --locked --no-default-features --features l2 -e normal --prefix none |
    grep -Ei '^(tokio-postgres|postgres-protocol|pgwire-replication|rdkafka|clap|config|tracing-subscriber|metrics-exporter-prometheus|axum) '; then
    die "feature l2 pulls in a daemon dependency"
fi

# promtool runs the unit tests of the alerting rules (deploy/prometheus/alerts_test.yml).
promtool_ensure
log_info "promtool check rules / test rules: deploy/prometheus/alerts.yml"
promtool check rules "$ROOT/deploy/prometheus/alerts.yml"
promtool test rules "$ROOT/deploy/prometheus/alerts_test.yml"

# The Python example client (tests/other_languages.rs runs it).
python_ensure

log_info "cargo test (daemon, L1 and L2)"
cargo test --locked --features l1,l2 "$@"

# The version matrix (PostgreSQL 15 ran the whole suite above).
log_info "the source and end-to-end tests on the other supported PostgreSQL majors"
bash "$ROOT/deploy/local/test-majors.sh" 14 16 17 18
