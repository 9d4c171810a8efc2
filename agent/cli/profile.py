"""Where the CLI finds the mesh: servers, TLS files and credentials (a connection profile).

Each field is taken from the first of these that sets it, as ``nats context`` and kubectl
do:

1. flags: ``-s/--server``, ``--creds``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``,
   ``--user``, ``--password-file``;
2. the environment: ``HARMONY_NATS_URL``, ``HARMONY_NATS_CREDS``, ``HARMONY_NATS_CA``,
   ``HARMONY_NATS_CERT``, ``HARMONY_NATS_KEY``;
3. a named context: ``--context NAME``, else ``$HARMONY_CONTEXT``, else the one chosen by
   ``harmony-agent context use`` (unless ``--config`` is given): the file
   ``~/.config/harmony-agent/contexts/NAME.yaml`` (``$XDG_CONFIG_HOME`` is honoured);
4. an agent's configuration file: ``--config FILE``, else ``$HARMONY_AGENT_CONFIG`` (its
   ``nats:`` section: ``servers``, ``tls``, ``credentials``, ``user``, ``password_file``);
5. the default, ``nats://127.0.0.1:4222`` (the zero-configuration agent's embedded server).

Secrets never leave this module in clear: ``describe`` and every URL shown to the operator
go through ``redact``; a password is only ever read from its file at connect time.

Light on purpose (it runs before every mesh command): the standard library only, and
PyYAML only when a context or configuration file is actually read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_SERVER = "nats://127.0.0.1:4222"
CONTEXT_ENV = "HARMONY_CONTEXT"
CONFIG_ENV = "HARMONY_AGENT_CONFIG"
ENV = {
    "servers": "HARMONY_NATS_URL",
    "credentials": "HARMONY_NATS_CREDS",
    "ca_file": "HARMONY_NATS_CA",
    "cert_file": "HARMONY_NATS_CERT",
    "key_file": "HARMONY_NATS_KEY",
}
FLAGS = {
    "servers": "--server",
    "credentials": "--creds",
    "ca_file": "--tls-ca",
    "cert_file": "--tls-cert",
    "key_file": "--tls-key",
    "user": "--user",
    "password_file": "--password-file",
}
CONTEXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONTEXT_KEYS = frozenset({"servers", "tls", "credentials", "user", "password_file", "description"})
TLS_KEYS = frozenset({"ca_file", "cert_file", "key_file"})


class ProfileError(Exception):
    """Bad input in a flag, context or configuration file; the message is one line."""


def redact(url: str) -> str:
    """The URL without its password (``nats://user:***@host:4222``)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Profile:
    """One resolved connection; ``sources`` says where each field came from."""

    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    credentials: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password_file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def where(self) -> str:
        """The servers for an error message, passwords redacted."""
        return ", ".join(redact(s) for s in self.servers)

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ProfileError(
                f"password file {self.password_file}: cannot read: {exc.strerror or exc}"
            ) from None

    def describe(self) -> dict[str, Any]:
        """What ``context show`` prints: every field with its source, no secret."""
        out: dict[str, Any] = {"servers": [redact(s) for s in self.servers]}
        for name in ("credentials", "ca_file", "cert_file", "key_file", "user", "password_file"):
            out[name] = getattr(self, name)
        out["sources"] = dict(self.sources)
        return out

    def as_context(self, description: str | None = None) -> dict[str, Any]:
        """The context-file form of this profile (paths as given)."""
        doc: dict[str, Any] = {"servers": list(self.servers)}
        tls = {k: getattr(self, k) for k in sorted(TLS_KEYS) if getattr(self, k)}
        if tls:
            doc["tls"] = tls
        for name in ("credentials", "user", "password_file"):
            if getattr(self, name):
                doc[name] = getattr(self, name)
        if description:
            doc["description"] = description
        return doc


# --- where contexts live -------------------------------------------------------------------


def config_home() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "harmony-agent"


def contexts_dir() -> Path:
    return config_home() / "contexts"


def current_file() -> Path:
    return config_home() / "context"


def check_context_name(name: str) -> str:
    if not CONTEXT_NAME.match(name):
        raise ProfileError(
            f"context name {name!r} is not valid (letters, digits, '.', '_', '-'; at most 64)"
        )
    return name


def context_path(name: str) -> Path:
    return contexts_dir() / f"{check_context_name(name)}.yaml"


def context_names() -> list[str]:
    try:
        return sorted(p.stem for p in contexts_dir().glob("*.yaml") if CONTEXT_NAME.match(p.stem))
    except OSError:
        return []


def current_context() -> str | None:
    """The context chosen by ``context use``, if any."""
    try:
        name = current_file().read_text().strip()
    except OSError:
        return None
    return name or None


# --- reading files -------------------------------------------------------------------------


def _load_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        from agent.yaml_errors import yaml_error

        raise ProfileError(yaml_error(str(path), exc)) from None


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{where}: expected a non-empty string")
    return value


def _servers(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ProfileError(f"{where}: expected a list of URLs like nats://host:4222")
    urls = tuple(s.strip() for s in items if s.strip())
    if not urls:
        raise ProfileError(f"{where}: no URL given")
    for url in urls:
        if "://" not in url:
            raise ProfileError(f"{where}: {redact(url)!r} is not a URL like nats://host:4222")
    return urls


def _tls(value: Any, where: str) -> dict[str, str | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: expected a mapping with ca_file, cert_file, key_file")
    unknown = sorted(set(value) - TLS_KEYS)
    if unknown:
        raise ProfileError(f"{where}.{unknown[0]}: unknown field")
    return {k: _text(value.get(k), f"{where}.{k}") for k in TLS_KEYS}


def read_context(name: str) -> dict[str, Any]:
    """The fields a context sets (None for the ones it does not)."""
    path = context_path(name)
    if not path.exists():
        known = ", ".join(context_names()) or "none"
        raise ProfileError(f"context {name!r} not found in {contexts_dir()} (known: {known})")
    doc = _load_yaml(path, "context")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ProfileError(f"{path}: expected a mapping of fields")
    unknown = sorted(set(doc) - CONTEXT_KEYS)
    if unknown:
        raise ProfileError(f"{path}: {unknown[0]}: unknown field")
    return {
        "servers": _servers(doc.get("servers"), f"{path}: servers"),
        **_tls(doc.get("tls"), f"{path}: tls"),
        "credentials": _text(doc.get("credentials"), f"{path}: credentials"),
        "user": _text(doc.get("user"), f"{path}: user"),
        "password_file": _text(doc.get("password_file"), f"{path}: password_file"),
    }


def read_agent_config(path: str) -> dict[str, Any]:
    """The connection fields of an agent configuration file (its ``nats:`` section)."""
    doc = _load_yaml(Path(path), "config")
    nats = doc.get("nats") if isinstance(doc, dict) else None
    if nats is None:
        return {}
    if not isinstance(nats, dict):
        raise ProfileError(f"{path}: nats: expected a mapping")
    where = f"{path}: nats"
    out: dict[str, Any] = {
        "servers": _servers(nats.get("servers"), f"{where}.servers"),
        **_tls(nats.get("tls"), f"{where}.tls"),
        "credentials": _text(nats.get("credentials"), f"{where}.credentials"),
        "user": _text(nats.get("user"), f"{where}.user"),
        "password_file": _text(nats.get("password_file"), f"{where}.password_file"),
    }
    if out["servers"] is None and nats.get("embedded") and isinstance(nats.get("listen"), str):
        host, _, port = nats["listen"].rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host
        out["servers"] = (f"nats://{host}:{port}",)
    return out


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What the operator asked for on the command line (None: not given)."""

    flags: Mapping[str, Any] = field(default_factory=dict)
    context: str | None = None
    config: str | None = None


def resolve(selection: Selection, environ: Mapping[str, str] | None = None) -> Profile:
    """Flags > environment > context > agent config > default, field by field."""
    env = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []

    flags = dict(selection.flags)
    if flags.get("servers") is not None:
        flags["servers"] = _servers(flags["servers"], "--server")
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))

    from_env: dict[str, Any] = {}
    for name, var in ENV.items():
        if env.get(var):
            from_env[name] = _servers(env[var], f"${var}") if name == "servers" else env[var]
    layers.append(("env", from_env))

    context = selection.context or env.get(CONTEXT_ENV) or None
    context_source = "--context" if selection.context else f"${CONTEXT_ENV}"
    if context is None and selection.config is None:
        context, context_source = current_context(), "current context"
    if context is not None:
        layers.append((f"context {context}", read_context(context)))

    config = selection.config or env.get(CONFIG_ENV) or None
    if config is not None:
        layers.append((f"config {config}", read_agent_config(config)))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for name, value in layer.items():
            if value is not None and name not in values:
                values[name] = value
                sources[name] = _label(source, name, context_source)
    if "servers" not in values:
        sources["servers"] = "default"
    known = {f.name for f in fields(Profile)} - {"sources"}
    return Profile(**{k: v for k, v in values.items() if k in known}, sources=sources)


def _label(source: str, name: str, context_source: str) -> str:
    if source == "flag":
        return FLAGS.get(name, name)
    if source == "env":
        return f"${ENV[name]}"
    if source.startswith("context "):
        return f"{source} ({context_source})"
    return source
