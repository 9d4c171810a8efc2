"""A real OpenSSH server on loopback, with ``systemctl``/``systemd-run`` shims first on the
remote PATH.

No systemd runs in the test environment, so the shim records every call and keeps unit
states in files; unit files themselves are written for real by the topology. The
``systemd-run`` shim models ``--on-active`` timers honestly: a detached sleeper process,
independent of the caller, runs the timer's command when it elapses, and ``systemctl stop
X.timer`` kills it. It refuses options it does not know, and an existing timer name.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.ports import free_port
from tests.harness.wait import eventually
from topologies.config import LinuxSshConfig

SSHD = Path("/usr/sbin/sshd")

SHIM = r'''#!{python}
"""systemctl stand-in: records calls, keeps ActiveState per unit in files, stops timers.

Timers are the detached sleepers started by the systemd-run shim (state/timers/*.json).
"""
import json, os, signal, sys, time
from pathlib import Path
here = Path(__file__).resolve().parent
state, unit_dir = here / "state", Path((here / "unit_dir").read_text().strip())
timers = state / "timers"
timers.mkdir(parents=True, exist_ok=True)
args = sys.argv[1:]
with open(here / "calls.log", "a") as log:
    log.write(json.dumps(args) + "\n")
with open(here / "commands.log", "a") as log:
    log.write(json.dumps(["systemctl", *args]) + "\n")
words = [a for a in args if not a.startswith("-")]
verb, names = (words[0], words[1:]) if words else ("", [])
name = names[0] if names else ""
if verb == "daemon-reload":
    (state / "loaded").write_text("\n".join(p.name for p in unit_dir.glob("*.service")))
    sys.exit(0)


def loaded(unit):
    loaded_file = state / "loaded"
    return unit in (loaded_file.read_text().split() if loaded_file.exists() else [])


def active(unit):
    return (state / unit).exists() and (state / unit).read_text() == "active"


def set_state(unit, value):
    (state / unit).write_text(value)
    with open(state / "transitions.log", "a") as log:
        log.write(json.dumps({"unit": unit, "state": value,
                              "at": time.clock_gettime(time.CLOCK_BOOTTIME)}) + "\n")


if verb in ("start", "restart"):
    if not loaded(name):
        print(f"Failed to {verb} {name}: Unit {name} not found.", file=sys.stderr)
        sys.exit(5)
    set_state(name, "active")
elif verb == "stop":
    code = 0
    for unit in names:
        if unit.endswith(".timer"):
            info_file = timers / (unit + ".json")
            if not info_file.exists():
                print(f"Failed to stop {unit}: Unit {unit} not loaded.", file=sys.stderr)
                code = 5
                continue
            try:
                os.kill(json.loads(info_file.read_text())["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            info_file.unlink(missing_ok=True)
        elif not loaded(unit):
            print(f"Failed to stop {unit}: Unit {unit} not loaded.", file=sys.stderr)
            code = 5
        elif active(unit):
            set_state(unit, "inactive")
    sys.exit(code)
elif verb == "kill":
    # A bare SIGKILL would restart a Restart=on-failure unit; after a queued stop (as the
    # fence does) it ends inactive, which is what the shim models: no restart.
    if not active(name):
        print(f"Failed to kill unit {name}: Unit {name} not loaded.", file=sys.stderr)
        sys.exit(1)
    set_state(name, "inactive")
elif verb == "fail":  # test hook: the unit's process died and systemd gave up
    set_state(name, "failed")
elif verb == "show":
    current = (state / name).read_text() if (state / name).exists() else "inactive"
    running = current == "active"
    print("LoadState=" + ("loaded" if loaded(name) else "not-found"))
    print("ActiveState=" + current)
    print("SubState=" + ("running" if running else "failed" if current == "failed" else "dead"))
    print("MainPID=" + ("4242" if running else "0"))
    print("Result=" + ("exit-code" if current == "failed" else "success"))
    print("ExecMainStatus=" + ("1" if current == "failed" else "0"))
else:
    print(f"shim: unsupported {args}", file=sys.stderr)
    sys.exit(1)
'''

SYSTEMD_RUN = r'''#!{python}
"""systemd-run stand-in for --on-active timers: a detached sleeper runs the command when the
timer elapses, independently of whoever called systemd-run. Options are checked strictly."""
import json, os, re, subprocess, sys, time
from pathlib import Path
here = Path(__file__).resolve().parent
timers = here / "state" / "timers"
timers.mkdir(parents=True, exist_ok=True)
args = sys.argv[1:]
with open(here / "systemd-run.log", "a") as log:
    log.write(json.dumps(args) + "\n")
with open(here / "commands.log", "a") as log:
    log.write(json.dumps(["systemd-run", *args]) + "\n")
SPAN = re.compile(r"^(\d+)(ms|s)$")
unit, delay, command, props = None, None, None, {}
for index, arg in enumerate(args):
    if arg == "--":
        command = args[index + 1:]
        break
    key, _, value = arg.partition("=")
    if key in ("--quiet", "--collect") and not value:
        continue
    if key == "--unit" and re.fullmatch(r"[A-Za-z0-9:_.@-]+", value):
        unit = value
    elif key == "--description" and value:
        pass
    elif key == "--on-active" and SPAN.match(value):
        number, suffix = SPAN.match(value).groups()
        delay = int(number) / (1000 if suffix == "ms" else 1)
    elif key == "--timer-property" and value.split("=")[0] in ("AccuracySec", "RemainAfterElapse"):
        props[value.split("=")[0]] = value.partition("=")[2]
    else:
        print(f"systemd-run shim: unsupported or malformed option {arg!r}", file=sys.stderr)
        sys.exit(1)
if not (unit and delay is not None and command and command[0].startswith("/")):
    print("systemd-run shim: needs --unit, --on-active and an absolute command", file=sys.stderr)
    sys.exit(1)
if props.get("RemainAfterElapse") != "no" or not SPAN.match(props.get("AccuracySec", "")):
    print("systemd-run shim: expected AccuracySec=<span> and RemainAfterElapse=no", file=sys.stderr)
    sys.exit(1)
timer = unit + ".timer"
info_file = timers / (timer + ".json")
if info_file.exists():
    print(f"Failed to start transient timer unit: Unit {timer} was already loaded or has a "
          "fragment file.", file=sys.stderr)
    sys.exit(1)
fire_at = time.clock_gettime(time.CLOCK_BOOTTIME) + delay
sleeper = subprocess.Popen(
    [sys.executable, __file__.replace("systemd-run", "timer-sleeper"), timer, repr(fire_at),
     json.dumps(command)],
    start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
info_file.write_text(json.dumps({"pid": sleeper.pid, "fire_at": fire_at, "command": command}))
'''

TIMER_SLEEPER = r'''#!{python}
"""One armed timer: sleep until it elapses, unload it (RemainAfterElapse=no), run the command."""
import json, subprocess, sys, time
from pathlib import Path
here = Path(__file__).resolve().parent
timer, fire_at, command = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
while (left := fire_at - time.clock_gettime(time.CLOCK_BOOTTIME)) > 0:
    time.sleep(min(left, 0.01))
(here / "state" / "timers" / (timer + ".json")).unlink(missing_ok=True)
with open(here / "state" / "fired.log", "a") as log:
    log.write(json.dumps({"timer": timer, "fire_at": fire_at,
                          "at": time.clock_gettime(time.CLOCK_BOOTTIME)}) + "\n")
subprocess.run(command, check=False)
'''


@dataclass
class Sshd:
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    shim_dir: Path
    unit_dir: Path

    def config(self, **overrides: object) -> LinuxSshConfig:
        fields: dict[str, object] = {
            "kind": "linux-ssh",
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "key_file": self.client_key,
            "known_hosts": self.known_hosts,
            "unit_dir": str(self.unit_dir),
            "connect_timeout": 5.0,
        }
        fields.update(overrides)
        return LinuxSshConfig.model_validate(fields)

    def systemctl_calls(self) -> list[str]:
        """Every systemctl call but ``show`` (observe), as space-joined argv."""
        log = self.shim_dir / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        calls = [" ".join(json.loads(line)) for line in lines]
        return [call for call in calls if not call.startswith("show ")]

    def _records(self, name: str) -> list[dict[str, Any]]:
        path = self.shim_dir / name
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def commands(self) -> list[list[str]]:
        """Every systemctl and systemd-run call, in order, as argv."""
        return [list(call) for call in self._records("commands.log")]

    def systemd_run_calls(self) -> list[list[str]]:
        return [list(call) for call in self._records("systemd-run.log")]

    def armed_timers(self) -> dict[str, dict[str, Any]]:
        """Timer name -> {pid, fire_at (CLOCK_BOOTTIME), command} of every armed timer."""
        found = sorted((self.shim_dir / "state" / "timers").glob("*.timer.json"))
        return {path.name.removesuffix(".json"): json.loads(path.read_text()) for path in found}

    def fired(self) -> list[dict[str, Any]]:
        """Timers that elapsed: {timer, fire_at, at} (CLOCK_BOOTTIME seconds)."""
        return self._records("state/fired.log")

    def transitions(self, unit: str) -> list[dict[str, Any]]:
        """State changes of ``unit``: {unit, state, at} (CLOCK_BOOTTIME seconds)."""
        return [t for t in self._records("state/transitions.log") if t["unit"] == unit]

    def unit_state(self, unit: str) -> str:
        path = self.shim_dir / "state" / unit
        return path.read_text() if path.exists() else "inactive"

    def disarm_all(self) -> None:
        """Kill every sleeper still armed (test teardown)."""
        for info in self.armed_timers().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(info["pid"], signal.SIGKILL)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _prepare(tmp_path: Path) -> tuple[Sshd, Path]:
    """Keys, authorized_keys, known_hosts, shim and sshd_config; returns the config path."""
    if not SSHD.exists():
        pytest.skip("needs OpenSSH's /usr/sbin/sshd (Debian: apt-get install openssh-server)")
    base = tmp_path / "sshd"
    shim_dir, unit_dir = base / "shim", base / "units"
    for directory in (base, shim_dir, unit_dir):
        directory.mkdir(parents=True)
    _keygen(base / "host_key")
    _keygen(base / "client_key")
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    for name, text in (
        ("systemctl", SHIM),
        ("systemd-run", SYSTEMD_RUN),
        ("timer-sleeper", TIMER_SLEEPER),
    ):
        script = shim_dir / name
        script.write_text(text.replace("{python}", sys.executable))
        script.chmod(0o755)
    (shim_dir / "unit_dir").write_text(str(unit_dir))
    port = free_port()
    host_pub = (base / "host_key.pub").read_text().split()
    (base / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (base / "sshd_config").write_text(
        "\n".join(
            [
                f"ListenAddress 127.0.0.1:{port}",
                f"HostKey {base / 'host_key'}",
                f"PidFile {base / 'sshd.pid'}",
                f"AuthorizedKeysFile {base / 'authorized_keys'}",
                "UsePAM no",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                f"SetEnv PATH={shim_dir}:/usr/local/bin:/usr/bin:/bin",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    user = getpass.getuser()
    sshd = Sshd(port, user, base / "client_key", base / "known_hosts", shim_dir, unit_dir)
    return sshd, base / "sshd_config"


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    server, config = _prepare(tmp_path)
    proc = await asyncio.create_subprocess_exec(str(SSHD), "-D", "-e", "-f", str(config))
    try:
        await eventually(lambda: _accepts(server.port), timeout=10, what="sshd to listen")
        yield server
    finally:
        server.disarm_all()
        proc.terminate()
        await proc.wait()


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True
