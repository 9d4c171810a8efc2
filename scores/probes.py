"""Health probes (exec, http, tcp) run where the workload runs, and the monitor that runs them.

A probe is a small object with ``check(env, timeout) -> CheckResult``; it never raises for a
failed check and never outlives ``timeout`` (a hung exec probe's process group is killed).

* On the agent's own machine (a topology with ``ProcessRuntime``): exec is a subprocess with
  the workload's environment; http is an aiohttp GET (2xx and 3xx pass, redirects are not
  followed); tcp is a connect.
* Over SSH (``HostShell`` without ``ProcessRuntime``): every check is one command on the
  remote host under ``timeout -s KILL``: exec runs the command through ``env``; http and tcp
  run a few lines of ``python3`` there, so ``127.0.0.1`` means the workload's host (no curl
  needed, but python3 is).
* Kubernetes: the probe becomes the container's readinessProbe (``use_health``) and the
  agent reads readiness; no agent-side probe runs.

``HealthMonitor`` runs one application's probe every ``period`` in its own task and feeds the
pure ``HealthTracker``; the controller reads ``verdict()`` without ever waiting for a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import aiohttp

from scores.base import Observation, RunContext, Score
from scores.duration import format_duration
from scores.health import (
    CheckResult,
    HealthSpec,
    HealthTracker,
    Phase,
    ProbeSpec,
    Verdict,
    builtin_failure,
    deadline_clock,
    split_host_port,
)
from scores.process import _INHERITED_ENV
from topologies.capabilities import HostShell, ProcessRuntime
from topologies.higher_order import resolve

_DETAIL_MAX = 200
_GRACE = 2.0
"""Extra seconds the agent waits for a remote probe beyond its own ``timeout -s KILL``."""


class ProbeUnsupported(ValueError):
    """This topology cannot run this probe (one line, naming the probe)."""


@runtime_checkable
class Probe(Protocol):
    kind: str
    target: str

    async def check(self, env: Mapping[str, str], timeout: float) -> CheckResult:
        """One check; ``env`` is the Score's env plus the HARMONY_* variables."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class HealthAware(Protocol):
    """An Interpret that runs the probe itself (Kubernetes: as the pod's readinessProbe)."""

    def use_health(self, health: HealthSpec) -> None: ...


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:_DETAIL_MAX] if lines else ""


def _os_error(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno).lower()
    inner = getattr(exc, "os_error", None)  # aiohttp.ClientConnectorError
    if inner is not None and inner is not exc:
        return _os_error(inner)
    return (str(exc) or type(exc).__name__)[:_DETAIL_MAX]


# --- on the agent's machine --------------------------------------------------------------


class LocalExecProbe:
    """``exec`` as a subprocess in its own session, as the workload's user (the
    ProcessRuntime's ``run_as``); its whole group is killed afterwards."""

    kind = "exec"

    def __init__(self, argv: Sequence[str], runtime: ProcessRuntime) -> None:
        self.argv = list(argv)
        self.target = " ".join(self.argv)
        self._runtime = runtime

    async def check(self, env: Mapping[str, str], timeout: float) -> CheckResult:
        source = "probe exec"
        full_env = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV}
        full_env.update(env)
        uid, gid = self._runtime.run_as  # as the workload runs, not as the agent
        argv = as_workload(self.argv, uid, gid)
        if argv is None:
            why = "setpriv (util-linux) is needed to run a probe as the workload's user"
            return CheckResult(False, why, source)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=full_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return CheckResult(False, f"cannot run {self.argv[0]}: {_os_error(exc)}", source)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            return CheckResult(
                False, f"timed out after {format_duration(timeout)} (killed)", source
            )
        finally:
            _kill_group(proc.pid)  # leftovers of the probe's group, if any
        code = proc.returncode
        text = _last_line(out.decode(errors="replace"))
        if code == 0:
            return CheckResult(True, f"exit 0{': ' + text if text else ''}", source)
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        return CheckResult(False, f"{how}{': ' + text if text else ''}", source)

    async def close(self) -> None:
        return None


def _ambient_caps() -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapAmb:"):
                    return int(line.split()[1], 16) != 0
    except (OSError, ValueError):
        pass
    return False


def as_workload(argv: list[str], uid: int | None, gid: int | None) -> list[str] | None:
    """``argv`` run as the workload would be: its user and group, no supplementary groups,
    none of the agent's ambient capabilities (the fence does the same for workloads).

    Why setpriv and not ``user=``/``group=``: uvloop's subprocess_exec refuses those
    arguments, and a ``preexec_fn`` is unsafe in the agent, which has threads (the session
    thread). None when setpriv is needed but missing."""
    if uid is None and not _ambient_caps():
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv]
    if uid is not None:
        prefix += [f"--reuid={uid}", f"--regid={gid if gid is not None else uid}", "--clear-groups"]
    return [*prefix, "--inh-caps=-all", "--ambient-caps=-all", "--", *argv]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class LocalHttpProbe:
    """GET ``url``; 2xx and 3xx pass (a redirect is not followed)."""

    kind = "http"

    def __init__(self, url: str) -> None:
        self.target = url
        self._session: aiohttp.ClientSession | None = None

    async def check(self, env: Mapping[str, str], timeout: float) -> CheckResult:
        del env
        source = "probe http"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(
                self.target,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                status = resp.status
        except TimeoutError:
            return CheckResult(False, f"timed out after {format_duration(timeout)}", source)
        except (aiohttp.ClientError, OSError) as exc:
            return CheckResult(False, _os_error(exc), source)
        return CheckResult(status < 400, f"HTTP {status}", source)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class LocalTcpProbe:
    """Open a TCP connection to ``HOST:PORT`` and close it."""

    kind = "tcp"

    def __init__(self, address: str) -> None:
        self.target = address
        self._host, self._port = split_host_port(address)

    async def check(self, env: Mapping[str, str], timeout: float) -> CheckResult:
        del env
        source = "probe tcp"
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), timeout
            )
        except TimeoutError:
            return CheckResult(False, f"timed out after {format_duration(timeout)}", source)
        except OSError as exc:
            return CheckResult(False, _os_error(exc), source)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return CheckResult(True, f"connected to {self.target}", source)

    async def close(self) -> None:
        return None


# --- on a remote host, through its shell --------------------------------------------------

_REMOTE_NET = r"""
import socket, sys, urllib.error, urllib.request
kind, target, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    if kind == "tcp":
        host, _, port = target.rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=limit).close()
        print("connected to " + target)
        sys.exit(0)
    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    try:
        code = urllib.request.build_opener(Stay).open(target, timeout=limit).status
    except urllib.error.HTTPError as exc:
        code = exc.code
    print("HTTP %d" % code)
    sys.exit(0 if code < 400 else 1)
except Exception as exc:
    reason = getattr(exc, "reason", exc)
    print(getattr(reason, "strerror", None) or str(reason) or type(exc).__name__)
    sys.exit(1)
"""


def _remote_detail(code: int, stdout: str, stderr: str, timeout: float, what: str) -> str:
    text = _last_line(stdout) or _last_line(stderr)
    # 124: our own wait expired; -1 (killed by a signal, as asyncssh reports it) and 137:
    # ``timeout -s KILL`` fired, killing the probe's process group and itself.
    if code in (-1, 124, 137):
        return f"timed out after {format_duration(timeout)} (killed)"
    if code == 127:
        return f"{what} not found on the host{': ' + text if text else ''}"
    if code == 255:
        return f"ssh failed: {text}"
    return f"exit {code}{': ' + text if text else ''}"


class RemoteExecProbe:
    """``exec`` on the topology's host: ``timeout -s KILL <t> env K=V... cmd args``."""

    kind = "exec"

    def __init__(self, argv: Sequence[str], shell: HostShell) -> None:
        self.argv = list(argv)
        self.target = " ".join(self.argv)
        self._shell = shell

    async def check(self, env: Mapping[str, str], timeout: float) -> CheckResult:
        assignments = [f"{k}={v}" for k, v in sorted(env.items())]
        argv = ["timeout", "-s", "KILL", f"{timeout:g}", "env", *assignments, *self.argv]
        result = await self._shell.run(argv, timeout=timeout + _GRACE)
        detail = _remote_detail(
            result.returncode, result.stdout, result.stderr, timeout, self.argv[0]
        )
        if result.ok:
            text = _last_line(result.stdout)
            return CheckResult(True, f"exit 0{': ' + text if text else ''}", "probe exec")
        return CheckResult(False, detail, "probe exec")

    async def close(self) -> None:
        return None


class RemoteNetProbe:
    """``http``/``tcp`` from the topology's host (so 127.0.0.1 is the workload's host)."""

    def __init__(self, kind: str, target: str, shell: HostShell) -> None:
        self.kind = kind
        self.target = target
        self._shell = shell

    async def check(self, env: Mapping[str, str], timeout: float) -> CheckResult:
        del env
        argv = ["timeout", "-s", "KILL", f"{timeout + 0.5:g}", "python3", "-c", _REMOTE_NET]
        argv += [self.kind, self.target, f"{timeout:g}"]
        result = await self._shell.run(argv, timeout=timeout + _GRACE)
        source = f"probe {self.kind}"
        if result.ok:
            return CheckResult(True, _last_line(result.stdout), source)
        if result.returncode == 1 and result.stdout.strip():
            return CheckResult(False, _last_line(result.stdout), source)
        detail = _remote_detail(result.returncode, result.stdout, result.stderr, timeout, "python3")
        return CheckResult(False, detail, source)

    async def close(self) -> None:
        return None


# --- choosing a probe for a topology -------------------------------------------------------


def probe_for(spec: ProbeSpec, topology: object) -> Probe:
    """The runner of ``spec`` where ``topology`` runs workloads; ProbeUnsupported if none."""
    target = resolve(topology)
    if isinstance(target, ProcessRuntime):
        if spec.exec is not None:
            return LocalExecProbe(spec.exec, target)
        return LocalHttpProbe(str(spec.http)) if spec.http else LocalTcpProbe(str(spec.tcp))
    if isinstance(target, HostShell):
        if spec.exec is not None:
            return RemoteExecProbe(spec.exec, target)
        return RemoteNetProbe(spec.kind, spec.target, target)
    kind = getattr(target, "kind", type(target).__name__)
    raise ProbeUnsupported(f"probe {spec.kind} cannot run on the {kind} topology")


def score_env(score: Score) -> dict[str, str]:
    """The Score's own environment (``env`` or ``environment``), given to exec probes too."""
    for name in ("env", "environment"):
        value = getattr(score, name, None)
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
    return {}


async def probe_program_problem(spec: ProbeSpec, topology: object) -> str | None:
    """Why the exec probe's program cannot run on ``topology``, or None (also: not exec).

    Locally ``shutil.which`` / ``os.access``; over a shell ``command -v`` / ``test -x``.
    Other topologies (Kubernetes: the program runs in the container) are not checked.
    """
    if spec.exec is None:
        return None
    target = resolve(topology)
    program = spec.exec[0]
    if isinstance(target, ProcessRuntime):
        ok = await asyncio.to_thread(_local_executable, program)
        return None if ok else f"{program!r} is not an executable file on this host"
    if isinstance(target, HostShell):
        test = 'test -f "$1" && test -x "$1"' if "/" in program else 'command -v "$1"'
        result = await target.run(["sh", "-c", f"{test} >/dev/null 2>&1", "sh", program])
        if result.returncode in (124, 255):
            return f"could not check {program!r}: {_last_line(result.stderr)}"
        where = getattr(target, "address", "the host")
        return None if result.ok else f"{program!r} is not executable on {where}"
    return None


def _local_executable(program: str) -> bool:
    if "/" in program:
        return os.path.isfile(program) and os.access(program, os.X_OK)
    return shutil.which(program) is not None


# --- the monitor ---------------------------------------------------------------------------


class HealthMonitor:
    """One application's health on this agent: probes every period, built-in health, verdict.

    The controller calls, all cheap and non-blocking:
    ``started(ctx)`` after a successful start, ``stopped()`` after a stop, ``note(obs)``
    with every ``observe()`` it makes, ``verdict()`` to decide, ``give_up(default)`` when it
    gives the application up (returns the cooldown), ``take_recovery()`` to learn that the
    probe passed during the cooldown, ``await close()`` when the application goes away.
    """

    def __init__(
        self,
        app: str,
        health: HealthSpec | None,
        probe: Probe | None,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = deadline_clock,
    ) -> None:
        self.app = app
        self.spec = health
        """The ``health:`` block as given (None: built-in health with the defaults)."""
        self.tracker = HealthTracker(app, health, clock=clock)
        self.health = self.tracker.health
        self.probe = probe
        self._clock = clock
        self._score_env = dict(env or {})
        self._env: dict[str, str] = dict(self._score_env)
        self._obs: Observation | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchers: list[Callable[[], None]] = []
        self._noted = asyncio.Event()
        """Set by ``note``: a check without a probe can only change after an observation."""
        self.checks = 0

    # what the controller calls
    def started(self, ctx: RunContext) -> None:
        self._env = {**self._score_env, **ctx.harmony_env()}
        self._obs = None
        self.tracker.started()
        self._ensure_running()

    def stopped(self) -> None:
        self.tracker.stopped()
        self._obs = None

    def note(self, obs: Observation | None) -> None:
        """The latest ``observe()``: its built-in health counts at the next check."""
        self._obs = obs
        self._noted.set()

    def verdict(self) -> Verdict:
        return self.tracker.verdict()

    def give_up(self, default_cooldown: float) -> float:
        cooldown = self.tracker.gave_up(default_cooldown)
        self._obs = None
        self._ensure_running()
        return cooldown

    def take_recovery(self) -> bool:
        return self.tracker.take_recovery()

    def watch(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` when the verdict needs a decision: the threshold was just crossed, or
        the probe passed during the cooldown (the controller wakes its runner)."""
        self._watchers.append(cb)

    def status(self) -> dict[str, object]:
        """For ``status``: what is probed and how it goes."""
        v = self.verdict()
        return {
            "probe": f"{self.probe.kind} {self.probe.target}" if self.probe else None,
            "phase": v.phase.value,
            "failures": v.failures,
            "threshold": v.threshold,
            "sentence": v.sentence,
        }

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.probe is not None:
            await self.probe.close()

    # the checks
    async def check_once(self) -> Verdict:
        """One period's check: the probe (if any) and the latest built-in health."""
        cooling = self.tracker.phase is Phase.COOLING
        result: CheckResult | None = None
        failed = None if cooling else builtin_failure(self._obs)
        if failed is not None:
            result = CheckResult(False, failed, "built-in health")
        elif self.probe is not None:
            result = await self._run_probe()
        elif not cooling and self._obs is not None:
            result = CheckResult(True, "no failure observed", "built-in health")
        self.checks += 1
        if result is None:
            return self.tracker.verdict()
        was_crossed, was_cooling = self.tracker.verdict().crossed, cooling
        verdict = self.tracker.record(result)
        recovered = was_cooling and verdict.phase is not Phase.COOLING and result.ok
        if (verdict.crossed and not was_crossed) or recovered:
            for cb in self._watchers:
                cb()
        return verdict

    async def _run_probe(self) -> CheckResult:
        assert self.probe is not None
        timeout = self.health.timeout
        try:
            # Every probe bounds itself; this only guards against a runner that does not.
            return await asyncio.wait_for(self.probe.check(self._env, timeout), timeout + 5.0)
        except TimeoutError:
            return CheckResult(False, "probe did not return", f"probe {self.probe.kind}")
        except Exception as exc:  # a probe's bad day never takes the monitor down
            return CheckResult(False, f"probe error: {exc!r}", f"probe {self.probe.kind}")

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"health:{self.app}"
            )

    def _quiet(self, verdict: Verdict) -> bool:
        """Nothing to probe, nothing failing, no cooldown to end: the next check can only
        differ after a new observation. Waiting for one instead of checking every period
        is what lets a thousand healthy applications cost nothing (issue 17)."""
        return (
            self.probe is None
            and verdict.phase is not Phase.COOLING
            and verdict.failures == 0
            and builtin_failure(self._obs) is None
        )

    async def _loop(self) -> None:
        period = self.health.period
        while self.tracker.phase is not Phase.IDLE:
            began = time.monotonic()
            verdict = await self.check_once()
            if self._quiet(verdict):
                self._noted.clear()
                await self._noted.wait()
            await asyncio.sleep(max(0.0, began + period - time.monotonic()))


def health_monitor(
    app: str,
    health: HealthSpec | None,
    score: Score,
    topology: object,
    interpret: object | None = None,
    *,
    clock: Callable[[], float] = deadline_clock,
) -> HealthMonitor:
    """The monitor of one application on this agent's topology.

    With a probe on a Kubernetes Score the interpret takes the probe as readinessProbe
    (``use_health``) and the monitor only reads built-in health. ProbeUnsupported when the
    topology can run neither.
    """
    probe: Probe | None = None
    if health is not None and health.probe is not None:
        if isinstance(interpret, HealthAware):
            interpret.use_health(health)
        else:
            probe = probe_for(health.probe, topology)
    return HealthMonitor(app, health, probe, env=score_env(score), clock=clock)
