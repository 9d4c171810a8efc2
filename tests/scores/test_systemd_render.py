"""SystemdUnit rendering: typed fields in, a unit file systemd parses as meant out."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from scores.base import RunContext, WorkloadState
from scores.systemd import SystemdUnitSpec, observation_from_show, quote_exec_arg


def _spec(**fields: object) -> SystemdUnitSpec:
    return SystemdUnitSpec.model_validate(
        {"kind": "SystemdUnit", "unit": "ledger.service", "exec_start": ["/bin/true"], **fields}
    )


def test_exec_words_are_quoted_against_splitting_and_expansion() -> None:
    assert quote_exec_arg("/usr/bin/python3") == "/usr/bin/python3"
    assert quote_exec_arg("a b") == '"a b"'
    assert quote_exec_arg("$HOME") == '"$$HOME"'
    assert quote_exec_arg("100%") == "100%%"
    assert quote_exec_arg('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert quote_exec_arg("") == '""'


def test_render_carries_fields_and_contract_environment(ctx: RunContext) -> None:
    spec = _spec(
        exec_start=["/usr/bin/python3", "-m", "http.server", "8080"],
        environment={"GREETING": "hello world"},
        user="ledger",
        type="notify",
        stop_timeout="1m",
    )
    text = spec.render(ctx)
    assert "ExecStart=/usr/bin/python3 -m http.server 8080" in text
    assert 'Environment="GREETING=hello world"' in text
    assert 'Environment="HARMONY_APP=ledger"' in text
    assert 'Environment="HARMONY_FENCING_TOKEN=7"' in text
    assert "Type=notify" in text
    assert "User=ledger" in text
    assert "TimeoutStopSec=1m" not in text and "TimeoutStopSec=60s" in text
    assert "[Install]" not in text, "only the lease holder may start it, never boot"


@pytest.mark.parametrize(
    "fields",
    [
        {"unit": "../evil.service"},
        {"unit": "ledger"},
        {"exec_start": ["/bin/sh", "-c", "a\nExecStartPre=/bin/rm"]},
        {"environment": {"BAD KEY": "x"}},
        {"description": "two\nlines"},
    ],
)
def test_unsafe_fields_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _spec(**fields)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_rendered_unit_passes_systemd_analyze_verify(ctx: RunContext, tmp_path: Path) -> None:
    spec = _spec(
        exec_start=["/bin/sh", "-c", 'echo "$HOME" 100% done', "with space"],
        environment={"A": 'quote " and \\ backslash'},
        working_directory="/tmp",
    )
    unit = tmp_path / "ledger.service"
    unit.write_text(spec.render(ctx))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr  # any complaint names the file


def test_show_properties_map_to_states() -> None:
    running = observation_from_show(
        "a.service", {"LoadState": "loaded", "ActiveState": "active", "MainPID": "12"}
    )
    assert (running.state, running.pids) == (WorkloadState.RUNNING, (12,))
    failed = observation_from_show("a.service", {"LoadState": "loaded", "ActiveState": "failed"})
    assert failed.state is WorkloadState.FAILED
    absent = observation_from_show("a.service", {"LoadState": "not-found"})
    assert (absent.state, absent.reason) == (WorkloadState.STOPPED, "not-found")
