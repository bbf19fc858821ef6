# Sourced by scripts/bench-compare.sh (not run): certificates for the TLS idle step, the
# TLS configurations of both brokers, and one storm of idle connections measured.

# bench_pki DIR: a CA (DIR/ca.pem) and a server certificate for localhost and 127.0.0.1
# (DIR/server.pem, DIR/server.key), EC P-256, made by openssl.
bench_pki() {
  mkdir -p "$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$1/ca.key" -out "$1/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout "$1/server.key" -out "$1/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$1/server.ext"
  openssl x509 -req -in "$1/server.csr" -CA "$1/ca.pem" -CAkey "$1/ca.key" -CAcreateserial \
    -days 2 -extfile "$1/server.ext" -out "$1/server.pem" 2>/dev/null
  # Mosquitto started as root reads them as the user it drops to.
  chmod a+rx "$1" "$1/.." && chmod a+r "$1"/*
}

# tls_confs WORK PORT TLS_PORT: WORK/flockmq-tls.toml (FlockMQ's TLS listener) and
# WORK/mosquitto-tls.conf (Mosquitto's plain listener as usual, and TLS on TLS_PORT),
# over the certificates in WORK/pki.
tls_confs() {
  cat > "$1/flockmq-tls.toml" <<CONF
tls_addr = "127.0.0.1:$3"
tls_cert_file = "$1/pki/server.pem"
tls_key_file = "$1/pki/server.key"
CONF
  cat > "$1/mosquitto-tls.conf" <<CONF
per_listener_settings false
allow_anonymous true
max_inflight_messages 0
max_queued_messages 0
persistence false
listener $2 127.0.0.1
listener $3 127.0.0.1
cafile $1/pki/ca.pem
certfile $1/pki/server.pem
keyfile $1/pki/server.key
CONF
}

# idle_storm BENCH PID ADDR CLIENTS SETTLE READY [TLS_CA]: open CLIENTS idle connections
# to ADDR (over TLS when TLS_CA names the CA file), sampling the broker PID's RSS while
# they connect; once all are up, wait SETTLE seconds and print
# "RSS_BEFORE_KB PEAK_KB AFTER_KB" (the peak: the sampled maximum or VmHWM, the larger).
idle_storm() {
  local tls=()
  [ -n "${7:-}" ] && tls=(--tls-ca "$7")
  local before after hwm peak line
  before=$(awk '/VmRSS/ {print $2}' "/proc/$2/status")
  rm -f "$6"
  "$1" --scenario storm --clients "$4" --duration "$(( $5 + 4 ))s" --ready-file "$6" \
    --broker-pid "$2" --brokers "$3" "${tls[@]}" > "$6.json" &
  local bench=$!
  for _ in $(seq 1200); do [ -f "$6" ] && break; sleep 0.1; done
  sleep "$5"
  after=$(awk '/VmRSS/ {print $2}' "/proc/$2/status")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$2/status")
  wait $bench || true
  line=$(cat "$6.json")
  echo "storm: $line" >&2
  peak=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print((r.get("rss_peak_connecting_bytes") or 0)//1024)' "$line")
  [ "$hwm" -gt "$peak" ] && peak=$hwm
  echo "$before $peak $after"
}
