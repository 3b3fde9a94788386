{{/* Names and labels. */}}
{{- define "dicom-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dicom-node.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "dicom-node.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "dicom-node.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dicom-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dicom-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "node"). */}}
{{- define "dicom-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dicom-node.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dicom-node.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dicom-node.gpuImage" -}}
{{- printf "%s:%s" .Values.gpuImage.repository (default .Chart.AppVersion .Values.gpuImage.tag) -}}
{{- end -}}

{{- define "dicom-node.pvcName" -}}
{{- default (printf "%s-data" (include "dicom-node.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* Redis base URL: the bundled one or the external one. */}}
{{- define "dicom-node.redisUrl" -}}
{{- if .Values.redis.bundled -}}
{{- printf "redis://%s-redis:6379" (include "dicom-node.fullname" .) -}}
{{- else -}}
{{- required "redis.url is required when redis.bundled is false" .Values.redis.url | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{/* "true" when the index is SQLite on the shared volume (no PostgreSQL configured). */}}
{{- define "dicom-node.sqlite" -}}
{{- if and (not .Values.database.url) (not .Values.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* Settings every node process shares: the ConfigMap, the DB secret, extra envFrom. */}}
{{- define "dicom-node.envFrom" -}}
- configMapRef:
    name: {{ include "dicom-node.fullname" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dicom-node.env" -}}
{{- if .Values.database.existingSecret }}
- name: DICOM_NODE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end }}
{{- end -}}

{{/* Affinity for a worker: its own value if set; otherwise, with SQLite, the SCP's host (WAL
is not shareable between hosts). Call with (dict "root" $ "affinity" .Values.workers.io.affinity). */}}
{{- define "dicom-node.workerAffinity" -}}
{{- if .affinity }}
{{- toYaml .affinity }}
{{- else if include "dicom-node.sqlite" .root }}
podAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - labelSelector:
        matchLabels:
          {{- include "dicom-node.selectorLabels" (dict "root" .root "component" "node") | nindent 10 }}
      topologyKey: kubernetes.io/hostname
{{- end }}
{{- end -}}

{{/* Refuse combinations that cannot work. */}}
{{- define "dicom-node.validate" -}}
{{- if and (gt (int .Values.node.replicas) 1) (include "dicom-node.sqlite" .) -}}
{{- fail "node.replicas > 1 needs PostgreSQL (database.url or database.existingSecret): SQLite serves one SCP" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- end -}}

{{/* The /data volume and /tmp (the root filesystem is read-only). */}}
{{- define "dicom-node.dataVolumes" -}}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "dicom-node.pvcName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "dicom-node.dataMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- end -}}
