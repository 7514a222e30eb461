{{/* Names, labels and small computed values shared by the templates. */}}

{{- define "dptrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dptrain.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dptrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object of the release (CRDs excepted: see dptrain.crdLabels). */}}
{{- define "dptrain.labels" -}}
helm.sh/chart: {{ include "dptrain.chart" . }}
app.kubernetes.io/name: {{ include "dptrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dptrain
{{- end -}}

{{/* Labels the chart adds to the CRDs of crds/ (which already carry app.kubernetes.io/part-of). */}}
{{- define "dptrain.crdLabels" -}}
helm.sh/chart: {{ include "dptrain.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of the operator pod (the trainer NetworkPolicy admits pods carrying them). */}}
{{- define "dptrain.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "dptrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dptrain.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "dptrain.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest, else repository:tag (tag defaults to appVersion). Argument: (dict "image" ... "root" $). */}}
{{- define "dptrain.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the trainer ServiceAccount and NetworkPolicy, as a JSON list. */}}
{{- define "dptrain.trainerNamespaces" -}}
{{- $namespaces := .Values.trainer.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $namespaces) -}}
{{- end -}}

{{/* Labels that make a Prometheus select the monitoring objects (values are templates). */}}
{{- define "dptrain.monitoringLabels" -}}
{{- $labels := dict -}}
{{- range $key, $value := .Values.monitoring.labels -}}
{{- $_ := set $labels $key (tpl $value $) -}}
{{- end -}}
{{- if $labels -}}
{{- toYaml $labels -}}
{{- end -}}
{{- end -}}

{{/* The job label Prometheus gives trainer targets (the PodMonitor's jobLabel: the pods' app.kubernetes.io/name). */}}
{{- define "dptrain.trainerJobLabel" -}}dptrain-trainer{{- end -}}

{{/* Fails early on value combinations the schema cannot express well. */}}
{{- define "dptrain.validate" -}}
{{- if and .Values.rbac.namespaced (not .Values.watchNamespaces) -}}
{{- fail "rbac.namespaced=true needs watchNamespaces: the Roles are created in those namespaces" -}}
{{- end -}}
{{- if and .Values.monitoring.serviceMonitor.enabled (eq (int .Values.operator.metricsPort) 0) -}}
{{- fail "monitoring.serviceMonitor.enabled=true needs operator.metricsPort (it is 0: metrics are off)" -}}
{{- end -}}
{{- end -}}
