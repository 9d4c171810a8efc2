"""A Kubernetes cluster, spoken to over its REST API with server-side apply.

The ``kubernetes`` package is optional (the ``kubernetes`` extra) and heavy, so it is only
imported by ``KubernetesTopology.from_config``, to load in-cluster or kubeconfig credentials.
Requests themselves go through aiohttp: they stay on the event loop instead of blocking a
thread per call, and the request shape is the documented REST API, easy to fake in tests.
"""

from __future__ import annotations

import importlib
import json
import ssl
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp

from topologies.capabilities import KubernetesApi
from topologies.config import KubernetesConfig

CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "PersistentVolume",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "StorageClass",
        "PriorityClass",
        "IngressClass",
        "RuntimeClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "APIService",
    }
)
_IRREGULAR = {"Endpoints": "endpoints"}


class KubernetesError(RuntimeError):
    """The API server refused a request; the message carries its status and reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def plural(kind: str) -> str:
    """Resource name of a kind, by the rules the built-in kinds follow (not for odd CRDs)."""
    if kind in _IRREGULAR:
        return _IRREGULAR[kind]
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in "aeiou":
        return lower[:-1] + "ies"
    if lower.endswith(("s", "x", "ch", "sh")):
        return lower + "es"
    return lower + "s"


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if kind not in CLUSTER_SCOPED and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural(kind)}"
    return f"{base}/{name}" if name else base


class KubernetesTopology:
    """Provides ``KubernetesApi`` for one cluster and a default namespace."""

    CAPABILITIES: ClassVar[frozenset[type]] = frozenset({KubernetesApi})
    kind: ClassVar[str] = "kubernetes"

    def __init__(
        self,
        host: str,
        *,
        namespace: str = "default",
        auth_headers: Callable[[], Mapping[str, str]] = dict,
        ssl_context: ssl.SSLContext | bool = True,
        timeout: float = 30.0,
    ) -> None:
        self._host = host.rstrip("/")
        self._namespace = namespace
        self._auth_headers = auth_headers
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: KubernetesConfig) -> KubernetesTopology:
        """Load credentials the way kubectl (or a Pod) would; needs the kubernetes extra."""
        k8s_client: Any = importlib.import_module("kubernetes.client")
        k8s_config: Any = importlib.import_module("kubernetes.config")

        configuration = k8s_client.Configuration()
        if config.in_cluster:
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:
            k8s_config.load_kube_config(
                config_file=str(config.kubeconfig) if config.kubeconfig else None,
                context=config.context,
                client_configuration=configuration,
            )
        context: ssl.SSLContext | bool
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        else:
            context = False  # the kubeconfig asked for insecure-skip-tls-verify

        def headers() -> dict[str, str]:
            # Called per request: in-cluster tokens are rotated and refreshed by this hook.
            found: dict[str, str] = {}
            for setting in configuration.auth_settings().values():
                if setting.get("in") == "header" and setting.get("value"):
                    found[str(setting["key"])] = str(setting["value"])
            return found

        return cls(
            configuration.host,
            namespace=config.namespace,
            auth_headers=headers,
            ssl_context=context,
            timeout=config.request_timeout or 10.0,
        )

    def capabilities(self) -> frozenset[type]:
        return self.CAPABILITIES

    @property
    def namespace(self) -> str:
        return self._namespace

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Accept": "application/json", **self._auth_headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with self._session.request(
            method, self._host + path, data=data, headers=headers, params=params, ssl=self._ssl
        ) as resp:
            text = await resp.text()
            payload: dict[str, Any] = json.loads(text) if text.strip() else {}
            if resp.status >= 400 and resp.status != 404:
                raise KubernetesError(resp.status, str(payload.get("message", text))[:500])
            return resp.status, payload

    def _ns(self, kind: str, namespace: str | None) -> str | None:
        return None if kind in CLUSTER_SCOPED else (namespace or self._namespace)

    async def apply(
        self, manifest: Mapping[str, Any], *, field_manager: str, force: bool = True
    ) -> dict[str, Any]:
        meta = manifest.get("metadata") or {}
        kind, api_version = str(manifest["kind"]), str(manifest["apiVersion"])
        path = resource_path(api_version, kind, self._ns(kind, meta.get("namespace")), meta["name"])
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        # JSON is YAML, and the API server accepts it for application/apply-patch+yaml.
        status, payload = await self._request(
            "PATCH", path, body=manifest, content_type="application/apply-patch+yaml", params=params
        )
        if status == 404:
            raise KubernetesError(404, f"{kind} {meta['name']}: resource type not found")
        return payload

    async def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        path = resource_path(api_version, kind, self._ns(kind, namespace), name)
        status, payload = await self._request("GET", path)
        return None if status == 404 else payload

    async def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = resource_path(api_version, kind, self._ns(kind, namespace), name)
        if subresource:
            path += f"/{subresource}"
        status, payload = await self._request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )
        if status == 404:
            raise KubernetesError(404, f"{kind} {name} not found")
        return payload

    async def delete(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> bool:
        path = resource_path(api_version, kind, self._ns(kind, namespace), name)
        status, _ = await self._request("DELETE", path)
        return status != 404

    async def list(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        path = resource_path(api_version, kind, self._ns(kind, namespace), None)
        params = {"labelSelector": label_selector} if label_selector else None
        status, payload = await self._request("GET", path, params=params)
        if status == 404:
            raise KubernetesError(404, f"{kind}: resource type not found")
        return [dict(item) for item in payload.get("items") or []]
