{{/* Chart name. */}}
{{- define "chatfleet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name of the operator's objects. */}}
{{- define "chatfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chatfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "chatfleet.labels" -}}
{{ include "chatfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "chatfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chatfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rules on the objects a ChatDeployment owns: exactly the verbs the operator uses
(a test audits a whole lifecycle against them). "create" on the applied kinds is for
server-side apply, which creates what does not exist. */}}
{{- define "chatfleet.managedRules" -}}
- apiGroups: [chatfleet.dev]
  resources: [chatdeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [chatfleet.dev]
  resources: [chatdeployments/status]
  verbs: [patch]
# Owner references with blockOwnerDeletion need this where the API server enforces
# them (the OwnerReferencesPermissionEnforcement admission plugin, as on OpenShift).
- apiGroups: [chatfleet.dev]
  resources: [chatdeployments/finalizers]
  verbs: [update]
# No delete anywhere: what the operator creates is owned by its ChatDeployment, and
# the garbage collector deletes it. list/watch: drift is repaired from watch events.
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [{{ if .Values.rbac.readSecrets }}get, {{ end }}create]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
