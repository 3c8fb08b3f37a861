"""Helpers of the chart tests: render the Helm chart offline (helm-python-sdk wraps Helm's Go SDK;
no cluster, no helm CLI), and the value sets it is rendered with."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import helm_process
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "loupe"
RAYCLUSTER_CRD = REPO_ROOT.parent / "shared" / "k8s" / "ray.io_rayclusters.yaml"
RELEASE, NAMESPACE = "rel", "search"

# The value sets the chart is rendered with (besides the defaults).
MINIMAL: dict[str, Any] = {
    "loupe": {"shards": 1, "replicas": 1},
    "extractorWorkers": {"replicas": 1, "slotsPerPod": 1},
    "auth": {"enabled": False},
    "rayAuth": {"enabled": False},
    "persistence": {"enabled": False},
    "pdb": {"enabled": False},
    "dashboard": {"enabled": False},
    "metrics": {"scrapeAnnotations": False},
}
PRODUCTION: dict[str, Any] = {
    "image": {"repository": "registry.invalid/search/loupe", "tag": "0.1.0-cpu", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "loupe": {"shards": 8, "replicationFactor": 3, "replicas": 4, "port": 443, "metricsPort": 9100, "indexFactory": "IVF4096,PQ64",
              "extraArgs": ["--max-side", "768"]},
    "shardWorkers": {"resources": {"requests": {"cpu": "4", "memory": "32Gi"}}, "replicaSpread": "DoNotSchedule",
                     "nodeSelector": {"pool": "memory"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "loupe", "effect": "NoSchedule"}]},
    "extractorWorkers": {"replicas": 4, "slotsPerPod": 1, "resources": {"requests": {"cpu": "8", "memory": "8Gi"}}},
    "auth": {"enabled": True, "existingSecret": "loupe-tokens"},
    "rayAuth": {"enabled": True, "existingSecret": "loupe-ray-token"},
    # the ReadWriteMany option: one shared claim
    "persistence": {"enabled": True, "mode": "shared", "storageClass": "cephfs", "size": "2Ti"},
    "metrics": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "pdb": {"maxUnavailable": 1},
}
SECURE: dict[str, Any] = {
    "tls": {"enabled": True, "existingSecret": "loupe-tls"},
    "auth": {"enabled": True, "readToken": "r" * 40, "writeToken": "w" * 40, "internalToken": "i" * 40},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "persistence": {"mode": "shared", "existingClaim": "loupe-rwx"},
    "backup": {"enabled": True, "url": "s3://loupe-backups", "full": True},
}
# what an operator adds around the pods, and every token given explicitly
EXTRAS: dict[str, Any] = {
    "global": {"imageRegistry": "registry.invalid", "storageClass": "fast"},
    "loupe": {"replicationFactor": 2, "extraEnv": [{"name": "LOUPE_MAX_SIDE", "value": "768"}]},
    "auth": {"readToken": "R" * 40, "writeToken": "W" * 40, "internalToken": "I" * 40},
    "rayAuth": {"token": "Y" * 48},
    "serviceAccount": {"create": True, "annotations": {"iam.example/role": "loupe"}},
    "priorityClassName": "loupe-high",
    "head": {"priorityClassName": "loupe-critical"},
    "podLabels": {"team": "search"},
    "podAnnotations": {"loupe.io/secret-version": "2"},
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corp-ca"}}],
    "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/corp-ca", "readOnly": True}],
    "extraInitContainers": [{"name": "wait-for-dns", "image": "busybox:1.37", "command": ["sh", "-c", "nslookup kubernetes.default"]}],
    "persistence": {"fixOwnership": True, "storageClass": "gp3", "accessModes": ["ReadWriteOncePod"]},
    "backup": {"enabled": True, "url": "s3://loupe-backups/prod", "credentialsSecret": "loupe-s3", "endpointUrl": "https://minio.storage.svc:9000",
               "region": "eu-west-1", "timeZone": "Europe/Paris"},
}
# the example shipped next to values.yaml
EXAMPLE: dict[str, Any] = yaml.safe_load((CHART_DIR / "values-production.yaml").read_text())
VALUE_SETS: dict[str, dict[str, Any]] = {"default": {}, "minimal": MINIMAL, "production": PRODUCTION, "tls-auth-servicemonitor": SECURE,
                                         "extras-explicit-tokens": EXTRAS, "values-production.yaml": EXAMPLE}


def render(values: dict[str, Any], chart_dir: Path = CHART_DIR, release: str = RELEASE) -> list[dict[str, Any]]:
    """Every object the chart renders (templates and test hooks), parsed; NOTES.txt excluded."""
    files = helm_process.render(chart_dir, values, name=release, namespace=NAMESPACE, is_install=True)
    objs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(d for d in yaml.safe_load_all(text) if d)
    return objs


def notes(values: dict[str, Any]) -> str:
    files = helm_process.render(CHART_DIR, values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def chart_copy(tmp_path: Path) -> Path:
    """A private copy of the chart, for tests that add files to it."""
    dst = tmp_path / "loupe"
    shutil.copytree(CHART_DIR, dst)
    return dst
