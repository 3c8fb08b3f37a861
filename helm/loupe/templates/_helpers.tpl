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

{{/*
Claims: the shared one (`persistence.mode: shared`), the head's and each shard replica's (`perReplica`).
*/}}
{{- define "loupe.dataClaim" -}}
{{- default (include "loupe.suffixed" (list . "data")) .Values.persistence.existingClaim }}
{{- end }}

{{- define "loupe.headClaim" -}}
{{- include "loupe.suffixed" (list . "data-head") }}
{{- end }}

{{/*
Argument: (list root shard replica).
*/}}
{{- define "loupe.shardClaim" -}}
{{- include "loupe.suffixed" (list (index . 0) (printf "data-shard-%d-r%d" (int (index . 1)) (int (index . 2)))) }}
{{- end }}

{{/*
Shard worker groups (and claims) provisioned: loupe.shards, or more with loupe.shardGroups (room
for `loupe reshard` to grow into).
*/}}
{{- define "loupe.shardGroups" -}}
{{- max (int .Values.loupe.shards) (int .Values.loupe.shardGroups) }}
{{- end }}

{{/*
Worker group (and Ray resource suffix) of one shard replica. Argument: (list shard replica).
*/}}
{{- define "loupe.shardGroup" -}}
{{- printf "shard-%d-r%d" (int (index . 0)) (int (index . 1)) }}
{{- end }}

{{/*
The Ray resource a shard replica's group advertises; `loupe up --shard-resource` gets the same
name with `{shard}` / `{replica}` placeholders. Argument: (list root shard replica).
*/}}
{{- define "loupe.shardResourceName" -}}
{{- printf "%s_%d_r%d" (index . 0).Values.loupe.shardResource (int (index . 1)) (int (index . 2)) }}
{{- end }}

{{- define "loupe.shardResourceTemplate" -}}
{{- printf "%s_{shard}_r{replica}" .Values.loupe.shardResource }}
{{- end }}

{{/*
Access modes of the created claims: the values', or the mode's default.
*/}}
{{- define "loupe.accessModes" -}}
{{- if .Values.persistence.accessModes }}
{{- toYaml .Values.persistence.accessModes }}
{{- else if eq .Values.persistence.mode "shared" }}
- ReadWriteMany
{{- else }}
- ReadWriteOnce
{{- end }}
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
- --replication-factor
- {{ .Values.loupe.replicationFactor | quote }}
- --write-quorum
- {{ .Values.loupe.writeQuorum | quote }}
- --replicas
- {{ .Values.loupe.replicas | quote }}
- --shard-resource
- {{ include "loupe.shardResourceTemplate" . | quote }}
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
- --rerank-slots
- {{ .Values.loupe.limits.rerankSlots | quote }}
- --max-rerank-queue
- {{ .Values.loupe.limits.maxRerankQueue | quote }}
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
Environment of the head container for backups to S3 (the broker writes them): the keys of
`backup.credentialsSecret` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) and the endpoint/region
values. boto3 in the broker reads these.
*/}}
{{- define "loupe.backupEnv" -}}
{{- with .Values.backup.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.backup.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
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

{{/*
The data volume of a pod. Argument: (list root claim): claim "" = the shared one (or emptyDir).
*/}}
{{- define "loupe.dataVolume" -}}
{{- $root := index . 0 }}{{- $claim := index . 1 }}
- name: data
{{- if not $root.Values.persistence.enabled }}
  emptyDir: {}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ $claim | default (include "loupe.dataClaim" $root) }}
{{- end }}
{{- end }}

{{/*
Init container that hands /data to the pods' user where the volume plugin ignores fsGroup.
*/}}
{{- define "loupe.fixOwnership" -}}
{{- if and .Values.persistence.enabled .Values.persistence.fixOwnership }}
{{- $uid := int (.Values.podSecurityContext.runAsUser | default 10001) }}
{{- $gid := int (.Values.podSecurityContext.runAsGroup | default $uid) }}
- name: fix-data-ownership
  image: {{ include "loupe.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - 'find /data -xdev \( ! -user {{ $uid }} -o ! -group {{ $gid }} \) -exec chown -h {{ $uid }}:{{ $gid }} {} +'
  securityContext:
    runAsUser: 0
    runAsGroup: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    capabilities:
      drop: [ALL]
      add: [CHOWN, DAC_READ_SEARCH, FOWNER]
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {cpu: 500m, memory: 128Mi}
  volumeMounts:
    - {name: data, mountPath: /data}
{{- end }}
{{- end }}

{{/*
Pod-spec fields every Ray pod shares: service account, priority, pull secrets, security context.
Argument: (list root priorityClassName-of-the-role).
*/}}
{{- define "loupe.podCommon" -}}
{{- $root := index . 0 }}{{- $priority := index . 1 }}
{{- with (include "loupe.serviceAccountName" $root) }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
{{- with ($priority | default $root.Values.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "loupe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loupe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Pod metadata every Ray pod shares besides its role's: pod labels (argument's labels first),
checksum and user annotations. Argument: (dict "root" $ "labels" dict "annotations" dict).
*/}}
{{- define "loupe.podMeta" -}}
{{- $root := .root }}
labels:
  {{- include "loupe.labels" $root | nindent 2 }}
  {{- with .labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  ray.io/overwrite-container-cmd: "true"
  # the Secrets' content: a new token changes the pod templates, so KubeRay (upgradeStrategy
  # Recreate) restarts every pod with it together
  checksum/secrets: {{ include "loupe.secretsChecksum" $root }}
  {{- with .annotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with $root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
Topology spread constraints: entries without labelSelector select the given labels.
Argument: (list constraints selectorLabels).
*/}}
{{- define "loupe.spread" -}}
{{- $out := list }}
{{- range (index . 0) }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (index $ 1)) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- if $out }}
{{- toYaml $out }}
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
{{- if and (gt (int .Values.loupe.shardGroups) 0) (lt (int .Values.loupe.shardGroups) (int .Values.loupe.shards)) }}
{{- fail (printf "loupe.shardGroups = %d is less than loupe.shards = %d: every shard needs its worker groups (0 = as many as shards)" (int .Values.loupe.shardGroups) (int .Values.loupe.shards)) }}
{{- end }}
{{- $extSlots := mul .Values.extractorWorkers.replicas .Values.extractorWorkers.slotsPerPod }}
{{- if lt (int $extSlots) (int .Values.loupe.replicas) }}
{{- fail (printf "extractorWorkers: replicas × slotsPerPod = %d is less than loupe.replicas = %d: some extractor replicas could never be placed" (int $extSlots) (int .Values.loupe.replicas)) }}
{{- end }}
{{- $p := .Values.persistence }}
{{- if $p.enabled }}
{{- $modes := include "loupe.accessModes" . | fromYamlArray }}
{{- if has "ReadOnlyMany" $modes }}
{{- fail "persistence.accessModes: ReadOnlyMany cannot work: the head and the shards write to /data" }}
{{- end }}
{{- if eq $p.mode "shared" }}
{{- if and (not $p.existingClaim) (not (has "ReadWriteMany" $modes)) }}
{{- fail (printf "persistence.mode=shared mounts one claim on the head and %d shard pods: its accessModes %v must include ReadWriteMany (a ReadWriteOnce volume attaches to one node: the other pods stay Pending or fail with Multi-Attach). Use persistence.mode=perReplica (one ReadWriteOnce claim per shard replica) or a ReadWriteMany storage class" (mul (int (include "loupe.shardGroups" .)) (int .Values.loupe.replicationFactor)) $modes) }}
{{- end }}
{{- else if $p.existingClaim }}
{{- fail "persistence.existingClaim is for persistence.mode=shared (one claim for all pods); persistence.mode=perReplica creates one claim per shard replica and one for the head" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.existingSecret: required when tls.enabled (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and .Values.backup.enabled (not .Values.backup.url) }}
{{- fail "backup.url: required when backup.enabled (s3://bucket/prefix)" }}
{{- end }}
{{- if eq .Values.loupe.shardResource .Values.loupe.extractorResource }}
{{- fail (printf "loupe.shardResource and loupe.extractorResource must differ (both %q): shards and extractors would share pods" .Values.loupe.shardResource) }}
{{- end }}
{{- end }}

{{/*
One token: the explicit value, else the (base64) value of the Secret in the cluster, else random.
Argument: (list explicit oldBase64 randomLength). Output: the token, plain.
*/}}
{{- define "loupe.token" -}}
{{- $explicit := index . 0 }}{{- $old := index . 1 }}
{{- if $explicit }}{{ $explicit }}{{ else if $old }}{{ b64dec $old }}{{ else }}{{ randAlphaNum (int (index . 2)) }}{{ end }}
{{- end }}

{{/*
Data of the chart-created Secrets, plain text, as JSON {"auth": {...}, "ray": {...}}. Argument:
(dict "auth" .Values.auth "rayAuth" .Values.rayAuth "oldAuth" data "oldRay" data), old data as
`lookup` returns it (base64 values; empty when the Secret does not exist or nothing is looked up).
A Secret of an earlier chart version has no `write-token` key: its write token is read from `tokens`.
*/}}
{{- define "loupe.secretData" -}}
{{- $oldAuth := .oldAuth | default dict }}{{- $oldRay := .oldRay | default dict }}
{{- $oldWrite := get $oldAuth "write-token" }}
{{- if and (not $oldWrite) (get $oldAuth "tokens") }}
{{- $line := regexFind "(?m)^write \\S+" (b64dec (get $oldAuth "tokens")) }}
{{- if $line }}{{ $oldWrite = trimPrefix "write " $line | b64enc }}{{ end }}
{{- end }}
{{- $read := include "loupe.token" (list .auth.readToken (get $oldAuth "read-token") 40) }}
{{- $write := include "loupe.token" (list .auth.writeToken $oldWrite 40) }}
{{- $internal := include "loupe.token" (list .auth.internalToken (get $oldAuth "internal-token") 40) }}
{{- $ray := include "loupe.token" (list .rayAuth.token (get $oldRay "auth_token") 48) }}
{{- toJson (dict
      "auth" (dict "tokens" (printf "read %s\nwrite %s\n" $read $write) "internal-token" $internal "read-token" $read "write-token" $write)
      "ray" (dict "auth_token" $ray)) }}
{{- end }}

{{/*
The chart-created Secrets' data, computed once per render (random tokens included) and kept in
.Values: the Secret objects and the pods' checksum annotation must see the same tokens.
*/}}
{{- define "loupe.secrets" -}}
{{- if not (hasKey .Values "loupeRenderedSecrets") }}
{{- $oldAuth := dict }}{{- $oldRay := dict }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- $oldAuth = (lookup "v1" "Secret" .Release.Namespace (include "loupe.authSecret" .)).data | default dict }}
{{- end }}
{{- if and .Values.rayAuth.enabled (not .Values.rayAuth.existingSecret) }}
{{- $oldRay = (lookup "v1" "Secret" .Release.Namespace (include "loupe.rayAuthSecret" .)).data | default dict }}
{{- end }}
{{- $data := include "loupe.secretData" (dict "auth" .Values.auth "rayAuth" .Values.rayAuth "oldAuth" $oldAuth "oldRay" $oldRay) | fromJson }}
{{- $_ := set .Values "loupeRenderedSecrets" $data }}
{{- end }}
{{- toJson (get .Values "loupeRenderedSecrets") }}
{{- end }}

{{/*
sha256 of what the pods read from Secrets: the chart-created data that is in use, and the names of
existing Secrets (their content is the operator's: roll pods with `podAnnotations` after a rotation).
*/}}
{{- define "loupe.secretsChecksum" -}}
{{- $all := include "loupe.secrets" . | fromJson }}
{{- $used := dict }}
{{- if .Values.auth.enabled }}
{{- $_ := set $used "auth" (.Values.auth.existingSecret | default $all.auth) }}
{{- end }}
{{- if .Values.rayAuth.enabled }}
{{- $_ := set $used "ray" (.Values.rayAuth.existingSecret | default $all.ray) }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $_ := set $used "tls" .Values.tls.existingSecret }}
{{- end }}
{{- toJson $used | sha256sum }}
{{- end }}

{{/*
Init containers of a Ray pod: the ownership fix (pods with /data) and the user's. Argument: (list root hasData).
*/}}
{{- define "loupe.initContainers" -}}
{{- $root := index . 0 }}
{{- $fix := ternary (include "loupe.fixOwnership" $root | trim) "" (index . 1) }}
{{- if or $fix $root.Values.extraInitContainers }}
initContainers:
  {{- with $fix }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with $root.Values.extraInitContainers }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Startup probe failures (every 10 s) allowed: `loupe.startupTimeoutS` for the actors + 60 s for `ray start`.
*/}}
{{- define "loupe.startupFailureThreshold" -}}
{{- add (div (add (int .Values.loupe.startupTimeoutS) 9) 10) 6 }}
{{- end }}
