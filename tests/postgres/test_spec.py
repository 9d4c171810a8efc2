"""The PostgreSQL Score's fields and rendered files: no server needed."""

from __future__ import annotations

from typing import Any

import pytest

from agent.application import ApplicationError, parse_documents
from scores.check import missing_capabilities
from scores.postgres import PostgresSpec
from scores.postgres import config as cfg
from topologies.config import KubernetesConfig, LinuxSshConfig, LocalhostConfig

APP = """
apiVersion: harmony/v1
kind: Application
metadata: {name: ledger}
spec:
  trait: stateful
  placement: {sites: [site-a, site-b, site-c]}
  score:
    kind: PostgreSQL
    port: 5433
    synchronous: true
    tls: {ca_file: /etc/harmony/bundle.pem, cert_file: /etc/harmony/pg.crt,
          key_file: /etc/harmony/pg.key}
    parameters: {work_mem: 16MB, max_connections: 200}
    hba: ["hostssl all all 10.0.0.0/8 scram-sha-256"]
    sites: {site-b: {advertise: 10.0.2.1}}
    stop_timeout: 20s
"""


def _spec(**fields: Any) -> PostgresSpec:
    return PostgresSpec.model_validate(
        {"kind": "PostgreSQL", "replication_password_file": "/etc/pw", **fields}
    )


def test_an_application_with_a_postgres_score_parses() -> None:
    (app,) = parse_documents(APP)
    score = app.spec.score
    assert isinstance(score, PostgresSpec)
    assert (score.port, score.synchronous, score.stop_timeout) == (5433, True, 20.0)
    assert score.sites["site-b"].advertise == "10.0.2.1"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("    parameters: {port: 5434}", "set by the PostgreSQL Score"),
        ("    parameters: {synchronous_standby_names: '*'}", "set by the PostgreSQL Score"),
        ("    parameters: {harmony.fencing_token: '9'}", "set by the PostgreSQL Score"),
        ("    parameters: {'bad name': 1}", "not a PostgreSQL setting name"),
        ("    data_dir: relative/path", "absolute path"),
        ("    hba: ['trust everybody']", "not a pg_hba.conf record"),
        ("    replication_user: Robert'); DROP", "replication_user"),
        ("    os_user: root;rm", "os_user"),
        ("    port: 70000", "port"),
        ("    stop_timeout: soon", "invalid duration"),
        ('    listen: "127.0.0.1\'; evil"', "invalid address"),
    ],
)
def test_bad_fields_are_refused_with_the_field_named(change: str, complaint: str) -> None:
    text = APP.replace("    stop_timeout: 20s", change)
    with pytest.raises(ApplicationError, match="score") as caught:
        parse_documents(text)
    assert complaint in str(caught.value)


def test_replicas_must_be_able_to_authenticate() -> None:
    with pytest.raises(ValueError, match=r"tls .* or replication_password_file"):
        PostgresSpec.model_validate({"kind": "PostgreSQL"})


def test_capability_check_names_what_is_missing() -> None:
    spec = _spec()
    assert missing_capabilities(spec, LocalhostConfig()) == []
    ssh = LinuxSshConfig(kind="linux-ssh", host="db1")
    assert missing_capabilities(spec, ssh) == []
    assert missing_capabilities(spec, KubernetesConfig(kind="kubernetes"), site="k") == [
        "score PostgreSQL needs HostShell, which site k (kubernetes) does not provide"
    ]


def test_postgresql_conf_owns_its_settings_and_quotes_values() -> None:
    spec = _spec(parameters={"work_mem": "16MB", "application_name": "it's", "jit": False})
    layout = cfg.Layout("/srv/run", "/srv/run/pgdata", 5433, "*")
    role = cfg.RoleSettings("host=a user='x y'", 'ANY 1 ("b")', 7)
    text = cfg.postgresql_conf(spec, layout, "ledger", role, tls=True)
    lines = dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line)
    assert lines["port"] == "5433" and lines["wal_log_hints"] == "on"
    assert lines["primary_conninfo"] == "'host=a user=''x y'''"
    assert lines["synchronous_standby_names"] == "'ANY 1 (\"b\")'"
    assert lines["harmony.fencing_token"] == "'7'"
    assert lines["application_name"] == "'it''s'" and lines["jit"] == "off"
    assert lines["ssl_ca_file"] == "'/srv/run/tls/ca.crt'"
    assert text.index("work_mem") > text.index("port =")  # the operator's last, never owned


def test_strings_for_libpq_and_pgpass_are_escaped() -> None:
    assert cfg.conninfo({"host": "h", "password": "a b'c", "x": None}) == (
        "host=h password='a b\\'c'"
    )
    assert cfg.pgpass("replicator", "pa:ss\\w") == "*:*:*:replicator:pa\\:ss\\\\w\n"
    assert cfg.sync_standby_names(True, []) == "ANY 1 (*)"
    assert cfg.sync_standby_names(True, ["b", "a", "b"]) == 'ANY 1 ("a", "b")'
    assert cfg.sync_standby_names(False, ["a"]) == ""
    assert cfg.application_name("Site-A", "node.1") == "site_a_node_1"


def test_alter_system_cannot_override_owned_settings() -> None:
    auto = "# Do not edit\nwork_mem = '8MB'\nport = '1'\nharmony.fencing_token = '99'\n"
    assert cfg.strip_owned(auto) == "# Do not edit\nwork_mem = '8MB'\n"


def test_history_and_lsn_parsing() -> None:
    assert cfg.lsn("16/B374D848") == 0x16B374D848
    history = "1\t0/4020A40\tno recovery target specified\n\n2\t0/5000000\tx\n"
    assert cfg.parse_history(history) == [(1, 0x4020A40), (2, 0x5000000)]


def test_scram_verifier_has_postgres_format() -> None:
    verifier = cfg.scram_verifier("secret", salt=b"0123456789abcdef")
    assert verifier.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    assert verifier == cfg.scram_verifier("secret", salt=b"0123456789abcdef")
    assert verifier != cfg.scram_verifier("Secret", salt=b"0123456789abcdef")
