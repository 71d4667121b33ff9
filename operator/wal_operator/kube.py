"""A small async Kubernetes client for the operator's children (ConfigMap, Deployment, Service, Secret).

It uses the credentials kopf logged in with (:class:`kopf.ConnectionInfo`), so the operator talks to
one API server with one identity. Children are written with server-side apply (field manager
``wal-operator``): what the operator stops rendering is removed, what others add is kept. A server
that cannot apply to a missing object (an emulator) gets a create instead.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

FIELD_MANAGER = "wal-operator"
_SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubeError(Exception):
    """The API server refused a request."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


def _data(value: str | bytes) -> bytes:
    """kubeconfig ``*-data`` fields are base64; kopf passes them through as given."""
    raw = value.encode() if isinstance(value, str) else value
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        context.load_verify_locations(cadata=_data(info.ca_data).decode())
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        # ssl wants files; write them where only we can read them
        folder = tempfile.mkdtemp(prefix="wal-operator-")
        cert = os.path.join(folder, "client.crt")
        key = os.path.join(folder, "client.key")
        for path, content in ((cert, info.certificate_data), (key, info.private_key_data)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(_data(content))
    if cert and key:
        context.load_cert_chain(os.fsdecode(cert), os.fsdecode(key))
    return context


class KubeClient:
    """JSON in, JSON out; ``None`` for a missing object; :class:`KubeError` for any other refusal."""

    def __init__(self, info: kopf.ConnectionInfo, relogin: Callable[[], kopf.ConnectionInfo | None] | None = None):
        self._info = info
        self._relogin = relogin
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "wal-operator"}
        if self._info.token:
            headers["Authorization"] = f"{self._info.scheme or 'Bearer'} {self._info.token}"
        elif self._info.username and self._info.password:
            token = base64.b64encode(f"{self._info.username}:{self._info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        return headers

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self._info))
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/",
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=30),
                trust_env=self._info.trust_env,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        for attempt in range(2):
            session = self._ensure_session()
            headers = self._headers()
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body)
            async with session.request(method, path.lstrip("/"), data=data, params=params, headers=headers) as rsp:
                text = await rsp.text()
                if rsp.status == 401 and attempt == 0 and self._relogin is not None:
                    fresh = self._relogin()
                    if fresh is not None:
                        self._info = fresh
                        await self.close()
                        continue
                if rsp.status == 404:
                    return None
                if rsp.status >= 400:
                    try:
                        message = str(json.loads(text).get("message", text))
                    except ValueError:
                        message = text[:500]
                    raise KubeError(rsp.status, method, path, message)
                if not text:
                    return {}
                result: dict[str, Any] = json.loads(text)
                return result
        raise KubeError(401, method, path, "unauthorized")  # pragma: no cover - loop always returns

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.request("GET", path)

    async def apply(self, collection: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``body`` (create or update) under ``collection``; returns the object."""
        name = body["metadata"]["name"]
        result = await self.request(
            "PATCH",
            f"{collection}/{name}",
            body,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        if result is None:  # an emulator that does not apply to missing objects
            result = await self.request("POST", collection, body, params={"fieldManager": FIELD_MANAGER})
        assert result is not None
        return result

    async def create(self, collection: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create ``body`` under ``collection`` (POST); :class:`KubeError` 409 if it exists."""
        result = await self.request("POST", collection, body, params={"fieldManager": FIELD_MANAGER})
        if result is None:
            raise KubeError(404, "POST", collection, "the namespace or resource type does not exist")
        return result

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        """Delete an object; False if it was already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        return await self.request("DELETE", path, body) is not None

    async def read_secret_key(self, namespace: str, name: str, key: str) -> bytes:
        """One key of a Secret, decoded from base64; KeyError names what is missing."""
        secret = await self.get(f"api/v1/namespaces/{namespace}/secrets/{name}")
        if secret is None:
            raise KeyError(f"Secret {namespace}/{name} not found")
        data = secret.get("data") or {}
        if key in data:
            return base64.b64decode(data[key])
        string_data = secret.get("stringData") or {}
        if key in string_data:  # emulators keep what was posted
            return str(string_data[key]).encode()
        raise KeyError(f"Secret {namespace}/{name} has no key {key!r}")


def relogin_service_account(info: kopf.ConnectionInfo) -> Callable[[], kopf.ConnectionInfo | None]:
    """Bound service-account tokens rotate; read the file again after a 401."""

    def relogin() -> kopf.ConnectionInfo | None:
        if not os.path.exists(_SERVICE_ACCOUNT_TOKEN):
            return None
        with open(_SERVICE_ACCOUNT_TOKEN, encoding="utf-8") as fh:
            token = fh.read().strip()
        return kopf.ConnectionInfo(
            server=info.server,
            ca_path=info.ca_path,
            token=token,
            default_namespace=info.default_namespace,
            trust_env=info.trust_env,
        )

    return relogin
