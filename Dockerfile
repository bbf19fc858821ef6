# FlockMQ container image.
#
# For users (any machine that can pull images): the last stage builds from source.
#   docker build -t flockmq .
# Offline (this project's CI, or a host that already built the binary): the
# `prebuilt` stage copies dist/broker-node, built on the host, into the same
# runtime base, and needs no Rust image:
#   scripts/docker-image.sh           # builds dist/broker-node and the image
# The runtime base `debian:bookworm-slim` can be made offline with
# scripts/docker-base-image.sh (debootstrap + docker import).
#
# Stages are ordered so that the classic builder, which builds every stage up to
# the target, never needs the Rust image for `--target prebuilt`.

ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

# ---- runtime base: a non-root user, data volume, ports, health check ----
FROM ${RUNTIME_IMAGE} AS base
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/flockmq --shell /usr/sbin/nologin flockmq \
 && mkdir -p /var/lib/flockmq/data /var/lib/flockmq/certs \
 && chown -R flockmq:flockmq /var/lib/flockmq
WORKDIR /var/lib/flockmq
# In a container the node listens on every interface (the host decides what to
# publish); data lives in the volume. The cluster port stays on loopback: a single
# node needs no peers, and a node serving it beyond loopback must have cluster TLS
# (or cluster.allow_insecure). docker-compose.yml and the Helm chart set both.
ENV FLOCKMQ_DATA_DIR=/var/lib/flockmq/data \
    FLOCKMQ_MQTT_ADDR=0.0.0.0:1883 \
    FLOCKMQ_HTTP_ADDR=0.0.0.0:8080 \
    FLOCKMQ_CLUSTER_ADDR=127.0.0.1:7000 \
    FLOCKMQ_WS_ADDR=off \
    FLOCKMQ_LOG__FORMAT=json
VOLUME ["/var/lib/flockmq/data"]
EXPOSE 1883 8080 7000
USER 10001:10001
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["broker-node", "ctl", "health"]
ENTRYPOINT ["broker-node"]

# ---- offline: the binary built on the host ----
FROM base AS prebuilt
COPY dist/broker-node /usr/local/bin/broker-node

# ---- from source ----
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p broker-node --bin broker-node \
 && cp target/release/broker-node /broker-node

FROM base AS runtime
COPY --from=builder /broker-node /usr/local/bin/broker-node
