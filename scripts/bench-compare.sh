#!/usr/bin/env bash
# Runs FlockMQ and Mosquitto (Debian package, no artificial limits) side by side on
# this machine, alternating, several repetitions, with flockmq-bench as the load, and
# writes docs/benchmarks.md: medians per scenario, the FlockMQ/Mosquitto ratio, peak
# RSS of each broker, the machine and the commands.
#
#   scripts/bench-compare.sh            # full run (a few minutes)
#   REPS=1 DURATION=2s scripts/bench-compare.sh --smoke   # CI smoke: proves it works
#   RUMQTTD=/path/to/rumqttd scripts/bench-compare.sh    # rumqttd as a second peer
#   scripts/bench-compare.sh --offline  # only the offline-queues step, its table replaced
#   scripts/bench-compare.sh --idle     # only the idle-connection steps, their table replaced
#   BENCH_BIN=DIR scripts/bench-compare.sh ...  # broker-node and flockmq-bench from DIR, not built
#
# rumqttd (`cargo install rumqttd`) is the optional second peer: taken when RUMQTTD
# names its binary or `rumqttd` is on PATH, and reported as a FlockMQ/rumqttd ratio.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-10s}
OUT=${OUT:-docs/benchmarks.md}
SMOKE=0
OFFLINE_ONLY=0
IDLE_ONLY=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
[ "${1:-}" = "--offline" ] && OFFLINE_ONLY=1
[ "${1:-}" = "--idle" ] && IDLE_ONLY=1

command -v mosquitto >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; }
TARGET=${CARGO_TARGET_DIR:-target}
if [ -n "${BENCH_BIN:-}" ]; then
  # Binaries built elsewhere (e.g. an older commit's, for a before/after comparison).
  BIN=$BENCH_BIN
elif [ $SMOKE = 1 ]; then
  # The smoke run proves the harness works; the debug build the tests made will do.
  cargo build -q -p broker-node --bins
  BIN=$TARGET/debug
else
  cargo build --release -q -p broker-node --bins
  BIN=$TARGET/release
fi
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
# The smoke run's report is thrown away with the work directory.
[ $SMOKE = 1 ] && OUT=${OUT_SMOKE:-$WORK/bench-smoke.md}

PORT=18830
TLS_PORT=18883
BROKERS=(flockmq mosquitto)
RUMQTTD=${RUMQTTD:-$(command -v rumqttd || true)}
if [ -n "$RUMQTTD" ] && [ -x "$RUMQTTD" ]; then BROKERS+=(rumqttd); fi
cat > "$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
max_inflight_messages 0
max_queued_messages 0
persistence false
CONF
# rumqttd's own defaults, but no delay between accepted connections, room for the idle
# storm, and payloads as large as the others allow.
cat > "$WORK/rumqttd.toml" <<CONF
id = 0
[router]
id = 0
max_connections = 20000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:$PORT"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 268435455
max_inflight_count = 100
dynamic_filters = true
CONF

start_broker() { # name → sets BROKER_PID
  case "$1" in
    flockmq)
      rm -rf "$WORK/data"
      # FLOCKMQ_FILE: a configuration file (the TLS listener's), when set. (Not named
      # FLOCKMQ_*: the broker takes every FLOCKMQ_ variable for a configuration key.)
      env ${FLOCKMQ_FILE:+FLOCKMQ_CONFIG=$FLOCKMQ_FILE} "$BIN/broker-node" --data-dir "$WORK/data" --mqtt-addr 127.0.0.1:$PORT \
        --http-addr 127.0.0.1:18080 --cluster-addr 127.0.0.1:17000 --ws-addr off \
        >"$WORK/flockmq.log" 2>&1 &
      ;;
    mosquitto)
      mosquitto -c "${MOSQUITTO_CONF:-$WORK/mosquitto.conf}" >"$WORK/mosquitto.log" 2>&1 &
      ;;
    rumqttd)
      "$RUMQTTD" -c "$WORK/rumqttd.toml" >"$WORK/rumqttd.log" 2>&1 &
      ;;
  esac
  BROKER_PID=$!
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "broker $1 did not start:" >&2; tail -5 "$WORK/$1.log" >&2; return 1
}

stop_broker() { kill "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; }

peak_rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# name|flockmq-bench arguments
# (QoS 1 pairs last: the latency step below offers half of Mosquitto's rate there.)
SCENARIOS=(
  "fan-in qos0 (4→1)|--scenario fan-in --clients 4 --qos 0"
  "fan-out qos0 (1→50)|--scenario fan-out --clients 50 --qos 0"
  "pairs qos2 (50)|--scenario pairs --clients 50 --qos 2"
  "wildcards qos1 (10,000 filters)|--scenario wildcards --clients 10000 --qos 1"
  "retained (100,000, then #)|--scenario retained --clients 100000"
  "pairs qos1 (50)|--scenario pairs --clients 50 --qos 1"
)
[ $SMOKE = 1 ] && SCENARIOS=("${SCENARIOS[0]}"
  "wildcards qos1 (100 filters)|--scenario wildcards --clients 100 --qos 1"
  "retained (1,000, then #)|--scenario retained --clients 1000"
  "pairs qos1 (5)|--scenario pairs --clients 5 --qos 1")

RESULTS="$WORK/results.tsv"
: > "$RESULTS"; : > "$WORK/latency.tsv"; : > "$WORK/idle.tsv"; : > "$WORK/offline.tsv"
half=0
IDLE=${IDLE:-10000}
IDLE_TLS=${IDLE_TLS:-$IDLE}
IDLE_SETTLE=${IDLE_SETTLE:-40}
[ $SMOKE = 1 ] && IDLE=200 && IDLE_TLS=50 && IDLE_SETTLE=1

# The throughput and latency steps (not run with --offline or --idle).
if [ $OFFLINE_ONLY = 0 ] && [ $IDLE_ONLY = 0 ]; then
for rep in $(seq "$REPS"); do
  for s in "${SCENARIOS[@]}"; do
    name=${s%%|*}; args=${s#*|}
    for broker in "${BROKERS[@]}"; do
      start_broker $broker
      # shellcheck disable=SC2086
      line=$("$BIN/flockmq-bench" $args --brokers 127.0.0.1:$PORT --duration "$DURATION" --label $broker)
      echo "$broker $name: $line" >&2
      rate=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["receive_rate"])' "$line")
      p99=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["latency_ms"]["p99"])' "$line")
      lost=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["lost"])' "$line")
      sat=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["generator_saturated"])' "$line")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$broker" "$rep" "$rate" "$p99" "$(peak_rss_kb $BROKER_PID)" "$lost/$sat" >> "$RESULTS"
      stop_broker
    done
  done
done

# Latency at a rate both can sustain: half of Mosquitto's median QoS 1 pairs rate in
# this run, offered to each broker in turn (p50/p99 of publish-to-receive).
half=$(python3 -c '
import statistics, sys
rates = [float(l.split("\t")[3]) for l in open(sys.argv[1])
         if l.startswith("pairs qos1") and l.split("\t")[1] == "mosquitto"]
print(int(statistics.median(rates) / 2) if rates else 0)' "$RESULTS")
pairs_args=${SCENARIOS[-1]#*|}
if [ "$half" -gt 0 ]; then
  for rep in $(seq "$REPS"); do
    for broker in "${BROKERS[@]}"; do
      start_broker $broker
      # shellcheck disable=SC2086
      line=$("$BIN/flockmq-bench" $pairs_args --rate "$half" --brokers 127.0.0.1:$PORT \
        --duration "$DURATION" --label $broker)
      echo "$broker at $half msg/s: $line" >&2
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); l=r["latency_ms"]
print("\t".join([sys.argv[2], str(r["receive_rate"]), str(l["p50"]), str(l["p99"]), str(r["lost"])]))' \
        "$line" "$broker" >> "$WORK/latency.tsv"
      stop_broker
    done
  done
fi

fi # the throughput and latency steps

# Memory per idle connection, plain and TLS: RSS growth over N idle connections,
# measured once they have been idle for IDLE_SETTLE seconds (FlockMQ parks a connection
# idle for mqtt.park_after, 10 s by default, and its allocator returns the freed pages
# over the next seconds; Mosquitto is measured the same way); and the storm's peak: the
# broker's RSS while the N clients connect (100 at a time), sampled, or its VmHWM.
# rumqttd has no TLS listener here: plain only.
# shellcheck source=scripts/bench-idle.sh
. scripts/bench-idle.sh
bench_pki "$WORK/pki"
tls_confs "$WORK" "$PORT" "$TLS_PORT"
if [ $OFFLINE_ONLY = 0 ]; then
for kind in plain tls; do
  for broker in "${BROKERS[@]}"; do
    n=$IDLE; addr=127.0.0.1:$PORT; ca=""
    if [ $kind = tls ]; then
      [ $broker = rumqttd ] && continue
      n=$IDLE_TLS; addr=127.0.0.1:$TLS_PORT; ca=$WORK/pki/ca.pem
      FLOCKMQ_FILE=$WORK/flockmq-tls.toml MOSQUITTO_CONF=$WORK/mosquitto-tls.conf
    fi
    [ "$n" -gt 0 ] || continue
    start_broker $broker
    unset FLOCKMQ_FILE MOSQUITTO_CONF
    sleep 0.5
    read -r before peak after < <(idle_storm "$BIN/flockmq-bench" "$BROKER_PID" "$addr" "$n" \
      "$IDLE_SETTLE" "$WORK/ready" "$ca")
    echo "$broker idle $kind: $n connections, RSS before $before KiB, peak $peak KiB, after $after KiB" >&2
    printf '%s\t%s\t%s\t%s\t%s\n' "$kind" "$broker" "$n" "$(( (after - before) * 1024 / n ))" \
      "$(( (peak - before) * 1024 / n ))" >> "$WORK/idle.tsv"
    stop_broker
  done
done
fi

# Queues of offline sessions (issue 22), not run with --idle: OFFLINE_SESSIONS persistent sessions
# subscribed to fleet/all/# at QoS 1 are away while OFFLINE_MESSAGES QoS 1 messages of
# 1 KB go to fleet/all/cmd (OFFLINE_INFLIGHT outstanding), so each is queued for every
# session. Reported: the broker's RSS growth over the publishes (VmRSS, read by
# flockmq-bench from /proc), that per queued delivery, and the publish rate. Mosquitto
# keeps its sessions on disk too (persistence true) and holds up to 1000 messages a
# client, as FlockMQ's default mqtt.max_queued_messages does.
OFFLINE_SESSIONS=${OFFLINE_SESSIONS:-1000}
OFFLINE_MESSAGES=${OFFLINE_MESSAGES:-200}
OFFLINE_INFLIGHT=${OFFLINE_INFLIGHT:-16}
OFFLINE_SETTLED=${OFFLINE_SETTLED:-20}
[ $SMOKE = 1 ] && OFFLINE_SESSIONS=20 && OFFLINE_MESSAGES=10 && OFFLINE_SETTLED=3
# shellcheck source=scripts/bench-offline.sh
. scripts/bench-offline.sh
mosquitto_persist_conf "$WORK" "$PORT"
OFFLINE_BROKERS=(flockmq mosquitto)
[ $IDLE_ONLY = 1 ] && OFFLINE_BROKERS=()
for broker in "${OFFLINE_BROKERS[@]}"; do
  MOSQUITTO_CONF="$WORK/mosquitto-persist.conf"
  start_broker $broker
  unset MOSQUITTO_CONF
  line=$(offline_bench "$BIN/flockmq-bench" "$BROKER_PID" "$PORT" "$broker" \
    "$OFFLINE_SESSIONS" "$OFFLINE_MESSAGES" "$OFFLINE_INFLIGHT" "$OFFLINE_SETTLED")
  echo "$broker offline: $line" >&2
  python3 -c 'import json,sys; r=json.loads(sys.argv[1])
print("\t".join(str(x) for x in [sys.argv[2], r["sessions"], r["sent"], r["rss_growth_bytes"],
      r["bytes_per_queued_delivery"], r["bytes_per_queued_delivery_settled"], r["publish_rate"],
      r["kept_for_one_session"], r["errors"]]))' \
    "$line" "$broker" >> "$WORK/offline.tsv"
  stop_broker
done

RUMQTTD=$RUMQTTD IDLE=$IDLE IDLE_SETTLE=$IDLE_SETTLE OFFLINE_ONLY=$OFFLINE_ONLY IDLE_ONLY=$IDLE_ONLY \
OFFLINE_MESSAGES=$OFFLINE_MESSAGES OFFLINE_INFLIGHT=$OFFLINE_INFLIGHT OFFLINE_SETTLED=$OFFLINE_SETTLED \
python3 - "$RESULTS" "$WORK/idle.tsv" "$OUT" "$REPS" "$DURATION" "$WORK/latency.tsv" "$half" "${SCENARIOS[-1]%%|*}" "$WORK/offline.tsv" <<'PY'
import collections, os, platform, statistics, subprocess, sys
results, idle, out, reps, duration, latency, half, pairs_name, offline = sys.argv[1:]
# The offline-queues table, between markers so that `--offline` replaces it alone.
runs = [line.rstrip("\n").split("\t") for line in open(offline)]
def num(v): return float(v) if v != "None" else 0.0
base = {r[0]: (num(r[4]), num(r[5])) for r in runs}.get("mosquitto", (0.0, 0.0))
def against(v, b): return f"{v / b:.2f}×" if b > 0 else "–"
block = ["<!-- offline: scripts/bench-compare.sh (alone: --offline) -->",
         f"Queues of offline sessions: {runs[0][1] if runs else 0} persistent sessions subscribed "
         f"to `fleet/all/#` at QoS 1 are offline while {os.environ['OFFLINE_MESSAGES']} QoS 1 "
         f"messages of 1 KB are published to `fleet/all/cmd` ({os.environ['OFFLINE_INFLIGHT']} "
         "in flight), each queued for every session; Mosquitto with `persistence true`. RSS growth "
         "from before the publishes to 2 s after the last acknowledgement, and per queued delivery "
         f"then and {os.environ['OFFLINE_SETTLED']} s after (once the allocator has returned "
         "what it freed).", "",
         "| broker | RSS growth MiB | bytes per queued delivery | against Mosquitto | "
         f"bytes per delivery at {os.environ['OFFLINE_SETTLED']} s | against Mosquitto | "
         "publish msg/s | kept for one session | errors |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for broker, sessions, sent, growth, per_delivery, settled, rate, kept, errors in runs:
    pd, ps = num(per_delivery), num(settled)
    block.append(f"| {broker} | {num(growth) / 2**20:,.1f} | {pd:,.0f} | {against(pd, base[0])} | "
                 f"{ps:,.0f} | {against(ps, base[1])} | {float(rate):,.0f} | {kept} of {sent} | {errors} |")
block.append("<!-- /offline -->")
# Idle connections, plain and TLS, and the storm's peak: rows of kind, broker,
# connections, bytes per idle connection, bytes per connection at the peak.
idle_rows = [line.split() for line in open(idle)]
def idle_base(kind, col):
    return next((int(r[col]) for r in idle_rows if r[0] == kind and r[1] == "mosquitto"), 0)
idle_block = ["<!-- idle: scripts/bench-compare.sh (alone: --idle) -->",
              f"Idle connections: N held, RSS growth per connection {os.environ['IDLE_SETTLE']} s "
              "after the last one connected; and the storm's peak: the broker's highest RSS while "
              "the N clients connected (100 at a time; sampled every 5 ms, or VmHWM if higher), "
              "above its RSS before, per connection. TLS: TLS 1.3, an EC P-256 certificate, no "
              "session resumption (every client a full handshake).", "",
              "| connections | broker | N | bytes per idle connection | against Mosquitto | "
              "storm peak bytes per connection | against Mosquitto |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
for kind, broker, n, per, peak in idle_rows:
    b, bp = idle_base(kind, 3), idle_base(kind, 4)
    idle_block.append(f"| {kind} | {broker} | {int(n):,} | {int(per):,} | {against(int(per), b)} | "
                      f"{int(peak):,} | {against(int(peak), bp)} |")
idle_block.append("<!-- /idle -->")
def replace_block(marker, block):
    """Put `block` in place of the one between its markers in `out`."""
    try:
        previous = open(out).read()
    except OSError:
        previous = ""
    start, end = f"<!-- {marker}:", f"<!-- /{marker} -->"
    if start in previous:
        a = previous.index(start)
        b = previous.index(end) + len(end)
        text = previous[:a] + "\n".join(block) + previous[b:]
    elif "## Reading the figures" in previous:
        a = previous.index("## Reading the figures")
        text = previous[:a] + "\n".join(block) + "\n\n" + previous[a:]
    else:
        text = previous + "\n".join(block) + "\n"
    open(out, "w").write(text)
    print("\n".join(block))
if os.environ["OFFLINE_ONLY"] == "1":
    replace_block("offline", block)
    sys.exit(0)
if os.environ["IDLE_ONLY"] == "1":
    replace_block("idle", idle_block)
    sys.exit(0)
rows = collections.defaultdict(lambda: collections.defaultdict(list))
order = []
for line in open(results):
    name, broker, rep, rate, p99, rss, extra = line.rstrip("\n").split("\t")
    if name not in order:
        order.append(name)
    rows[name][broker].append((float(rate), float(p99), int(rss), extra))
def med(v): return statistics.median(v) if v else 0.0
def summary(runs):  # median msg/s, median p99 ms, peak RSS KiB of one broker's runs
    return med([r[0] for r in runs]), med([r[1] for r in runs]), max((r[2] for r in runs), default=0)
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
mosq = subprocess.run(["sh", "-c", "mosquitto -h 2>/dev/null | head -1"], capture_output=True, text=True).stdout.strip()
lines = ["# Benchmarks", "",
         f"Machine: {platform.machine()}, {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores. "
         f"Peer: {mosq}. Medians of {reps} runs of {duration}, brokers run one at a time, alternating, "
         "with `flockmq-bench` (this repository) on the same machine, 64-byte payloads.", "",
         "Command: `scripts/bench-compare.sh`", "",
         "| scenario | FlockMQ msg/s | Mosquitto msg/s | ratio | FlockMQ p99 ms | Mosquitto p99 ms | FlockMQ peak RSS KiB | Mosquitto peak RSS KiB |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for name in order:
    (fr, fp, frss), (mr, mp, mrss) = summary(rows[name]["flockmq"]), summary(rows[name]["mosquitto"])
    lines.append(f"| {name} | {fr:,.0f} | {mr:,.0f} | {fr / mr if mr else 0:.2f} | "
                 f"{fp:.2f} | {mp:.2f} | {frss} | {mrss} |")
lines += ["", "Wildcards: each subscriber has its own filter (`bench/w/i/+`, `bench/w/+/i` or "
          "`bench/w/i/#`) and 4 publishers cycle over topics each matching one filter. Retained: "
          "msg/s is retained messages delivered per second from the `#` SUBSCRIBE to the last one, "
          "p99 is from the SUBSCRIBE; setting them is QoS 1, 64 in flight."]
if any(rows[name]["rumqttd"] for name in order):
    version = subprocess.run(["sh", "-c", '"$RUMQTTD" --version 2>/dev/null | head -1'],
                             capture_output=True, text=True).stdout.strip() or "rumqttd"
    lines += ["", f"Second peer: {version} (built from crates.io), same runs:", "",
              "| scenario | FlockMQ msg/s | rumqttd msg/s | ratio | rumqttd p99 ms | rumqttd peak RSS KiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in order:
        fr, (qr, qp, qrss) = summary(rows[name]["flockmq"])[0], summary(rows[name]["rumqttd"])
        lines.append(f"| {name} | {fr:,.0f} | {qr:,.0f} | {fr / qr if qr else 0:.2f} | {qp:.2f} | {qrss} |")
lat = collections.defaultdict(list)
for line in open(latency):
    broker, rate, p50, p99, lost = line.rstrip("\n").split("\t")
    lat[broker].append((float(rate), float(p50), float(p99), int(lost)))
if lat:
    lines += ["", f"Latency of {pairs_name} at {int(half):,} msg/s offered (half of Mosquitto's median "
              "rate above), medians of the runs:", "",
              "| broker | received msg/s | p50 ms | p99 ms | lost |", "| --- | ---: | ---: | ---: | ---: |"]
    for broker in [b for b in ("flockmq", "mosquitto", "rumqttd") if lat[b]]:
        v = lat[broker]
        lines.append(f"| {broker} | {med([x[0] for x in v]):,.0f} | {med([x[1] for x in v]):.2f} | "
                     f"{med([x[2] for x in v]):.2f} | {sum(x[3] for x in v)} |")
lines += [""] + idle_block + [""] + block
# Everything from "## Reading the figures" on is written by hand (profiles, targets,
# the 100,000-connection measurement): kept as it is.
try:
    previous = open(out).read()
    kept = previous[previous.index("## Reading the figures"):]
except (OSError, ValueError):
    kept = ""
open(out, "w").write("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
print("\n".join(lines))
PY
