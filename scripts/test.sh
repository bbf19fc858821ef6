#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test of the workspace
# (unit, property, integration against real broker processes and real clients), short
# smoke runs of the fuzz target and the benchmark, the three-node docker-compose
# cluster end to end, and the Helm chart.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== cargo fmt"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build"
cargo build --workspace --all-targets --locked
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
echo "== fuzz smoke"
scripts/fuzz-smoke.sh
echo "== benchmark smoke"
REPS=1 DURATION=1s scripts/bench-compare.sh --smoke >/dev/null
REPS=1 DURATION=1s KILLS=1 SESSIONS=500 scripts/bench-cluster.sh --smoke 2>/dev/null
echo "== docker compose end to end"
# The image packs the debug build the tests above already made.
PROFILE=debug tests/docker/compose-e2e.sh
echo "== Helm chart"
# Lint, render, schema checks; and, with Docker, the rendered pods run as containers
# of the image compose-e2e just built.
if docker image inspect flockmq:e2e >/dev/null 2>&1; then export CHART_TEST_IMAGE=flockmq:e2e; fi
tests/helm/chart-test.sh
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "cargo test: %d passed, %d failed\n", p, f }' "$log"
