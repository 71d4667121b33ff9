{{- define "wal-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wal-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wal-operator.labels" -}}
{{ include "wal-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "wal-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "wal-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions, the same for the ClusterRole (cluster-wide) and each Role (watchNamespaces).
kopf runs --standalone with cluster scanning off: no namespaces, no CRDs, no peering objects.
*/}}
{{- define "wal-operator.rules" -}}
- apiGroups: ["wal-listener.io"]
  resources: ["wallisteners"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["wal-listener.io"]
  resources: ["wallisteners/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* The labels of the listener pods (and Services) the operator creates: what the monitors select. */}}
{{- define "wal-operator.listenerSelector" -}}
app.kubernetes.io/name: wal-listener
app.kubernetes.io/managed-by: wal-operator
{{- end -}}

{{/* namespaceSelector of a PodMonitor/ServiceMonitor: the watched namespaces, or every namespace. */}}
{{- define "wal-operator.monitorNamespaces" -}}
{{- if .Values.watchNamespaces -}}
matchNames:
{{- range .Values.watchNamespaces }}
  - {{ . | quote }}
{{- end }}
{{- else -}}
any: true
{{- end -}}
{{- end -}}

{{/*
Extra label matchers for every selector of the alert rules: "" or ", <matchers>" to append inside {...}.
*/}}
{{- define "wal-operator.ruleSelector" -}}
{{- with .Values.monitoring.prometheusRule.selector -}}, {{ . }}{{- end -}}
{{- end -}}
