{{/* The settings the chart itself sets (the ConfigMap adds extraEnv to them). */}}
{{- define "dicom-node.configData" -}}
DICOM_NODE_AE_TITLE: {{ .Values.node.aeTitle | quote }}
DICOM_NODE_HOST: "0.0.0.0"
# tls.only: port 0, the node opens no plain DICOM listener at all (not only unexposed).
DICOM_NODE_PORT: {{ ternary "0" (.Values.node.port | toString) .Values.tls.only | quote }}
# 0.0.0.0: the kubelet's probes and the HTTP Service reach the API on the pod address; the
# token below guards everything but /healthz, /readyz and /metrics.
DICOM_NODE_HTTP_HOST: "0.0.0.0"
DICOM_NODE_HTTP_PORT: {{ .Values.node.httpPort | quote }}
DICOM_NODE_HTTP_TOKEN_FILE: /etc/dicom-node/secrets/http-token
DICOM_NODE_PSEUDONYM_KEY_FILE: /etc/dicom-node/secrets/pseudonym-key
{{- with .Values.uidRoot }}
DICOM_NODE_UID_ROOT: {{ . | quote }}
{{- end }}
DICOM_NODE_ALLOWED_CALLERS: {{ .Values.node.allowedCallers | toJson | quote }}
DICOM_NODE_STORAGE_DIR: /data/store
DICOM_NODE_WORK_DIR: /data/jobs
# Worker heartbeats (`dicom-node worker-alive`) on the pod's own /tmp, not the shared volume.
DICOM_NODE_WORKER_HEARTBEAT_DIR: /tmp/heartbeats
{{- if include "dicom-node.sqlite" . }}
DICOM_NODE_DATABASE_URL: "sqlite:////data/index.db"
{{- end }}
DICOM_NODE_MODELS_ROOT: /models
DICOM_NODE_VLM_MODEL: {{ .Values.vlm.model | quote }}
DICOM_NODE_VLM_BACKEND: {{ include "dicom-node.vlmBackend" . | quote }}
{{- if include "dicom-node.served" . }}
DICOM_NODE_VLM_BASE_URL: {{ include "dicom-node.vlmBaseUrl" . | quote }}
DICOM_NODE_VLM_SERVED_MODEL: {{ default .Values.modelServer.servedModel .Values.vlm.servedModel | quote }}
DICOM_NODE_VLM_TIMEOUT_SECONDS: {{ .Values.vlm.timeoutSeconds | quote }}
DICOM_NODE_VLM_MAX_CONCURRENCY: {{ .Values.vlm.maxConcurrency | quote }}
{{- if .Values.vlm.apiKey.existingSecret }}
DICOM_NODE_VLM_API_KEY_FILE: /etc/dicom-node/secrets/vlm-api-key
{{- end }}
{{- else }}
DICOM_NODE_VLM_FALLBACK_BACKEND: {{ .Values.vlm.fallbackBackend | quote }}
DICOM_NODE_VLM_ON_ENGINE_MISMATCH: {{ .Values.vlm.onEngineMismatch | quote }}
{{- end }}
DICOM_NODE_TLS_ENABLED: {{ .Values.tls.enabled | quote }}
{{- if .Values.tls.enabled }}
DICOM_NODE_TLS_PORT: {{ .Values.service.dicom.tlsPort | quote }}
DICOM_NODE_TLS_CERT: /etc/dicom-node/tls/tls.crt
DICOM_NODE_TLS_KEY: /etc/dicom-node/tls/tls.key
{{- if .Values.tls.caKey }}
DICOM_NODE_TLS_CA: {{ printf "/etc/dicom-node/tls/%s" .Values.tls.caKey | quote }}
{{- end }}
DICOM_NODE_TLS_REQUIRE_CLIENT_CERT: {{ .Values.tls.requireClientCert | quote }}
{{- end }}
DICOM_NODE_PRIORS__NODE_ADDRESS: {{ .Values.priors.nodeAddress | quote }}
DICOM_NODE_PRIORS__ARCHIVES: {{ .Values.priors.archives | toJson | quote }}
DICOM_NODE_REPORT__DESTINATIONS: {{ .Values.report.destinations | toJson | quote }}
DICOM_NODE_LOG_FORMAT: json
{{- end -}}
