{{/* Names and labels. */}}
{{- define "elasticserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "elasticserve.fullname" -}}
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

{{- define "elasticserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "elasticserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "elasticserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "elasticserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end -}}

{{- define "elasticserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "elasticserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image: the CUDA one when gpu.enabled. */}}
{{- define "elasticserve.image" -}}
{{- $repo := .Values.image.repository -}}
{{- $tag := .Values.image.tag -}}
{{- if .Values.gpu.enabled -}}
{{- $repo = default $repo .Values.gpu.image.repository -}}
{{- $tag = .Values.gpu.image.tag -}}
{{- end -}}
{{- printf "%s:%s" (required "image.repository is required" $repo) (toString (default .Chart.AppVersion $tag)) -}}
{{- end -}}

{{/*
The server options a user may set in .Values.server, by flag name. It must list exactly
the flags of config/config.go that the chart does not set itself; deploy/helm/chartcheck
fails when a config option is missing here or a name here is not one.
*/}}
{{- define "elasticserve.serverOptions" -}}
ctx-size kv-unified prefill-ctx-size prefill-streams decode-flash-attn kv-type parallel threads batch-size ubatch-size flash-attn
model-alias chat-template cors-origins policy budget sink distance selection
max-image-bytes max-images max-image-pixels allow-image-urls allow-private-image-urls image-url-timeout
max-body-bytes queue-size cache-reuse cache-reuse-compressed cache-ram-mb cache-dir cache-dir-mb image-cache-mb request-timeout log-level log-format n-predict ui
{{- end -}}

{{/* The options the chart sets from its own values, and which value sets each. */}}
{{- define "elasticserve.managedOptions" -}}
model: model.file
mmproj: model.mmproj
addr: containerPort
api-key: apiKey
gpu-layers: gpu.layers
shutdown-grace: shutdownGraceSeconds
{{- end -}}

{{/* ELASTICSERVE_<FLAG> for a flag name. */}}
{{- define "elasticserve.envName" -}}
{{- printf "ELASTICSERVE_%s" (. | upper | replace "-" "_") -}}
{{- end -}}

{{/*
A value as the server parses it. YAML numbers reach templates as float64, so a whole
number is printed as an integer (16777216, not 1.6777216e+07).
*/}}
{{- define "elasticserve.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* Whether the pod gets an API key, and from which Secret. */}}
{{- define "elasticserve.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else if or .Values.apiKey.value .Values.apiKey.generate -}}
{{- printf "%s-api-key" (include "elasticserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The claim holding the model files (source=pvc). */}}
{{- define "elasticserve.modelClaim" -}}
{{- default (printf "%s-models" (include "elasticserve.fullname" .)) .Values.model.persistence.existingClaim -}}
{{- end -}}

{{/* Seconds: preStop sleep + the server's drain grace + margin. */}}
{{- define "elasticserve.terminationGrace" -}}
{{- $grace := int .Values.shutdownGraceSeconds -}}
{{- $margin := int .Values.terminationMarginSeconds -}}
{{- if lt $grace 0 -}}{{- fail "shutdownGraceSeconds must be >= 0" -}}{{- end -}}
{{- if lt $margin 6 -}}{{- fail "terminationMarginSeconds must be >= 6: the server takes up to 5 s after its grace to send the final errors" -}}{{- end -}}
{{- add (int .Values.preStopSleepSeconds) $grace $margin -}}
{{- end -}}

{{/* Checks of combinations that templates cannot express otherwise. */}}
{{- define "elasticserve.validate" -}}
{{- $known := splitList " " (include "elasticserve.serverOptions" . | replace "\n" " ") -}}
{{- $managed := include "elasticserve.managedOptions" . | fromYaml -}}
{{- range $k, $v := .Values.server -}}
{{- if hasKey $managed $k -}}
{{- fail (printf "server.%s: set by the chart; use %s instead" $k (get $managed $k)) -}}
{{- else if not (has $k $known) -}}
{{- fail (printf "server.%s: not an elasticserve option (known: %s)" $k (join ", " $known)) -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.model.source (list "pvc" "volume" "image")) -}}
{{- fail (printf "model.source must be pvc, volume or image, got %q" .Values.model.source) -}}
{{- end -}}
{{- if and (eq .Values.model.source "volume") (not .Values.model.volume) -}}
{{- fail "model.source=volume needs model.volume (a volume source such as nfs: {...})" -}}
{{- end -}}
{{- if and (eq .Values.model.source "image") .Values.gpu.enabled -}}
{{- fail "model.source=image: only the CPU image bundles a model; use pvc or volume with gpu.enabled" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (include "elasticserve.pdbHas" (list . "minAvailable")) (include "elasticserve.pdbHas" (list . "maxUnavailable")) -}}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable (the other to null)" -}}
{{- end -}}
{{- if .Values.autoscaling.enabled -}}
{{- if not (has .Values.autoscaling.mode (list "hpa" "keda")) -}}
{{- fail (printf "autoscaling.mode must be hpa or keda, got %q" .Values.autoscaling.mode) -}}
{{- end -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) -}}
{{- fail "autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when podDisruptionBudget.<key> is set (not absent, not null). */}}
{{- define "elasticserve.pdbHas" -}}
{{- $pdb := (index . 0).Values.podDisruptionBudget -}}
{{- if and (hasKey $pdb (index . 1)) (not (kindIs "invalid" (get $pdb (index . 1)))) -}}true{{- end -}}
{{- end -}}
