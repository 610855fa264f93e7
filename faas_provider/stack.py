"""Reading a faas-cli stack file (stack.yml) into FunctionDeployments, as faas-cli deploy would."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from faas_provider.models import FunctionDeployment

_ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class StackError(ValueError):
    """The stack file cannot be read or describes an invalid function."""


def _substitute(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment, as faas-cli's envsubst does."""
    return _ENV_REFERENCE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def load_stack(path: Path) -> list[FunctionDeployment]:
    """The functions of a stack file, in file order."""
    try:
        document = yaml.safe_load(_substitute(path.read_text()))
    except (OSError, yaml.YAMLError) as error:
        raise StackError(f"cannot read stack file {path}: {error}") from error
    functions = (document or {}).get("functions") or {}
    if not isinstance(functions, dict):
        raise StackError(f"{path}: 'functions' must be a mapping of name to function")
    return [_deployment(path, name, spec or {}) for name, spec in functions.items()]


def _deployment(path: Path, name: str, spec: dict[str, Any]) -> FunctionDeployment:
    env: dict[str, Any] = {}
    for env_file in spec.get("environment_file") or []:
        included = yaml.safe_load((path.parent / env_file).read_text()) or {}
        env.update(included.get("environment") or {})
    env.update(spec.get("environment") or {})
    body = {
        "service": name,
        "image": spec.get("image", ""),
        "namespace": spec.get("namespace"),
        "envProcess": spec.get("fprocess"),
        "envVars": {k: str(v) for k, v in env.items()},
        "constraints": spec.get("constraints"),
        "secrets": spec.get("secrets"),
        "labels": _strings(spec.get("labels")),
        "annotations": _strings(spec.get("annotations")),
        "limits": spec.get("limits"),
        "requests": spec.get("requests"),
        "readOnlyRootFilesystem": spec.get("readonly_root_filesystem", False),
    }
    try:
        return FunctionDeployment.model_validate(body)
    except ValueError as error:
        raise StackError(f"{path}: function {name}: {error}") from error


def _strings(mapping: dict[str, Any] | None) -> dict[str, str] | None:
    return None if mapping is None else {k: str(v) for k, v in mapping.items()}
