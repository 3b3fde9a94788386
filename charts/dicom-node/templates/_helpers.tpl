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

{{- define "dicom-node.serviceAccountName" -}}
{{- default (include "dicom-node.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* An image reference from {repository, tag, digest}: the digest wins. Call with
(dict "image" .Values.image "default" .Chart.AppVersion). */}}
{{- define "dicom-node.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "dicom-node.image" -}}
{{- include "dicom-node.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "dicom-node.gpuImage" -}}
{{- include "dicom-node.imageRef" (dict "image" .Values.gpuImage "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "dicom-node.pvcName" -}}
{{- default (printf "%s-data" (include "dicom-node.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* "true" when the index is SQLite on the shared volume (no PostgreSQL configured). */}}
{{- define "dicom-node.sqlite" -}}
{{- if and (not .Values.database.url) (not .Values.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* "true" when the VLM is served (deployed model server or external endpoint): the gpu-queue
worker is then a thin CPU worker. */}}
{{- define "dicom-node.served" -}}
{{- if or .Values.modelServer.enabled .Values.vlm.baseUrl (eq .Values.vlm.backend "openai") -}}true{{- end -}}
{{- end -}}

{{- define "dicom-node.vlmBackend" -}}
{{- if .Values.vlm.backend -}}{{ .Values.vlm.backend }}{{- else if include "dicom-node.served" . -}}openai{{- else -}}torch{{- end -}}
{{- end -}}

{{- define "dicom-node.vlmBaseUrl" -}}
{{- if .Values.vlm.baseUrl -}}
{{- .Values.vlm.baseUrl -}}
{{- else if .Values.modelServer.enabled -}}
{{- printf "http://%s-model-server:%v/v1" (include "dicom-node.fullname" .) .Values.modelServer.port -}}
{{- end -}}
{{- end -}}

{{/* The chart-made Secret (generated and inline credentials). */}}
{{- define "dicom-node.secretName" -}}
{{- printf "%s-credentials" (include "dicom-node.fullname" .) -}}
{{- end -}}

{{/* A generated secret value that survives upgrades: the existing Secret's value when there is
one (lookup, at install/upgrade), else a new random one (after prefix). Call with
(dict "root" $ "key" "k" "prefix" ""). */}}
{{- define "dicom-node.generated" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "dicom-node.secretName" .root) -}}
{{- if and $existing (index $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- printf "%s%s" (.prefix | default "") (randAlphaNum 40) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Where a credential comes from: {name, key} of a Secret. */}}
{{- define "dicom-node.redisPasswordRef" -}}
{{- if .Values.redis.password.existingSecret -}}
name: {{ .Values.redis.password.existingSecret }}
key: {{ .Values.redis.password.key }}
{{- else -}}
name: {{ include "dicom-node.secretName" . }}
key: redis-password
{{- end -}}
{{- end -}}

{{- define "dicom-node.httpTokenRef" -}}
{{- if .Values.secrets.httpToken.existingSecret -}}
name: {{ .Values.secrets.httpToken.existingSecret }}
key: {{ .Values.secrets.httpToken.key }}
{{- else -}}
name: {{ include "dicom-node.secretName" . }}
key: http-token
{{- end -}}
{{- end -}}

{{- define "dicom-node.pseudonymKeyRef" -}}
{{- if .Values.secrets.pseudonymKey.existingSecret -}}
name: {{ .Values.secrets.pseudonymKey.existingSecret }}
key: {{ .Values.secrets.pseudonymKey.key }}
{{- else -}}
name: {{ include "dicom-node.secretName" . }}
key: pseudonym-key
{{- end -}}
{{- end -}}

{{/* Settings every node process shares: the ConfigMap, extra envFrom. */}}
{{- define "dicom-node.envFrom" -}}
- configMapRef:
    name: {{ include "dicom-node.fullname" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Credentials as env from Secrets (never from the ConfigMap). */}}
{{- define "dicom-node.env" -}}
{{- if .Values.database.existingSecret }}
- name: DICOM_NODE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- else if .Values.database.url }}
- name: DICOM_NODE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dicom-node.secretName" . }}
      key: database-url
{{- end }}
{{- if .Values.redis.bundled }}
# Kubernetes expands $(REDIS_PASSWORD) from the entry before (the password is URL-safe).
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- include "dicom-node.redisPasswordRef" . | nindent 6 }}
- name: DICOM_NODE_BROKER_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "dicom-node.fullname" .) | quote }}
- name: DICOM_NODE_RESULT_BACKEND
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/1" (include "dicom-node.fullname" .) | quote }}
{{- else }}
{{- $secret := default (include "dicom-node.secretName" .) .Values.redis.external.existingSecret }}
- name: DICOM_NODE_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary .Values.redis.external.brokerUrlKey "broker-url" (ne .Values.redis.external.existingSecret "") }}
- name: DICOM_NODE_RESULT_BACKEND
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary .Values.redis.external.resultUrlKey "result-url" (ne .Values.redis.external.existingSecret "") }}
{{- end }}
{{- end -}}

{{/* Credentials mounted as files (settings *_file) under /etc/dicom-node/secrets. */}}
{{- define "dicom-node.secretVolume" -}}
- name: credentials
  projected:
    defaultMode: 0440
    sources:
      - secret:
          {{- $ref := include "dicom-node.httpTokenRef" . | fromYaml }}
          name: {{ $ref.name }}
          items: [{key: {{ $ref.key }}, path: http-token}]
      - secret:
          {{- $ref := include "dicom-node.pseudonymKeyRef" . | fromYaml }}
          name: {{ $ref.name }}
          items: [{key: {{ $ref.key }}, path: pseudonym-key}]
      {{- if .Values.vlm.apiKey.existingSecret }}
      - secret:
          name: {{ .Values.vlm.apiKey.existingSecret }}
          items: [{key: {{ .Values.vlm.apiKey.key }}, path: vlm-api-key}]
      {{- end }}
{{- end -}}

{{- define "dicom-node.secretMount" -}}
- name: credentials
  mountPath: /etc/dicom-node/secrets
  readOnly: true
{{- end -}}

{{/* The TLS listener's certificate, in the SCP pods. */}}
{{- define "dicom-node.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- end -}}

{{- define "dicom-node.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/dicom-node/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod annotations that restart pods when their configuration or the TLS Secret changes. */}}
{{- define "dicom-node.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.tls.enabled }}
{{- $tls := lookup "v1" "Secret" .Release.Namespace .Values.tls.secretName }}
checksum/tls: {{ ($tls.data | default dict) | toJson | sha256sum }}
{{- if .Values.tls.reloaderAnnotation }}
secret.reloader.stakater.com/reload: {{ .Values.tls.secretName | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Placement of a pod that mounts /data. Call with (dict "root" $ "w" <component values>
"gpu" <bool: an in-process GPU pod>). singleNode: workers follow the SCP to its host; the SCP
and io worker tolerate the GPU worker's taints and take its nodeSelector when the GPU worker is
in-process (they must share its host). */}}
{{- define "dicom-node.placementNodeSelector" -}}
{{- $r := .root -}}
{{- $sel := .w.nodeSelector | default dict -}}
{{- if and (eq $r.Values.placement "singleNode") (not (include "dicom-node.served" $r)) -}}
{{- $sel = merge (deepCopy $sel) ($r.Values.workers.gpu.nodeSelector | default dict) -}}
{{- end -}}
{{- if $sel }}{{ toYaml $sel }}{{ end -}}
{{- end -}}

{{- define "dicom-node.placementTolerations" -}}
{{- $r := .root -}}
{{- $tol := .w.tolerations | default list -}}
{{- if and (eq $r.Values.placement "singleNode") (not (include "dicom-node.served" $r)) (not .gpu) -}}
{{- $tol = concat $tol ($r.Values.workers.gpu.tolerations | default list) | uniq -}}
{{- end -}}
{{- if $tol }}{{ toYaml $tol }}{{ end -}}
{{- end -}}

{{- define "dicom-node.workerAffinity" -}}
{{- if .w.affinity }}
{{- toYaml .w.affinity }}
{{- else if eq .root.Values.placement "singleNode" }}
podAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - labelSelector:
        matchLabels:
          {{- include "dicom-node.selectorLabels" (dict "root" .root "component" "node") | nindent 10 }}
      topologyKey: kubernetes.io/hostname
{{- end }}
{{- end -}}

{{/* Topology spread (multiNode only). Call with (dict "root" $ "component" "node"). */}}
{{- define "dicom-node.topologySpread" -}}
{{- if and .root.Values.topologySpread.enabled (eq .root.Values.placement "multiNode") }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: {{ .root.Values.topologySpread.topologyKey }}
    whenUnsatisfiable: {{ .root.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "dicom-node.selectorLabels" (dict "root" .root "component" .component) | nindent 8 }}
{{- end }}
{{- end -}}

{{/* Pod-level settings every pod of the chart shares. */}}
{{- define "dicom-node.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "dicom-node.serviceAccountName" . }}
# The pods talk to no Kubernetes API: no token in them.
automountServiceAccountToken: false
# No service-link variables: a release named dicom-node would get DICOM_NODE_HTTP_PORT=tcp://...
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
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
{{- include "dicom-node.secretVolume" . | nindent 0 }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dicom-node.dataMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- include "dicom-node.secretMount" . | nindent 0 }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* checkov skip annotations: each check left failing, with its reason (tests/chart fails on any
other failure). Call with (dict "digest" <image pinned by digest> "env" <Secret values as env>
"extra" (list "CKV_...=reason")). */}}
{{- define "dicom-node.checkovSkips" -}}
{{- $skips := list "CKV_K8S_11=No CPU limit on purpose: CFS throttling stalls DICOM associations past their deadlines and slows comparisons; CPU requests are set" "CKV_K8S_15=imagePullPolicy IfNotPresent: images are pinned (digest or release tag), Always only adds a registry round trip to every start" -}}
{{- if .env -}}
{{- $skips = append $skips "CKV_K8S_35=The process reads these credentials from the environment (the node: database and broker URLs; redis-server: its password; a NIM: NGC_API_KEY); the entries are secretKeyRef, never ConfigMap values, and the node reads its tokens and keys from files" -}}
{{- end -}}
{{- if not .digest -}}
{{- $skips = append $skips "CKV_K8S_43=Image by tag in this value set: set the images' digest to pin them" -}}
{{- end -}}
{{- range .extra -}}
{{- $skips = append $skips . -}}
{{- end -}}
{{- range $i, $s := $skips }}
checkov.io/skip{{ add1 $i }}: {{ $s | quote }}
{{- end -}}
{{- end -}}
