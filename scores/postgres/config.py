"""Files and strings the PostgreSQL Score renders: pure functions, tested without a server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scores.postgres.spec import OWNED_PARAMETERS, PostgresSpec

HEADER = "# Managed by harmony-agent (PostgreSQL Score): rewritten on every start and role change\n"


@dataclass(frozen=True)
class Layout:
    """Where one instance's files live on its host."""

    run_dir: str
    data_dir: str
    port: int
    listen: str

    @property
    def socket_dir(self) -> str:
        return f"{self.run_dir}/sock"

    @property
    def socket_path(self) -> str:
        return f"{self.socket_dir}/.s.PGSQL.{self.port}"

    @property
    def config_file(self) -> str:
        return f"{self.run_dir}/postgresql.conf"

    @property
    def hba_file(self) -> str:
        return f"{self.run_dir}/pg_hba.conf"

    @property
    def ident_file(self) -> str:
        return f"{self.run_dir}/pg_ident.conf"

    @property
    def tls_dir(self) -> str:
        return f"{self.run_dir}/tls"

    @property
    def log_dir(self) -> str:
        return f"{self.run_dir}/log"

    @property
    def watchdog(self) -> str:
        return f"{self.run_dir}/watchdog.py"

    @property
    def watchdog_state(self) -> str:
        return f"{self.run_dir}/watchdog.json"

    @property
    def watchdog_log(self) -> str:
        return f"{self.run_dir}/postgres.log"

    @property
    def deadline_file(self) -> str:
        return f"{self.run_dir}/deadline"

    @property
    def passfile(self) -> str:
        return f"{self.run_dir}/pgpass"

    @property
    def standby_signal(self) -> str:
        return f"{self.data_dir}/standby.signal"

    def tls(self, name: str) -> str:
        return f"{self.tls_dir}/{name}"


def conf_value(value: str | int | float | bool) -> str:
    """A postgresql.conf value: booleans as on/off, numbers bare, strings single-quoted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def conninfo(params: Mapping[str, str | int | None]) -> str:
    """A libpq key=value connection string; values quoted only when they need it."""
    parts = []
    for key, raw in params.items():
        if raw is None:
            continue
        value = str(raw)
        if value == "" or re.search(r"[\s'\\]", value):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def application_name(site: str, node: str) -> str:
    """The name a replica streams under; ``synchronous_standby_names`` lists these."""
    name = re.sub(r"[^a-z0-9_]", "_", f"{site}_{node}".lower())
    return name[:63]


def sync_standby_names(synchronous: bool, names: Iterable[str]) -> str:
    """``ANY 1 (...)`` over the given replicas, ``*`` (any replica) while none is known."""
    if not synchronous:
        return ""
    listed = sorted(set(names))
    members = ", ".join('"' + n.replace('"', '""') + '"' for n in listed) if listed else "*"
    return f"ANY 1 ({members})"


def default_parameters(layout: Layout) -> dict[str, str | int | float | bool]:
    """Settings the Score picks but an operator may override through ``parameters``."""
    return {
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "wal_keep_size": "512MB",
        "hot_standby_feedback": True,
        "wal_receiver_timeout": "10s",
        "wal_sender_timeout": "10s",
        "wal_retrieve_retry_interval": "1s",
        "logging_collector": True,
        "log_directory": f"{layout.log_dir}",
        "log_filename": "postgresql-%a.log",
        "log_truncate_on_rotation": True,
        "log_rotation_age": "1d",
        "log_rotation_size": 0,
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }


@dataclass(frozen=True)
class RoleSettings:
    """What differs between a primary and a replica in ``postgresql.conf``."""

    primary_conninfo: str | None = None
    sync_names: str = ""
    fencing_token: int | None = None


def postgresql_conf(
    spec: PostgresSpec, layout: Layout, app: str, role: RoleSettings, tls: bool
) -> str:
    owned: dict[str, str | int | float | bool] = {
        "data_directory": layout.data_dir,
        "hba_file": layout.hba_file,
        "ident_file": layout.ident_file,
        "port": layout.port,
        "listen_addresses": layout.listen,
        "unix_socket_directories": layout.socket_dir,
        "cluster_name": app[:63],
        "wal_level": "replica",
        "wal_log_hints": True,
        "hot_standby": True,
        "recovery_target_timeline": "latest",
        "synchronous_standby_names": role.sync_names,
        "synchronous_commit": "on",
        "default_transaction_read_only": False,
    }
    if role.primary_conninfo is not None:
        owned["primary_conninfo"] = role.primary_conninfo
    if tls:
        owned |= {
            "ssl": True,
            "ssl_cert_file": layout.tls("server.crt"),
            "ssl_key_file": layout.tls("server.key"),
            "ssl_ca_file": layout.tls("ca.crt"),
        }
    assert set(owned) <= OWNED_PARAMETERS, set(owned) - OWNED_PARAMETERS
    lines = [HEADER]
    lines += [f"{k} = {conf_value(v)}\n" for k, v in default_parameters(layout).items()]
    lines.append("# set by the Score (role, replication, files)\n")
    lines += [f"{k} = {conf_value(v)}\n" for k, v in owned.items()]
    if role.fencing_token is not None:
        lines.append(f"harmony.fencing_token = '{role.fencing_token}'\n")
    if spec.parameters:
        lines.append("# the Score's parameters\n")
        lines += [f"{k} = {conf_value(v)}\n" for k, v in spec.parameters.items()]
    return "".join(lines)


def pg_hba(spec: PostgresSpec, tls: bool) -> str:
    user, repl = spec.os_user, spec.replication_user
    lines = [HEADER, f"local all {user} peer\n"]
    if tls:
        lines += [f"hostssl replication {repl} all cert\n", f"hostssl postgres {repl} all cert\n"]
    else:
        lines += [
            f"host replication {repl} all scram-sha-256\n",
            f"host postgres {repl} all scram-sha-256\n",
        ]
    if spec.hba:
        lines.append("# the Score's hba lines\n")
        lines += [line.strip() + "\n" for line in spec.hba]
    return "".join(lines)


def pgpass(user: str, password: str) -> str:
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:{user}:{escaped}\n"


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """A SCRAM-SHA-256 verifier, so the plain password never reaches the server or its logs.

    Same computation as PostgreSQL's ``scram_build_secret`` (passwords are taken as given;
    PostgreSQL's SASLprep leaves printable ASCII unchanged, which the Score requires).
    """
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def strip_owned(auto_conf: str) -> str:
    """``postgresql.auto.conf`` without settings the Score owns (ALTER SYSTEM cannot win)."""
    kept = []
    for line in auto_conf.splitlines(keepends=True):
        key = line.split("=", 1)[0].strip().lower()
        if "=" in line and (key in OWNED_PARAMETERS or key.startswith("harmony.")):
            continue
        kept.append(line)
    return "".join(kept)


def lsn(text: str) -> int:
    """``16/B374D848`` -> int."""
    high, _, low = text.strip().partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def parse_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file: (parent timeline, switch point LSN) per line."""
    entries = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isdigit():
            entries.append((int(words[0]), lsn(words[1])))
    return entries
