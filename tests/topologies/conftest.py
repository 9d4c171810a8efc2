"""A real OpenSSH server on loopback, with a ``systemctl`` shim first on the remote PATH.

No systemd runs in the test environment, so the shim records every call and keeps unit
states in files; unit files themselves are written for real by the topology.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.ports import free_port
from tests.harness.wait import eventually
from topologies.config import LinuxSshConfig

SSHD = Path("/usr/sbin/sshd")

SHIM = r'''#!{python}
"""systemctl stand-in: records calls, keeps ActiveState per unit in files."""
import json, os, sys
from pathlib import Path
here = Path(__file__).resolve().parent
state, unit_dir = here / "state", Path((here / "unit_dir").read_text().strip())
state.mkdir(exist_ok=True)
args = sys.argv[1:]
with open(here / "calls.log", "a") as log:
    log.write(json.dumps(args) + "\n")
verb = args[0] if args else ""
if verb == "daemon-reload":
    (state / "loaded").write_text("\n".join(p.name for p in unit_dir.glob("*.service")))
    sys.exit(0)
name = args[1] if len(args) > 1 else ""
loaded_file = state / "loaded"
loaded = name in (loaded_file.read_text().split() if loaded_file.exists() else [])
active = (state / name).exists() and (state / name).read_text() == "active"
if verb in ("start", "restart"):
    if not loaded:
        print(f"Failed to {verb} {name}: Unit {name} not found.", file=sys.stderr)
        sys.exit(5)
    (state / name).write_text("active")
elif verb == "stop":
    if not loaded:
        print(f"Failed to stop {name}: Unit {name} not loaded.", file=sys.stderr)
        sys.exit(5)
    (state / name).write_text("inactive")
elif verb == "show":
    print("LoadState=" + ("loaded" if loaded else "not-found"))
    print("ActiveState=" + ("active" if active else "inactive"))
    print("SubState=" + ("running" if active else "dead"))
    print("MainPID=" + ("4242" if active else "0"))
    print("Result=success")
    print("ExecMainStatus=0")
else:
    print(f"shim: unsupported {args}", file=sys.stderr)
    sys.exit(1)
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
    shim = shim_dir / "systemctl"
    shim.write_text(SHIM.replace("{python}", sys.executable))
    shim.chmod(0o755)
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
