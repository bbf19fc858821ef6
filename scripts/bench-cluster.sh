#!/usr/bin/env bash
# Cluster figures, written to docs/benchmarks-cluster.md:
# - the data plane: publisher/subscriber pairs with both ends on one node versus the
#   publisher on node 1 and the subscriber on node 2 (same three-node cluster, same
#   run), QoS 0 and 1, at full speed (throughput) and at a fixed offered rate
#   (latency p50/p99);
# - the control plane: leader failover, from kill -9 of the leader to a new leader
#   known to the survivors, over KILLS kills;
# - control-plane throughput: SUBSCRIBEs per second through Raft, with batching on
#   (the defaults) and off (one command per entry), against a single node and spread
#   over the three;
# - catch-up: a fourth node joins a cluster holding SESSIONS persistent sessions (one
#   subscription each) and as many retained messages, plus SESSIONS more offline
#   persistent sessions with QUEUED QoS 1 messages queued for each (one copy of each
#   message, SESSIONS × QUEUED queued deliveries) and a snapshot of all of it taken on
#   the leader, timed until it reports the leader's state digest at the same applied
#   index; every node's RSS and the snapshot's size;
# - offline queues per node: OFFLINE_SESSIONS persistent sessions, spread over the three
#   nodes, away while OFFLINE_MESSAGES QoS 1 messages of 1 KB are published; the RSS
#   growth of every node per queued delivery and the publish rate, beside Mosquitto
#   (persistence on) measured the same way in the same run.
#
#   scripts/bench-cluster.sh                      # about fifteen minutes
#   STEPS="offline catchup" scripts/bench-cluster.sh   # some steps (data failover
#                                                      # control offline catchup); the
#                                                      # report goes to stdout, not docs/
#   REPS=1 DURATION=1s KILLS=1 SESSIONS=500 scripts/bench-cluster.sh --smoke   # CI
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5s}
RATE=${RATE:-5000}
KILLS=${KILLS:-10}
SESSIONS=${SESSIONS:-100000}
DRAIN=${DRAIN:-3s}
ALL_STEPS="data failover control offline catchup"
STEPS=${STEPS:-$ALL_STEPS}
step() { [[ " $STEPS " == *" $1 "* ]]; }
PARTIAL=0
[ "$STEPS" != "$ALL_STEPS" ] && [ -z "${OUT:-}" ] && PARTIAL=1
OUT=${OUT:-docs/benchmarks-cluster.md}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
QUEUED=${QUEUED:-$([ $SMOKE = 1 ] && echo 10 || echo 100)}

TARGET=${CARGO_TARGET_DIR:-target}
if [ $SMOKE = 1 ]; then
  DRAIN=1s
  cargo build -q -p broker-node --bins
  BIN=$TARGET/debug
else
  cargo build --release -q -p broker-node --bins
  BIN=$TARGET/release
fi
WORK=$(mktemp -d)
[ -n "${KEEP_WORK:-}" ] && echo "work directory (kept): $WORK" >&2
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
[ $SMOKE = 1 ] || [ $PARTIAL = 1 ] && OUT=$WORK/bench-cluster.md

INITIAL="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
declare -A PID
start_node() { # id [flags...]: environment settings in NODE_ENV (e.g. batching off)
  local id=$1
  shift
  local cluster_flags=(--initial-cluster "$INITIAL")
  [ $# -gt 0 ] && cluster_flags=("$@")
  env ${NODE_ENV:-} "$BIN/broker-node" --node-id "$id" --data-dir "$WORK/data$id" \
    --mqtt-addr 127.0.0.1:$((18900 + id)) --http-addr 127.0.0.1:$((18950 + id)) \
    --cluster-addr 127.0.0.1:$((17100 + id)) "${cluster_flags[@]}" --ws-addr off \
    >>"$WORK/node$id.log" 2>&1 &
  PID[$id]=$!
}
field() { # id key → a field of the node's cluster status, or nothing
  status "$1" | python3 -c 'import json,sys
try: print(json.load(sys.stdin)[sys.argv[1]])
except Exception: print("")' "$2"
}
status() { # id → JSON or nothing
  curl -fsS --max-time 1 "http://127.0.0.1:$((18950 + $1))/api/v1/cluster" 2>/dev/null || true
}
leader_seen_by() { # id → leader id or empty
  status "$1" | python3 -c 'import json,sys
try: print(json.load(sys.stdin)["leader"] or "")
except Exception: print("")'
}
wait_ready() {
  for id in 1 2 3; do
    for _ in $(seq 300); do
      curl -fsS --max-time 1 "http://127.0.0.1:$((18950 + id))/readyz" >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
}
stop_all() { for id in "${!PID[@]}"; do kill "${PID[$id]}" 2>/dev/null || true; wait "${PID[$id]}" 2>/dev/null || true; done; }

for id in 1 2 3; do start_node "$id"; done
wait_ready

# ---- data plane ----
N1=127.0.0.1:18901
N2=127.0.0.1:18902
RESULTS=$WORK/results.tsv
: > "$RESULTS"
CLIENTS=20
[ $SMOKE = 1 ] && CLIENTS=4
step data && for rep in $(seq "$REPS"); do
  for qos in 0 1; do
    for mode in full rate; do
      rate_arg=0
      [ $mode = rate ] && rate_arg=$RATE
      for placement in same cross; do
        # Subscriber i connects to brokers[(i+1) % n], publisher i to brokers[i % n]:
        # "N1,N1" keeps both on node 1, "N1,N2" puts every pair across two nodes.
        brokers="$N1,$N1"
        [ $placement = cross ] && brokers="$N1,$N2"
        line=$("$BIN/flockmq-bench" --scenario pairs --clients $CLIENTS --qos $qos \
          --rate $rate_arg --duration "$DURATION" --drain "$DRAIN" --brokers "$brokers" --label $placement)
        echo "qos$qos $mode $placement: $line" >&2
        python3 - "$line" "$qos" "$mode" "$placement" >>"$RESULTS" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("\t".join([sys.argv[2], sys.argv[3], sys.argv[4], str(r["receive_rate"]),
                 str(r["latency_ms"]["p50"]), str(r["latency_ms"]["p99"]),
                 str(r["lost"]), str(r["duplicates"]), str(r["generator_saturated"])]))
PY
      done
    done
  done
done

# ---- failover ----
FAILOVER=$WORK/failover.tsv
: > "$FAILOVER"
step failover && for k in $(seq "$KILLS"); do
  leader=""
  for _ in $(seq 100); do
    leader=$(leader_seen_by 1)
    [ -z "$leader" ] && leader=$(leader_seen_by 2)
    [ -n "$leader" ] && break
    sleep 0.1
  done
  [ -n "$leader" ] || { echo "no leader before kill $k" >&2; exit 1; }
  survivors=()
  for id in 1 2 3; do [ "$id" != "$leader" ] && survivors+=("$id"); done
  t0=$(date +%s.%N)
  kill -9 "${PID[$leader]}"
  wait "${PID[$leader]}" 2>/dev/null || true
  new=""
  while :; do
    a=$(leader_seen_by "${survivors[0]}")
    b=$(leader_seen_by "${survivors[1]}")
    if [ -n "$a" ] && [ "$a" != "$leader" ] && [ "$a" = "$b" ]; then new=$a; break; fi
    sleep 0.02
    if python3 -c "import sys,time; sys.exit(0 if time.time() - $t0 < 30 else 1)"; then :; else
      echo "no new leader 30 s after kill $k" >&2; exit 1
    fi
  done
  t1=$(date +%s.%N)
  printf '%s\t%s\t%s\n' "$k" "$leader->$new" "$(python3 -c "print($t1 - $t0)")" >>"$FAILOVER"
  echo "kill $k: leader $leader -> $new in $(python3 -c "print(round($t1 - $t0, 3))") s" >&2
  start_node "$leader"
  wait_ready
  sleep 1
done
stop_all

# ---- control-plane throughput: batching on and off ----
N3=127.0.0.1:18903
CONTROL=$WORK/control.tsv
: > "$CONTROL"
SUB_CLIENTS=20
[ $SMOKE = 1 ] && SUB_CLIENTS=4
step control && for batching in on off; do
  rm -rf "$WORK"/data?
  NODE_ENV=""
  [ $batching = off ] && NODE_ENV="FLOCKMQ_CLUSTER__BATCH_MAX_COMMANDS=1"
  for id in 1 2 3; do start_node "$id"; done
  wait_ready
  for rep in $(seq "$REPS"); do
    for spread in leader all; do
      brokers="$N1"
      [ $spread = all ] && brokers="$N1,$N2,$N3"
      line=$("$BIN/flockmq-bench" --scenario subscribes --clients $SUB_CLIENTS --inflight 8 \
        --qos 1 --duration "$DURATION" --brokers "$brokers" --label "$batching-$spread")
      echo "subscribes batching $batching via $spread: $line" >&2
      python3 - "$line" "$batching" "$spread" >>"$CONTROL" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("\t".join([sys.argv[2], sys.argv[3], str(r["subscribes_per_second"]),
                 str(r["latency_ms"]["p50"]), str(r["latency_ms"]["p99"]), str(r["refused"])]))
PY
    done
  done
  stop_all
done
NODE_ENV=""

# ---- offline queues, per node of the cluster, beside Mosquitto ----
source scripts/bench-offline.sh
OFFLINE_SESSIONS=${OFFLINE_SESSIONS:-1000}
OFFLINE_MESSAGES=${OFFLINE_MESSAGES:-200}
[ $SMOKE = 1 ] && { OFFLINE_SESSIONS=50; OFFLINE_MESSAGES=10; }
OFFLINE=$WORK/offline.tsv
: > "$OFFLINE"
if step offline; then
if command -v mosquitto >/dev/null 2>&1; then
  mosquitto_persist_conf "$WORK" 18999
  mosquitto -c "$WORK/mosquitto-persist.conf" >"$WORK/mosquitto.log" 2>&1 &
  MOSQ=$!
  sleep 0.5
  line=$(offline_bench "$BIN/flockmq-bench" "$MOSQ" 18999 mosquitto "$OFFLINE_SESSIONS" "$OFFLINE_MESSAGES" 16 0)
  echo "offline mosquitto: $line" >&2
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("mosquitto", r["bytes_per_queued_delivery"], r["publish_rate"], sep="\t")' "$line" >>"$OFFLINE"
  kill "$MOSQ"; wait "$MOSQ" 2>/dev/null || true
fi
rm -rf "$WORK"/data?
for id in 1 2 3; do start_node "$id"; done
wait_ready
line=$("$BIN/flockmq-bench" --scenario offline --clients "$OFFLINE_SESSIONS" --count "$OFFLINE_MESSAGES" \
  --payload 1024 --inflight 16 --duration 600s --brokers "$N1,$N2,$N3" --label flockmq \
  --node-pids "${PID[1]},${PID[2]},${PID[3]}")
echo "offline flockmq, 3 nodes: $line" >&2
python3 -c 'import json,sys
r = json.loads(sys.argv[1])
print("flockmq", ",".join(f"{x:.1f}" for x in r["bytes_per_queued_delivery_per_node"]), r["publish_rate"], sep="\t")' \
  "$line" >>"$OFFLINE"
stop_all
fi

# ---- catch-up of a joining node ----
CATCHUP=$WORK/catchup.tsv
: > "$CATCHUP"
if step catchup; then
rm -rf "$WORK"/data?
for id in 1 2 3; do start_node "$id"; done
wait_ready
fill=$("$BIN/flockmq-bench" --scenario sessions --clients "$SESSIONS" --concurrency 200 \
  --brokers "$N1,$N2,$N3" --payload 64)
echo "filled: $fill" >&2
queued='{}'
if [ "$QUEUED" -gt 0 ]; then
  queued=$("$BIN/flockmq-bench" --scenario offline --clients "$SESSIONS" --count "$QUEUED" \
    --concurrency 200 --inflight 8 --duration 600s --brokers "$N1,$N2,$N3" --payload 100 --label q)
  echo "queued: $queued" >&2
fi
leader=""
for _ in $(seq 300); do # a leader, even right after an election
  leader=$(leader_seen_by 1)
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "no leader after the fill" >&2; exit 1; }
sleep 2
# A snapshot of the whole state, queues included, for the new node to install: left
# to cluster.snapshot_after_logs, the last one could predate the queued messages, and
# the new node would replay them from the log instead.
curl -fsS --max-time 300 -X POST "http://127.0.0.1:$((18950 + leader))/api/v1/cluster/snapshot" >&2
echo >&2
rss_nodes=$(for id in 1 2 3; do awk '/VmRSS/ {print $2}' "/proc/${PID[$id]}/status"; done | paste -sd,)
target_index=$(field "$leader" digest_index)
t0=$(date +%s.%N)
start_node 4 --join 127.0.0.1:$((17100 + leader))
caught=""
while :; do
  # The join itself adds entries (membership changes): compare with the leader now.
  index4=$(field 4 digest_index)
  if [ -n "$index4" ] && [ "$index4" -ge "$target_index" ] && [ "$index4" = "$(field "$leader" digest_index)" ] \
    && [ "$(field 4 digest)" = "$(field "$leader" digest)" ]; then
    caught=1
    break
  fi
  python3 -c "import sys,time; sys.exit(0 if time.time() - $t0 < 600 else 1)" || break
  sleep 0.05
done
t1=$(date +%s.%N)
[ -n "$caught" ] || { echo "node 4 did not catch up in 600 s" >&2; tail -20 "$WORK/node4.log" >&2; exit 1; }
snapshot_mb=$(du -sm "$WORK/data$leader" | cut -f1)
snapshot_file_mb=$(du -sm "$WORK/data$leader/raft/raft-snapshots" 2>/dev/null | cut -f1)
rss4=$(awk '/VmRSS/ {print $2}' "/proc/${PID[4]}/status")
installed=$(grep -c 'snapshot installed' "$WORK/node4.log" || true)
echo "catch-up: $(python3 -c "print(round($t1 - $t0, 2))") s to index $target_index; RSS of nodes 1-3 (KiB) $rss_nodes, node 4 $rss4; snapshots installed on node 4: $installed" >&2
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(python3 -c "print($t1 - $t0)")" "$target_index" "$fill" \
  "$snapshot_mb" "$rss4" "$installed" "$queued" "$rss_nodes" "${snapshot_file_mb:-0}" >"$CATCHUP"
stop_all
fi

python3 - "$RESULTS" "$FAILOVER" "$OUT" "$REPS" "$DURATION" "$RATE" "$CLIENTS" "$CONTROL" "$CATCHUP" "$SUB_CLIENTS" "$OFFLINE" "$OFFLINE_SESSIONS" "$OFFLINE_MESSAGES" <<'PY'
import collections, json, platform, statistics, subprocess, sys
results, failover, out, reps, duration, rate, clients, control, catchup, sub_clients, offline, offline_sessions, offline_messages = sys.argv[1:]
rows = collections.defaultdict(list)
for line in open(results):
    qos, mode, placement, rr, p50, p99, lost, dups, sat = line.rstrip("\n").split("\t")
    rows[(qos, mode, placement)].append((float(rr), float(p50), float(p99), int(lost), int(dups), sat))
med = statistics.median
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
lines = ["# Cluster benchmarks", "",
         f"Machine: {platform.machine()}, {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
         "three `broker-node` processes (release build) on loopback and the load generator share them.", "",
         "Command: `scripts/bench-cluster.sh`", "",
         "## Data plane: same node versus across nodes", "",
         f"`flockmq-bench --scenario pairs --clients {clients}`: {clients} publisher/subscriber pairs on their own topics, "
         f"64-byte payloads; medians of {reps} runs of {duration}, same-node and cross-node runs alternating. "
         f"'Same node': both ends on node 1. 'Across': publisher on node 1, subscriber on node 2, every message "
         f"forwarded over the peer stream. Latency is measured at an offered {rate} msg/s.", "",
         "| QoS | same node msg/s | across nodes msg/s | ratio | same p50 / p99 ms | across p50 / p99 ms | lost (same / across) |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
for qos in ("0", "1"):
    s, c = rows[(qos, "full", "same")], rows[(qos, "full", "cross")]
    sl, cl = rows[(qos, "rate", "same")], rows[(qos, "rate", "cross")]
    if not (s and c and sl and cl):
        continue
    sr, cr = med([r[0] for r in s]), med([r[0] for r in c])
    lines.append(f"| {qos} | {sr:,.0f} | {cr:,.0f} | {cr / sr if sr else 0:.2f} | "
                 f"{med([r[1] for r in sl]):.2f} / {med([r[2] for r in sl]):.2f} | "
                 f"{med([r[1] for r in cl]):.2f} / {med([r[2] for r in cl]):.2f} | "
                 f"{sum(r[3] for r in s + sl)} / {sum(r[3] for r in c + cl)} |")
times = [float(l.split("\t")[2]) for l in open(failover)]
lines += ["", "## Control plane: leader failover", "",
          f"kill -9 of the leader, then polling `/api/v1/cluster` on both survivors every 20 ms until they name the same new leader; "
          f"the killed node is restarted and caught up before the next kill. {len(times)} kills. Defaults: heartbeat 200 ms, "
          "election timeout 0.8–1.6 s (openraft waits out the old leader's lease first).", ""]
if times:
    lines += [f"median {med(times):.2f} s, worst {max(times):.2f} s, best {min(times):.2f} s", ""]
ctl = collections.defaultdict(list)
for line in open(control):
    batching, spread, rate_s, p50, p99, refused = line.rstrip("\n").split("\t")
    ctl[(batching, spread)].append((float(rate_s), float(p50), float(p99), int(refused)))
lines += ["## Control plane: SUBSCRIBEs per second through Raft", "",
          f"`flockmq-bench --scenario subscribes --clients {sub_clients} --inflight 8 --qos 1`: every client keeps 8 "
          f"SUBSCRIBEs of new filters outstanding for {duration}; each is one replicated command, acknowledged "
          f"once committed and applied. 'Leader only': all clients on the node that initialized the cluster (the "
          f"leader); 'all three': clients spread over the nodes, followers forwarding to the leader. Batching off: "
          f"`FLOCKMQ_CLUSTER__BATCH_MAX_COMMANDS=1`, one command per Raft entry. Medians of {reps} runs.", "",
          "| batching | clients on | subscribes/s | p50 ms | p99 ms | refused |",
          "| --- | --- | ---: | ---: | ---: | ---: |"]
for batching in ("on", "off"):
    for spread, name in (("leader", "leader only"), ("all", "all three")):
        r = ctl[(batching, spread)]
        if r:
            lines.append(f"| {batching} | {name} | {med([x[0] for x in r]):,.0f} | {med([x[1] for x in r]):.2f} | "
                         f"{med([x[2] for x in r]):.2f} | {sum(x[3] for x in r)} |")
caught = open(catchup).read().rstrip("\n")
if caught:
  seconds, index, fill, snapshot_mb, rss_kb, installed, queued, rss_nodes, snapshot_file_mb = caught.split("\t")
  fill, queued = json.loads(fill), json.loads(queued)
  lines += ["", "## Control plane: a new node catching up", "",
            f"`flockmq-bench --scenario sessions --clients {fill['sessions']}` fills a three-node cluster with "
            f"{fill['sessions']:,} persistent sessions (one QoS 1 subscription each) and {fill['sessions']:,} retained "
            f"messages of 64 bytes ({fill['sessions_per_second']:,.0f} sessions/s, {fill['failed']} failed)."]
  if queued:
      lines += ["", f"Then `flockmq-bench --scenario offline --clients {queued['sessions']:,} --count {queued['sent']}` "
                f"adds {queued['sessions']:,} more persistent sessions subscribed to `fleet/all/#`, offline, and "
                f"publishes {queued['sent']} QoS 1 messages of {queued['payload_bytes']} bytes to `fleet/all/cmd`: "
                f"{queued['queued_deliveries']:,} queued deliveries ({queued['publish_rate']:,.0f} msg/s, "
                f"{queued['errors']} errors; one session then reconnected and received "
                f"{queued['kept_for_one_session']} of them)."]
  lines += ["", "The leader then builds a snapshot of all of it (`POST /api/v1/cluster/snapshot`), and "
            f"`broker-node --node-id 4 --join` starts; the clock runs from its start until it reports the "
            f"leader's state digest at the same applied index ({index}).", "",
            "| | |", "| --- | ---: |",
            f"| catch-up of node 4 | {float(seconds):.2f} s |",
            f"| snapshots installed on node 4 | {installed} |",
            f"| the leader's snapshot file | {snapshot_file_mb} MB |",
            f"| the leader's data directory | {snapshot_mb} MB |"]
  lines += [f"| RSS of node {i + 1} before the join | {int(kb) / 1024:,.0f} MB |"
            for i, kb in enumerate(rss_nodes.split(","))]
  lines += [f"| RSS of node 4 after catching up | {int(rss_kb) / 1024:,.0f} MB |", ""]
rows = dict(line.rstrip("\n").split("\t", 1) for line in open(offline) if line.strip())
if rows:
  lines += ["## Offline queues, per node of the cluster", "",
            f"{int(offline_sessions):,} persistent sessions subscribed to `fleet/all/#` at QoS 1 (spread over the "
            f"three nodes for FlockMQ) are away while {offline_messages} QoS 1 messages of 1 KB go to `fleet/all/cmd`: "
            "RSS growth per queued delivery, 2 s after the last PUBACK, of every node, and the publish rate. "
            "Mosquitto (persistence on) is one node, measured the same way in the same run.", "",
            "| broker | bytes per queued delivery | publish msg/s |", "| --- | ---: | ---: |"]
  if "mosquitto" in rows:
      per, rate_m = rows["mosquitto"].split("\t")
      lines.append(f"| Mosquitto | {float(per):,.0f} | {float(rate_m):,.0f} |")
  if "flockmq" in rows:
      per, rate_f = rows["flockmq"].split("\t")
      lines.append(f"| FlockMQ, nodes 1 / 2 / 3 | {' / '.join(f'{float(x):,.0f}' for x in per.split(','))} | {float(rate_f):,.0f} |")
  lines.append("")
open(out, "w").write("\n".join(lines) + "\n")
print(f"wrote {out}")
PY
if [ $PARTIAL = 1 ]; then cat "$OUT"; fi
