"""The read side: events, get app, apply --diff, agent forget, completion, man pages and
status at scale, against a real nats-server holding known mesh contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError

from agent.cli.status_render import SUMMARY_OVER
from tests.cli.conftest import Invoke, Mesh
from tests.commands.helpers import APPS_YAML, heartbeat, seed_apps, seed_world

# --- events ---------------------------------------------------------------------------------


async def publish_event(mesh: Mesh, site: str, event: str, app: str, token: int) -> None:
    body = {
        "event": event,
        "app": app,
        "agent": f"{site}/node-1",
        "site": site,
        "node": "node-1",
        "fencing_token": token,
        "time": "2026-01-01T00:00:00.000Z",
        "sentence": f"{app}: {event} with token {token}",
    }
    await mesh.nc.jetstream().publish(
        f"harmony.events.{site}.node-1.{event}", json.dumps(body).encode()
    )


async def test_events_text_json_and_app_filter(mesh: Mesh, invoke: Invoke) -> None:
    empty = await invoke("events", "-s", mesh.url)
    assert empty.exit_code == 0 and empty.stdout == ""
    await publish_event(mesh, "site-a", "started", "ledger", 3)
    await publish_event(mesh, "site-b", "started", "web", 4)
    await publish_event(mesh, "site-a", "stopped", "ledger", 3)

    text = await invoke("events", "-s", mesh.url)
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines() == [
        "2026-01-01T00:00:00.000Z  site-a/node-1  started  ledger  token 3  "
        "ledger: started with token 3",
        "2026-01-01T00:00:00.000Z  site-b/node-1  started  web  token 4  web: started with token 4",
        "2026-01-01T00:00:00.000Z  site-a/node-1  stopped  ledger  token 3  "
        "ledger: stopped with token 3",
    ]
    only = await invoke("events", "--app", "ledger", "-o", "json", "-s", mesh.url)
    records = [json.loads(line) for line in only.stdout.splitlines()]
    assert [(r["event"], r["seq"]) for r in records] == [("started", 1), ("stopped", 3)]
    assert records[0]["subject"] == "harmony.events.site-a.node-1.started"
    recent = await invoke("events", "--since", "1h", "-s", mesh.url)
    assert len(recent.stdout.splitlines()) == 3  # all published just now


async def test_events_follow_prints_new_events(mesh: Mesh) -> None:
    import asyncio

    await publish_event(mesh, "site-a", "started", "ledger", 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "events", "-f", "-s", mesh.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"started  ledger  token 1" in first
        await publish_event(mesh, "site-b", "started", "web", 2)
        second = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"site-b/node-1  started  web  token 2" in second
    finally:
        proc.terminate()
        await proc.wait()


# --- get, apply --diff ----------------------------------------------------------------------


async def test_get_app_round_trips_through_apply(
    mesh: Mesh, invoke: Invoke, tmp_path: Path
) -> None:
    await seed_apps(mesh.buckets)
    one = await invoke("get", "app", "ledger", "-s", mesh.url)
    assert one.exit_code == 0, one.output
    doc = yaml.safe_load(one.stdout)
    assert doc["metadata"] == {"name": "ledger"} and doc["spec"]["score"]["kind"] == "Process"
    as_json = json.loads(
        (await invoke("get", "app", "ledger", "-o", "json", "-s", mesh.url)).stdout
    )
    assert as_json == doc

    everything = await invoke("get", "app", "-s", mesh.url)
    (tmp_path / "all.yaml").write_text(everything.stdout)
    again = await invoke("apply", "-f", str(tmp_path / "all.yaml"), "-s", mesh.url)
    assert again.stdout == "application/ledger unchanged\napplication/web unchanged\n"
    listed = json.loads((await invoke("get", "app", "-o", "json", "-s", mesh.url)).stdout)
    assert [d["metadata"]["name"] for d in listed] == ["ledger", "web"]

    missing = await invoke("get", "app", "nope", "-s", mesh.url)
    assert missing.exit_code == 1 and missing.stderr == (
        "harmony-agent: error: application 'nope' not found\n"
    )


async def test_apply_diff_exit_codes(mesh: Mesh, invoke: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(APPS_YAML)
    new = await invoke("apply", "-f", str(path), "--diff", "-s", mesh.url)
    assert new.exit_code == 1
    assert "--- /dev/null\n" in new.stdout and f"+++ {path}/application/ledger\n" in new.stdout
    assert (await invoke("get", "app", "-s", mesh.url)).stdout == ""  # --diff writes nothing

    assert (await invoke("apply", "-f", str(path), "-s", mesh.url)).exit_code == 0
    same = await invoke("apply", "-f", str(path), "--diff", "-s", mesh.url)
    assert (same.exit_code, same.stdout) == (0, "")

    path.write_text(APPS_YAML.replace('command: [sleep, "1000"]', 'command: [sleep, "2000"]'))
    changed = await invoke("apply", "-f", str(path), "--diff", "-s", mesh.url)
    assert changed.exit_code == 1
    lines = changed.stdout.splitlines()
    assert "--- mesh/application/ledger" in lines
    assert "-    - '1000'" in lines and "+    - '2000'" in lines
    assert not any("application/web" in line for line in lines)


# --- agent forget ---------------------------------------------------------------------------


async def test_forget_refuses_a_live_agent_and_forgets_a_dead_one(
    mesh: Mesh, invoke: Invoke
) -> None:
    await seed_world(mesh.buckets, mesh.nc)  # site-c/node-1 is closed, the others alive
    await mesh.buckets.state.put("inst.ledger.site-c.node-1", b'{"state":"running"}')
    await mesh.buckets.state.put("inst.web.site-c.node-1", b'{"state":"running"}')
    await mesh.buckets.state.put("inst.ledger.site-a.node-1", b'{"state":"running"}')

    alive = await invoke("agent", "forget", "site-a/node-1", "-s", mesh.url)
    assert alive.exit_code == 1
    assert "site-a/node-1 is alive (its record was written" in alive.stderr
    await mesh.buckets.state.get("agent.site-a.node-1")  # still there

    gone = await invoke("agent", "forget", "site-c/node-1", "-s", mesh.url)
    assert gone.exit_code == 0, gone.output
    assert gone.stdout == (
        "agent site-c/node-1 forgotten (deleted agent.site-c.node-1 and 2 instance reports)\n"
    )
    for key in ("agent.site-c.node-1", "inst.ledger.site-c.node-1", "inst.web.site-c.node-1"):
        with pytest.raises(KeyNotFoundError):
            await mesh.buckets.state.get(key)
    await mesh.buckets.state.get("inst.ledger.site-a.node-1")  # another agent's: kept
    doc = json.loads((await invoke("status", "-o", "json", "-s", mesh.url)).stdout)
    assert [a["id"] for a in doc["agents"]] == ["site-a/node-1", "site-b/node-1"]

    again = await invoke("agent", "forget", "site-c/node-1", "-s", mesh.url)
    assert again.exit_code == 1 and "has no record of agent site-c/node-1" in again.stderr


async def test_forget_checks_the_v2_session_stores(mesh: Mesh, invoke: Invoke) -> None:
    """With a ``mesh`` descriptor, a session live in a majority of the lease stores
    refuses, even though the agent's record in harmony-state is stale."""
    expired = heartbeat("site-c", "node-1", state="expired")
    await mesh.buckets.state.put("agent.site-c.node-1", expired)
    js = mesh.nc.jetstream()
    stores = {}
    for name in ("s1", "s2", "s3"):
        stores[name] = await js.create_key_value(KeyValueConfig(bucket=f"harmony-leases-{name}"))
    await mesh.buckets.state.put("mesh", json.dumps({"stores": ["s1", "s2", "s3"]}).encode())
    live = json.dumps({"epoch": "e1", "ttl": 60}).encode()
    for name in ("s1", "s2"):
        await stores[name].put("sess.site-c.node-1.live", live)

    refused = await invoke("agent", "forget", "site-c/node-1", "-s", mesh.url)
    assert refused.exit_code == 1
    assert "session is live in 2 of 3 lease stores" in refused.stderr

    # A contender expired it in one of the two: no majority any more.
    await stores["s2"].put("sess.site-c.node-1.expired.site-a.node-1", b"{}")
    done = await invoke("agent", "forget", "site-c/node-1", "-s", mesh.url)
    assert done.exit_code == 0, done.output


# --- completion and man pages ---------------------------------------------------------------


def complete(words: str, env_extra: dict[str, str]) -> list[str]:
    """What bash completion offers for the command line ``words`` (cursor at the end)."""
    env = {
        **os.environ,
        **env_extra,
        "_HARMONY_AGENT_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli"], env=env, capture_output=True, text=True, check=False
    ).stdout
    return [line.split(",", 1)[1] for line in out.splitlines() if "," in line]


async def test_completion_offers_names_from_the_mesh(mesh: Mesh, invoke: Invoke) -> None:
    import asyncio

    await seed_world(mesh.buckets, mesh.nc)
    env = {"HARMONY_NATS_URL": mesh.url}
    apps = await asyncio.to_thread(complete, "harmony-agent cmd fence ", env)
    assert apps == ["ledger", "web"]
    assert await asyncio.to_thread(complete, "harmony-agent cmd failover le", env) == ["ledger"]
    sites = await asyncio.to_thread(complete, "harmony-agent cmd drain ", env)
    assert sites == ["site-a", "site-b", "site-c"]
    agents = await asyncio.to_thread(complete, "harmony-agent agent forget site-c", env)
    assert agents == ["site-c/node-1"]
    verbs = await asyncio.to_thread(complete, "harmony-agent cmd ", env)
    assert {"failover", "drain", "fence", "ping"} <= set(verbs)
    # an unreachable mesh completes nothing, quietly
    dead = {"HARMONY_NATS_URL": "nats://127.0.0.1:1", "HARMONY_COMPLETION_TIMEOUT": "0.5"}
    assert await asyncio.to_thread(complete, "harmony-agent cmd fence ", dead) == []

    for shell, marker in (
        ("bash", "complete -o"),
        ("zsh", "compdef"),
        ("fish", "--command harmony-agent"),
    ):
        script = await invoke("completion", shell)
        assert script.exit_code == 0 and marker in script.stdout
        assert "_HARMONY_AGENT_COMPLETE" in script.stdout


def test_every_command_has_a_current_man_page() -> None:
    from agent.cli import cli
    from agent.cli.manpages import page_name, pages, walk

    docs = Path(__file__).resolve().parents[2] / "docs" / "man"
    generated = pages()
    paths = [path for path, _, _ in walk(cli)]
    assert len(paths) > 30 and ("harmony-agent", "cmd", "failover") in paths
    for path in paths:
        page = docs / page_name(path)
        assert page.exists(), f"{page} missing: run `make man`"
        assert page.read_text() == generated[page.name], f"{page} is stale: run `make man`"
    assert sorted(p.name for p in docs.glob("*.1")) == sorted(generated)


# --- status at scale, drain wording ---------------------------------------------------------


async def test_status_summarises_many_applications(mesh: Mesh, invoke: Invoke) -> None:
    """60 applications running on site-a/node-1 but three: one fenced, one without a holder,
    one failed. The table counts them per state and lists only those three."""
    import asyncio

    from agent.application import parse_documents
    from mesh.names import lease_family
    from tests.commands.helpers import report, write_claim, write_session

    template = parse_documents(APPS_YAML)[0].to_json().decode()
    names = [f"app-{n:03}" for n in range(SUMMARY_OVER + 10)]
    puts = [
        mesh.buckets.state.put(f"app.{n}", template.replace('"ledger"', f'"{n}"').encode())
        for n in names
    ]
    puts += [
        write_claim(mesh.nc, lease_family(n), "site-a/node-1", 5) for n in names if n != "app-003"
    ]
    puts += [
        mesh.buckets.state.put(
            f"inst.{n}.site-a.node-1", report(n, "failed" if n == "app-005" else "running", 5)
        )
        for n in names
    ]
    await asyncio.gather(*puts)
    await write_session(mesh.nc, "site-a/node-1")
    await mesh.buckets.state.put("fence.app-007", b"{}")
    await mesh.buckets.state.put("agent.site-a.node-1", heartbeat("site-a", "node-1"))

    table = (await invoke("status", "-s", mesh.url)).stdout
    lines = table.splitlines()
    counts = lines[
        lines.index("APPLICATIONS   COUNT") + 1 : lines.index("APPLICATIONS   COUNT") + 5
    ]
    assert [line.split() for line in counts] == [
        ["running", "57"],
        ["failed", "1"],
        ["fenced", "1"],
        ["no", "holder", "1"],
    ]
    listed = [line.split()[0] for line in lines if line.startswith("app-")]
    assert listed == ["app-003", "app-005", "app-007"]
    assert "60 applications, 3 not running listed; --all lists every one" in table

    full = (await invoke("status", "--all", "-s", mesh.url)).stdout
    assert "APPLICATIONS   COUNT" not in full
    assert [line.split()[0] for line in full.splitlines() if line.startswith("app-")] == names
    doc = json.loads((await invoke("status", "-o", "json", "-s", mesh.url)).stdout)
    assert [a["name"] for a in doc["applications"]] == names  # JSON is always complete


async def test_drain_of_the_only_site_says_what_stops(mesh: Mesh, invoke: Invoke) -> None:
    from agent.commands import CommandServer

    app = APPS_YAML.split("---")[0].replace("[site-a, site-b, site-c]", "[local]")
    from agent.application import parse_documents

    await mesh.buckets.state.put("app.ledger", parse_documents(app)[0].to_json())
    await mesh.buckets.state.put("agent.local.node-1", heartbeat("local", "node-1"))
    server = CommandServer(mesh.nc, mesh.buckets.state, site="local", node="node-1")
    await server.start()
    try:
        drained = await invoke("cmd", "drain", "local", "-s", mesh.url)
        assert drained.exit_code == 0, drained.output
        assert drained.stdout == (
            "site local drained: ledger stops (no other undrained site in the placement); "
            "`cmd undrain local` lifts it\n"
        )
    finally:
        await server.stop()


async def test_events_include_the_v2_audit_trail(mesh: Mesh, invoke: Invoke) -> None:
    """With the v2 stream (``harmony.audit.<user>.<verb>`` captured too), both kinds are
    read through one consumer with two filters, in stream order."""
    from nats.js.api import StreamConfig

    from mesh.names import EVENTS_STREAM

    js = mesh.nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM)
    config: StreamConfig = info.config
    config.subjects = ["harmony.events.>", "harmony.audit.>"]
    await js.update_stream(config)
    await publish_event(mesh, "site-a", "started", "ledger", 3)
    audit = {"verb": "drain", "site": "site-b", "reason": "kernel update"}
    await js.publish("harmony.audit.alice.drain", json.dumps(audit).encode())

    lines = (await invoke("events", "-s", mesh.url)).stdout.splitlines()
    assert len(lines) == 2 and "site-a/node-1  started  ledger" in lines[0]
    assert lines[1].split("  ")[1:] == [
        "audit:alice",
        "drain",
        "-",
        "verb=drain site=site-b reason=kernel update",
    ]
