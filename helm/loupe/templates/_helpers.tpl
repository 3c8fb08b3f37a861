{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "loupe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release + chart, truncated to 63 characters. Objects derived from it add a
suffix; suffixed names stay within 63 characters because the prefix is cut to leave room.
*/}}
{{- define "loupe.fullname" -}}
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

{{/*
The RayCluster's name. KubeRay derives pod and Service names from it (e.g. "<name>-head-svc",
"<name>-extractors-worker-xxxxx"), so it is kept to 39 characters.
*/}}
{{- define "loupe.clusterName" -}}
{{- include "loupe.fullname" . | trunc 39 | trimSuffix "-" }}
{{- end }}

{{/*
"<fullname>-<suffix>" within 63 characters.
*/}}
{{- define "loupe.suffixed" -}}
{{- $root := index . 0 }}{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "loupe.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "loupe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels.
*/}}
{{- define "loupe.labels" -}}
helm.sh/chart: {{ include "loupe.chart" . }}
{{ include "loupe.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loupe
{{- end }}

{{- define "loupe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loupe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels KubeRay puts on every pod of the RayCluster (used by selectors of the Service, PDBs, PodMonitor).
*/}}
{{- define "loupe.rayClusterSelector" -}}
ray.io/cluster: {{ include "loupe.clusterName" . }}
{{- end }}

{{- define "loupe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "loupe.authSecret" -}}
{{- default (include "loupe.suffixed" (list . "auth")) .Values.auth.existingSecret }}
{{- end }}

{{- define "loupe.rayAuthSecret" -}}
{{- default (include "loupe.suffixed" (list . "ray-auth")) .Values.rayAuth.existingSecret }}
{{- end }}

{{- define "loupe.dataClaim" -}}
{{- default (include "loupe.suffixed" (list . "data")) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Custom Ray resources as KubeRay's rayStartParams "resources" value: a quoted JSON string,
e.g. "{\"loupe_shard\":2}" (KubeRay passes it to `ray start --resources=...` through a shell).
Argument: a dict name → count.
*/}}
{{- define "loupe.rayResources" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") }}
{{- end }}

{{/*
The `loupe up` argv of the broker on the Ray head. One list: the head container runs it, and
tests/integration/test_multinode.py runs the same list against a multi-node Ray cluster.
*/}}
{{- define "loupe.upArgs" -}}
- loupe
- up
- --ray-address
- auto
- --host
- 0.0.0.0
- --port
- {{ .Values.loupe.port | quote }}
- --metrics-port
- {{ .Values.loupe.metricsPort | quote }}
- --shard-metrics-port
- {{ .Values.metrics.shardPort | quote }}
- --extractor-metrics-port
- {{ .Values.metrics.extractorPort | quote }}
- --data-dir
- /data
- --shards
- {{ .Values.loupe.shards | quote }}
- --replicas
- {{ .Values.loupe.replicas | quote }}
- --shard-resource
- {{ .Values.loupe.shardResource | quote }}
- --extractor-resource
- {{ .Values.loupe.extractorResource | quote }}
- --extractor-threads
- {{ .Values.loupe.extractorThreads | quote }}
- --shard-threads
- {{ .Values.loupe.shardThreads | quote }}
- --extractor-runtime
- {{ .Values.loupe.extractorRuntime | quote }}
- --extractor-batch-images
- {{ .Values.loupe.extractorBatchImages | quote }}
- --extractor-batch-wait-ms
- {{ .Values.loupe.extractorBatchWaitMs | quote }}
- --index-factory
- {{ .Values.loupe.indexFactory | quote }}
- --max-inflight
- {{ .Values.loupe.limits.maxInflight | quote }}
- --max-extract-queue
- {{ .Values.loupe.limits.maxExtractQueue | quote }}
- --shard-budget-s
- {{ .Values.loupe.limits.shardBudgetS | quote }}
- --shard-budget-fraction
- {{ .Values.loupe.limits.shardBudgetFraction | quote }}
- --default-timeout-s
- {{ .Values.loupe.limits.defaultTimeoutS | quote }}
- --shutdown-grace-s
- {{ .Values.loupe.limits.shutdownGraceS | quote }}
{{- if .Values.auth.enabled }}
- --auth-tokens-file
- /etc/loupe/auth/tokens
- --internal-token-file
- /etc/loupe/auth/internal-token
{{- else }}
- --insecure-no-auth
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert-file
- /etc/loupe/tls/tls.crt
- --tls-key-file
- /etc/loupe/tls/tls.key
{{- end }}
{{- range .Values.loupe.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Environment of every Ray container: Ray token auth and extra variables.
*/}}
{{- define "loupe.rayEnv" -}}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "loupe.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- with .Values.loupe.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes shared by the Ray pods: /dev/shm for Ray's object store (KubeRay recommends a memory
emptyDir) and, for the head and shard pods, the data volume.
*/}}
{{- define "loupe.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
{{- end }}

{{- define "loupe.dataVolume" -}}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "loupe.dataClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/*
The worker container command: KubeRay's generated `ray start ... --block` (kept in
$KUBERAY_GEN_RAY_START_CMD because the RayCluster sets ray.io/overwrite-container-cmd).
*/}}
{{- define "loupe.workerCommand" -}}
- /bin/bash
- -c
- ulimit -n 65536; exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"
{{- end }}

{{/*
Worker readiness/liveness: this pod's raylet is running. Declared so that KubeRay does not inject
its default worker probes, which `wget` the dashboard agent's /api/local_raylet_healthz: the
agent's health module needs ray[default] and the image has no wget. (`ray start --block`, the
container's main process, also exits when the raylet dies, which restarts the container.)
*/}}
{{- define "loupe.workerProbe" -}}
exec:
  command:
    - python
    - -c
    - |
      import os, sys
      def comm(pid):
          try:
              with open(f"/proc/{pid}/comm") as f:
                  return f.read().strip()
          except OSError:
              return ""
      sys.exit(0 if "raylet" in {comm(p) for p in os.listdir("/proc") if p.isdigit()} else 1)
periodSeconds: 10
timeoutSeconds: 5
failureThreshold: 3
{{- end }}

{{/*
Checks across values that a JSON schema cannot express.
*/}}
{{- define "loupe.validate" -}}
{{- $shardSlots := mul .Values.shardWorkers.replicas .Values.shardWorkers.slotsPerPod }}
{{- if lt (int $shardSlots) (int .Values.loupe.shards) }}
{{- fail (printf "shardWorkers: replicas × slotsPerPod = %d is less than loupe.shards = %d: some shards could never be placed" (int $shardSlots) (int .Values.loupe.shards)) }}
{{- end }}
{{- $extSlots := mul .Values.extractorWorkers.replicas .Values.extractorWorkers.slotsPerPod }}
{{- if lt (int $extSlots) (int .Values.loupe.replicas) }}
{{- fail (printf "extractorWorkers: replicas × slotsPerPod = %d is less than loupe.replicas = %d: some extractor replicas could never be placed" (int $extSlots) (int .Values.loupe.replicas)) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.existingSecret: required when tls.enabled (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if eq .Values.loupe.shardResource .Values.loupe.extractorResource }}
{{- fail (printf "loupe.shardResource and loupe.extractorResource must differ (both %q): shards and extractors would share pods" .Values.loupe.shardResource) }}
{{- end }}
{{- end }}
