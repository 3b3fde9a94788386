{{/* The engine cache key: weights hash, GPU product and engine version (12 hex). */}}
{{- define "dicom-node.engineKey" -}}
{{- $b := .Values.modelServer.engineBuild -}}
{{- printf "%s|%s|%s" $b.weightsHash $b.gpuProduct $b.engineVersion | sha256sum | trunc 12 -}}
{{- end -}}

{{/* Placement and GPU resources of model-server pods (server and engine build). */}}
{{- define "dicom-node.modelServerScheduling" -}}
{{- $m := .Values.modelServer -}}
{{- with $m.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- $sel := deepCopy ($m.nodeSelector | default dict) }}
{{- if $m.engineBuild.enabled }}
{{- /* A built engine runs only on the GPU it was built for. */}}
{{- $_ := set $sel "nvidia.com/gpu.product" $m.engineBuild.gpuProduct }}
{{- end }}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $m.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "dicom-node.modelServerImage" -}}
{{- include "dicom-node.imageRef" (dict "image" .Values.modelServer.image "default" "latest") -}}
{{- end -}}
