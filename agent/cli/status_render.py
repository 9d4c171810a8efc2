"""Tables for ``harmony-agent status``, drawn from the JSON document (never from the mesh
directly, so table and ``-o json`` cannot disagree).

Plain text with ANSI colours on a terminal only (``NO_COLOR`` is honoured): columns are
left-aligned and three spaces apart, lines carry no trailing spaces and are never cut, so
piped output is fit for ``grep`` and ``awk``. A small renderer of our own rather than rich:
rich's import and table layout cost ``status`` more than its whole round trip to the mesh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VOLATILE = frozenset({"generated_at", "last_seen", "age", "lease_age", "revision"})
"""Fields that change with every heartbeat or tick; ``--watch`` re-prints only when
something else changes (health flips still show: ``healthy`` is not volatile)."""

SUMMARY_OVER = 50
"""More applications (or agents) than this: the table summarises unless ``--all``."""
LISTED_MAX = 50
"""A summary lists at most this many applications (or agents) that need attention."""

STATE_STYLE = {
    "running": "green",
    "standby": "cyan",
    "stopped": "dim",
    "fenced": "magenta",
    "failed": "bold red",
}
CONDITION_STYLE = {
    "running": "green",
    "partial": "yellow",
    "moving": "cyan",
    "no holder": "yellow",
    "holder unhealthy": "red",
    "failed": "bold red",
    "fenced": "magenta",
}
SGR = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "magenta": "35",
    "cyan": "36",
}


@dataclass
class Text:
    """A line or a table cell: segments of text, each with an optional style."""

    segments: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, text: str, style: str = "") -> Text:
        return cls([(text, style)])

    def append(self, text: str, style: str = "") -> Text:
        self.segments.append((text, style))
        return self

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.segments)

    def __len__(self) -> int:
        return len(self.plain)

    def draw(self, color: bool) -> str:
        if not color:
            return self.plain
        return "".join(_paint(text, style) for text, style in self.segments)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Text]] = field(default_factory=list)

    def add_row(self, *cells: Text | str) -> None:
        self.rows.append([c if isinstance(c, Text) else Text.of(c) for c in cells])

    def draw(self, color: bool) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        lines = [_line([Text.of(h, "bold") for h in self.headers], widths, color)]
        lines += [_line(row, widths, color) for row in self.rows]
        return "\n".join(lines)


def _paint(text: str, style: str) -> str:
    codes = ";".join(SGR[s] for s in style.split() if s in SGR)
    return f"\x1b[{codes}m{text}\x1b[0m" if codes and text else text


def _line(cells: list[Text], widths: list[int], color: bool) -> str:
    out = ""
    for n, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        last = n == len(cells) - 1
        out += cell.draw(color) + ("" if last else " " * (width - len(cell) + 3))
    return out.rstrip()


def draw(parts: list[Table | Text], color: bool) -> str:
    """The sections one after the other; a blank line before each table but the first."""
    out: list[str] = []
    for n, part in enumerate(parts):
        if n and isinstance(part, Table):
            out.append("")
        out.append(part.draw(color))
    return "\n".join(out)


def stable(doc: Any) -> str:
    """``doc`` without its volatile fields, as a comparable string."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(doc), sort_keys=True)


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 1:
        return f"{int(s * 1000)}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def _yes(flag: bool | None, good: str = "green", bad: str = "red") -> Text:
    if flag is None:
        return Text.of("-")
    return Text.of("yes", good) if flag else Text.of("no", bad)


def _sites(doc: dict[str, Any]) -> Table:
    table = Table(["SITE", "AGENTS", "DRAINED"])
    for s in doc["sites"]:
        ok = s["healthy_agents"] == s["agents"] and s["agents"] > 0
        count = Text.of(f"{s['healthy_agents']}/{s['agents']} healthy", "green" if ok else "yellow")
        drained = Text.of("-")
        if s["drained"]:
            by = (s.get("drain") or {}).get("by")
            drained = Text.of("yes" + (f" (by {by})" if by else ""), "yellow")
        table.add_row(s["name"], count, drained)
    return table


def _agents(doc: dict[str, Any], wide: bool) -> Table:
    cols = ["AGENT", "HEALTHY", "IN QUORUM", "LAST SEEN", "VERSION"]
    if wide:
        cols += ["STATE", "READY", "TTL", "EPOCH", "STARTED", "TOPOLOGY"]
    table = Table(cols)
    for a in doc["agents"]:
        row: list[Text | str] = [
            a["id"],
            _yes(a["healthy"]),
            _yes(a["in_quorum"]),
            human_age(a["age"]) + " ago" if a["age"] is not None else "never",
            a["version"] or "-",
        ]
        if wide:
            row += [
                a["state"],
                _yes(a["ready"]),
                f"{a['ttl']:g}s",
                a["epoch"] or "-",
                a["started_at"] or "-",
                a["topology"] or "-",
            ]
        table.add_row(*row)
    return table


def _instances(app: dict[str, Any], wide: bool) -> Text:
    text = Text()
    for n, inst in enumerate(app["instances"]):
        if n:
            text.append(" ")
        text.append(inst["agent"] + "=")
        label = inst["state"] + ("?" if inst["stale"] else "")
        if wide and inst["token"] is not None:
            label += f"#{inst['token']}"
        text.append(label, "dim" if inst["stale"] else STATE_STYLE.get(inst["state"], ""))
    return text if app["instances"] else Text.of("-")


def _holder(app: dict[str, Any]) -> tuple[Text, str, str]:
    """(holder, token, lease age) columns; stateless applications show their slots."""
    if app["trait"] == "stateless":
        held = [s for s in app["slots"] if s["holder"]]
        text = Text.of(f"{len(held)} slot{'s' if len(held) != 1 else ''}")
        tokens = ",".join(str(s["fencing_token"]) for s in held) or "-"
        return text, tokens, "-"
    if not app["holder"]:
        return Text.of("none", "yellow"), "-", "-"
    holder = Text.of(app["holder"], "" if app["holder_healthy"] else "red")
    if app["lease_state"] == "handover" and app["handover_to"]:
        holder.append(f" -> {app['handover_to']}", "cyan")
    return holder, str(app["fencing_token"]), human_age(app["lease_age"])


def _applications(doc: dict[str, Any], wide: bool) -> Table:
    cols = ["APPLICATION", "TRAIT", "STRATEGY", "HOLDER", "TOKEN", "LEASE AGE", "INSTANCES"]
    if wide:
        cols += ["SITES", "SCORE", "SLOTS"]
    table = Table(cols)
    for app in doc["applications"]:
        holder, token, age = _holder(app)
        name = Text.of(app["name"])
        if app["fenced"]:
            name.append(" (fenced)", "magenta")
        row: list[Text | str] = [
            name,
            app["trait"],
            app["strategy"],
            holder,
            token,
            age,
            _instances(app, wide),
        ]
        if wide:
            slots = " ".join(
                f"{s['site']}={s['holder'] or 'free'}#{s['fencing_token']}" for s in app["slots"]
            )
            row += [",".join(app["sites"]), app["score"], slots or "-"]
        table.add_row(*row)
    return table


def human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _replication(doc: dict[str, Any], wide: bool) -> Table | None:
    """Role, timeline and lag of every instance of a replicated application (PostgreSQL):
    None when no instance reports a role."""
    cols = ["APPLICATION", "INSTANCE", "ROLE", "STATE", "TIMELINE", "LAG", "ERROR"]
    if wide:
        cols += ["POSITION", "DETAIL"]
    table = Table(cols)
    for app in doc["applications"]:
        insts = app["instances"]
        if not any(i.get("role") or i.get("timeline") is not None for i in insts):
            continue
        for i in insts:
            role = i.get("role") or "-"
            style = "green" if role == "primary" else ("cyan" if role == "replica" else "dim")
            state = i["state"] + ("?" if i["stale"] else "")
            error = i.get("error") or "-"
            if not wide and len(error) > 60:
                error = error[:57] + "..."
            row: list[Text | str] = [
                app["name"],
                i["agent"],
                Text.of(role, "dim" if i["stale"] else style),
                Text.of(state, "dim" if i["stale"] else STATE_STYLE.get(i["state"], "")),
                str(i["timeline"]) if i.get("timeline") is not None else "-",
                "-" if role == "primary" else human_bytes(i.get("lag_bytes")),
                Text.of(error, "red" if i.get("error") else ""),
            ]
            if wide:
                position = i.get("position")
                row += [
                    "-" if position is None else f"{position >> 32:X}/{position & 0xFFFFFFFF:X}",
                    i.get("replication_detail") or "-",
                ]
            table.add_row(*row)
    return table if table.rows else None


def _trust(doc: dict[str, Any], wide: bool) -> Table:
    table = Table(["TRUSTED SITE", "STATE", "FINGERPRINT", "NOT AFTER"])
    for t in doc["trust"]:
        fp = t["fingerprint"] or "-"
        if not wide and len(fp) > 23:
            fp = fp[:23] + "..."
        table.add_row(t["site"], t.get("state") or "-", fp, t["not_after"] or "-")
    return table


def condition(app: dict[str, Any], drained: set[str]) -> str:
    """One word for where an application stands, for the summary of a large mesh:
    ``running`` is the only state that needs no attention."""
    if app["fenced"]:
        return "fenced"
    if any(i["state"] == "failed" and not i["stale"] for i in app["instances"]):
        return "failed"
    if app["trait"] == "stateless":
        wanted = {s for s in app["sites"] if s not in drained}
        held = {s["site"] for s in app["slots"] if s["holder"]}
        if not held:
            return "no holder"
        return "running" if wanted <= held else "partial"
    if app["lease_state"] == "handover":
        return "moving"
    if not app["holder"]:
        return "no holder"
    if not app["holder_healthy"]:
        return "holder unhealthy"
    return "running"


def _counts(title: str, counts: dict[str, int], styles: dict[str, str]) -> Table:
    table = Table([title, "COUNT"])
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(Text.of(name, styles.get(name, "")), str(count))
    return table


def _listed(count: int, what: str) -> str:
    if count <= LISTED_MAX:
        return f"{count} {what} listed"
    return f"{count} {what}, the first {LISTED_MAX} listed"


def _summarised(doc: dict[str, Any], wide: bool) -> list[Table | Text]:
    """Counts per state, then only what needs attention, at most ``LISTED_MAX`` of each
    (``--all`` lists everything, ``-o json`` has everything)."""
    parts: list[Table | Text] = [_sites(doc)]
    notes: list[str] = []
    agents = doc["agents"]
    if len(agents) > SUMMARY_OVER:
        up = sum(1 for a in agents if a["healthy"])
        agent_counts = {"healthy": up, "unhealthy": len(agents) - up}
        parts.append(_counts("AGENTS", agent_counts, {"healthy": "green", "unhealthy": "red"}))
        sick = [a for a in agents if not a["healthy"]]
        if sick:
            parts.append(_agents({**doc, "agents": sick[:LISTED_MAX]}, wide))
        notes.append(f"{len(agents)} agents, {_listed(len(sick), 'unhealthy')}")
    else:
        parts.append(_agents(doc, wide))
    apps = doc["applications"]
    if len(apps) > SUMMARY_OVER:
        drained = {s["name"] for s in doc["sites"] if s["drained"]}
        conditions = {a["name"]: condition(a, drained) for a in apps}
        counts: dict[str, int] = {}
        for value in conditions.values():
            counts[value] = counts.get(value, 0) + 1
        parts.append(_counts("APPLICATIONS", counts, CONDITION_STYLE))
        attention = [a for a in apps if conditions[a["name"]] != "running"]
        if attention:
            parts.append(_applications({**doc, "applications": attention[:LISTED_MAX]}, wide))
        notes.append(f"{len(apps)} applications, {_listed(len(attention), 'not running')}")
    else:
        parts.append(_applications(doc, wide))
    note = "; ".join(notes) + "; --all lists every one, -o json has everything"
    parts.append(Text.of(note, "dim"))
    return parts


def render(doc: dict[str, Any], *, wide: bool = False, full: bool = False) -> list[Table | Text]:
    """The sections of one status document, in reading order. Beyond ``SUMMARY_OVER``
    applications or agents the listing is summarised unless ``full``."""
    large = len(doc["applications"]) > SUMMARY_OVER or len(doc["agents"]) > SUMMARY_OVER
    if large and not full:
        parts = _summarised(doc, wide)
    else:
        parts = [_sites(doc), _agents(doc, wide), _applications(doc, wide)]
        replication = _replication(doc, wide)
        if replication is not None:
            parts.append(replication)
    parts.append(_trust(doc, wide) if doc["trust"] else Text.of("no trusted site CAs in the mesh"))
    parts += [Text.of(f"! {p}", "yellow") for p in doc["problems"]]
    return parts
