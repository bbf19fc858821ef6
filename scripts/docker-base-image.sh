#!/usr/bin/env bash
# Build the runtime base image `debian:bookworm-slim` without pulling anything:
# debootstrap a minimal Debian bookworm from the Debian mirror apt already uses and
# `docker import` it under the name the Dockerfile expects. Does nothing when the
# image exists (FORCE=1 rebuilds it).
set -euo pipefail

# BASE_IMAGE, not IMAGE: callers export IMAGE for the image built on top of this one.
IMAGE="${BASE_IMAGE:-debian:bookworm-slim}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE present"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
rootfs="$(mktemp -d /tmp/flockmq-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrapping a minimal bookworm into $rootfs"
debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
# What a slim image leaves out: package lists, caches, docs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "imported $IMAGE"
