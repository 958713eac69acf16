{{/*
Names, labels and small shared pieces of the detseg chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "detseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The fully qualified app name: fullnameOverride, else <release>-<name> (just <release> when it contains the name). */}}
{{- define "detseg.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Triton's objects: <fullname>-triton (kept within 63 characters). */}}
{{- define "detseg.triton.fullname" -}}
{{- printf "%s-triton" (include "detseg.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{- define "detseg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels (app.kubernetes.io/*) on every object; call with (dict "ctx" $ "component" "frontend"). */}}
{{- define "detseg.labels" -}}
helm.sh/chart: {{ include "detseg.chart" .ctx }}
{{ include "detseg.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: detseg
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels a selector matches: name, instance and component. */}}
{{- define "detseg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "detseg.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
metadata.annotations: commonAnnotations merged with the object's own; nothing when both are empty. Call at the
metadata's indentation with (dict "ctx" $ "annotations" {...}): `  {{- include "detseg.annotations" ... }}`.
*/}}
{{- define "detseg.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .annotations)) (deepCopy (default (dict) .ctx.Values.commonAnnotations)) -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "detseg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "detseg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; call with (dict "image" .Values.image "default" .Chart.AppVersion). */}}
{{- define "detseg.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* Triton's gRPC endpoint as the front end reaches it. */}}
{{- define "detseg.tritonUrl" -}}
{{- if .Values.triton.enabled -}}
{{- printf "%s:%d" (include "detseg.triton.fullname" .) (int .Values.triton.ports.grpc) -}}
{{- else -}}
{{- .Values.externalTriton.url -}}
{{- end -}}
{{- end -}}

{{/*
What `detseg export` reads (the Triton pod's init container): its checksum re-exports when one of them changes,
and only then (a front-end setting such as log_level leaves the GPU pods alone).
*/}}
{{- define "detseg.exportInputs" -}}
{{- $config := pick .Values.config "models" "adapted" "detector" "segmenter" "detector_imgsz" "text_encoder" "offline" "threads" "triton_max_batch_size" "triton_max_queue_delay_us" "triton_max_queue_size" "triton_instances" -}}
{{- toYaml (dict "config" $config "image" .Values.image "modelRepository" .Values.triton.modelRepository) -}}
{{- end -}}

{{/* Where secrets and writable folders are mounted in the front-end container. */}}
{{- define "detseg.paths" -}}
cache: /var/cache/detseg
tmp: /tmp
tls: /etc/detseg/tls
auth: /etc/detseg/auth
signing: /etc/detseg/signing
{{- end -}}

{{/* True when the chart must create its own Secret (some secret material is given inline). */}}
{{- define "detseg.ownSecret" -}}
{{- $v := .Values -}}
{{- if or (and $v.tls.enabled (not $v.tls.existingSecret)) (and $v.auth.enabled (not $v.auth.existingSecret)) (and $v.signing.enabled (not $v.signing.existingSecret)) (and $v.redis.url (not $v.redis.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{/* True when the front end uses the shared Redis tier (its URL inline or in an existing Secret). */}}
{{- define "detseg.redis.enabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret -}}
true
{{- end -}}
{{- end -}}

{{- define "detseg.redis.secretName" -}}
{{- default (include "detseg.fullname" .) .Values.redis.existingSecret -}}
{{- end -}}

{{- define "detseg.redis.secretKey" -}}
{{- ternary .Values.redis.existingSecretKey "redis-url" (ne .Values.redis.existingSecret "") -}}
{{- end -}}

{{/*
The port of a URL (scheme://[user[:password]@]host:port/...) or of host:port; .default when it names none.
Call with (dict "url" "redis://:pw@redis:6380/0" "default" 6379).
*/}}
{{- define "detseg.urlPort" -}}
{{- $hostPort := regexReplaceAll "^[A-Za-z][A-Za-z0-9+.-]*://([^/]*@)?([^/?#]*).*$" .url "${2}" -}}
{{- if regexMatch ":[0-9]+$" $hostPort -}}
{{- regexFind "[0-9]+$" $hostPort -}}
{{- else -}}
{{- .default -}}
{{- end -}}
{{- end -}}

{{/*
The front end's terminationGracePeriodSeconds: the preStop sleep, the drain (config.grace_seconds) and a margin for
the process to exit, rounded up; derived so that the kubelet never kills a pod mid-drain.
*/}}
{{- define "detseg.terminationGracePeriodSeconds" -}}
{{- $v := .Values -}}
{{- addf (int $v.preStopSleepSeconds) (float64 $v.config.grace_seconds) (int $v.shutdownMarginSeconds) | ceil | int -}}
{{- end -}}

{{- define "detseg.tls.secretName" -}}
{{- default (include "detseg.fullname" .) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "detseg.auth.secretName" -}}
{{- default (include "detseg.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "detseg.signing.secretName" -}}
{{- default (include "detseg.fullname" .) .Values.signing.existingSecret -}}
{{- end -}}

{{/*
A value as an environment string: YAML numbers reach templates as float64, so whole numbers are printed as
integers (536870912, not 5.36870912e+08).
*/}}
{{- define "detseg.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq (float64 (int64 .)) . -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* A native gRPC probe on the front end; call with (dict "probe" .Values.readinessProbe "port" <int>). */}}
{{- define "detseg.grpcProbe" -}}
grpc:
  port: {{ .port }}
  {{- with .probe.service }}
  service: {{ . | quote }}
  {{- end }}
{{- with .probe.initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
successThreshold: {{ default 1 .probe.successThreshold }}
{{- end -}}

{{/* An HTTP probe on Triton; call with (dict "probe" .Values.triton.readinessProbe "path" "/v2/health/ready"). */}}
{{- define "detseg.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
{{- with .probe.initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
successThreshold: {{ default 1 .probe.successThreshold }}
{{- end -}}

{{/*
Checks the schema cannot express, each failing with a message that names the value to set.
*/}}
{{- define "detseg.validate" -}}
{{- $v := .Values -}}
{{- if and (eq $v.backend "triton") (not $v.triton.enabled) (not $v.externalTriton.url) -}}
{{- fail "externalTriton.url: backend is triton and triton.enabled is false; give the Triton gRPC endpoint (host:port) or set triton.enabled=true" -}}
{{- end -}}
{{- if and $v.triton.enabled (ne $v.backend "triton") -}}
{{- fail (printf "triton.enabled: the Triton Deployment serves backend triton, but backend is %s; set triton.enabled=false" $v.backend) -}}
{{- end -}}
{{- if and $v.tls.enabled (eq (int $v.healthPort) 0) -}}
{{- fail "healthPort: tls.enabled needs a plaintext health port for the probes (Kubernetes' grpc probes cannot speak TLS); set healthPort, e.g. 50052" -}}
{{- end -}}
{{- if and (ne (int $v.healthPort) 0) (eq (int $v.healthPort) (int $v.containerPort)) -}}
{{- fail "healthPort: must differ from containerPort (or be 0)" -}}
{{- end -}}
{{- if and (eq (toString $v.config.metrics_exporter) "prometheus") (has (int $v.metricsPort) (list (int $v.containerPort) (int $v.healthPort))) -}}
{{- fail "metricsPort: must differ from containerPort and healthPort" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) (or (not $v.tls.cert) (not $v.tls.key)) -}}
{{- fail "tls.cert and tls.key: tls.enabled needs both (PEM), or tls.existingSecret naming a Secret with tls.crt and tls.key" -}}
{{- end -}}
{{- if and $v.tls.mutual (not $v.tls.enabled) -}}
{{- fail "tls.mutual: needs tls.enabled=true" -}}
{{- end -}}
{{- if and $v.tls.mutual (not $v.tls.existingSecret) (not $v.tls.clientCA) -}}
{{- fail "tls.clientCA: tls.mutual needs the CA (PEM) that signs client certificates, or tls.existingSecret with ca.crt" -}}
{{- end -}}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.tokens) -}}
{{- fail "auth.tokens: auth.enabled needs at least one token, or auth.existingSecret" -}}
{{- end -}}
{{- if and $v.signing.enabled (not $v.signing.existingSecret) (not $v.signing.key) -}}
{{- fail "signing.key: signing.enabled needs an Ed25519 private key (PEM, detseg keygen), or signing.existingSecret" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas: must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and $v.pdb.enabled (ne (toString $v.pdb.minAvailable) "") (ne (toString $v.pdb.maxUnavailable) "") -}}
{{- fail "pdb.minAvailable and pdb.maxUnavailable: set only one (the other to \"\")" -}}
{{- end -}}
{{- if and $v.pdb.enabled (eq (toString $v.pdb.minAvailable) "") (eq (toString $v.pdb.maxUnavailable) "") -}}
{{- fail "pdb.minAvailable or pdb.maxUnavailable: pdb.enabled needs one of them (a number or a percentage), or set pdb.enabled=false" -}}
{{- end -}}
{{- if and $v.redis.url $v.redis.existingSecret -}}
{{- fail "redis.url: give the URL inline or in redis.existingSecret, not both" -}}
{{- end -}}
{{- if and $v.triton.enabled $v.triton.modelRepository.export.enabled $v.triton.modelRepository.existingClaim (gt (int $v.triton.replicaCount) 1) -}}
{{- fail "triton.replicaCount: with triton.modelRepository.existingClaim and export.enabled every Triton pod would export into the same claim at once; export once (replicaCount 1, or export.enabled=false on a filled claim), or drop existingClaim (an emptyDir per pod)" -}}
{{- end -}}
{{- if and $v.triton.enabled (not $v.triton.modelRepository.export.enabled) (not $v.triton.modelRepository.existingClaim) -}}
{{- fail "triton.modelRepository.existingClaim: with triton.modelRepository.export.enabled=false Triton needs a PVC holding the repository" -}}
{{- end -}}
{{- end -}}
