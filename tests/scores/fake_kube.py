"""An in-process stand-in for the Kubernetes API server: records requests, stores objects.

It checks request *shape* only (paths, verbs, content types, query); it applies no
admission, defaulting or controller logic. No real cluster is used anywhere in the suite.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

_COLLECTIONS = frozenset({"pods", "deployments", "statefulsets", "replicasets"})


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    authorization: str | None
    body: Any


def _selected(obj: dict[str, Any], selector: str) -> bool:
    """Equality-based label selectors (``a=b,c=d``), as the agent sends them."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@dataclass
class FakeKube:
    requests: list[Recorded] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_with: int | None = None
    url: str = ""
    lingering: dict[str, int] = field(default_factory=dict)
    """Object path -> how many more list requests still return it (a terminating pod)."""

    async def handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        body = json.loads(text) if text else None
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                request.content_type,
                request.headers.get("Authorization"),
                body,
            )
        )
        if self.fail_with is not None:
            return web.json_response({"message": "injected failure"}, status=self.fail_with)
        path = request.path
        if request.method == "PATCH" and path.endswith("/scale"):
            target = self.objects.get(path.removesuffix("/scale"))
            if target is None:
                return web.json_response({"message": "not found"}, status=404)
            target.setdefault("spec", {})["replicas"] = body["spec"]["replicas"]
            return web.json_response({"spec": {"replicas": body["spec"]["replicas"]}})
        if request.method == "PATCH":
            self.objects[path] = body
            return web.json_response(body)
        if request.method == "GET" and path.rsplit("/", 1)[-1] in _COLLECTIONS:
            selector = request.query.get("labelSelector", "")
            items = [
                obj
                for key, obj in sorted(self.objects.items())
                if key.rsplit("/", 1)[0] == path and _selected(obj, selector)
            ]
            for key in [k for k in self.lingering if k.rsplit("/", 1)[0] == path]:
                self.lingering[key] -= 1
                if self.lingering[key] <= 0:  # gone after this answer
                    del self.lingering[key]
                    self.objects.pop(key, None)
            return web.json_response({"kind": "List", "items": items})
        if request.method == "GET":
            found = self.objects.get(path)
            if found is None:
                return web.json_response({"message": "not found"}, status=404)
            return web.json_response(found)
        if request.method == "DELETE":
            existed = self.objects.pop(path, None)
            return web.json_response({}, status=200 if existed else 404)
        return web.json_response({"message": "unsupported"}, status=405)


@asynccontextmanager
async def fake_kube() -> AsyncIterator[FakeKube]:
    fake = FakeKube()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    try:
        yield fake
    finally:
        await server.close()
