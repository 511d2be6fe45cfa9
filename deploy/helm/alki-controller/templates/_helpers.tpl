{{/* The chart's name, or nameOverride. */}}
{{- define "alki-controller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: fullnameOverride, else the release name if it holds the chart's name, else both. */}}
{{- define "alki-controller.fullname" -}}
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

{{/* Labels that select the controller's pod; never change after install (the StatefulSet's selector). */}}
{{- define "alki-controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alki-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the volume claim template, which a StatefulSet cannot change either: no versions in it. */}}
{{- define "alki-controller.stableLabels" -}}
{{ include "alki-controller.selectorLabels" . }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: alki-fleet
{{- end }}

{{/* Every object's labels. */}}
{{- define "alki-controller.labels" -}}
{{ include "alki-controller.stableLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret mounted at /etc/alki/secret: the chart's own, an existing one, or none (""). */}}
{{- define "alki-controller.secretName" -}}
{{- if .Values.secret.create }}
{{- include "alki-controller.fullname" . }}
{{- else }}
{{- .Values.secret.name }}
{{- end }}
{{- end }}

{{/*
The names the server certificate is issued for (ALKI_TLS_NAMES): the public names devices use, the Service's
names inside the cluster, and localhost for kubectl exec and port-forward.
*/}}
{{- define "alki-controller.tlsNames" -}}
{{- $fullname := include "alki-controller.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := concat .Values.controller.publicNames (list $fullname (printf "%s.%s" $fullname $ns) (printf "%s.%s.svc" $fullname $ns) (printf "%s.%s.svc.%s" $fullname $ns .Values.clusterDomain) "localhost" "127.0.0.1") }}
{{- join "," (uniq $names) }}
{{- end }}

{{/* host:port devices pull bundles from: controller.registryHost, else the first public name on the HTTPS port. */}}
{{- define "alki-controller.registryHost" -}}
{{- if .Values.controller.registryHost }}
{{- .Values.controller.registryHost }}
{{- else if .Values.controller.publicNames }}
{{- printf "%s:%v" (first .Values.controller.publicNames) .Values.service.ports.https }}
{{- else }}
{{- fail "set controller.publicNames (the DNS names devices reach the controller by) or controller.registryHost" }}
{{- end }}
{{- end }}

{{/* A path under the mounted Secret for one of its keys, failing when there is no Secret or the key is missing. */}}
{{- define "alki-controller.secretFile" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $why := index . 2 }}
{{- if not (include "alki-controller.secretName" $root) }}
{{- fail (printf "%s needs the file %s from a Secret: set secret.create or secret.name" $why $key) }}
{{- end }}
{{- if and $root.Values.secret.create (not (hasKey $root.Values.secret.files $key)) }}
{{- fail (printf "%s needs secret.files.%s (helm --set-file 'secret.files.%s=PATH')" $why ($key | replace "." "\\.") ($key | replace "." "\\.")) }}
{{- end }}
{{- printf "/etc/alki/secret/%s" $key }}
{{- end }}
