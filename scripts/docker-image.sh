#!/usr/bin/env bash
# Build the FlockMQ image offline: the release binary on the host, copied into the
# Dockerfile's `prebuilt` stage over the locally made base image.
#   IMAGE=flockmq:dev scripts/docker-image.sh
# PROFILE=debug packs the debug build instead (what the test suite already built).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-flockmq:dev}"
scripts/docker-base-image.sh
PROFILE="${PROFILE:-release}"
if [[ "$PROFILE" == release ]]; then
  cargo build --release --locked -p broker-node --bin broker-node
else
  cargo build --locked -p broker-node --bin broker-node
fi
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p dist
cp "$target_dir/$PROFILE/broker-node" dist/broker-node
docker build --target prebuilt -t "$IMAGE" . >/dev/null
echo "built $IMAGE"
