"""Each agent's command plane: ``harmony.cmd.<site>.<node>.<verb>`` and, for the applications
it holds, ``harmony.cmd.app.<name>.<verb>`` (CONTRACT section 7).

What this module guarantees, whatever arrives: every request with a reply subject gets
exactly one reply (``{"ok": false, "error": ...}`` for anything wrong), nothing a client
sends can raise out of the subscription callback, and one slow handler cannot stall the
rest (each valid request runs as its own task, at most ``max_in_flight`` at a time; beyond
that the agent answers "busy" at once rather than queueing without bound).

failover needs the controller's lease handover: the controller registers a
``FailoverHandler`` and tells us which applications it holds (``sync_apps``). A request
with a ``request_id`` is served once: a retry with the same id (the reply was lost, the
client timed out) gets the first answer, even while the first is still being worked out.

drain/undrain/fence/resume: the CLI writes these marks itself with the operator's own
credentials (``agent.commands.marks``, SPEC v2). The agent still serves the verbs for
meshes with one shared account (and older clients); under per-identity accounts the agent
may not write marks, and these requests get an error reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError
from nats.js.kv import KeyValue

from agent import app_metrics
from agent.commands import marks
from agent.commands.decoder import DecodeError, decode_request
from agent.commands.models import (
    MAX_REQUEST_BYTES,
    AnyRequest,
    DrainRequest,
    FailoverRequest,
    FenceRequest,
    LogsRequest,
    PingRequest,
    Reply,
    ResumeRequest,
    UndrainRequest,
    Verb,
)
from agent.commands.workload_logs import log_path, read_from, read_tail

log = structlog.get_logger("agent.commands")

HANDLER_TIMEOUT = 30.0
REMEMBER_REQUESTS = 512
"""Recent request ids kept for idempotent retries (each with its answer)."""
REMEMBER_FOR = 600.0
"""Seconds a request id is remembered: far longer than any client retries."""


class FailoverHandler(Protocol):
    """The controller's planned handover of ``app`` it holds, to ``to_site`` (or the next
    eligible site in placement order when None). Return once the handover is decided
    (lease marked for handover or refused), with ``Reply.success(...)`` or
    ``Reply.failure("why")``. Raising is tolerated and becomes an error reply."""

    async def __call__(self, app: str, to_site: str | None) -> Reply: ...


class _LogLimiter:
    """At most ``rate`` warnings per second about bad requests; counts the rest, so a flood
    of garbage cannot also flood the journal."""

    def __init__(self, rate: int = 10) -> None:
        self.rate = rate
        self.window = 0.0
        self.count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.window, self.count = now, 0
        self.count += 1
        if self.count > self.rate:
            self.suppressed += 1
            return False
        return True


class CommandServer:
    """Subscribes on a connection and answers commands; ``start`` / ``stop`` around it.

    ``state_dir`` is the agent's: the ``logs`` verb reads ``<state_dir>/workloads/<app>.log``.
    """

    def __init__(
        self,
        nc: Client,
        state: KeyValue,
        *,
        site: str,
        node: str,
        failover: FailoverHandler | None = None,
        max_in_flight: int = 16,
        handler_timeout: float = HANDLER_TIMEOUT,
        max_bytes: int = MAX_REQUEST_BYTES,
        state_dir: Path | None = None,
    ) -> None:
        self.nc = nc
        self.state = state
        self.site = site
        self.node = node
        self.agent_id = f"{site}/{node}"
        self.failover = failover
        self.max_in_flight = max_in_flight
        self.handler_timeout = handler_timeout
        self.max_bytes = max_bytes
        self.state_dir = state_dir
        self.held: dict[str, Subscription] = {}
        self.answered = 0
        self.rejected = 0
        self._agent_sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._limiter = _LogLimiter()
        self._recent: OrderedDict[str, tuple[float, str, asyncio.Future[Reply]]] = OrderedDict()
        self.replayed = 0
        """Retries answered from memory (a request id seen before)."""

    @property
    def agent_subject(self) -> str:
        return f"harmony.cmd.{self.site}.{self.node}.*"

    async def start(self) -> None:
        self._agent_sub = await self.nc.subscribe(self.agent_subject, cb=self._on_agent_msg)
        log.info(
            "command_plane_serving",
            msg=f"command plane serving {self.agent_subject}",
            subject=self.agent_subject,
        )

    async def stop(self) -> None:
        subs = [self._agent_sub, *self.held.values()]
        self._agent_sub, self.held = None, {}
        for sub in subs:
            if sub is not None:
                with contextlib.suppress(NatsError):
                    await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def sync_apps(self, held: set[str] | frozenset[str]) -> None:
        """Serve ``harmony.cmd.app.<name>.*`` for exactly the applications in ``held``.

        The controller calls this whenever what it holds changes (every cycle is fine: it
        is idempotent and cheap), so the app subject always reaches the current holder.
        """
        for name in sorted(set(self.held) - set(held)):
            sub = self.held.pop(name)
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
        for name in sorted(set(held) - set(self.held)):
            self.held[name] = await self.nc.subscribe(
                f"harmony.cmd.app.{name}.*", cb=self._on_app_msg
            )

    # --- receiving ---------------------------------------------------------------------------

    async def _on_agent_msg(self, msg: Msg) -> None:
        await self._receive(msg, app=None)

    async def _on_app_msg(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        await self._receive(msg, app=parts[3] if len(parts) == 5 else "")

    async def _receive(self, msg: Msg, *, app: str | None) -> None:
        """Runs inside nats-py's per-subscription callback loop: must be quick, never raise."""
        try:
            verb = msg.subject.rsplit(".", 1)[-1]
            request = decode_request(verb, msg.data, app=app, max_bytes=self.max_bytes)
            if isinstance(request, DecodeError):
                self._refuse(msg, request.code, request.message, verb=verb[:64])
                await self._respond(msg, Reply.failure(request.message, agent=self.agent_id))
                return
            if len(self._tasks) >= self.max_in_flight:
                self._refuse(msg, "busy", "busy: too many commands in flight", verb=verb[:64])
                await self._respond(msg, Reply.failure("busy: too many commands in flight"))
                return
            task = asyncio.create_task(self._serve(msg, request), name=f"cmd {verb}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        except Exception as exc:  # a bug here must not kill the subscription
            log.exception(
                "command_receive_failed",
                msg="command receive failed",
                subject=msg.subject,
                error=repr(exc),
            )

    def _refuse(self, msg: Msg, code: str, message: str, **fields: object) -> None:
        """The one log line of a refused command (rate-limited: a flood of garbage must
        not also flood the journal)."""
        self.rejected += 1
        if self._limiter.allow():
            suppressed, self._limiter.suppressed = self._limiter.suppressed, 0
            log.warning(
                "command_refused",
                msg=f"command refused: {message}",
                subject=msg.subject[:200],
                size=len(msg.data),
                code=code,
                error=message,
                suppressed=suppressed,
                **fields,
            )

    def _remembered(self, request: AnyRequest) -> asyncio.Future[Reply] | Reply | None:
        """The first answer to this request's id (a future while it is being worked out),
        a refusal if the id came with a different request, or None: serve it."""
        rid = request.request_id
        if rid is None or request.verb in (Verb.PING, Verb.LOGS):
            return None
        now = time.monotonic()
        while self._recent and (
            len(self._recent) > REMEMBER_REQUESTS
            or next(iter(self._recent.values()))[0] < now - REMEMBER_FOR
        ):
            self._recent.popitem(last=False)
        what = f"{request.verb.value} {request.model_dump_json(exclude={'by', 'request_id'})}"
        seen = self._recent.get(rid)
        if seen is None:
            self._recent[rid] = (now, what, asyncio.get_running_loop().create_future())
            return None
        if seen[1] != what:
            return Reply.failure(f"request id {rid} was already used for another request")
        return seen[2]

    async def _serve(self, msg: Msg, request: AnyRequest) -> None:
        remembered = self._remembered(request)
        if remembered is not None:
            if isinstance(remembered, Reply):
                await self._respond(msg, remembered)
                return
            self.replayed += 1
            reply = await asyncio.shield(remembered)
            log.info(
                "command_replayed",
                message=f"{request.verb.value} retried: the first answer again",
                verb=request.verb.value,
                request_id=request.request_id,
            )
            await self._respond(msg, reply)
            return
        seen = self._recent.get(request.request_id or "")
        mine = seen is not None and request.verb not in (Verb.PING, Verb.LOGS)
        first = seen[2] if mine and seen is not None and not seen[2].done() else None
        reply = Reply.failure(f"{request.verb.value} interrupted (the agent is stopping)")
        try:
            reply = await self._answer(msg, request)
        finally:
            if first is not None and not first.done():
                first.set_result(reply)  # retries waiting on it get this answer too
        await self._respond(msg, reply)

    async def _answer(self, msg: Msg, request: AnyRequest) -> Reply:
        try:
            reply = await asyncio.wait_for(self.handle(request), self.handler_timeout)
        except TimeoutError:
            reply = Reply.failure(f"{request.verb.value} timed out after {self.handler_timeout:g}s")
        except (NatsError, JsError, OSError) as exc:
            reply = Reply.failure(f"mesh error: {exc or type(exc).__name__}")
        except Exception as exc:
            log.exception("command_failed", msg="command handler failed", verb=request.verb.value)
            reply = Reply.failure(f"internal error: {type(exc).__name__}: {exc}")
        fields = {
            k: v
            for k, v in request.model_dump(
                exclude={"by", "offset", "inode", "max_bytes", "request_id"}
            ).items()
            if v is not None
        }
        if not reply.ok:
            self._refuse(
                msg, "refused", reply.error or "", verb=request.verb.value, by=request.by, **fields
            )
        else:
            # ping and logs (polled by `logs -f`) are routine: debug, not the journal.
            routine = request.verb in (Verb.PING, Verb.LOGS)
            (log.debug if routine else log.info)(
                "command_served",
                msg=f"{request.verb.value} served",
                verb=request.verb.value,
                by=request.by,
                **fields,
            )
        return reply

    async def _respond(self, msg: Msg, reply: Reply) -> None:
        app_metrics.command(msg.subject, reply.ok)
        if not msg.reply:
            return  # a bare publish: nobody to tell, nothing to do
        body = reply.model_copy(update={"agent": self.agent_id})
        self.answered += 1
        with contextlib.suppress(NatsError):
            await msg.respond(body.encode())

    # --- verbs -------------------------------------------------------------------------------

    async def handle(self, request: AnyRequest) -> Reply:
        """Execute one decoded request. Public so tests and in-process callers skip NATS."""
        match request:
            case PingRequest():
                return Reply.success(verb="ping", held=sorted(self.held))
            case DrainRequest(site=site, by=by, reason=reason, request_id=rid):
                return await marks.apply_mark(
                    self.state, "drain", site, by=by, reason=reason, request_id=rid
                )
            case UndrainRequest(site=site):
                return await marks.apply_mark(self.state, "undrain", site)
            case FenceRequest(app=app, by=by, reason=reason, request_id=rid):
                return await marks.apply_mark(
                    self.state, "fence", app, by=by, reason=reason, request_id=rid
                )
            case ResumeRequest(app=app):
                return await marks.apply_mark(self.state, "resume", app)
            case FailoverRequest(app=app, to=to):
                return await self._failover(app, to)
            case LogsRequest():
                return await self._logs(request)
        return Reply.failure(f"verb {request.verb.value!r} is not implemented")

    async def _logs(self, request: LogsRequest) -> Reply:
        state_dir = self.state_dir
        if state_dir is None:
            return Reply.failure("logs are not available: this agent has no state directory")
        path = log_path(state_dir, request.app)
        try:
            if request.offset is None:
                chunk = await asyncio.to_thread(read_tail, path, request.tail, request.max_bytes)
            else:
                chunk = await asyncio.to_thread(
                    read_from, path, request.offset, request.inode, request.max_bytes
                )
        except FileNotFoundError:
            return Reply.failure(
                f"no output of {request.app!r} on {self.agent_id} "
                "(it has not run here as a Process workload)"
            )
        except OSError as exc:
            return Reply.failure(f"cannot read the output of {request.app!r}: {exc.strerror}")
        return Reply.success(verb="logs", app=request.app, **chunk.fields())

    async def _failover(self, app: str, to: str | None) -> Reply:
        if not await marks.app_exists(self.state, app):
            return Reply.failure(f"unknown application {app!r}")
        if app not in self.held:
            return Reply.failure(
                f"this agent does not hold {app!r}; send failover to harmony.cmd.app.{app}.failover"
            )
        if self.failover is None:
            return Reply.failure("failover is not available: no controller on this agent")
        reply = await self.failover(app, to)
        return reply.model_copy(update={"verb": "failover", "app": app})
