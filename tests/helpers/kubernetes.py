"""Render deploy/kubernetes/ with kustomize and validate the objects offline, for the manifest tests.

Rendering uses `kubectl kustomize` (kustomize v5 built in; `$KUBECTL` names another binary) or a
standalone `kustomize build`. Built-in kinds are validated against the Kubernetes JSON schemas that
the `kubernetes-validate` package ships (strict: an unknown field is an error). KEDA's kinds have no
schema there: `KEDA_SCHEMAS` below is hand-written from KEDA's v2 API (keda.sh/v1alpha1), strict on
every object whose fields we set, so a typo in a field name fails as it would at `kubectl apply`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("base", "overlays/production", "overlays/production-keda")

# Oldest Kubernetes these manifests claim to support, and the newest schemas the validator has.
OLDEST_KUBERNETES = "1.29"


def kustomize_command() -> list[str] | None:
    """The command that renders a kustomization directory, or None when no tool is installed."""
    explicit = os.environ.get("KUBECTL")
    if explicit:
        return [explicit, "kustomize"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(command: list[str], overlay: str) -> list[dict[str, Any]]:
    """Every object of one overlay, as kustomize renders it."""
    done = subprocess.run(
        [*command, str(KUBERNETES_DIR / overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"kustomize failed on {overlay}:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def kubernetes_versions() -> list[str]:
    """The Kubernetes versions to validate against: the oldest supported and the newest known."""
    from kubernetes_validate.utils import latest_version, major_minor

    return sorted({OLDEST_KUBERNETES, major_minor(latest_version())})


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Schema violations of one rendered object (empty = valid), against every version we support."""
    import jsonschema

    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion", "").startswith("keda.sh/"):
        schema = KEDA_SCHEMAS.get(obj.get("kind", ""))
        if schema is None:
            return [f"{name}: no schema for KEDA kind {obj.get('kind')!r}"]
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]

    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    errors = []
    for version in kubernetes_versions():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
        except SchemaNotFoundError as e:
            errors.append(f"{name}: {e.message}")
    return errors


# --- KEDA v2 (keda.sh/v1alpha1), the fields these manifests may use ---------------------------------

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}

_SCALING_RULES = {  # autoscaling/v2 HPAScalingRules, as KEDA embeds it
    "type": "object",
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}

_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "properties": {
        "type": {"type": "string", "minLength": 1},
        "name": {"type": "string"},
        "metadata": _STRING_MAP,  # KEDA reads every trigger parameter as a string
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
    # the postgresql scaler refuses a trigger without a query or a non-zero target
    "if": {"properties": {"type": {"const": "postgresql"}}},
    "then": {
        "properties": {
            "metadata": {
                "required": ["query", "targetQueryValue"],
                "properties": {
                    "query": {"type": "string", "minLength": 1},
                    "targetQueryValue": {"type": "string", "pattern": r"^[0-9]*\.?[0-9]+$", "not": {"pattern": r"^0*\.?0*$"}},
                    "activationTargetQueryValue": {"type": "string", "pattern": r"^[0-9]*\.?[0-9]+$"},
                },
            }
        }
    },
}

SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1},
                        "envSourceContainerName": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                "pollingInterval": _COUNT,
                "cooldownPeriod": _COUNT,
                "initialCooldownPeriod": _COUNT,
                "idleReplicaCount": _COUNT,
                "minReplicaCount": _COUNT,
                "maxReplicaCount": _COUNT,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT32, "replicas": _INT32, "behavior": {"type": "string"}},
                    "additionalProperties": False,
                },
                "advanced": {
                    "type": "object",
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "properties": {"scaleUp": _SCALING_RULES, "scaleDown": _SCALING_RULES},
                                    "additionalProperties": False,
                                },
                            },
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

TRIGGER_AUTHENTICATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "minProperties": 1,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}},
                        "additionalProperties": False,
                    },
                },
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name"],
                        "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "containerName": {"type": "string"}},
                        "additionalProperties": False,
                    },
                },
                # secret stores we do not use: accepted as objects, not checked further
                **{
                    key: {"type": "object"}
                    for key in ("podIdentity", "hashiCorpVault", "azureKeyVault", "awsSecretManager", "gcpSecretManager")
                },
                "configMapTargetRef": {"type": "array"},
                "boundServiceAccountToken": {"type": "array"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT_SCHEMA, "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA}
