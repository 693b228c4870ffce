{{/* Chart name. */}}
{{- define "deputy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "deputy.fullname" -}}
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

{{/* chart label value. */}}
{{- define "deputy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of the operator pods (immutable: never add to these). */}}
{{- define "deputy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deputy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/*
Common labels. Call with (dict "ctx" $ "component" "controller").
*/}}
{{- define "deputy.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "deputy.chart" $ctx }}
app.kubernetes.io/name: {{ include "deputy.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: deputy
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "deputy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deputy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Kubernetes username of the operator's ServiceAccount. */}}
{{- define "deputy.controllerUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "deputy.serviceAccountName" .) -}}
{{- end -}}

{{/* Service DNS name inside the cluster (no cluster domain). */}}
{{- define "deputy.serviceHost" -}}
{{- printf "%s.%s.svc" (include "deputy.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The token issuer URL. */}}
{{- define "deputy.issuer" -}}
{{- if .Values.config.issuer -}}
{{- .Values.config.issuer | trimSuffix "/" -}}
{{- else -}}
{{- printf "%s://%s" (ternary "https" "http" .Values.tls.enabled) (include "deputy.serviceHost" .) -}}
{{- end -}}
{{- end -}}

{{/* The signing-key Secret Deputy reads (and rotates). */}}
{{- define "deputy.keysSecretName" -}}
{{- default .Values.signingKeys.secretName .Values.signingKeys.existingSecret -}}
{{- end -}}

{{/* The TLS Secret mounted into the pods. */}}
{{- define "deputy.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "deputy.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Name of the token port: https with TLS, http without. */}}
{{- define "deputy.tokenPortName" -}}
{{- ternary "https" "http" .Values.tls.enabled -}}
{{- end -}}

{{/* The image reference. */}}
{{- define "deputy.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Checks of combinations that values.schema.json cannot express. Renders nothing. */}}
{{- define "deputy.validate" -}}
{{- if .Values.tls.enabled -}}
{{- if and .Values.tls.certManager.enabled .Values.tls.existingSecret -}}
{{- fail "tls: set either tls.certManager.enabled or tls.existingSecret, not both" -}}
{{- end -}}
{{- if not (or .Values.tls.certManager.enabled .Values.tls.existingSecret) -}}
{{- fail "tls.enabled is true but there is no certificate source: set tls.certManager.enabled=true (cert-manager issues it) or tls.existingSecret=<kubernetes.io/tls Secret>, or tls.enabled=false" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.config.issuer (not (regexMatch "^https?://[^/?#]+(/[^?#]*)?$" .Values.config.issuer)) -}}
{{- fail (printf "config.issuer must be an http(s) URL without query or fragment, got %q" .Values.config.issuer) -}}
{{- end -}}
{{- if and .Values.tls.enabled .Values.config.issuer (hasPrefix "http://" .Values.config.issuer) -}}
{{- fail "config.issuer uses http:// while tls.enabled is true: use https://" -}}
{{- end -}}
{{- end -}}
