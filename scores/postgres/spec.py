"""``kind: PostgreSQL``: the fields an operator writes, validated before anything runs."""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scores.base import Score
from scores.duration import Duration
from topologies.capabilities import HostShell
from topologies.higher_order import Provides, resolve

if TYPE_CHECKING:
    from scores.postgres.interpret import PostgresInterpret

IDENTIFIER = r"^[a-z_][a-z0-9_]{0,62}$"
"""A role name that needs no quoting anywhere (SQL, pg_hba.conf, conninfo)."""
OS_USER = r"^[a-z_][a-z0-9_-]{0,31}$"
_GUC_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")

OWNED_PARAMETERS = frozenset(
    {
        # where and how it listens, where its files are
        "port",
        "listen_addresses",
        "unix_socket_directories",
        "data_directory",
        "config_file",
        "hba_file",
        "ident_file",
        "external_pid_file",
        "cluster_name",
        # replication and roles
        "wal_level",
        "wal_log_hints",
        "hot_standby",
        "primary_conninfo",
        "primary_slot_name",
        "recovery_target_timeline",
        "recovery_target",
        "recovery_target_lsn",
        "recovery_target_name",
        "recovery_target_time",
        "recovery_target_xid",
        "recovery_target_action",
        "recovery_target_inclusive",
        "promote_trigger_file",
        "synchronous_standby_names",
        "synchronous_commit",
        "default_transaction_read_only",
        # TLS
        "ssl",
        "ssl_cert_file",
        "ssl_key_file",
        "ssl_ca_file",
        "ssl_crl_file",
        "ssl_crl_dir",
        "ssl_passphrase_command",
    }
)
"""GUCs the Score sets itself; ``parameters`` may not name them (nor ``harmony.*``)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not value.startswith("/") or "\n" in value or "'" in value:
        raise ValueError(f"{what} must be an absolute path without quotes or newlines")
    return posixpath.normpath(value)


class PostgresTls(_Strict):
    """Certificates issued by the site CA (``SiteCA.issue``), paths on the database host.

    The server presents ``cert_file`` (its SAN must name the host replicas connect to:
    ``sslmode=verify-full``); replicas present ``client_cert_file`` whose CN must be the
    replication user (``cert`` authentication). Both are verified against ``ca_file``, the
    federated trust bundle. The Score copies them into its run directory, owned by
    ``os_user`` with mode 0600, so the originals may stay root-only.
    """

    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str | None = None
    """Defaults to ``cert_file`` (a leaf from ``SiteCA.issue`` has both usages) when its CN
    is the replication user."""
    client_key_file: str | None = None

    @field_validator("ca_file", "cert_file", "key_file", "client_cert_file", "client_key_file")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return _absolute(value, "tls paths")

    @model_validator(mode="after")
    def _pairs(self) -> PostgresTls:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("tls: set both client_cert_file and client_key_file, or neither")
        return self


class PostgresSite(_Strict):
    """Per-site overrides, for sites that differ (addresses, or several on one machine)."""

    port: int | None = Field(default=None, ge=1, le=65535)
    listen: str | None = None
    advertise: str | None = None
    data_dir: str | None = None
    run_dir: str | None = None

    @field_validator("data_dir", "run_dir")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return _absolute(value, "data_dir and run_dir")


class PostgresSpec(Score):
    """A PostgreSQL primary where the lease is held, a streaming replica on every other site."""

    kind: Literal["PostgreSQL"] = "PostgreSQL"
    port: int = Field(default=5432, ge=1, le=65535)
    listen: str = "*"
    """``listen_addresses``: ``*``, or host names/addresses separated by commas."""
    advertise: str | None = None
    """Address replicas and clients use to reach this instance (and that its server
    certificate names). Default: the SSH host on an SSH topology, ``listen`` when it is one
    concrete address, else this machine's fully qualified host name."""
    data_dir: str | None = None
    """Default ``<run_dir>/pgdata``."""
    run_dir: str | None = None
    """Configuration, sockets, certificates, logs, watchdog: default
    ``<agent state_dir>/workloads/<app>`` (the same path on an SSH host)."""
    bin_dir: str | None = None
    """Default: the directory of ``pg_ctl`` on the host's PATH, else the newest
    ``/usr/lib/postgresql/*/bin``."""
    os_user: str = Field(default="postgres", pattern=OS_USER)
    synchronous: bool = False
    max_lag_on_failover: int = Field(default=1024 * 1024, ge=0)
    """Bytes: a replica further behind than this is not a promotion candidate (read by the
    controller, as Patroni's ``maximum_lag_on_failover``)."""
    replication_user: str = Field(default="replicator", pattern=IDENTIFIER)
    replication_password_file: str | None = None
    """Without ``tls``: a file on every database host holding the replication user's password
    (SCRAM); never copied into the Application."""
    tls: PostgresTls | None = None
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    hba: list[str] = Field(default_factory=list)
    """Extra ``pg_hba.conf`` lines for applications, appended after the Score's own."""
    sites: dict[str, PostgresSite] = Field(default_factory=dict)
    stop_timeout: Duration = 30.0
    start_timeout: Duration = 60.0
    promote_timeout: Duration = 30.0
    basebackup_timeout: Duration = 600.0
    """Also bounds ``pg_rewind``."""
    keep_replaced_data_dirs: int = Field(default=1, ge=0)
    """A data directory that could not be rewound is moved aside (``pgdata.replaced-<time>``)
    before a fresh base backup; this many of the newest are kept."""

    required_capabilities: ClassVar[frozenset[type]] = frozenset({HostShell})

    @field_validator("data_dir", "run_dir", "bin_dir", "replication_password_file")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return _absolute(value, "data_dir, run_dir, bin_dir and replication_password_file")

    @field_validator("listen", "advertise")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.:*,%\[\] -]+", value):
            raise ValueError(f"invalid address {value!r}")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(
        cls, value: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        for name, setting in value.items():
            if not _GUC_NAME.match(name):
                raise ValueError(f"parameters: {name!r} is not a PostgreSQL setting name")
            if name in OWNED_PARAMETERS or name.startswith("harmony."):
                raise ValueError(
                    f"parameters: {name} is set by the PostgreSQL Score itself "
                    "(use the Score's own fields)"
                )
            if isinstance(setting, str) and ("\n" in setting or "\r" in setting):
                raise ValueError(f"parameters: {name} must not contain a newline")
        return value

    @field_validator("hba")
    @classmethod
    def _hba(cls, value: list[str]) -> list[str]:
        for line in value:
            if "\n" in line or "\r" in line:
                raise ValueError("hba: one pg_hba.conf line per entry")
            words = line.split()
            if not words or words[0] not in {"local", "host", "hostssl", "hostnossl"}:
                raise ValueError(f"hba: {line!r} is not a pg_hba.conf record")
        return value

    @model_validator(mode="after")
    def _authentication(self) -> PostgresSpec:
        if self.tls is None and self.replication_password_file is None:
            raise ValueError(
                "replicas need to authenticate: set tls (certificates from the site CA) "
                "or replication_password_file"
            )
        return self

    def interpret(self, topology: Provides[HostShell]) -> PostgresInterpret:
        from scores.postgres.interpret import PostgresInterpret

        return PostgresInterpret(self, resolve(topology))
