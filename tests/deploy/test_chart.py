"""The Helm chart rendered offline with four value sets: lint, Kubernetes/KubeRay validation, and
the wiring that matters (ports ↔ flags, Ray resources, probes, data volume, secrets)."""

from __future__ import annotations

import copy
import functools
import json
import shlex
from typing import Any

import pytest
import yaml
import helm_process
from chart_render import CHART_DIR, NAMESPACE, RAYCLUSTER_CRD, RELEASE, REPO_ROOT, VALUE_SETS, chart_copy, notes, one, render

if not helm_process.available():
    pytest.skip("helm-python-sdk (test extra) is not installed", allow_module_level=True)

CORE_KINDS = {"Service", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget", "ConfigMap", "Pod", "ServiceAccount", "CronJob"}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
K8S_VERSION = "1.37.0"


@pytest.fixture(params=sorted(VALUE_SETS), scope="module")
def rendered(request) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return request.param, values, render(values)


def _merged(values: dict[str, Any]) -> dict[str, Any]:
    return helm_process.merge_values(CHART_DIR, copy.deepcopy(values))


def _head(rc: dict[str, Any]) -> dict[str, Any]:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _group(rc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def _shard_groups(rc: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """Worker groups of the shard replicas by (shard, replica), read from their pod labels."""
    out = {}
    for g in rc["spec"]["workerGroupSpecs"]:
        labels = g["template"]["metadata"]["labels"]
        if labels["app.kubernetes.io/component"] == "shards":
            out[(int(labels["loupe.io/shard"]), int(labels["loupe.io/shard-replica"]))] = g
    return out


def _flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from the head command {args}"
    return args[args.index(name) + 1]


def ray_resources(param: str) -> dict[str, float]:
    """KubeRay's rayStartParams "resources" value ('"{\\"x\\": 1}"') as the dict `ray start` receives."""
    (word,) = shlex.split(param)  # what the shell in the pod makes of it
    return json.loads(word)


# --- lint and validation --------------------------------------------------------------------------
def test_lint_has_no_errors_or_warnings(rendered):
    name, values, _ = rendered
    report = helm_process.lint(CHART_DIR, copy.deepcopy(values), strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == [], (name, report)
    bad = [m for m in report["messages"] if m["severity"] > 1]  # 1 = INFO (e.g. "icon is recommended")
    assert bad == [], (name, bad)


def test_core_objects_validate_strictly_against_kubernetes(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    name, _, objs = rendered
    checked = 0
    for obj in objs:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 2, name


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (kubectl's strict field validation), not pruned."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=1)
def _crd() -> dict[str, Any]:
    """KubeRay's RayCluster CRD, parsed once per run (0.9 MB of YAML: ~6 s with the pure-Python loader)."""
    if not RAYCLUSTER_CRD.is_file():
        pytest.skip(f"KubeRay's RayCluster CRD {RAYCLUSTER_CRD} is absent (it lives outside the repo in ../shared/k8s)")
    return yaml.load(RAYCLUSTER_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _crd_v1_schema() -> dict[str, Any]:
    return next(v for v in _crd()["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=1)
def _crd_validator() -> tuple[str, Any]:
    """(apiVersion, validator) of KubeRay's RayCluster CRD, v1, unknown fields rejected."""
    jsonschema = pytest.importorskip("jsonschema")
    crd = _crd()
    schema = _strict(_crd_v1_schema())
    cls = jsonschema.validators.validator_for(schema)
    return f"{crd['spec']['group']}/v1", cls(schema)


def test_raycluster_validates_against_the_kuberay_crd(rendered):
    api_version, validator = _crd_validator()
    rc = one(rendered[2], "RayCluster")
    assert rc["apiVersion"] == api_version
    validator.validate(rc)


def test_the_strict_crd_check_catches_a_misspelt_field():
    jsonschema = pytest.importorskip("jsonschema")
    _, validator = _crd_validator()
    rc = one(render({}), "RayCluster")
    rc["spec"]["workerGroupSpecs"][0]["rayStartParam"] = rc["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        validator.validate(rc)


def test_monitoring_objects_are_well_formed(rendered):
    _, _, objs = rendered
    for obj in objs:
        if obj["kind"] in MONITORING_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"], obj


def test_object_kinds_per_value_set(rendered):
    name, _, objs = rendered
    kinds = sorted(o["kind"] for o in objs)
    print(f"{name}: {kinds}")
    assert {"RayCluster", "Service", "Pod"} <= set(kinds)
    expected_extra = {
        "default": {"Secret", "PersistentVolumeClaim"},
        "minimal": set(),
        "production": {"PersistentVolumeClaim", "PodDisruptionBudget", "PodMonitor"},
        "tls-auth-servicemonitor": {"Secret", "ServiceMonitor", "CronJob"},
        "extras-explicit-tokens": {"Secret", "PersistentVolumeClaim", "PodDisruptionBudget", "ServiceAccount", "CronJob"},
        "values-production.yaml": {"PersistentVolumeClaim", "PodDisruptionBudget", "ServiceAccount", "PodMonitor"},
    }[name]
    assert expected_extra <= set(kinds), (name, kinds)
    if name == "minimal":
        assert set(kinds) == {"RayCluster", "Service", "Pod"}


def test_every_name_fits_63_characters_with_the_longest_release_name():
    release = "r" * 53  # Helm's own limit
    objs = render(VALUE_SETS["tls-auth-servicemonitor"], release=release)
    for obj in objs:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        for key, value in obj["metadata"].get("labels", {}).items():
            assert len(str(value)) <= 63, (key, value)
    rc = one(objs, "RayCluster")
    # KubeRay builds "<cluster>-<group>-worker-<5 chars>" pod names and "<cluster>-head-svc"
    for group in rc["spec"]["workerGroupSpecs"]:
        assert len(rc["metadata"]["name"]) + len(f"-{group['groupName']}-worker-xxxxx") <= 63, group["groupName"]


def test_standard_labels_on_every_object(rendered):
    _, _, objs = rendered
    for obj in objs:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "loupe"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("loupe-")


# --- what matters ---------------------------------------------------------------------------------
def test_head_runs_ray_start_then_loupe_up_with_the_values_as_flags(rendered):
    name, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    head = _head(rc)
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = head["command"][2]
    assert "KUBERAY_GEN_RAY_START_CMD//--block/" in script and script.rstrip().endswith('exec "$@"')
    args = head["args"]
    assert args[:2] == ["loupe", "up"]
    assert _flag(args, "--ray-address") == "auto"
    assert _flag(args, "--host") == "0.0.0.0"
    assert _flag(args, "--port") == str(v["loupe"]["port"])
    assert _flag(args, "--metrics-port") == str(v["loupe"]["metricsPort"])
    assert _flag(args, "--shard-metrics-port") == str(v["metrics"]["shardPort"])
    assert _flag(args, "--extractor-metrics-port") == str(v["metrics"]["extractorPort"])
    assert _flag(args, "--shards") == str(v["loupe"]["shards"])
    assert _flag(args, "--replication-factor") == str(v["loupe"]["replicationFactor"])
    assert _flag(args, "--shard-resource") == v["loupe"]["shardResource"] + "_{shard}_r{replica}"
    assert _flag(args, "--replicas") == str(v["loupe"]["replicas"])
    assert _flag(args, "--index-factory") == v["loupe"]["indexFactory"]
    assert args[len(args) - len(v["loupe"]["extraArgs"]):] == v["loupe"]["extraArgs"] or not v["loupe"]["extraArgs"]
    # the flags exist in the CLI this image runs
    from cluster.cli import build_parser

    parsed = build_parser().parse_args(args[1:])
    assert parsed.shard_resource == v["loupe"]["shardResource"] + "_{shard}_r{replica}"
    assert parsed.shard_metrics_port == v["metrics"]["shardPort"]
    assert parsed.extractor_metrics_port == v["metrics"]["extractorPort"]
    assert parsed.extractor_resource == v["loupe"]["extractorResource"]


def test_container_ports_match_the_flags_and_the_service(rendered):
    _, values, objs = rendered
    v = _merged(values)
    head = _head(one(objs, "RayCluster"))
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == int(_flag(head["args"], "--port")) == v["loupe"]["port"]
    assert ports["broker-metrics"] == int(_flag(head["args"], "--metrics-port"))
    assert {ports["gcs-server"], ports["dashboard"], ports["client"]} == {6379, 8265, 10001}
    assert set(ports) == {"gcs-server", "dashboard", "client", "grpc", "broker-metrics"}  # no Ray metrics export (8080)
    rc = one(objs, "RayCluster")
    for group in rc["spec"]["workerGroupSpecs"]:
        flag = "--extractor-metrics-port" if group["groupName"] == "extractors" else "--shard-metrics-port"
        worker_ports = [p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]]
        assert worker_ports == [int(_flag(head["args"], flag))], (group["groupName"], worker_ports)
    svc = one(objs, "Service")
    assert svc["spec"]["selector"]["ray.io/node-type"] == "head"
    assert svc["spec"]["selector"]["ray.io/cluster"] == one(objs, "RayCluster")["metadata"]["name"]
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["grpc"]["port"] == ports["grpc"] and by_name["grpc"]["targetPort"] == "grpc"
    assert by_name["broker-metrics"]["port"] == ports["broker-metrics"] and by_name["broker-metrics"]["targetPort"] == "broker-metrics"


def test_ray_resources_reach_ray_start_params_and_match_the_flags(rendered):
    """One worker group of one pod per shard replica, advertising the resource that the head's
    --shard-resource template names for that (shard, replica); the extractors share one group."""
    _, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    args = _head(rc)["args"]
    shards, replication = int(_flag(args, "--shards")), int(_flag(args, "--replication-factor"))
    template = _flag(args, "--shard-resource")
    groups = _shard_groups(rc)
    assert set(groups) == {(i, j) for i in range(shards) for j in range(replication)}
    for (i, j), g in groups.items():
        assert g["groupName"] == f"shard-{i}-r{j}"
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 1
        assert ray_resources(g["rayStartParams"]["resources"]) == {template.format(shard=i, replica=j): 1}
    extractors = _group(rc, "extractors")
    assert ray_resources(extractors["rayStartParams"]["resources"]) == {_flag(args, "--extractor-resource"): v["extractorWorkers"]["slotsPerPod"]}
    assert extractors["replicas"] * v["extractorWorkers"]["slotsPerPod"] >= int(_flag(args, "--replicas"))
    assert len(rc["spec"]["workerGroupSpecs"]) == shards * replication + 1
    for spec in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        assert "metrics-export-port" not in spec["rayStartParams"]  # Ray's export needs ray[default]: not used
        assert spec["rayStartParams"]["num-cpus"] == "0"


def test_probes_target_the_broker_health_service(rendered):
    from loupe.v1 import retrieval_pb2

    service = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name
    _, values, objs = rendered
    v = _merged(values)
    head = _head(one(objs, "RayCluster"))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = head[kind]
        if v["tls"]["enabled"]:
            code = probe["exec"]["command"][2]
            assert f'service="{service}"' in code and f"127.0.0.1:{v['loupe']['port']}" in code and "/etc/loupe/tls/ca.crt" in code
            compile(code, kind, "exec")
        else:
            assert probe["grpc"] == {"port": v["loupe"]["port"], "service": service}


def test_workers_declare_probes_so_kuberay_injects_none(rendered):
    """KubeRay's default worker probes wget the dashboard agent (needs ray[default] and wget)."""
    _, _, objs = rendered
    for group in one(objs, "RayCluster")["spec"]["workerGroupSpecs"]:
        c = group["template"]["spec"]["containers"][0]
        for kind in ("readinessProbe", "livenessProbe"):
            cmd = c[kind]["exec"]["command"]
            assert cmd[:2] == ["python", "-c"] and "raylet" in cmd[2] and "wget" not in cmd[2]
            compile(cmd[2], kind, "exec")


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def _volumes(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {vol["name"]: vol for vol in group["template"]["spec"].get("volumes", [])}


def test_data_volume_is_mounted_where_the_shards_write(rendered):
    """perReplica (default): a claim per shard replica, mounted by that replica's one pod, and one
    for the head — ReadWriteOnce by default. shared: one ReadWriteMany claim on every data pod."""
    name, values, objs = rendered
    v = _merged(values)
    p = v["persistence"]
    rc = one(objs, "RayCluster")
    data_dir = _flag(_head(rc)["args"], "--data-dir")
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    pods = {"head": rc["spec"]["headGroupSpec"], **{g["groupName"]: g for g in _shard_groups(rc).values()}}
    claims = {}
    for group_name, group in pods.items():
        assert _mounts(group["template"]["spec"]["containers"][0]).get(data_dir) == "data", (name, group_name)
        vol = _volumes(group)["data"]
        if not p["enabled"]:
            assert "emptyDir" in vol
            continue
        claims[group_name] = vol["persistentVolumeClaim"]["claimName"]
    assert data_dir not in _mounts(_group(rc, "extractors")["template"]["spec"]["containers"][0])
    if not p["enabled"]:
        assert pvcs == {}
        return
    if p["mode"] == "perReplica":
        assert len(set(claims.values())) == len(claims), claims  # no claim is mounted by two groups
        assert set(claims.values()) == set(pvcs)
        assert claims["head"] == f"{RELEASE}-loupe-data-head"
        for (i, j), g in _shard_groups(rc).items():
            assert claims[g["groupName"]] == f"{RELEASE}-loupe-data-shard-{i}-r{j}"
            pvc = pvcs[claims[g["groupName"]]]
            assert pvc["metadata"]["labels"]["loupe.io/shard"] == str(i) and pvc["spec"]["resources"]["requests"]["storage"] == p["size"]
        assert pvcs[claims["head"]]["spec"]["resources"]["requests"]["storage"] == p["headSize"]
        expected_modes = p["accessModes"] or ["ReadWriteOnce"]
    else:
        assert len(set(claims.values())) == 1
        if p["existingClaim"]:
            assert set(claims.values()) == {p["existingClaim"]} and pvcs == {}
            return
        assert set(claims.values()) == set(pvcs) == {f"{RELEASE}-loupe-data"}
        expected_modes = p["accessModes"] or ["ReadWriteMany"]
    for pvc in pvcs.values():
        assert pvc["spec"]["accessModes"] == expected_modes
        assert pvc["spec"].get("storageClassName") == (p["storageClass"] or None)
        assert (pvc["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == ("keep" if p["keep"] else None)


def test_default_storage_is_one_readwriteonce_claim_per_shard_replica():
    objs = render({"loupe": {"shards": 3, "replicationFactor": 2}})
    pvcs = sorted(o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert pvcs == sorted([f"{RELEASE}-loupe-data-head"] + [f"{RELEASE}-loupe-data-shard-{i}-r{j}" for i in range(3) for j in range(2)])
    assert {tuple(o["spec"]["accessModes"]) for o in objs if o["kind"] == "PersistentVolumeClaim"} == {("ReadWriteOnce",)}
    assert all("storageClassName" not in o["spec"] for o in objs if o["kind"] == "PersistentVolumeClaim")  # the cluster default


def test_shared_mode_is_one_readwritemany_claim():
    objs = render({"persistence": {"mode": "shared"}, "loupe": {"replicationFactor": 2}})
    (pvc,) = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    rc = one(objs, "RayCluster")
    names = {_volumes(g)["data"]["persistentVolumeClaim"]["claimName"] for g in _shard_groups(rc).values()}
    assert names == {pvc["metadata"]["name"]} == {_volumes(rc["spec"]["headGroupSpec"])["data"]["persistentVolumeClaim"]["claimName"]}


def test_fix_ownership_init_container_runs_on_data_pods_only():
    rc = one(render({"persistence": {"fixOwnership": True}}), "RayCluster")
    for group in [rc["spec"]["headGroupSpec"], *_shard_groups(rc).values()]:
        (init,) = group["template"]["spec"]["initContainers"]
        assert init["name"] == "fix-data-ownership" and init["securityContext"]["runAsUser"] == 0
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "DAC_READ_SEARCH", "FOWNER"]}
        assert "chown -h 10001:10001" in init["command"][-1] and {"name": "data", "mountPath": "/data"} in init["volumeMounts"]
    assert "initContainers" not in _group(rc, "extractors")["template"]["spec"]
    default = one(render({}), "RayCluster")
    assert all("initContainers" not in g["template"]["spec"] for g in [default["spec"]["headGroupSpec"], *default["spec"]["workerGroupSpecs"]])


def test_every_ray_container_carries_the_ray_token(rendered):
    _, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    containers = [_head(rc)] + [g["template"]["spec"]["containers"][0] for g in rc["spec"]["workerGroupSpecs"]]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        if not v["rayAuth"]["enabled"]:
            assert "RAY_AUTH_MODE" not in env
            continue
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "auth_token"
        if v["rayAuth"]["existingSecret"]:
            assert ref["name"] == v["rayAuth"]["existingSecret"]
        else:
            assert "auth_token" in secrets[ref["name"]]["data"]


def test_auth_and_tls_files_are_mounted_where_the_flags_point(rendered):
    import base64

    _, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    head = _head(rc)
    args, mounts, volumes = head["args"], _mounts(head), _volumes(rc["spec"]["headGroupSpec"])
    if not v["auth"]["enabled"]:
        assert "--insecure-no-auth" in args and "--auth-tokens-file" not in args
    else:
        assert "--insecure-no-auth" not in args
        for flag, key in (("--auth-tokens-file", "tokens"), ("--internal-token-file", "internal-token")):
            path = _flag(args, flag)
            directory, filename = path.rsplit("/", 1)
            assert filename == key and mounts[directory] == "auth"
        secret_name = volumes["auth"]["secret"]["secretName"]
        if v["auth"]["existingSecret"]:
            assert secret_name == v["auth"]["existingSecret"]
        else:
            secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name)
            tokens = base64.b64decode(secret["data"]["tokens"]).decode()
            roles = [line.split()[0] for line in tokens.splitlines() if line.strip()]
            assert roles == ["read", "write"]
            assert all(len(line.split()) == 2 for line in tokens.splitlines() if line.strip())
            if v["auth"]["readToken"]:
                assert f"read {v['auth']['readToken']}" in tokens
            assert len(base64.b64decode(secret["data"]["internal-token"])) >= 32
    if v["tls"]["enabled"]:
        assert _flag(args, "--tls-cert-file") == "/etc/loupe/tls/tls.crt"
        assert _flag(args, "--tls-key-file") == "/etc/loupe/tls/tls.key"
        assert mounts["/etc/loupe/tls"] == "tls"
        assert volumes["tls"]["secret"]["secretName"] == v["tls"]["existingSecret"]
    else:
        assert "--tls-cert-file" not in args


def test_helm_test_pod_checks_health_and_searches(rendered):
    _, values, objs = rendered
    v = _merged(values)
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    script = c["command"][-1]
    assert 'service="loupe.v1.Retrieval"' in script and "loupe search" in script
    env = {e["name"]: e.get("value") for e in c["env"]}
    svc = one(objs, "Service")
    assert env["LOUPE_ADDRESS"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc:{v['loupe']['port']}"
    assert ("LOUPE_TOKEN_FILE" in env) == v["auth"]["enabled"]
    assert ("LOUPE_TLS_CA_FILE" in env) == v["tls"]["enabled"]


# the `loupe up` flag that sets the /metrics port of the process each pod hosts
METRICS_FLAG = {"head": "--metrics-port", "shards": "--shard-metrics-port", "extractors": "--extractor-metrics-port"}
ROLE = {"head": "broker", "shards": "shard", "extractors": "extractor"}


def _pods(rc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod template of the head and of each worker group, by group name ("head" for the head)."""
    return {"head": rc["spec"]["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in rc["spec"]["workerGroupSpecs"]}}


def _role(group: str) -> str:
    """head / shards / extractors of a pod template name from _pods (shard groups are shard-<i>-r<j>)."""
    return "shards" if group.startswith("shard-") else group


def _metrics_port(template: dict[str, Any]) -> tuple[str, int]:
    """(name, number) of the pod's one *-metrics container port."""
    (port,) = [p for p in template["spec"]["containers"][0]["ports"] if p["name"].endswith("-metrics")]
    return port["name"], port["containerPort"]


def test_scraping_by_annotations_and_monitors(rendered):
    _, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    args = _head(rc)["args"]
    svc = one(objs, "Service")
    annotated = v["metrics"]["scrapeAnnotations"]
    # the head pod's annotation scrapes the broker: none on the Service (it would scrape it twice)
    assert not any(k.startswith("prometheus.io/") for k in (svc["metadata"].get("annotations") or {}))
    pods = _pods(rc)
    assert {_role(g) for g in pods} == set(METRICS_FLAG)
    for group, template in pods.items():
        name, number = _metrics_port(template)
        assert number == int(_flag(args, METRICS_FLAG[_role(group)])), group
        ann = template["metadata"]["annotations"]
        assert ann.get("prometheus.io/port") == (str(number) if annotated else None), group
        assert ann.get("prometheus.io/scrape") == ("true" if annotated else None), group
    kinds = {o["kind"]: o for o in objs}
    assert ("ServiceMonitor" in kinds) == v["metrics"]["serviceMonitor"]["enabled"]
    assert ("PodMonitor" in kinds) == v["metrics"]["podMonitor"]["enabled"]
    if "ServiceMonitor" in kinds:
        sm = kinds["ServiceMonitor"]
        (ep,) = sm["spec"]["endpoints"]
        assert ep["port"] == "broker-metrics" and ep["honorLabels"] is True
        assert ep["relabelings"] == [{"action": "replace", "targetLabel": "role", "replacement": "broker"}]
        assert all(svc["metadata"]["labels"].get(k) == val for k, val in sm["spec"]["selector"]["matchLabels"].items())
    if "PodMonitor" in kinds:
        pm = kinds["PodMonitor"]["spec"]
        assert pm["selector"]["matchLabels"] == {"ray.io/cluster": rc["metadata"]["name"]}
        endpoints = {e["port"]: e for e in pm["podMetricsEndpoints"]}
        # one endpoint per named metrics port of the pods, the broker's unless the ServiceMonitor has it
        wanted = {group: _metrics_port(t)[0] for group, t in pods.items() if group != "head" or "ServiceMonitor" not in kinds}
        assert set(endpoints) == set(wanted.values())
        for group, port_name in wanted.items():
            ep = endpoints[port_name]
            assert ep["honorLabels"] is True and ep["path"] == "/metrics"
            assert ep["relabelings"] == [{"action": "replace", "targetLabel": "role", "replacement": ROLE[_role(group)]}]


def test_podmonitor_leaves_the_broker_to_the_servicemonitor():
    both = render({"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    assert [e["port"] for e in one(both, "PodMonitor")["spec"]["podMetricsEndpoints"]] == ["shard-metrics", "extract-metrics"]
    alone = render({"metrics": {"podMonitor": {"enabled": True}}})
    assert [e["port"] for e in one(alone, "PodMonitor")["spec"]["podMetricsEndpoints"]] == ["broker-metrics", "shard-metrics", "extract-metrics"]


def test_metrics_ports_follow_the_values():
    objs = render({"metrics": {"shardPort": 19091, "extractorPort": 19092, "podMonitor": {"enabled": True}}})
    rc = one(objs, "RayCluster")
    args = _head(rc)["args"]
    assert _flag(args, "--shard-metrics-port") == "19091" and _flag(args, "--extractor-metrics-port") == "19092"
    assert _metrics_port(_pods(rc)["shard-0-r0"]) == ("shard-metrics", 19091)
    assert _metrics_port(_pods(rc)["extractors"]) == ("extract-metrics", 19092)
    assert _pods(rc)["extractors"]["metadata"]["annotations"]["prometheus.io/port"] == "19092"


def test_one_actor_per_pod_by_default_and_notes_warn_otherwise():
    v = _merged({})
    assert v["extractorWorkers"]["slotsPerPod"] == 1
    assert "random port" not in notes({})
    assert "random port" in notes({"extractorWorkers": {"slotsPerPod": 2}})
    text = notes({})
    assert "port 9091 of each shard pod" in text and "port 9092 of each extractor pod" in text and "loupe_shard_up" in text


def _selects(pdb: dict[str, Any], template: dict[str, Any]) -> bool:
    """Whether the budget's selector matches a pod of this template (KubeRay adds ray.io/cluster and ray.io/group)."""
    return all(template["metadata"]["labels"].get(k, template["_ray"].get(k)) == val for k, val in pdb["spec"]["selector"]["matchLabels"].items())


def test_pdbs_use_an_integer_min_available_the_disruption_controller_can_evaluate(rendered):
    """RayCluster pods have no scale subresource: only an integer minAvailable lets the disruption
    controller allow evictions (KubeRay issue 2662). One budget per shard with >= 2 copies
    (minAvailable copies - maxUnavailable), one for the extractors; none that would be 0."""
    _, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    pdbs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodDisruptionBudget"}
    if not v["pdb"]["enabled"]:
        assert pdbs == {}
        return
    for pdb in pdbs.values():
        assert set(pdb["spec"]) == {"minAvailable", "selector"}, pdb["spec"]
        assert isinstance(pdb["spec"]["minAvailable"], int) and pdb["spec"]["minAvailable"] >= 1
        assert pdb["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == rc["metadata"]["name"]
    templates = [dict(g["template"], _ray={"ray.io/cluster": rc["metadata"]["name"], "ray.io/group": g["groupName"]})
                 for g in rc["spec"]["workerGroupSpecs"]]
    head = dict(rc["spec"]["headGroupSpec"]["template"], _ray={"ray.io/cluster": rc["metadata"]["name"], "ray.io/group": "headgroup"})
    assert not any(_selects(p, head) for p in pdbs.values())  # the single head gets none: it would block drains
    R, unavailable = v["loupe"]["replicationFactor"], v["pdb"]["maxUnavailable"]
    for i in range(v["loupe"]["shards"]):
        name = f"{RELEASE}-loupe-shard-{i}"
        if R - unavailable < 1:
            assert name not in pdbs
            continue
        selected = [t for t in templates if _selects(pdbs[name], t)]
        assert sorted(int(t["metadata"]["labels"]["loupe.io/shard-replica"]) for t in selected) == list(range(R))
        assert {t["metadata"]["labels"]["loupe.io/shard"] for t in selected} == {str(i)}
        assert pdbs[name]["spec"]["minAvailable"] == R - unavailable
    ext = f"{RELEASE}-loupe-extractors"
    n = v["extractorWorkers"]["replicas"]
    if n - unavailable >= 1:
        assert pdbs[ext]["spec"]["minAvailable"] == n - unavailable
        assert [t["_ray"]["ray.io/group"] for t in templates if _selects(pdbs[ext], t)] == ["extractors"]
    else:
        assert ext not in pdbs


def test_pdb_forms_by_replication_factor():
    """R=1: no shard budget (it would block every drain: minAvailable 1 of 1 pod); R=2: minAvailable 1
    per shard, so a drain evicts one copy and waits for it to be back before the other."""
    assert [o for o in render({}) if o["kind"] == "PodDisruptionBudget"] == []
    objs = render({"loupe": {"shards": 2, "replicationFactor": 2, "replicas": 3}, "extractorWorkers": {"replicas": 3}})
    got = {o["metadata"]["name"]: (o["spec"]["minAvailable"], o["spec"]["selector"]["matchLabels"]) for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert got == {
        f"{RELEASE}-loupe-shard-0": (1, {"ray.io/cluster": f"{RELEASE}-loupe", "loupe.io/shard": "0"}),
        f"{RELEASE}-loupe-shard-1": (1, {"ray.io/cluster": f"{RELEASE}-loupe", "loupe.io/shard": "1"}),
        f"{RELEASE}-loupe-extractors": (2, {"ray.io/cluster": f"{RELEASE}-loupe", "ray.io/group": "extractors"}),
    }
    assert "no PodDisruptionBudget guards the shards" in notes({})
    assert "no PodDisruptionBudget guards the shards" not in notes({"loupe": {"replicationFactor": 2}})


def test_notes_say_how_to_reach_the_service():
    text = notes({})
    assert f"port-forward svc/{RELEASE}-loupe 50051:50051" in text
    assert f"{RELEASE}-loupe.{NAMESPACE}.svc:50051" in text
    assert "LOUPE_TOKEN" in text


# --- the dashboard and alert rules the project keeps (files/ of the chart: one copy) ---------------
def test_dashboard_and_rules_render_only_when_their_files_exist(tmp_path):
    chart = chart_copy(tmp_path)
    (chart / "files").mkdir(exist_ok=True)
    for f in ("dashboard.json", "alerts.yaml"):
        (chart / "files" / f).unlink(missing_ok=True)
    values = {"metrics": {"prometheusRule": {"enabled": True}}}
    kinds = {o["kind"] for o in render(values, chart_dir=chart)}
    assert "ConfigMap" not in kinds and "PrometheusRule" not in kinds

    dashboard = {"title": "loupe", "panels": [{"targets": [{"expr": "rate(loupe_search_duration_seconds_count[$__rate_interval])"}]}]}
    (chart / "files" / "dashboard.json").write_text(json.dumps(dashboard, indent=1))
    rules = {"groups": [{"name": "loupe", "rules": [{"alert": "LoupeShardDown", "expr": "up == 0", "for": "5m"}]}]}
    (chart / "files" / "alerts.yaml").write_text(yaml.safe_dump(rules))
    objs = render(values, chart_dir=chart)
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["loupe.json"]) == dashboard
    assert one(objs, "PrometheusRule")["spec"] == rules


def test_the_projects_dashboard_and_rules_render_when_present():
    files = {f: CHART_DIR / "files" / f for f in ("dashboard.json", "alerts.yaml")}
    if not any(p.is_file() and p.read_text().strip() for p in files.values()):
        pytest.skip("helm/loupe/files/dashboard.json and alerts.yaml are not there yet (filled by the dashboard issue)")
    objs = render({"metrics": {"prometheusRule": {"enabled": True}}})
    if files["dashboard.json"].is_file():
        assert json.loads(one(objs, "ConfigMap")["data"]["loupe.json"]) == json.loads(files["dashboard.json"].read_text())
    if files["alerts.yaml"].is_file():
        assert one(objs, "PrometheusRule")["spec"]["groups"]


# --- values.schema.json and template checks reject bad values --------------------------------------
@pytest.mark.parametrize(
    "values, message",
    [
        ({"loupe": {"shards": -1}}, "/loupe/shards"),
        ({"loupe": {"shards": 0}}, "/loupe/shards"),
        ({"loupe": {"replicas": -2}}, "/loupe/replicas"),
        ({"loupe": {"replicationFactor": 0}}, "/loupe/replicationFactor"),
        ({"shardWorkers": {"replicas": 3}}, "additional properties 'replicas' not allowed"),
        ({"persistence": {"mode": "rwx"}}, "/persistence/mode"),
        ({"upgradeStrategy": "Rolling"}, "/upgradeStrategy"),
        ({"loupe": {"startupTimeoutS": 5}}, "/loupe/startupTimeoutS"),
        ({"extractorWorkers": {"slotsPerPod": 0}}, "/extractorWorkers/slotsPerPod"),
        ({"loupe": {"shards": "2"}}, "/loupe/shards"),
        ({"loupe": {"port": "50051"}}, "/loupe/port"),
        ({"loupe": {"port": 70000}}, "/loupe/port"),
        ({"auth": {"enabled": "yes"}}, "/auth/enabled"),
        ({"persistence": {"size": "lots"}}, "/persistence/size"),
        ({"loupe": {"shardResource": "not a name"}}, "/loupe/shardResource"),
        ({"shards": 3}, "additional properties 'shards' not allowed"),
        ({"loupe": {"shard": 3}}, "additional properties 'shard' not allowed"),
        ({"service": {"type": "Ingress"}}, "/service/type"),
        ({"metrics": {"shardPort": 0}}, "/metrics/shardPort"),
        ({"metrics": {"extractorPort": "9092"}}, "/metrics/extractorPort"),
        ({"metrics": {"rayExportPort": 8080}}, "additional properties 'rayExportPort' not allowed"),
        ({"backup": {"url": "/data/backups"}}, "/backup/url"),
        ({"backup": {"url": "gs://bucket/x"}}, "/backup/url"),
        ({"backup": {"enabled": "daily"}}, "/backup/enabled"),
        ({"backup": {"endpointUrl": "minio:9000"}}, "/backup/endpointUrl"),
        ({"backup": {"bucket": "x"}}, "additional properties 'bucket' not allowed"),
    ],
)
def test_schema_rejects_bad_values_with_a_message_naming_the_key(values, message):
    helm_process.validate_schema(CHART_DIR, {})
    with pytest.raises(helm_process.HelmValuesError) as err:
        helm_process.validate_schema(CHART_DIR, values)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loupe": {"replicas": 3}}, "loupe.replicas = 3"),
        ({"persistence": {"mode": "shared", "accessModes": ["ReadWriteOnce"]}}, "must include ReadWriteMany"),
        ({"persistence": {"existingClaim": "mine"}}, "existingClaim is for persistence.mode=shared"),
        ({"persistence": {"accessModes": ["ReadOnlyMany"]}}, "ReadOnlyMany cannot work"),
        ({"tls": {"enabled": True}}, "tls.existingSecret"),
        ({"loupe": {"extractorResource": "loupe_shard"}}, "must differ"),
        ({"backup": {"enabled": True}}, "backup.url: required"),
    ],
)
def test_render_fails_on_inconsistent_values(values, message):
    with pytest.raises(helm_process.HelmError, match=message.replace(".", r"\.")):
        render(values)


# --- operating it: upgrades, secrets, pods' surroundings ---------------------------------------------
def _all_pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod spec of the head, of every worker group and of the `helm test` pod."""
    rc = one(objs, "RayCluster")
    specs = {name: t["spec"] for name, t in _pods(rc).items()}
    specs["helm-test"] = one(objs, "Pod")["spec"]
    return specs


def test_upgrade_strategy_recreates_pods_and_the_crd_knows_it(rendered):
    """Without spec.upgradeStrategy KubeRay never replaces running pods after `helm upgrade`."""
    _, values, objs = rendered
    rc = one(objs, "RayCluster")
    assert rc["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    schema = _crd_v1_schema()
    assert "Recreate" in schema["properties"]["spec"]["properties"]["upgradeStrategy"]["properties"]["type"]["enum"]
    assert "upgradeStrategy" not in one(render({"upgradeStrategy": ""}), "RayCluster")["spec"]


def test_the_chart_states_the_kuberay_version_it_needs():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["annotations"]["loupe.io/requires"] == "kuberay-operator>=1.6.0"  # upgradeStrategy
    assert "KubeRay operator >= 1.6" in notes({})


def test_no_pod_mounts_a_service_account_token(rendered):
    _, values, objs = rendered
    v = _merged(values)
    for name, spec in _all_pod_specs(objs).items():
        assert spec["automountServiceAccountToken"] is False, name
        expected = v["serviceAccount"]["name"] or (f"{RELEASE}-loupe" if v["serviceAccount"]["create"] else None)
        assert spec.get("serviceAccountName") == expected, name
    sas = [o for o in objs if o["kind"] == "ServiceAccount"]
    assert len(sas) == int(v["serviceAccount"]["create"])
    for sa in sas:
        assert sa["automountServiceAccountToken"] is False


def test_global_values_are_accepted_so_the_chart_can_be_a_subchart():
    helm_process.validate_schema(CHART_DIR, {"global": {"imageRegistry": "r.invalid", "anything": {"nested": 1}}})
    assert one(render({"global": {"imageRegistry": "r.invalid"}}), "RayCluster")


def test_shard_and_extractor_pods_spread_across_nodes(rendered):
    _, values, objs = rendered
    v = _merged(values)
    rc = one(objs, "RayCluster")
    cluster = rc["metadata"]["name"]
    for (i, j), g in _shard_groups(rc).items():
        spread = g["template"]["spec"]["topologySpreadConstraints"]
        every_shard = {"ray.io/cluster": cluster, "app.kubernetes.io/component": "shards"}
        assert {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": every_shard}} in spread
        copies = [c for c in spread if c["labelSelector"]["matchLabels"].get("loupe.io/shard") == str(i)]
        if v["loupe"]["replicationFactor"] > 1 and v["shardWorkers"]["replicaSpread"]:
            assert copies == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": v["shardWorkers"]["replicaSpread"],
                               "labelSelector": {"matchLabels": {"ray.io/cluster": cluster, "loupe.io/shard": str(i)}}}]
        else:
            assert copies == []
        # every selector matches the pod itself (a constraint that selects nothing spreads nothing)
        labels = {**g["template"]["metadata"]["labels"], "ray.io/cluster": cluster}
        assert all(all(labels.get(k) == val for k, val in c["labelSelector"]["matchLabels"].items()) for c in spread)
    ext = _group(rc, "extractors")["template"]["spec"]["topologySpreadConstraints"]
    assert ext[0]["labelSelector"]["matchLabels"] == {"ray.io/cluster": cluster, "app.kubernetes.io/component": "extractors"}
    assert "topologySpreadConstraints" not in rc["spec"]["headGroupSpec"]["template"]["spec"]


def test_pod_extras_reach_every_ray_pod():
    from chart_render import EXTRAS

    objs = render(EXTRAS)
    rc = one(objs, "RayCluster")
    for name, template in _pods(rc).items():
        spec, c = template["spec"], template["spec"]["containers"][0]
        assert template["metadata"]["labels"]["team"] == "search", name
        assert template["metadata"]["annotations"]["loupe.io/secret-version"] == "2", name
        assert spec["priorityClassName"] == ("loupe-critical" if name == "head" else "loupe-high"), name
        assert {"name": "ca-bundle", "configMap": {"name": "corp-ca"}} in spec["volumes"], name
        assert {"name": "ca-bundle", "mountPath": "/etc/corp-ca", "readOnly": True} in c["volumeMounts"], name
        inits = [i["name"] for i in spec["initContainers"]]
        assert inits == (["wait-for-dns"] if name == "extractors" else ["fix-data-ownership", "wait-for-dns"]), name
        assert {"name": "LOUPE_MAX_SIDE", "value": "768"} in c["env"], name
    assert one(objs, "Pod")["metadata"]["labels"]["team"] == "search"
    assert one(objs, "ServiceAccount")["metadata"]["annotations"] == {"iam.example/role": "loupe"}


def test_one_startup_timeout_for_loupe_and_the_probe(rendered):
    """`loupe up` waits LOUPE_STARTUP_TIMEOUT_S for its actors; the startup probe must outlast it."""
    from cluster.config import ClusterConfig

    _, values, objs = rendered
    v = _merged(values)
    head = _head(one(objs, "RayCluster"))
    env = {e["name"]: e.get("value") for e in head["env"]}
    timeout = v["loupe"]["startupTimeoutS"]
    assert ClusterConfig.build({"insecure_no_auth": True}, environ={"LOUPE_STARTUP_TIMEOUT_S": env["LOUPE_STARTUP_TIMEOUT_S"]}).startup_timeout_s == timeout
    probe = head["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert timeout + 60 <= budget <= timeout + 80, (timeout, budget)
    assert f"loupe up waits {timeout} s" in notes(values) and f"allows {budget} s" in notes(values)


def test_ray_is_pinned_to_the_charts_ray_version():
    import re

    pinned = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pinned == [_merged({})["rayVersion"]]


# --- secrets: precedence, GitOps, restarts -------------------------------------------------------------
def _secret_data(objs: list[dict[str, Any]], name: str) -> dict[str, str]:
    import base64

    obj = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == name)
    return {k: base64.b64decode(val).decode() for k, val in obj["data"].items()}


def test_explicit_tokens_are_what_the_secrets_hold():
    from chart_render import EXTRAS

    objs = render(EXTRAS)
    auth = _secret_data(objs, f"{RELEASE}-loupe-auth")
    assert auth == {"tokens": f"read {'R' * 40}\nwrite {'W' * 40}\n", "internal-token": "I" * 40, "read-token": "R" * 40, "write-token": "W" * 40}
    assert _secret_data(objs, f"{RELEASE}-loupe-ray-auth") == {"auth_token": "Y" * 48}


def _precedence_chart(tmp_path, old_auth: dict[str, str], old_ray: dict[str, str]):
    """A copy of the chart with a template that runs the token helper on a Secret "found" in the
    cluster (offline rendering looks nothing up), exposing the result in a ConfigMap."""
    import base64

    chart = chart_copy(tmp_path)
    enc = lambda d: "(dict " + " ".join(f'"{k}" "{base64.b64encode(v.encode()).decode()}"' for k, v in d.items()) + ")"  # noqa: E731
    (chart / "templates" / "zz-precedence.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: precedence\ndata:\n  result: {{ include \"loupe.secretData\" "
        f"(dict \"auth\" .Values.auth \"rayAuth\" .Values.rayAuth \"oldAuth\" {enc(old_auth)} \"oldRay\" {enc(old_ray)}) | quote }}}}\n")
    return chart


def test_explicit_values_win_over_the_secret_in_the_cluster_and_the_rest_is_kept(tmp_path):
    old_auth = {"tokens": "read oldread\nwrite oldwrite\n", "internal-token": "oldinternal", "read-token": "oldread"}  # a v0.1 Secret: no write-token key
    chart = _precedence_chart(tmp_path, old_auth, {"auth_token": "oldray"})
    values = {"auth": {"readToken": "newread"}, "rayAuth": {"token": "newray"}}
    got = json.loads(next(o for o in render(values, chart_dir=chart) if o["metadata"]["name"] == "precedence")["data"]["result"])
    assert got["auth"] == {"tokens": "read newread\nwrite oldwrite\n", "internal-token": "oldinternal", "read-token": "newread", "write-token": "oldwrite"}
    assert got["ray"] == {"auth_token": "newray"}
    kept = json.loads(next(o for o in render({}, chart_dir=chart) if o["metadata"]["name"] == "precedence")["data"]["result"])
    assert kept["auth"]["tokens"] == "read oldread\nwrite oldwrite\n" and kept["ray"] == {"auth_token": "oldray"}


def test_existing_secrets_are_used_and_not_created():
    objs = render({"auth": {"existingSecret": "my-tokens"}, "rayAuth": {"existingSecret": "my-ray"}})
    assert [o for o in objs if o["kind"] == "Secret"] == []
    rc = one(objs, "RayCluster")
    assert _volumes(rc["spec"]["headGroupSpec"])["auth"]["secret"]["secretName"] == "my-tokens"
    for template in _pods(rc).values():
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-ray", "key": "auth_token"}
    test_pod = one(objs, "Pod")
    assert next(vol for vol in test_pod["spec"]["volumes"] if vol["name"] == "auth")["secret"]["secretName"] == "my-tokens"


def test_pods_carry_a_checksum_of_the_secrets_they_run_with():
    """The checksum is computed from the same tokens as the Secret objects (random ones included),
    so a fresh install does not restart itself on its first upgrade, and a new token restarts every pod."""
    import hashlib

    def checksums(objs):
        return {t["metadata"]["annotations"]["checksum/secrets"] for t in _pods(one(objs, "RayCluster")).values()}

    objs = render({})
    (checksum,) = checksums(objs)
    auth, ray = _secret_data(objs, f"{RELEASE}-loupe-auth"), _secret_data(objs, f"{RELEASE}-loupe-ray-auth")
    assert checksum == hashlib.sha256(json.dumps({"auth": auth, "ray": ray}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    fixed = {"auth": {"readToken": "a" * 40, "writeToken": "b" * 40, "internalToken": "c" * 40}, "rayAuth": {"token": "d" * 48}}
    assert checksums(render(fixed)) == checksums(render(fixed))
    assert checksums(render(fixed)) != checksums(render({**fixed, "rayAuth": {"token": "e" * 48}}))
    assert checksums(render({"auth": {"existingSecret": "s"}, "rayAuth": {"existingSecret": "r"}})) != checksums(render({"auth": {"existingSecret": "s2"}, "rayAuth": {"existingSecret": "r"}}))


# --- the backup CronJob ------------------------------------------------------------------------------
def test_no_backup_cronjob_by_default():
    objs = render({})
    assert not [o for o in objs if o["kind"] == "CronJob"]
    assert "envFrom" not in _head(one(objs, "RayCluster"))


def test_the_backup_cronjob_asks_the_broker_with_the_write_token(rendered):
    """The job runs `loupe backup --to <url>` against the Service (TLS CA and write token when on);
    the head, which writes the backup, gets the S3 credentials and endpoint."""
    name, values, objs = rendered
    v = _merged(values)
    jobs = [o for o in objs if o["kind"] == "CronJob"]
    if not v["backup"]["enabled"]:
        assert not jobs, name
        return
    (job,) = jobs
    assert job["apiVersion"] == "batch/v1" and len(job["metadata"]["name"]) <= 52
    spec = job["spec"]
    assert spec["schedule"] == v["backup"]["schedule"] and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cmd = c["command"]
    assert cmd[:2] == ["loupe", "backup"] and _flag(cmd, "--to") == v["backup"]["url"]
    assert _flag(cmd, "--address") == f"{one(objs, 'Service')['metadata']['name']}.{NAMESPACE}.svc:{v['loupe']['port']}"
    assert ("--full" in cmd) == v["backup"]["full"]
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    volumes = {vol["name"]: vol for vol in pod.get("volumes", [])}
    if v["auth"]["enabled"]:
        assert _flag(cmd, "--token-file") == mounts["auth"] + "/write-token"
        assert volumes["auth"]["secret"]["items"] == [{"key": "write-token", "path": "write-token"}]
    else:
        assert "--token-file" not in cmd
    if v["tls"]["enabled"]:
        assert _flag(cmd, "--tls-ca-file") == mounts["tls"] + "/ca.crt"
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    head = _head(one(objs, "RayCluster"))
    env = {e["name"]: e.get("value") for e in head["env"]}
    if v["backup"]["credentialsSecret"]:
        assert head["envFrom"] == [{"secretRef": {"name": v["backup"]["credentialsSecret"]}}]
    if v["backup"]["endpointUrl"]:
        assert env["AWS_ENDPOINT_URL"] == v["backup"]["endpointUrl"]
    if v["backup"]["region"]:
        assert env["AWS_DEFAULT_REGION"] == v["backup"]["region"]
    if v["backup"]["timeZone"]:
        assert spec["timeZone"] == v["backup"]["timeZone"]


def test_the_backup_cronjob_name_fits_with_the_longest_release_name():
    objs = render(VALUE_SETS["tls-auth-servicemonitor"], release="r" * 53)
    (job,) = [o for o in objs if o["kind"] == "CronJob"]
    assert len(job["metadata"]["name"]) <= 52 and job["metadata"]["name"].endswith("-backup")
