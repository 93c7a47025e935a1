{{/*
Names, labels and the choices every template shares.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "eventhub-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of every resource: fullnameOverride, else <release>-<chart> (the release alone when it contains the chart name). */}}
{{- define "eventhub-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "eventhub-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "eventhub-gateway.labels" -}}
helm.sh/chart: {{ include "eventhub-gateway.chart" . }}
{{ include "eventhub-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eventhub-gateway
{{- end }}

{{/* Labels that select the gateway's pods (never change them: Deployment selectors are immutable). */}}
{{- define "eventhub-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eventhub-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The label of pods allowed to call the gateway through its NetworkPolicy (the helm test pod has it). */}}
{{- define "eventhub-gateway.clientLabel" -}}
{{ include "eventhub-gateway.fullname" . }}-client: "true"
{{- end }}

{{- define "eventhub-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "eventhub-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest. */}}
{{- define "eventhub-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret of the connection string: the existing one, or the chart's own; empty when there is none. */}}
{{- define "eventhub-gateway.connectionStringSecret" -}}
{{- $cs := .Values.eventHubs.connectionString }}
{{- if $cs.existingSecret }}
{{- $cs.existingSecret }}
{{- else if $cs.value }}
{{- printf "%s-connection-string" (include "eventhub-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Where Event Hubs is: "namespace", "connection-string" or "emulator" (nothing configured). */}}
{{- define "eventhub-gateway.mode" -}}
{{- if .Values.eventHubs.namespace }}namespace
{{- else if include "eventhub-gateway.connectionStringSecret" . }}connection-string
{{- else }}emulator
{{- end }}
{{- end }}

{{/* The file the gateway reads with --config (the ConfigMap's key). */}}
{{- define "eventhub-gateway.configFile" -}}
/etc/eventhub-gateway/gateway.yaml
{{- end }}

{{/*
The gateway's config file, from the values: every key is one `serve --config` accepts. The connection string
itself never appears here: only the path of the mounted Secret, or nothing (the env form).
*/}}
{{- define "eventhub-gateway.configYaml" -}}
{{- $mode := include "eventhub-gateway.mode" . }}
{{- $cs := .Values.eventHubs.connectionString }}
{{- $config := dict
  "listen" (printf "0.0.0.0:%d" (int .Values.service.grpcPort))
  "metrics_listen" (printf "0.0.0.0:%d" (int .Values.service.metricsPort))
  "event_hubs" .Values.eventHubs.hubs
  "websockets" .Values.eventHubs.websockets
  "drain_timeout_seconds" .Values.config.drain_timeout_seconds }}
{{- if .Values.rest.enabled }}
{{- $_ := set $config "http_listen" (printf "0.0.0.0:%d" (int .Values.service.httpPort)) }}
{{- end }}
{{- if eq $mode "emulator" }}
{{- $_ := set $config "emulator" true }}
{{- $_ := set $config "emulator_partitions" (int .Values.emulator.partitions) }}
{{- else if eq $mode "namespace" }}
{{- $_ := set $config "namespace" .Values.eventHubs.namespace }}
{{- $_ := set $config "credential" .Values.eventHubs.credential }}
{{- else if eq $cs.mountAs "file" }}
{{- $_ := set $config "connection_string_file" (printf "%s/%s" (trimSuffix "/" $cs.mountPath) $cs.key) }}
{{- end }}
{{- with .Values.tls.secretName }}
{{- $dir := trimSuffix "/" $.Values.tls.mountPath }}
{{- $tls := dict "cert" (printf "%s/tls.crt" $dir) "key" (printf "%s/tls.key" $dir) }}
{{- if $.Values.tls.clientAuth }}
{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- end }}
{{- $_ := set $config "auth" (include "eventhub-gateway.authConfig" . | fromYaml) }}
{{- with .Values.schemas }}
{{- $files := dict }}
{{- $i := 0 }}
{{- range $hub, $schema := . }}
{{- $_ := set $files $hub (printf "%s/%d/%s" (include "eventhub-gateway.schemasDir" $) $i ($schema.configMap.key | default "schema.json")) }}
{{- $i = add1 $i }}
{{- end }}
{{- $_ := set $config "schemas" $files }}
{{- end }}
{{- range $section := list "limits" "producer" }}
{{- $settings := dict }}
{{- range $key, $value := index $.Values.config $section }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $settings $key $value }}
{{- end }}
{{- end }}
{{- $_ := set $config $section $settings }}
{{- end }}
{{- with .Values.config.grpc_web }}
{{- $_ := set $config "grpc_web" . }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Where the ConfigMap of the i-th hub of `schemas` (by name) is mounted: <this>/<i>/<key>. */}}
{{- define "eventhub-gateway.schemasDir" -}}
/var/run/eventhub-gateway/schemas
{{- end }}

{{/* Where the ConfigMap of `auth.jwt[i].jwksConfigMap` is mounted: <this>/<i>/<key>. */}}
{{- define "eventhub-gateway.jwksDir" -}}
/var/run/eventhub-gateway/jwks
{{- end }}

{{/* The service-account files the pod gets when it mounts its token (auth.kubernetes). */}}
{{- define "eventhub-gateway.serviceAccountDir" -}}
/var/run/secrets/kubernetes.io/serviceaccount
{{- end }}

{{/*
The gateway's `auth` section, as YAML: `required`, the `jwt` issuers (the cluster's first, with
auth.kubernetes; a jwksConfigMap becomes the jwks_file it is mounted as), `api_keys` and `grants` as they are.
*/}}
{{- define "eventhub-gateway.authConfig" -}}
{{- $auth := .Values.auth }}
{{- $issuers := list }}
{{- if $auth.kubernetes.enabled }}
{{- $sa := include "eventhub-gateway.serviceAccountDir" . }}
{{- $issuers = append $issuers (dict
  "issuer" $auth.kubernetes.issuer
  "audiences" $auth.kubernetes.audiences
  "jwks_url" "https://kubernetes.default.svc/openid/v1/jwks"
  "ca_file" (printf "%s/ca.crt" $sa)
  "bearer_token_file" (printf "%s/token" $sa)
  "identity_claim" "sub"
  "leeway_seconds" $auth.kubernetes.leewaySeconds) }}
{{- end }}
{{- range $i, $jwt := $auth.jwt }}
{{- $issuer := omit $jwt "jwksConfigMap" }}
{{- with $jwt.jwksConfigMap }}
{{- $_ := set $issuer "jwks_file" (printf "%s/%d/%s" (include "eventhub-gateway.jwksDir" $) $i (.key | default "jwks.json")) }}
{{- end }}
{{- $issuers = append $issuers $issuer }}
{{- end }}
{{- $out := dict "required" $auth.required }}
{{- with $issuers }}
{{- $_ := set $out "jwt" . }}
{{- end }}
{{- with $auth.api_keys }}
{{- $_ := set $out "api_keys" . }}
{{- end }}
{{- with $auth.sas_keys }}
{{- $keys := list }}
{{- range $i, $key := . }}
{{- $keys = append $keys (dict "name" $key.name "identity" $key.identity "key_env" (printf "SAS_KEY_%d" $i)) }}
{{- end }}
{{- $_ := set $out "sas_keys" $keys }}
{{- end }}
{{- with $auth.grants }}
{{- $grants := list }}
{{- range . }}
{{- $grant := omit . "events_per_second" }}
{{- if not (kindIs "invalid" .events_per_second) }}
{{- $_ := set $grant "events_per_second" (int .events_per_second) }}
{{- end }}
{{- $grants = append $grants $grant }}
{{- end }}
{{- $_ := set $out "grants" $grants }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Whether callers send bearer credentials (JWTs or API keys), which plain-text gRPC would expose. */}}
{{- define "eventhub-gateway.bearerAuth" -}}
{{- if or .Values.auth.kubernetes.enabled .Values.auth.jwt .Values.auth.api_keys .Values.auth.sas_keys }}true{{ end }}
{{- end }}

{{/* The TCP ports of the auth.jwt issuers' JWKS URLs (443 unless the URL names one), one per line. */}}
{{- define "eventhub-gateway.jwksPorts" -}}
{{- $ports := list }}
{{- range .Values.auth.jwt }}
{{- with .jwks_url }}
{{- $host := (urlParse .).host }}
{{- $port := 443 }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- $port = regexFind "[0-9]+$" $host | atoi }}
{{- end }}
{{- $ports = append $ports $port }}
{{- end }}
{{- end }}
{{- range $ports | uniq }}
{{ . }}
{{- end }}
{{- end }}

{{/* Refuses combinations the schema cannot express, naming the values at fault. */}}
{{- define "eventhub-gateway.validate" -}}
{{- $v := .Values }}
{{- $cs := $v.eventHubs.connectionString }}
{{- if and $cs.existingSecret $cs.value }}
{{- fail "eventHubs.connectionString: set existingSecret or value, not both" }}
{{- end }}
{{- if and $v.eventHubs.namespace (or $cs.existingSecret $cs.value) }}
{{- fail "eventHubs: set namespace (Entra ID) or a connection string, not both" }}
{{- end }}
{{- if and $v.workloadIdentity.enabled (not $v.eventHubs.namespace) }}
{{- fail "workloadIdentity.enabled needs eventHubs.namespace (workload identity authenticates to a namespace)" }}
{{- end }}
{{- if and $v.workloadIdentity.enabled (not $v.serviceAccount.create) (not $v.serviceAccount.name) }}
{{- fail "workloadIdentity.enabled needs a ServiceAccount: serviceAccount.create, or serviceAccount.name of one federated with the identity" }}
{{- end }}
{{- if eq $v.eventHubs.credential "workload-identity" }}
{{- if not $v.workloadIdentity.enabled }}
{{- fail "eventHubs.credential workload-identity needs workloadIdentity.enabled" }}
{{- end }}
{{- end }}
{{- $budget := addf $v.config.drain_timeout_seconds $v.preStopPauseSeconds }}
{{- if le (float64 $v.terminationGracePeriodSeconds) (float64 $budget) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.drain_timeout_seconds + preStopPauseSeconds (%v), or pods are killed mid-drain" $v.terminationGracePeriodSeconds $budget) }}
{{- end }}
{{- $producer := $v.config.producer }}
{{- if gt (int $producer.min_size) (int $producer.max_size) }}
{{- fail "config.producer.min_size must not exceed config.producer.max_size" }}
{{- end }}
{{- if lt (float64 $producer.retry_max_backoff_ms) (float64 $producer.retry_initial_backoff_ms) }}
{{- fail "config.producer.retry_max_backoff_ms must be at least retry_initial_backoff_ms" }}
{{- end }}
{{- if lt (float64 $producer.reconnect_backoff_max_seconds) (float64 $producer.reconnect_backoff_initial_seconds) }}
{{- fail "config.producer.reconnect_backoff_max_seconds must be at least reconnect_backoff_initial_seconds" }}
{{- end }}
{{- if lt (float64 $v.config.limits.http2_connection_window_bytes) (mulf $v.config.limits.http2_stream_window_bytes 64) }}
{{- fail "config.limits.http2_connection_window_bytes must be at least 64 times http2_stream_window_bytes" }}
{{- end }}
{{- $limits := $v.config.limits }}
{{- if and (not (kindIs "invalid" $limits.max_connection_age_seconds)) (lt (float64 $limits.max_connection_age_grace_seconds) (float64 $producer.send_timeout)) }}
{{- fail (printf "config.limits.max_connection_age_grace_seconds (%v) must be at least config.producer.send_timeout (%v) when max_connection_age_seconds is set, so every event read before a connection's age is answered before it is closed" $limits.max_connection_age_grace_seconds $producer.send_timeout) }}
{{- end }}
{{- if and $v.tls.clientAuth (not $v.tls.secretName) }}
{{- fail "tls.clientAuth needs tls.secretName (the Secret's ca.crt is the client CA)" }}
{{- end }}
{{- $auth := $v.auth }}
{{- range $i, $jwt := $auth.jwt }}
{{- if eq (empty $jwt.jwks_url) (empty $jwt.jwksConfigMap) }}
{{- fail (printf "auth.jwt[%d] (%s): set jwks_url or jwksConfigMap, exactly one" $i $jwt.issuer) }}
{{- end }}
{{- end }}
{{- $grantNames := list }}
{{- range $i, $grant := $auth.grants }}
{{- if has $grant.name $grantNames }}
{{- fail (printf "auth.grants[%d]: the name %q is used twice (names label metrics)" $i $grant.name) }}
{{- end }}
{{- $grantNames = append $grantNames $grant.name }}
{{- range $grant.event_hubs }}
{{- if and (ne . "*") (not (has . $v.eventHubs.hubs)) }}
{{- fail (printf "auth.grants[%d] (%s): event hub %q is not in eventHubs.hubs" $i $grant.name .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $auth.required }}
{{- if not (or (include "eventhub-gateway.bearerAuth" .) $v.tls.clientAuth) }}
{{- fail "auth.required needs a way to authenticate: auth.kubernetes.enabled, auth.jwt, auth.api_keys, auth.sas_keys or tls.clientAuth" }}
{{- end }}
{{- if not $auth.grants }}
{{- fail "auth.required with no auth.grants lets no one publish: grant identities their hubs" }}
{{- end }}
{{- end }}
{{- if eq (int $v.service.grpcPort) (int $v.service.metricsPort) }}
{{- fail "service.grpcPort and service.metricsPort must differ" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (kindIs "invalid" $v.autoscaling.targetCPUUtilizationPercentage) (kindIs "invalid" $v.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.autoscaling.targetCPUUtilizationPercentage)) (not ($v.resources.requests | default dict).cpu) }}
{{- fail "autoscaling.targetCPUUtilizationPercentage needs resources.requests.cpu" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.autoscaling.targetMemoryUtilizationPercentage)) (not ($v.resources.requests | default dict).memory) }}
{{- fail "autoscaling.targetMemoryUtilizationPercentage needs resources.requests.memory" }}
{{- end }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
{{- $min := $v.podDisruptionBudget.minAvailable }}
{{- $max := $v.podDisruptionBudget.maxUnavailable }}
{{- if eq (kindIs "invalid" $min) (kindIs "invalid" $max) }}
{{- fail "podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (the other null)" }}
{{- end }}
{{- $replicas := ternary $v.autoscaling.minReplicas $v.replicaCount $v.autoscaling.enabled }}
{{- if and (not (kindIs "invalid" $min)) (not (kindIs "string" $min)) (ge (int $min) (int $replicas)) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) must be below the replicas (%v), or no node can ever be drained" $min $replicas) }}
{{- end }}
{{- end }}
{{- end }}
