#!/usr/bin/env bash
# A/B of two broker-node builds and Mosquitto, alternating on the same machine in the
# same run, for a before/after of a change (docs/benchmarks.md keeps the results):
#
#   scripts/bench-ab.sh OLD_BROKER_NODE NEW_BROKER_NODE FLOCKMQ_BENCH
#
# prints one line per run (scenario, build, repetition, received msg/s, p99 ms), the
# RSS growth per idle connection (IDLE connections, 20 s after they connected) and the
# offline-queues figures (bench-compare.sh's step: OFFLINE_SESSIONS sessions away while
# OFFLINE_MESSAGES 1 KB QoS 1 messages are queued for each; Mosquitto with persistence).
set -euo pipefail
OLD=$1; NEW=$2; BENCH=$3; REPS=${REPS:-3}; DURATION=${DURATION:-5s}
WORK=$(mktemp -d); PORT=18930
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
cat > "$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
max_inflight_messages 0
max_queued_messages 0
persistence false
CONF
start() {
  case "$1" in
    old|new) bin=$OLD; [ "$1" = new ] && bin=$NEW
      rm -rf "$WORK/data"
      "$bin" --data-dir "$WORK/data" --mqtt-addr 127.0.0.1:$PORT --http-addr 127.0.0.1:18981 \
        --cluster-addr 127.0.0.1:18982 --ws-addr off >"$WORK/$1.log" 2>&1 & ;;
    mosquitto) mosquitto -c "${MOSQUITTO_CONF:-$WORK/mosquitto.conf}" >"$WORK/m.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
SCEN=("fan-in-qos0|--scenario fan-in --clients 4 --qos 0" "fan-out-qos0|--scenario fan-out --clients 50 --qos 0" "pairs-qos1|--scenario pairs --clients 50 --qos 1" "pairs-qos2|--scenario pairs --clients 50 --qos 2")
for rep in $(seq $REPS); do
  for s in "${SCEN[@]}"; do
    name=${s%%|*}; args=${s#*|}
    for b in old new mosquitto; do
      start $b
      line=$("$BENCH" $args --brokers 127.0.0.1:$PORT --duration "$DURATION" --label $b 2>/dev/null || echo '{"receive_rate":0,"latency_ms":{"p99":0}}')
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(sys.argv[2], sys.argv[3], sys.argv[4], r["receive_rate"], r["latency_ms"]["p99"])' "$line" "$name" "$b" "$rep"
      stop
    done
  done
done
IDLE=${IDLE:-2000}
for b in old new mosquitto; do
  start $b; sleep 0.5; before=$(rss_kb $PID)
  rm -f "$WORK/ready"
  "$BENCH" --scenario storm --clients "$IDLE" --duration 24s --ready-file "$WORK/ready" --brokers 127.0.0.1:$PORT >/dev/null 2>&1 &
  bp=$!
  for _ in $(seq 600); do [ -f "$WORK/ready" ] && break; sleep 0.1; done
  sleep 20
  after=$(rss_kb $PID)
  wait $bp || true
  echo "idle $b bytes_per_conn $(( (after - before) * 1024 / IDLE ))"
  stop
done
OFFLINE_SESSIONS=${OFFLINE_SESSIONS:-1000}; OFFLINE_MESSAGES=${OFFLINE_MESSAGES:-200}
# shellcheck source=scripts/bench-offline.sh
. "$(dirname "$0")/bench-offline.sh"
mosquitto_persist_conf "$WORK" "$PORT"
for b in old new mosquitto; do
  MOSQUITTO_CONF="$WORK/mosquitto-persist.conf" start $b
  line=$(offline_bench "$BENCH" "$PID" "$PORT" "$b" "$OFFLINE_SESSIONS" "$OFFLINE_MESSAGES" 16 20)
  python3 -c 'import json,sys; r=json.loads(sys.argv[1])
print("offline", sys.argv[2], "bytes_per_delivery", round(r["bytes_per_queued_delivery"]),
      "at_20s", round(r["bytes_per_queued_delivery_settled"]), "msg/s", round(r["publish_rate"]),
      "kept", r["kept_for_one_session"])' "$line" $b
  stop
done
