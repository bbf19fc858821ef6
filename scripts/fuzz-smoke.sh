#!/usr/bin/env bash
# A short run of the decoder fuzz target (the long run is documented in
# broker-node/fuzz/README.md). Installs cargo-fuzz when it is missing.
set -euo pipefail
cd "$(dirname "$0")/../broker-node"
SECONDS_TO_RUN=${FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz run decode --sanitizer none --debug-assertions -- \
  -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048 2>&1 | tail -n 5
