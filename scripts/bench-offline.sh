# Shared by scripts/bench-compare.sh and scripts/bench-ab.sh (sourced, not run): the
# offline-queues step's Mosquitto configuration and its flockmq-bench invocation.

# mosquitto_persist_conf WORK PORT: a Mosquitto configuration with persistence on
# (its data in WORK/mosquitto-data) at WORK/mosquitto-persist.conf.
mosquitto_persist_conf() {
  mkdir -p "$1/mosquitto-data"
  cat > "$1/mosquitto-persist.conf" <<CONF
listener $2 127.0.0.1
allow_anonymous true
persistence true
persistence_location $1/mosquitto-data/
max_queued_messages 1000
CONF
}

# offline_bench BENCH PID PORT LABEL SESSIONS MESSAGES INFLIGHT SETTLED_SECONDS: one
# offline-queues run of flockmq-bench against the broker PID on PORT; its JSON line.
offline_bench() {
  "$1" --scenario offline --clients "$5" --count "$6" --payload 1024 --inflight "$7" \
    --duration 600s --broker-pid "$2" --settled-after "${8}s" \
    --brokers "127.0.0.1:$3" --label "$4"
}
