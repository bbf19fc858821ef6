#!/usr/bin/env python3
"""Checks on what `helm template` renders from helm/flockmq, for tests/helm/chart-test.sh.

    chart_checks.py validate RENDERED.yaml K8S_VERSION...
        every document against the Kubernetes OpenAPI schemas (kubernetes-validate,
        strict: unknown fields are errors); the prometheus-operator ServiceMonitor,
        which it has no schema for, against the fields the chart uses
    chart_checks.py facts RENDERED.yaml --namespace NS --replicas N --initial N [...]
        the facts the cluster depends on (ids, initial cluster, probes, quorum, ...)
    chart_checks.py pod RENDERED.yaml ORDINAL OUT_DIR
        what the kubelet would run for pod ORDINAL: OUT_DIR/env (NAME=value lines, after
        envFrom and fieldRef are resolved), OUT_DIR/command (the shell wrapper, then
        its $0 and args, NUL separated), OUT_DIR/init-command (the init container's),
        OUT_DIR/volumes/NAME (rendered Secrets as files, emptyDirs) and
        OUT_DIR/mounts-CONTAINER (NAME PATH ro|rw per line); a secretKeyRef is the
        rendered Secret's value, or a placeholder for the user's own Secrets
    chart_checks.py test-pod RENDERED.yaml OUT_DIR
        the same for the `helm test` hook Pod (its container `check`)
    chart_checks.py wrapper-env ENV_OUTPUT --node-id N --advertise A (--initial-cluster C | --join J | --single)
        the environment the wrapper handed to broker-node, as printed by `env`

Each subcommand prints one line per failed fact and exits 1 if any failed.
"""

import argparse
import base64
import os
import sys

import yaml

failures = []


def fail(message):
    failures.append(message)
    print(f"  FAIL {message}")


def expect(cond, message):
    if not cond:
        fail(message)
    return cond


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise SystemExit(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


# ---- validate ----

def check_endpoints(kind, endpoints, ports):
    """A monitor's scrape endpoints: /metrics on a port that exists, http or https (with
    a tlsConfig of the operator's SafeTLSConfig fields the chart sets), no other keys."""
    for ep in endpoints:
        expect(ep.get("port") in ports, f"{kind} port {ep.get('port')} not in {ports}")
        expect(ep.get("path") == "/metrics", f"{kind} path is /metrics")
        for key in ep:
            expect(key in {"port", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig"},
                   f"{kind} endpoint key {key}")
        expect(ep.get("scheme") in ("http", "https"), f"{kind} scheme {ep.get('scheme')!r}")
        tls = ep.get("tlsConfig")
        if tls is not None:
            expect(ep.get("scheme") == "https", f"{kind} tlsConfig without scheme https")
            for key in tls:
                expect(key in {"ca", "serverName", "insecureSkipVerify"}, f"{kind} tlsConfig key {key}")
            if "ca" in tls:
                ref = tls["ca"].get("secret", {})
                expect(set(tls["ca"]) == {"secret"} and set(ref) == {"name", "key"} and all(ref.values()),
                       f"{kind} tlsConfig.ca is a Secret key reference: {tls['ca']}")
                expect(isinstance(tls.get("serverName"), str) and tls["serverName"],
                       f"{kind} tlsConfig names the server it verifies")
            else:
                expect(tls.get("insecureSkipVerify") is True, f"{kind} tlsConfig verifies against nothing")


def check_admin_tls(docs, namespace, container, env, mounts, on, insecure):
    """The HTTP port (probes, metrics, admin API): HTTPS with the listeners' certificate
    when `on`, and everything that reaches it following: probes, scrapes (the CA of the
    mounted certificate's Secret, unless `insecure`), the helm test pod's ctl."""
    want = "HTTPS" if on else "HTTP"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        got = container.get(probe, {}).get("httpGet", {}).get("scheme")
        expect(got == want, f"{probe} scheme {got}, want {want}")
    expect((env.get("FLOCKMQ_HTTP_TLS", {}).get("value") == "true") == on, f"FLOCKMQ_HTTP_TLS set: {on}")
    sts = one(docs, "StatefulSet")
    annotations = sts["spec"]["template"]["metadata"].get("annotations", {})
    expect(annotations.get("prometheus.io/scheme", "http") == want.lower(), "prometheus.io/scheme annotation")
    endpoints = [ep for d in docs if d["kind"] == "ServiceMonitor" for ep in d["spec"]["endpoints"]]
    endpoints += [ep for d in docs if d["kind"] == "PodMonitor" for ep in d["spec"]["podMetricsEndpoints"]]
    tls_secret = None
    if on:
        expect(env.get("FLOCKMQ_TLS_CERT_FILE", {}).get("value") == "/etc/flockmq/tls/tls.crt"
               and env.get("FLOCKMQ_TLS_KEY_FILE", {}).get("value") == "/etc/flockmq/tls/tls.key",
               "the HTTPS port's certificate and key are the mounted listeners' Secret")
        volume = mounts.get("/etc/flockmq/tls")
        pod = sts["spec"]["template"]["spec"]
        tls_secret = next((v["secret"]["secretName"] for v in pod.get("volumes", []) if v["name"] == volume), None)
        expect(tls_secret, "the listeners' TLS Secret is mounted at /etc/flockmq/tls")
        # A certificate cert-manager writes holds the pods' names, for ctl.
        full = sts["metadata"]["name"]
        for cert in (d for d in docs if d["kind"] == "Certificate" and d["spec"]["secretName"] == tls_secret):
            names = cert["spec"]["dnsNames"]
            expect(f"*.{full}-headless.{namespace}.svc.cluster.local" in names,
                   f"Certificate {cert['metadata']['name']} holds the pods' names: {names}")
    for ep in endpoints:
        expect(ep.get("scheme") == want.lower(), f"scrape scheme {ep.get('scheme')}, want {want.lower()}")
        tls = ep.get("tlsConfig")
        if not on:
            expect(tls is None, "no tlsConfig for plain HTTP")
        elif insecure:
            expect(tls == {"insecureSkipVerify": True}, f"tlsConfig {tls}, want insecureSkipVerify only")
        else:
            expect(tls and tls.get("ca") == {"secret": {"name": tls_secret, "key": "ca.crt"}},
                   f"scrapes verify against ca.crt of {tls_secret}: {tls}")
    # The helm test pod's ctl verifies pod 0 against the same CA, mounted.
    for test in (d for d in docs if d["kind"] == "Pod"):
        spec = test["spec"]
        check = next(c for c in spec["containers"] if c["name"] == "check")
        script = "\n".join(check["command"])
        if "broker-node ctl" not in script:
            continue
        if not on:
            expect("ctl --url http://" in script and "--cacert" not in script, "helm test: ctl over http")
            continue
        expect("ctl --url https://" in script and "--cacert /etc/flockmq/tls-ca/ca.crt" in script,
               "helm test: ctl over https with --cacert")
        tmounts = {m["mountPath"]: m["name"] for m in check.get("volumeMounts", [])}
        volume = next((v for v in spec.get("volumes", []) if v["name"] == tmounts.get("/etc/flockmq/tls-ca")), None)
        expect(volume and volume["secret"]["secretName"] == tls_secret
               and volume["secret"].get("items") == [{"key": "ca.crt", "path": "ca.crt"}],
               f"helm test: ca.crt of {tls_secret} at /etc/flockmq/tls-ca: {volume}")


def check_service_monitor(sm, docs):
    """The ServiceMonitor fields the chart sets, and that it selects a real Service port."""
    spec = sm.get("spec", {})
    expect(sm.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    labels = spec.get("selector", {}).get("matchLabels", {})
    services = [d for d in docs if d["kind"] == "Service"
                and all(d["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]
    if expect(len(services) == 1, f"ServiceMonitor selects {len(services)} Services, want 1"):
        check_endpoints("ServiceMonitor", spec.get("endpoints", []), {p["name"] for p in services[0]["spec"]["ports"]})
    expect(spec.get("endpoints"), "ServiceMonitor has endpoints")
    expect(spec.get("namespaceSelector", {}).get("matchNames"), "ServiceMonitor namespaceSelector")


def check_pod_monitor(pm, docs):
    """The PodMonitor selects the StatefulSet's pods on their http port."""
    spec = pm.get("spec", {})
    expect(pm.get("apiVersion") == "monitoring.coreos.com/v1", "PodMonitor apiVersion")
    sts = one(docs, "StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    labels = spec.get("selector", {}).get("matchLabels", {})
    expect(labels and all(pod_labels.get(k) == v for k, v in labels.items()), "PodMonitor selects the pods")
    ports = {p["name"] for c in sts["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    check_endpoints("PodMonitor", spec.get("podMetricsEndpoints", []), ports)
    expect(spec.get("podMetricsEndpoints"), "PodMonitor has endpoints")


def check_certificate(cert, docs):
    """A cert-manager Certificate: the fields the chart sets, writing a Secret the pods mount."""
    spec = cert.get("spec", {})
    expect(cert.get("apiVersion") == "cert-manager.io/v1", "Certificate apiVersion")
    for key in spec:
        expect(key in {"secretName", "dnsNames", "usages", "duration", "renewBefore", "privateKey", "issuerRef"},
               f"Certificate key {key}")
    expect(spec.get("dnsNames") and spec.get("issuerRef", {}).get("name"), "Certificate has names and an issuer")
    valid = {"server auth", "client auth", "digital signature", "key encipherment"}
    expect(set(spec.get("usages", [])) <= valid, f"Certificate usages {spec.get('usages')}")
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    mounted = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    expect(spec.get("secretName") in mounted, f"Certificate Secret {spec.get('secretName')} is mounted")


def check_prometheus_rule(rule, docs):
    """The PrometheusRule's groups; promtool checks the rules themselves."""
    expect(rule.get("apiVersion") == "monitoring.coreos.com/v1", "PrometheusRule apiVersion")
    groups = rule.get("spec", {}).get("groups", [])
    expect(groups and all(g.get("rules") for g in groups), "PrometheusRule has rule groups")
    for g in groups:
        for r in g["rules"]:
            expect(r.get("alert") and r.get("expr") and r.get("annotations", {}).get("summary"),
                   f"rule {r.get('alert')} has a name, an expression and a summary")


# Custom resources kubernetes-validate has no schema for: checked by hand.
CUSTOM = {"ServiceMonitor": check_service_monitor, "PodMonitor": check_pod_monitor,
          "Certificate": check_certificate, "PrometheusRule": check_prometheus_rule}


def cmd_validate(args):
    import kubernetes_validate

    docs = load(args.rendered)
    checked = 0
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CUSTOM:
            CUSTOM[doc["kind"]](doc, docs)
            continue
        for version in args.versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checked += 1
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                fail(f"{name} against Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(f"{name}: no Kubernetes {version} schema for {doc['apiVersion']} {doc['kind']}")
    print(f"  {checked} manifest validations against Kubernetes {', '.join(args.versions)}")


# ---- facts ----

def cmd_facts(args):
    docs = load(args.rendered)
    sts = one(docs, "StatefulSet")
    full = sts["metadata"]["name"]
    headless = f"{full}-headless"
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "flockmq")
    env = {e["name"]: e for e in container.get("env", [])}

    expect(spec["replicas"] == args.replicas, f"replicas {spec['replicas']}, want {args.replicas}")
    expect(spec["podManagementPolicy"] == "Parallel", "podManagementPolicy is Parallel")
    expect(spec["serviceName"] == headless, f"serviceName is {headless}")
    expect(sts["metadata"]["annotations"]["flockmq.io/initial-size"] == str(args.initial),
           f"initial-size annotation is {args.initial}")

    # The initial voters: ids 1..initial at the pods' DNS names.
    want = ",".join(
        f"{i + 1}={full}-{i}.{headless}.{args.namespace}.svc.cluster.local:7000" for i in range(args.initial)
    )
    if args.initial > 1:
        got = env.get("FLOCKMQ_INITIAL_CLUSTER", {}).get("value")
        expect(got == want, f"FLOCKMQ_INITIAL_CLUSTER is {got!r}, want {want!r}")
    else:
        expect("FLOCKMQ_INITIAL_CLUSTER" not in env, "a single initial node has no FLOCKMQ_INITIAL_CLUSTER")
    expect(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
           "POD_NAME comes from metadata.name")

    # Peer discovery: the headless Service publishes pods before they are ready.
    hs = one(docs, "Service", headless)
    expect(hs["spec"].get("clusterIP") == "None", "headless Service has clusterIP None")
    expect(hs["spec"].get("publishNotReadyAddresses") is True, "headless Service publishes not-ready pods")
    expect({p["name"] for p in hs["spec"]["ports"]} >= {"cluster", "http"}, "headless Service has cluster and http ports")

    client = one(docs, "Service", full)
    expect(client["spec"]["type"] == args.service_type, f"client Service type {args.service_type}")
    ports = {p["name"]: p for p in client["spec"]["ports"]}
    expect(set(ports) == set(args.client_ports), f"client Service ports {sorted(ports)}, want {sorted(args.client_ports)}")
    cports = {p["name"] for p in container["ports"]}
    for p in ports.values():
        expect(p["targetPort"] in cports, f"client port {p['name']} targets a container port")
    for s in (hs, client):
        expect(s["spec"]["selector"] == spec["selector"]["matchLabels"], f"{s['metadata']['name']} selects the pods")

    # Quorum survives a drain.
    pdb = one(docs, "PodDisruptionBudget")
    expect(pdb["spec"].get("maxUnavailable") == 1, "PDB maxUnavailable is 1")
    expect("minAvailable" not in pdb["spec"], "PDB has no minAvailable")
    expect(pdb["spec"]["selector"] == spec["selector"], "PDB selects the pods")

    # Probes on the HTTP port.
    http_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    expect(http_port == 8080, "http container port 8080")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        expect(get.get("path") == path and get.get("port") == "http", f"{probe} is GET {path} on port http")
    expect(env.get("FLOCKMQ_HTTP_ADDR", {}).get("value") == "0.0.0.0:8080", "HTTP listens on 0.0.0.0:8080")

    # Non-root, nothing writable but the volumes.
    psc = pod.get("securityContext", {})
    expect(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, "pod runs as non-root uid 10001")
    expect(psc.get("fsGroup") == 10001, "fsGroup 10001 makes the data volume writable")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        expect(sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False
               and sc.get("readOnlyRootFilesystem") is True and sc.get("capabilities", {}).get("drop") == ["ALL"],
               f"container {c['name']} is non-root, read-only, without capabilities")
        expect(c.get("resources", {}).get("requests"), f"container {c['name']} has resource requests")

    # Kubernetes' service links would add FLOCKMQ_PORT etc., which the broker refuses.
    expect(pod.get("enableServiceLinks") is False, "enableServiceLinks is false")
    expect(pod.get("terminationGracePeriodSeconds", 0) >= 15, "terminationGracePeriodSeconds leaves the broker its 10 s")
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    key = {"hard": "requiredDuringSchedulingIgnoredDuringExecution",
           "soft": "preferredDuringSchedulingIgnoredDuringExecution"}.get(args.anti_affinity)
    if key:
        expect(key in anti, f"{args.anti_affinity} pod anti-affinity")
    else:
        expect("affinity" not in pod, "no affinity")

    # The data volume.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    expect(mounts.get("/var/lib/flockmq/data") == "data", "data volume at /var/lib/flockmq/data")
    expect(env.get("FLOCKMQ_DATA_DIR", {}).get("value") == "/var/lib/flockmq/data", "FLOCKMQ_DATA_DIR is the volume")
    vct = spec["volumeClaimTemplates"][0]
    expect(vct["metadata"]["name"] == "data", "volumeClaimTemplate data")
    expect(vct["spec"]["resources"]["requests"]["storage"] == args.storage, f"volume size {args.storage}")
    if args.storage_class:
        expect(vct["spec"].get("storageClassName") == args.storage_class, f"storageClassName {args.storage_class}")

    # Every Secret and ConfigMap the pod refers to is rendered or named as existing.
    rendered = {(d["kind"], d["metadata"]["name"]) for d in docs}
    # ... or written by a cert-manager Certificate the chart renders.
    rendered |= {("Secret", d["spec"]["secretName"]) for d in docs if d["kind"] == "Certificate"}
    refs = [("ConfigMap", e["configMapRef"]["name"]) for e in container.get("envFrom", [])]
    refs += [("Secret", v["secret"]["secretName"]) for v in pod.get("volumes", []) if "secret" in v]
    refs += [("Secret", e["valueFrom"]["secretKeyRef"]["name"]) for e in container.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})]
    for ref in refs:
        expect(ref in rendered or ref[1] in args.existing, f"{ref[0]} {ref[1]} is rendered or an existing Secret")
    # Every volume mount has its volume.
    volumes = {v["name"] for v in pod.get("volumes", [])} | {"data"}
    for c in pod["containers"] + pod.get("initContainers", []):
        for m in c.get("volumeMounts", []):
            expect(m["name"] in volumes, f"{c['name']} mounts volume {m['name']} that exists")

    annotations = spec["template"]["metadata"].get("annotations", {})
    expect(annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") == "8080",
           "prometheus.io scrape annotations")
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        found = [d for d in docs if d["kind"] == kind]
        expect(len(found) == (1 if kind in args.monitoring else 0), f"{len(found)} {kind}")

    check_admin_tls(docs, args.namespace, container, env, mounts, args.admin_tls, args.admin_tls_insecure)

    # The cluster port: mutual TLS from a mounted Secret, or insecure only when said so.
    if args.cluster_tls:
        want = {"FLOCKMQ_CLUSTER__TLS_CERT_FILE": "/etc/flockmq/cluster-tls/tls.crt",
                "FLOCKMQ_CLUSTER__TLS_KEY_FILE": "/etc/flockmq/cluster-tls/tls.key",
                "FLOCKMQ_CLUSTER__TLS_CA_FILE": "/etc/flockmq/cluster-tls/ca.crt"}
        for name, value in want.items():
            expect(env.get(name, {}).get("value") == value, f"{name}={value}")
        expect(mounts.get("/etc/flockmq/cluster-tls") == "cluster-tls", "cluster TLS Secret mounted")
        secret = next(v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "cluster-tls")
        expect(secret == args.cluster_tls, f"cluster TLS Secret is {args.cluster_tls} (got {secret})")
        expect("FLOCKMQ_CLUSTER__ALLOW_INSECURE" not in env, "no FLOCKMQ_CLUSTER__ALLOW_INSECURE with TLS")
    else:
        expect(env.get("FLOCKMQ_CLUSTER__ALLOW_INSECURE", {}).get("value") == "true",
               "without cluster TLS the chart says the network is trusted")
    tests = [d for d in docs if d["kind"] == "Pod"
             and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    expect(len(tests) == (0 if args.no_test_pod else 1), f"{len(tests)} helm test Pods")

    for name in args.env:
        expect(name in env, f"container env has {name}")
    for name in args.no_env:
        expect(name not in env, f"container env has no {name}")
    for item in args.env_value:
        name, value = item.split("=", 1)
        expect(env.get(name, {}).get("value") == value, f"{name}={value} (got {env.get(name, {}).get('value')!r})")
    cm = one(docs, "ConfigMap", f"{full}-env")
    for item in args.config:
        name, value = item.split("=", 1)
        expect(cm["data"].get(name) == value, f"ConfigMap {name}={value} (got {cm['data'].get(name)!r})")
    for item in args.secret_keys:
        name, keys = item.split("=", 1)
        secret = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
        got = sorted(secret[0].get("data", {})) if secret else None
        want = sorted(k for k in keys.split(",") if k) or None
        expect(got == want, f"Secret {name} keys {want or '(no such Secret)'} (got {got})")


# ---- pod ----

def cmd_pod(args):
    docs = load(args.rendered)
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    pod_name = f"{sts['metadata']['name']}-{args.ordinal}"
    container = next(c for c in pod["containers"] if c["name"] == "flockmq")
    materialize(docs, sts, pod, container, pod_name, args.out)


def cmd_test_pod(args):
    docs = load(args.rendered)
    test = next(d for d in docs if d["kind"] == "Pod"
                and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test")
    pod = test["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "check")
    materialize(docs, test, pod, container, test["metadata"]["name"], args.out)


def materialize(docs, owner, pod, container, pod_name, out):
    """OUT/env, OUT/command, OUT/init-command, OUT/volumes/*, OUT/mounts-* for one pod."""
    sts = owner
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}

    # As the kubelet does: envFrom first, then env (which wins), $(VAR) not used here.
    env = {"HOSTNAME": pod_name}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            ref = e["valueFrom"]
            if "fieldRef" in ref:
                field = ref["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.name": pod_name, "metadata.namespace": sts["metadata"].get("namespace", "")}[field]
            elif "secretKeyRef" in ref:
                name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                if key in secrets.get(name, {}):
                    env[e["name"]] = base64.b64decode(secrets[name][key]).decode()
                else:
                    env[e["name"]] = f"secret-{name}-{key}"
            else:
                raise SystemExit(f"env {e['name']}: unsupported valueFrom {ref}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "env"), "w") as f:
        for k, v in sorted(env.items()):
            expect("\n" not in v and "\0" not in v, f"env {k} is one line")
            f.write(f"{k}={v}\n")
    argv = list(container.get("command", [])) + list(container.get("args", []))
    with open(os.path.join(out, "command"), "w") as f:
        f.write("\0".join(argv))
    init = [c for c in pod.get("initContainers", []) if c["name"] == "passwd"]
    if init:
        with open(os.path.join(out, "init-command"), "w") as f:
            f.write("\0".join(init[0]["command"]))
    # The pod's volumes, as the kubelet would make them: OUT_DIR/volumes/NAME, with
    # rendered Secrets as one file per key (the user's own Secrets stay empty) and
    # emptyDirs writable by all; OUT_DIR/mounts-CONTAINER lists NAME PATH ro|rw.
    for volume in pod.get("volumes") or []:
        target = os.path.join(out, "volumes", volume["name"])
        os.makedirs(target, exist_ok=True)
        if "emptyDir" in volume:
            os.chmod(target, 0o777)
        secret = volume.get("secret")
        data = secrets.get(secret["secretName"], {}) if secret else {}
        # `items` maps keys to paths; without it every key is a file.
        paths = {i["key"]: i["path"] for i in secret.get("items", [])} if secret and "items" in secret else None
        for key, value in data.items():
            if paths is None or key in paths:
                with open(os.path.join(target, paths[key] if paths else key), "wb") as f:
                    f.write(base64.b64decode(value))
    for c in pod["containers"] + pod.get("initContainers", []):
        with open(os.path.join(out, f"mounts-{c['name']}"), "w") as f:
            for m in c.get("volumeMounts", []):
                f.write(f"{m['name']} {m['mountPath']} {'ro' if m.get('readOnly') else 'rw'}\n")


# ---- wrapper-env ----

def cmd_wrapper_env(args):
    with open(args.output) as f:
        env = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    expect(env.get("FLOCKMQ_NODE_ID") == args.node_id, f"FLOCKMQ_NODE_ID={env.get('FLOCKMQ_NODE_ID')}, want {args.node_id}")
    expect(env.get("FLOCKMQ_ADVERTISE_ADDR") == args.advertise,
           f"FLOCKMQ_ADVERTISE_ADDR={env.get('FLOCKMQ_ADVERTISE_ADDR')}, want {args.advertise}")
    if args.initial_cluster:
        expect(env.get("FLOCKMQ_INITIAL_CLUSTER") == args.initial_cluster, "FLOCKMQ_INITIAL_CLUSTER passed on")
        expect("FLOCKMQ_JOIN" not in env, "no FLOCKMQ_JOIN for an initial voter")
    if args.join:
        expect(env.get("FLOCKMQ_JOIN") == args.join, f"FLOCKMQ_JOIN={env.get('FLOCKMQ_JOIN')}, want {args.join}")
        expect("FLOCKMQ_INITIAL_CLUSTER" not in env, "FLOCKMQ_INITIAL_CLUSTER unset for a joining node")
    if args.single:
        expect("FLOCKMQ_INITIAL_CLUSTER" not in env and "FLOCKMQ_JOIN" not in env, "a single node neither lists nor joins")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("rendered")
    v.add_argument("versions", nargs="+")
    f = sub.add_parser("facts")
    f.add_argument("rendered")
    f.add_argument("--namespace", required=True)
    f.add_argument("--replicas", type=int, required=True)
    f.add_argument("--initial", type=int, required=True)
    f.add_argument("--service-type", default="ClusterIP")
    f.add_argument("--client-ports", nargs="+", default=["mqtt"])
    f.add_argument("--anti-affinity", default="soft")
    f.add_argument("--storage", default="8Gi")
    f.add_argument("--storage-class")
    f.add_argument("--monitoring", nargs="*", default=[], help="ServiceMonitor, PodMonitor, PrometheusRule rendered")
    f.add_argument("--cluster-tls", help="the Secret of the cluster's mutual TLS; absent: insecure")
    f.add_argument("--no-test-pod", action="store_true")
    f.add_argument("--admin-tls", action="store_true", help="the HTTP port is HTTPS (admin.tls.enabled)")
    f.add_argument("--admin-tls-insecure", action="store_true", help="scrapes skip verification")
    f.add_argument("--existing", nargs="*", default=[], help="Secrets the user provides")
    f.add_argument("--env", nargs="*", default=[])
    f.add_argument("--no-env", nargs="*", default=[])
    f.add_argument("--env-value", nargs="*", default=[])
    f.add_argument("--config", nargs="*", default=[])
    f.add_argument("--secret-keys", nargs="*", default=[], help="NAME=key1,key2 (NAME= for none)")
    pd = sub.add_parser("pod")
    pd.add_argument("rendered")
    pd.add_argument("ordinal", type=int)
    pd.add_argument("out")
    tp = sub.add_parser("test-pod")
    tp.add_argument("rendered")
    tp.add_argument("out")
    w = sub.add_parser("wrapper-env")
    w.add_argument("output")
    w.add_argument("--node-id", required=True)
    w.add_argument("--advertise", required=True)
    w.add_argument("--initial-cluster")
    w.add_argument("--join")
    w.add_argument("--single", action="store_true")
    args = p.parse_args()
    {"validate": cmd_validate, "facts": cmd_facts, "pod": cmd_pod, "test-pod": cmd_test_pod,
     "wrapper-env": cmd_wrapper_env}[args.cmd](args)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
