"""``apply`` / ``delete`` / ``check``: validation before any write, idempotence, exit codes."""

from __future__ import annotations

from pathlib import Path

import yaml
from nats.js.errors import KeyNotFoundError

from agent.application import Application
from tests.cli.conftest import Invoke, Mesh
from tests.commands.helpers import APPS_YAML


async def test_apply_creates_then_is_unchanged_then_updates(
    mesh: Mesh, invoke: Invoke, tmp_path: Path
) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(APPS_YAML)
    first = await invoke("apply", "-f", str(path), "-s", mesh.url)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == ["application/ledger created", "application/web created"]
    stored = Application.from_json((await mesh.buckets.state.get("app.ledger")).value or b"")
    assert stored.spec.placement.sites == ["site-a", "site-b", "site-c"]

    rev = (await mesh.buckets.state.get("app.ledger")).revision
    again = await invoke("apply", "-f", str(path), "-s", mesh.url)
    assert again.stdout.splitlines() == [
        "application/ledger unchanged",
        "application/web unchanged",
    ]
    assert (await mesh.buckets.state.get("app.ledger")).revision == rev  # nothing written

    changed = APPS_YAML.replace("[site-a, site-b, site-c]", "[site-b, site-a]")
    dry = await invoke("apply", "-f", "-", "-s", mesh.url, "--dry-run", input=changed)
    assert dry.stdout.splitlines()[0] == "application/ledger updated (dry run)"
    assert (await mesh.buckets.state.get("app.ledger")).revision == rev
    real = await invoke("apply", "-f", "-", "-s", mesh.url, input=changed)
    assert real.stdout.splitlines() == ["application/ledger updated", "application/web unchanged"]
    stored = Application.from_json((await mesh.buckets.state.get("app.ledger")).value or b"")
    assert stored.spec.placement.sites == ["site-b", "site-a"]


async def test_validation_errors_name_document_and_field(
    mesh: Mesh, invoke: Invoke, tmp_path: Path
) -> None:
    docs = list(yaml.safe_load_all(APPS_YAML))
    docs[1]["spec"]["trait"] = "stateful-ish"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = await invoke("apply", "-f", str(path), "-s", mesh.url)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"harmony-agent: error: {path} document 2 (web): spec.trait")
    assert result.stderr.count("\n") == 1
    try:
        await mesh.buckets.state.get("app.ledger")  # the valid first document was not written
        raise AssertionError("nothing may be written when any document is invalid")
    except KeyNotFoundError:
        pass

    for text, needle in [
        ("kind: Application\n: : :", "invalid YAML"),
        ("", "no Application documents"),
        ("- a list", "document 1: expected a mapping"),
    ]:
        bad = await invoke("apply", "-f", "-", "-s", mesh.url, input=text)
        assert bad.exit_code == 2 and needle in bad.stderr, bad.stderr
    missing = await invoke("apply", "-f", str(tmp_path / "nope.yaml"), "-s", mesh.url)
    assert missing.exit_code == 2 and "cannot read" in missing.stderr


async def test_delete(mesh: Mesh, invoke: Invoke) -> None:
    await invoke("apply", "-f", "-", "-s", mesh.url, input=APPS_YAML)
    result = await invoke("delete", "web", "-s", mesh.url)
    assert result.exit_code == 0 and result.stdout == "application/web deleted\n"
    gone = await invoke("delete", "web", "-s", mesh.url)
    assert gone.exit_code == 1 and "application 'web' not found" in gone.stderr
    bad = await invoke("delete", "Web!", "-s", mesh.url)
    assert bad.exit_code == 2


async def test_apply_to_an_unreachable_mesh(invoke: Invoke) -> None:
    from tests.harness.ports import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    result = await invoke("apply", "-f", "-", "-s", url, "--timeout", "1s", input=APPS_YAML)
    assert result.exit_code == 1 and "mesh unreachable" in result.stderr


async def test_check_documents_and_topology(invoke: Invoke, tmp_path: Path) -> None:
    apps = tmp_path / "apps.yaml"
    apps.write_text(APPS_YAML)
    plain = await invoke("check", "-f", str(apps))
    assert plain.exit_code == 0
    assert plain.stdout.splitlines() == ["application/ledger valid", "application/web valid"]

    config = tmp_path / "agent.yaml"
    config.write_text("site: site-c\nnode: n1\n")
    local = await invoke("check", "-f", str(apps), "--config", str(config))
    assert local.exit_code == 0, local.output
    assert "application/ledger valid on site-c/n1 (localhost)" in local.stdout
    assert "site site-c is not in its placement" in local.stdout  # web: site-a, site-b only

    k8s = tmp_path / "k8s.yaml"
    k8s.write_text("site: site-a\nnode: n1\ntopology: {kind: kubernetes}\n")
    refused = await invoke("check", "-f", str(apps), "--config", str(k8s))
    assert refused.exit_code == 2
    assert "ledger: score Process needs" in refused.stderr

    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("site: site-a\nbogus: 1\n")
    broken = await invoke("check", "-f", str(apps), "--config", str(bad_config))
    assert broken.exit_code == 2 and "bogus: unknown field" in broken.stderr
