"""Customer-agent credentials, found exactly where sap-cloud-sdk's customer flow looks.

STANDARD mode: a servicebinding.io binding under ``$SERVICE_BINDING_ROOT`` (default
``/bindings``) whose ``type`` file says ``integration-credentials``, with a ``credentials``
JSON file (``tokenServiceUrl``, ``clientid``, ``certificate``, ``privateKey``, ``gatewayUrl``,
``integrationDependencies``). TRANSPARENT mode: ``INTEGRATION_CLIENT_ID``,
``INTEGRATION_AUTH_URL``, ``INTEGRATION_GATEWAY_URL`` (+ ``INTEGRATION_DEPENDENCIES``).
Errors name the missing or invalid field and never echo a value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import CacheConfigError

BINDING_ROOT_ENV = "SERVICE_BINDING_ROOT"
DEFAULT_BINDING_ROOT = "/bindings"
BINDING_TYPE = "integration-credentials"
ENV_CLIENT_ID = "INTEGRATION_CLIENT_ID"
ENV_AUTH_URL = "INTEGRATION_AUTH_URL"
ENV_GATEWAY_URL = "INTEGRATION_GATEWAY_URL"
ENV_DEPENDENCIES = "INTEGRATION_DEPENDENCIES"
_DEPENDENCIES_FORMAT = 'expected [{"ordId": "...", "globalTenantId": "..."}]'


class CredentialsError(CacheConfigError):
    """Agent Gateway customer credentials are missing or invalid (the message names the field)."""


@dataclass(frozen=True)
class IntegrationDependency:
    """One MCP server the agent may call: its ORD id and global tenant id."""

    ord_id: str
    global_tenant_id: str


@dataclass(frozen=True)
class CustomerCredentials:
    """What a customer agent needs to get IAS tokens for Agent Gateway.

    ``certificate``/``private_key`` (PEM) are set in STANDARD (mTLS) mode and None in
    TRANSPARENT mode; they never appear in ``repr``.
    """

    token_service_url: str
    client_id: str
    gateway_url: str
    integration_dependencies: tuple[IntegrationDependency, ...] = ()
    certificate: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    source: str = field(default="", compare=False)
    """Where these came from: the credentials file path, or ``"env"``."""

    def __post_init__(self) -> None:
        if (self.certificate is None) != (self.private_key is None):
            raise CredentialsError(
                "certificate and privateKey must be given together (mTLS) or both omitted "
                "(transparent mode)"
            )
        if self.certificate is not None:
            _check_pem("certificate", self.certificate, "CERTIFICATE-----")
        if self.private_key is not None:
            _check_pem("privateKey", self.private_key, "PRIVATE KEY-----")

    @property
    def mtls(self) -> bool:
        """True in STANDARD mode (client certificate), False in TRANSPARENT mode."""
        return self.certificate is not None

    @property
    def scope_key(self) -> str:
        """The cache scope key sap-cloud-sdk uses for customer-flow tokens."""
        return f"customer::{self.client_id}"

    @classmethod
    def from_binding(cls, root: str | os.PathLike[str] | None = None) -> CustomerCredentials:
        """Load STANDARD-mode credentials from the ``integration-credentials`` binding.

        ``root`` defaults to ``$SERVICE_BINDING_ROOT``, else ``/bindings``.
        """
        path = find_binding(root)
        if path is None:
            scanned = _binding_root(root)
            raise CredentialsError(
                f"no service binding of type {BINDING_TYPE!r} with a 'credentials' file under "
                f"{scanned} (set {BINDING_ROOT_ENV} or use transparent mode env vars)"
            )
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CustomerCredentials:
        """Load STANDARD-mode credentials from a ``credentials`` JSON file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialsError(
                f"cannot read credentials file {os.fspath(path)}: {exc.strerror}"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # The message carries only line/column, never the (secret-bearing) content.
            raise CredentialsError(
                f"credentials file {os.fspath(path)} is not valid JSON "
                f"(line {exc.lineno}, column {exc.colno})"
            ) from None
        if not isinstance(data, dict):
            raise CredentialsError(f"credentials file {os.fspath(path)} must hold a JSON object")
        where = f"credentials file {os.fspath(path)}"
        fields = ("tokenServiceUrl", "clientid", "certificate", "privateKey", "gatewayUrl")
        missing = [name for name in (*fields, "integrationDependencies") if name not in data]
        if missing:
            raise CredentialsError(f"{where} is missing required field(s): {', '.join(missing)}")
        values = {name: _text(data[name], name, where) for name in fields}
        return cls(
            token_service_url=values["tokenServiceUrl"],
            client_id=values["clientid"],
            gateway_url=values["gatewayUrl"].rstrip("/"),
            integration_dependencies=_dependencies(
                data["integrationDependencies"], "integrationDependencies", where
            ),
            certificate=values["certificate"],
            private_key=values["privateKey"],
            source=os.fspath(path),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CustomerCredentials:
        """Load TRANSPARENT-mode credentials from the ``INTEGRATION_*`` environment variables."""
        env = os.environ if environ is None else environ
        required = (ENV_CLIENT_ID, ENV_AUTH_URL, ENV_GATEWAY_URL)
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise CredentialsError(
                f"transparent mode requires environment variable(s): {', '.join(missing)}"
            )
        raw_deps = env.get(ENV_DEPENDENCIES)
        if not raw_deps:
            raise CredentialsError(
                f"missing required environment variable {ENV_DEPENDENCIES} ({_DEPENDENCIES_FORMAT})"
            )
        try:
            deps = json.loads(raw_deps)
        except json.JSONDecodeError:
            raise CredentialsError(
                f"{ENV_DEPENDENCIES} is not valid JSON ({_DEPENDENCIES_FORMAT})"
            ) from None
        return cls(
            token_service_url=env[ENV_AUTH_URL],
            client_id=env[ENV_CLIENT_ID],
            gateway_url=env[ENV_GATEWAY_URL].rstrip("/"),
            integration_dependencies=_dependencies(deps, ENV_DEPENDENCIES, "environment"),
            source="env",
        )

    @classmethod
    def detect(cls, root: str | os.PathLike[str] | None = None) -> CustomerCredentials:
        """The SDK's order: a binding if one exists, else transparent-mode env vars."""
        path = find_binding(root)
        if path is not None:
            return cls.from_file(path)
        if all(os.environ.get(name) for name in (ENV_CLIENT_ID, ENV_AUTH_URL, ENV_GATEWAY_URL)):
            return cls.from_env()
        raise CredentialsError(
            f"no Agent Gateway customer credentials: no {BINDING_TYPE!r} binding under "
            f"{_binding_root(root)}, and {ENV_CLIENT_ID}, {ENV_AUTH_URL}, {ENV_GATEWAY_URL} "
            "are not all set"
        )


def _binding_root(root: str | os.PathLike[str] | None) -> str:
    if root is not None:
        return os.fspath(root)
    return os.environ.get(BINDING_ROOT_ENV, DEFAULT_BINDING_ROOT)


def find_binding(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``credentials`` file of the first ``integration-credentials`` binding, or None.

    Scans the binding root's subdirectories like sap-cloud-sdk does (sorted by name, so the
    choice is stable when several bindings match).
    """
    base = Path(_binding_root(root))
    if not base.is_dir():
        return None
    for entry in sorted(base.iterdir()):
        type_file = entry / "type"
        credentials = entry / "credentials"
        if not (entry.is_dir() and type_file.is_file()):
            continue
        try:
            kind = type_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if kind == BINDING_TYPE and credentials.is_file():
            return credentials
    return None


def _text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CredentialsError(f"{where}: field {name} must be a non-empty string")
    return value


def _check_pem(name: str, value: str, marker: str) -> None:
    if "-----BEGIN " not in value or marker not in value:
        raise CredentialsError(f"field {name} is not a PEM block (expected '-----BEGIN ...')")


def _dependencies(raw: Any, name: str, where: str) -> tuple[IntegrationDependency, ...]:
    if not isinstance(raw, list):
        raise CredentialsError(f"{where}: {name} must be a JSON array ({_DEPENDENCIES_FORMAT})")
    deps = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise CredentialsError(f"{where}: {name}[{index}] must be an object")
        deps.append(
            IntegrationDependency(
                ord_id=_text(item.get("ordId"), f"{name}[{index}].ordId", where),
                global_tenant_id=_text(
                    item.get("globalTenantId"), f"{name}[{index}].globalTenantId", where
                ),
            )
        )
    return tuple(deps)
