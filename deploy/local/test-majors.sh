#!/usr/bin/env bash
# The version matrix: the source's decode, oracle (test_decoding) and restart tests
# and the daemon's end-to-end test, against each PostgreSQL major (default 14 to 18),
# each on a server of its own (`services.sh start pgN`; 15 is the shared server).
# The other services must be running (`services.sh start all`). Prints which majors
# ran and how each did; exits non-zero if any failed.
#
# Usage: deploy/local/test-majors.sh [MAJOR...]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

majors=("$@")
((${#majors[@]})) || majors=(14 15 16 17 18)
tests=(--test source_decode --test source_oracle --test source_restart --test daemon_e2e)

passed=()
failed=()
for major in "${majors[@]}"; do
    if [[ "$major" == "$PG_VERSION" ]]; then
        url="postgres://$PG_SUPERUSER@$HOST:$PG_PORT/postgres"
    else
        bash "$ROOT/deploy/local/services.sh" start "pg$major"
        url="postgres://$PG_SUPERUSER@$HOST:$((PG_MAJOR_PORT_BASE + major))/postgres"
    fi
    log_info "PostgreSQL $major ($url): ${tests[*]}"
    if WAL2CACHE_TEST_PG="$url" cargo test --locked --no-fail-fast "${tests[@]}"; then
        passed+=("$major")
    else
        failed+=("$major")
    fi
done
log_info "PostgreSQL majors tested: ${majors[*]}; passed: ${passed[*]:-none}; failed: ${failed[*]:-none}"
((${#failed[@]} == 0))
