#!/usr/bin/env bash
# End-to-end test of the image and docker-compose.yml on this machine's Docker
# engine: build the image offline, start the three-node cluster (ports on
# 127.0.0.1 only, mutual TLS between nodes: a client without the cluster's
# certificate is refused, and a node with an open cluster port and no TLS does not
# start), publish and
# subscribe across nodes with mosquitto clients, kill a node (service and a
# persistent session survive), cut a node off its network (it refuses control-plane
# writes, the majority publishes the will of a client connected to it) and reconnect
# it (it catches up), then tear everything down.
#
#   tests/docker/compose-e2e.sh          # PROFILE=debug reuses the test build
set -euo pipefail
cd "$(dirname "$0")/../.."

PROJECT="flockmq-e2e-$$"
export FLOCKMQ_IMAGE="${FLOCKMQ_IMAGE:-flockmq:e2e}"
export NODE1_MQTT_PORT=21883 NODE2_MQTT_PORT=21884 NODE3_MQTT_PORT=21885
export NODE1_HTTP_PORT=28080 NODE2_HTTP_PORT=28081 NODE3_HTTP_PORT=28082
compose() { docker-compose -p "$PROJECT" -f docker-compose.yml "$@"; }
fail() { echo "compose-e2e: FAILED: $*" >&2; compose logs --tail 40 >&2 || true; exit 1; }
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
  echo "compose-e2e: SKIPPED: no Docker engine reachable" >&2
  exit 0
fi

step() { echo "compose-e2e: $*"; }

step "image $FLOCKMQ_IMAGE"
IMAGE="$FLOCKMQ_IMAGE" PROFILE="${PROFILE:-release}" scripts/docker-image.sh

step "cluster up"
compose up -d >/dev/null
container() { compose ps -q "$1"; }
wait_healthy() {
  local deadline=$((SECONDS + 120)) s
  for n in "$@"; do
    while :; do
      s="$(docker inspect -f '{{.State.Health.Status}}' "$(container "$n")")"
      [[ "$s" == healthy ]] && break
      ((SECONDS < deadline)) || fail "$n is $s after 120 s"
      sleep 1
    done
  done
}
wait_healthy node1 node2 node3

step "published ports on 127.0.0.1 only; the cluster port wants the cluster's certificate"
for n in node1 node2 node3; do
  for p in 1883 8080; do
    bound="$(docker port "$(container $n)" $p/tcp)"
    [[ "$bound" == 127.0.0.1:* ]] || fail "$n publishes $p on '$bound', not on 127.0.0.1 only"
  done
  [[ -z "$(docker port "$(container $n)" 7000/tcp 2>/dev/null)" ]] || fail "$n publishes its cluster port"
done
node1_ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(container node1)")"
# A client without a certificate: the node ends the handshake with an alert. (With
# -ign_eof s_client waits for the node to close, so it ends on that alert.)
refused="$(openssl s_client -connect "$node1_ip:7000" -servername node1 -ign_eof </dev/null 2>&1 || true)"
grep -q "alert certificate required" <<<"$refused" || fail "cluster port took a client without a certificate: $refused"
# The same image with its cluster port beyond loopback and no TLS refuses to start.
insecure="$(timeout 30 docker run --rm --pull never -e FLOCKMQ_CLUSTER_ADDR=0.0.0.0:7000 "$FLOCKMQ_IMAGE" 2>&1)" \
  && fail "a node with an open cluster port and no TLS started"
grep -q "cluster.allow_insecure" <<<"$insecure" || fail "no reason given: $insecure"

step "publish on node 2, subscribers on nodes 1 and 3"
mosquitto_sub -p "$NODE1_MQTT_PORT" -t 'fleet/#' -C 1 -W 20 -v >/tmp/$PROJECT.sub1 &
sub1=$!
mosquitto_sub -p "$NODE3_MQTT_PORT" -t 'fleet/#' -q 1 -C 1 -W 20 -v >/tmp/$PROJECT.sub3 &
sub3=$!
sleep 1.5
mosquitto_pub -p "$NODE2_MQTT_PORT" -t fleet/r1/pose -m '{"x":1}' -q 1
wait "$sub1" || fail "subscriber on node 1 got nothing"
wait "$sub3" || fail "subscriber on node 3 got nothing"
grep -qx 'fleet/r1/pose {"x":1}' /tmp/$PROJECT.sub1 || fail "node 1 got $(cat /tmp/$PROJECT.sub1)"
grep -qx 'fleet/r1/pose {"x":1}' /tmp/$PROJECT.sub3 || fail "node 3 got $(cat /tmp/$PROJECT.sub3)"

step "a persistent session on node 3; node 1 killed; a message queued meanwhile"
mosquitto_sub -p "$NODE3_MQTT_PORT" -i arm-1 -c -q 1 -t arm/1/command -W 2 >/dev/null 2>&1 || true
compose kill node1 >/dev/null 2>&1
deadline=$((SECONDS + 30))
until mosquitto_pub -p "$NODE2_MQTT_PORT" -t arm/1/command -m stop -q 1 2>/dev/null; do
  ((SECONDS < deadline)) || fail "no write accepted 30 s after killing node 1"
  sleep 1
done
got="$(mosquitto_sub -p "$NODE3_MQTT_PORT" -i arm-1 -c -q 1 -t arm/1/command -C 1 -W 20)" \
  || fail "the queued message did not arrive"
[[ "$got" == stop ]] || fail "queued message was '$got'"
compose start node1 >/dev/null
wait_healthy node1

step "node 3 cut off its network refuses writes, its robot's will fires, then it rejoins"
network="${PROJECT}_default"
# A robot on node 3 with a retained "offline" will, and a watcher on node 1: the
# leader declares node 3 lost after cluster.node_lost_after (15 s) and publishes it.
# (The cut may break the robot's connection to node 3 first, and node 3 then commit
# its end before it is cut off: node 1 hands the committed will to its watcher itself.)
mosquitto_sub -p "$NODE3_MQTT_PORT" -i r5 -q 1 -t fleet/r5/cmd \
  --will-topic fleet/r5/status --will-payload offline --will-retain --will-qos 1 -W 120 \
  >/dev/null 2>&1 &
robot=$!
mosquitto_sub -p "$NODE1_MQTT_PORT" -t fleet/r5/status -q 1 -C 1 -W 90 >/tmp/$PROJECT.will &
will_watcher=$!
# Cut only once the robot's session is connected in the replicated state.
deadline=$((SECONDS + 30))
until docker exec "$(container node1)" broker-node ctl sessions show r5 --json 2>/dev/null \
    | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["connected"] else 1)'; do
  ((SECONDS < deadline)) || fail "the robot never connected to node 3"
  sleep 0.5
done
sleep 1
docker network disconnect "$network" "$(container node3)"
if docker exec "$(container node3)" broker-node ctl publish cut/off x --retain --qos 1 >/tmp/$PROJECT.cut 2>&1; then
  fail "node 3 accepted a retained write while cut off"
fi
grep -q 503 /tmp/$PROJECT.cut || fail "unexpected refusal: $(cat /tmp/$PROJECT.cut)"
mosquitto_pub -p "$NODE1_MQTT_PORT" -t site/name -m north -r -q 1 || fail "majority refused a write"
wait "$will_watcher" || fail "the cut-off node's client got no will on the majority side"
[[ "$(cat /tmp/$PROJECT.will)" == offline ]] || fail "will was '$(cat /tmp/$PROJECT.will)'"
kill "$robot" 2>/dev/null || true
docker network connect --alias node3 "$network" "$(container node3)"
healed=$SECONDS
deadline=$((SECONDS + 120))
while :; do
  # The admin API answers loopback clients only (no token here): ask inside each node.
  digests="$(for n in node1 node2 node3; do
    docker exec "$(container $n)" broker-node ctl cluster status --json 2>/dev/null \
      | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["digest_index"], s["digest"])' \
      || echo "$n down"
  done | sort -u)"
  [[ "$(wc -l <<<"$digests")" == 1 && "$digests" != *down* ]] && break
  ((SECONDS < deadline)) || fail "nodes did not converge after the partition healed: $digests"
  echo "compose-e2e:   $((SECONDS - healed)) s after healing: $(tr "\n" " " <<<"$digests")"
  sleep 0.5
done
got="$(mosquitto_sub -p "$NODE3_MQTT_PORT" -t site/name -C 1 -W 10)" || fail "node 3 lacks the retained message"
[[ "$got" == north ]] || fail "node 3 has '$got'"

step "passed"
