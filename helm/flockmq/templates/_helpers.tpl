{{/* Names, labels and the cluster wiring shared by the templates. */}}

{{- define "flockmq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name, also the StatefulSet's: pods are <fullname>-<ordinal>. Kept to 52
characters so that pod names with the controller's hash label stay within limits.
*/}}
{{- define "flockmq.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flockmq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flockmq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flockmq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flockmq.labels" -}}
helm.sh/chart: {{ include "flockmq.chart" . }}
{{ include "flockmq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The headless Service: one DNS name per pod, ready or not. */}}
{{- define "flockmq.headless" -}}
{{- printf "%s-headless" (include "flockmq.fullname" .) }}
{{- end }}

{{- define "flockmq.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
How many nodes the cluster was first formed with: cluster.initialSize when set,
else what the running StatefulSet recorded at its first install, else replicaCount.
Pods below it are the voters of FLOCKMQ_INITIAL_CLUSTER; pods at or above it join.
*/}}
{{- define "flockmq.initialSize" -}}
{{- $size := int .Values.cluster.initialSize }}
{{- if le $size 0 }}
{{- $sts := lookup "apps/v1" "StatefulSet" .Release.Namespace (include "flockmq.fullname" .) }}
{{- $recorded := "" }}
{{- if $sts }}
{{- $recorded = index (default (dict) $sts.metadata.annotations) "flockmq.io/initial-size" | default "" }}
{{- end }}
{{- $size = int (default .Values.replicaCount $recorded) }}
{{- end }}
{{- if gt $size (int .Values.replicaCount) }}
{{- fail (printf "cluster.initialSize (%d) is larger than replicaCount (%d): the initial voters could never reach a majority" $size (int .Values.replicaCount)) }}
{{- end }}
{{- $size }}
{{- end }}

{{/* The DNS name of pod `ordinal`: .ctx is the root context. */}}
{{- define "flockmq.podHost" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "flockmq.fullname" .ctx) (int .ordinal) (include "flockmq.headless" .ctx) .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* FLOCKMQ_INITIAL_CLUSTER: `id=host:port` for the initial voters (node id = ordinal + 1). */}}
{{- define "flockmq.initialCluster" -}}
{{- $members := list }}
{{- range $i := until (int (include "flockmq.initialSize" .)) }}
{{- $members = append $members (printf "%d=%s:%d" (add $i 1) (include "flockmq.podHost" (dict "ctx" $ "ordinal" $i)) (int $.Values.cluster.port)) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* A setting's value as a string for an environment variable (integers stay integers). */}}
{{- define "flockmq.envValue" -}}
{{- if kindIs "float64" . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The TLS Secret: the user's or the chart's. */}}
{{- define "flockmq.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "flockmq.fullname" .)) }}
{{- end }}

{{/* The cluster TLS Secret (tls.crt, tls.key, ca.crt): the user's, or the one
cert-manager or the chart writes. */}}
{{- define "flockmq.clusterTlsSecret" -}}
{{- .Values.cluster.tls.existingSecret | default (printf "%s-cluster-tls" (include "flockmq.fullname" .)) }}
{{- end }}

{{/* The names a node certificate holds: every pod behind the headless Service. */}}
{{- define "flockmq.clusterDnsNames" -}}
{{- $h := include "flockmq.headless" . }}
{{- list (printf "*.%s.%s.svc.%s" $h .Release.Namespace .Values.clusterDomain) (printf "*.%s.%s.svc" $h .Release.Namespace) (printf "*.%s" $h) | toJson }}
{{- end }}

{{/* A cert-manager Certificate: .ctx the root context, .name, .secretName, .dnsNames,
.usages and .spec (the values' certManager block). */}}
{{- define "flockmq.certificate" -}}
{{- if not .spec.issuerRef.name }}
{{- fail (printf "%s: certManager.issuerRef.name is empty: name the Issuer or ClusterIssuer that signs it" .name) }}
{{- end }}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ .name }}
  labels:
    {{- include "flockmq.labels" .ctx | nindent 4 }}
spec:
  secretName: {{ .secretName }}
  dnsNames:
    {{- toYaml .dnsNames | nindent 4 }}
  usages:
    {{- toYaml .usages | nindent 4 }}
  duration: {{ .spec.duration }}
  renewBefore: {{ .spec.renewBefore }}
  privateKey:
    algorithm: ECDSA
    size: 256
    rotationPolicy: Always
  issuerRef:
    {{- toYaml .spec.issuerRef | nindent 4 }}
{{- end }}

{{- define "flockmq.tlsNeeded" -}}
{{- if or .Values.listeners.tls.enabled .Values.listeners.wss.enabled .Values.admin.tls.enabled }}true{{ end }}
{{- end }}

{{/* How Prometheus scrapes the HTTP port: the endpoint fields of a ServiceMonitor or
PodMonitor (scheme, and with admin.tls the CA of the listeners' Secret). */}}
{{- define "flockmq.scrapeTls" -}}
{{- if .Values.admin.tls.enabled }}
scheme: https
tlsConfig:
  {{- if .Values.admin.tls.insecureSkipVerify }}
  insecureSkipVerify: true
  {{- else }}
  ca:
    secret:
      name: {{ include "flockmq.tlsSecret" . }}
      key: ca.crt
  serverName: {{ .Values.admin.tls.serverName | default (printf "%s.%s.svc" (include "flockmq.fullname" .) .Release.Namespace) }}
  {{- end }}
{{- else }}
scheme: http
{{- end }}
{{- end }}

{{/* The Secret with the password file, ACL file and API token: the user's or the chart's. */}}
{{- define "flockmq.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "flockmq.fullname" .)) }}
{{- end }}

{{/* Key of the password file in the auth Secret, "" when there is none. */}}
{{- define "flockmq.passwdKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.passwordFile }}{{ else if .Values.auth.passwordFile }}passwd{{ end }}
{{- end }}

{{- define "flockmq.aclKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.aclFile }}{{ else if .Values.auth.aclFile }}acl{{ end }}
{{- end }}

{{- define "flockmq.apiTokenKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.apiToken }}{{ else if .Values.auth.apiToken }}api-token{{ end }}
{{- end }}

{{/* Whether the chart makes the auth Secret (the user gave file contents, no Secret). */}}
{{- define "flockmq.authSecretMade" -}}
{{- if and (not .Values.auth.existingSecret) (or .Values.auth.passwordFile .Values.auth.aclFile .Values.auth.apiToken) }}true{{ end }}
{{- end }}

{{/*
The plain-text users as a dict username -> password: auth.users, or, when clients
must authenticate and nothing else gives credentials, the default user with a
random password that an upgrade keeps (read back from the existing Secret).
*/}}
{{- define "flockmq.users" -}}
{{- $users := dict }}
{{- range .Values.auth.users }}
{{- if not (regexMatch "^[A-Za-z0-9._-]+$" (toString .username)) }}
{{- fail (printf "auth.users: username %q may only hold letters, digits, '.', '_' and '-'" (toString .username)) }}
{{- end }}
{{- if not .password }}
{{- fail (printf "auth.users: user %q has no password" .username) }}
{{- end }}
{{- $_ := set $users (toString .username) (toString .password) }}
{{- end }}
{{- if and (not .Values.auth.allowAnonymous) (not $users) (not (include "flockmq.passwdKey" .)) }}
{{- /* An install by an earlier chart version made a user with a random password:
       an upgrade keeps it. Nothing is ever made up here. */}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-users" (include "flockmq.fullname" .)) }}
{{- if and $existing $existing.data }}
{{- range $name, $password := $existing.data }}
{{- $_ := set $users $name (b64dec $password) }}
{{- end }}
{{- else }}
{{- fail "MQTT clients must authenticate (auth.allowAnonymous=false) and no credentials are given: set auth.users (e.g. --set 'auth.users[0].username=flockmq' --set 'auth.users[0].password=...'), auth.passwordFile, or auth.existingSecret with a password file; or auth.allowAnonymous=true" }}
{{- end }}
{{- end }}
{{- toJson $users }}
{{- end }}

{{/* Whether the node reads a password file (made by the init container). */}}
{{- define "flockmq.passwordFileUsed" -}}
{{- if or (include "flockmq.passwdKey" .) (ne (include "flockmq.users" .) "{}") }}true{{ end }}
{{- end }}

{{/* Settings the chart owns: refused in .Values.config. */}}
{{- define "flockmq.reservedKeys" -}}
node_id data_dir mqtt_addr tls_addr ws_addr wss_addr http_addr http_tls cluster_addr advertise_addr initial_cluster join api_token tls_cert_file tls_key_file tls_ca_file tls_require_client_cert mqtt.allow_anonymous mqtt.password_file mqtt.acl_file cluster.tls_cert_file cluster.tls_key_file cluster.tls_ca_file cluster.tls_server_name cluster.allow_insecure cluster.autoclean_after
{{- end }}

{{/* .Values.config as FLOCKMQ_ variables (section keys joined with a double underscore). */}}
{{- define "flockmq.configEnv" -}}
{{- $reserved := splitList " " (include "flockmq.reservedKeys" .) }}
{{- $env := dict }}
{{- range $key, $value := .Values.config }}
{{- if kindIs "map" $value }}
{{- range $sub, $v := $value }}
{{- $dotted := printf "%s.%s" $key $sub }}
{{- if has $dotted $reserved }}
{{- fail (printf "config.%s is set by the chart; use the chart's own values (see values.yaml)" $dotted) }}
{{- end }}
{{- $_ := set $env (printf "FLOCKMQ_%s__%s" (upper $key) (upper $sub)) (include "flockmq.envValue" $v) }}
{{- end }}
{{- else }}
{{- if has $key $reserved }}
{{- fail (printf "config.%s is set by the chart; use the chart's own values (see values.yaml)" $key) }}
{{- end }}
{{- $_ := set $env (printf "FLOCKMQ_%s" (upper $key)) (include "flockmq.envValue" $value) }}
{{- end }}
{{- end }}
{{- toYaml $env }}
{{- end }}
