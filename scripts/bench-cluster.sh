#!/usr/bin/env bash
# Cluster figures, written to docs/benchmarks-cluster.md:
# - the data plane: publisher/subscriber pairs with both ends on one node versus the
#   publisher on node 1 and the subscriber on node 2 (same three-node cluster, same
#   run), QoS 0 and 1, at full speed (throughput) and at a fixed offered rate
#   (latency p50/p99);
# - the control plane: leader failover, from kill -9 of the leader to a new leader
#   known to the survivors, over KILLS kills.
#
#   scripts/bench-cluster.sh                      # a few minutes
#   REPS=1 DURATION=1s KILLS=1 scripts/bench-cluster.sh --smoke   # CI: proves it works
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5s}
RATE=${RATE:-5000}
KILLS=${KILLS:-10}
DRAIN=${DRAIN:-3s}
OUT=${OUT:-docs/benchmarks-cluster.md}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1

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
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
[ $SMOKE = 1 ] && OUT=$WORK/bench-cluster.md

INITIAL="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
declare -A PID
start_node() { # id
  local id=$1
  "$BIN/broker-node" --node-id "$id" --data-dir "$WORK/data$id" \
    --mqtt-addr 127.0.0.1:$((18900 + id)) --http-addr 127.0.0.1:$((18950 + id)) \
    --cluster-addr 127.0.0.1:$((17100 + id)) --initial-cluster "$INITIAL" --ws-addr off \
    >>"$WORK/node$id.log" 2>&1 &
  PID[$id]=$!
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
stop_all() { for id in 1 2 3; do kill "${PID[$id]}" 2>/dev/null || true; wait "${PID[$id]}" 2>/dev/null || true; done; }

for id in 1 2 3; do start_node "$id"; done
wait_ready

# ---- data plane ----
N1=127.0.0.1:18901
N2=127.0.0.1:18902
RESULTS=$WORK/results.tsv
: > "$RESULTS"
CLIENTS=20
[ $SMOKE = 1 ] && CLIENTS=4
for rep in $(seq "$REPS"); do
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
for k in $(seq "$KILLS"); do
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

python3 - "$RESULTS" "$FAILOVER" "$OUT" "$REPS" "$DURATION" "$RATE" "$CLIENTS" <<'PY'
import collections, platform, statistics, subprocess, sys
results, failover, out, reps, duration, rate, clients = sys.argv[1:]
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
open(out, "w").write("\n".join(lines) + "\n")
print(f"wrote {out}")
PY
