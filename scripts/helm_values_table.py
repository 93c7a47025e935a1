#!/usr/bin/env python3
"""The chart README's table of the Helm chart's values, generated from the "# --" comments of values.yaml.

    .venv/bin/python scripts/helm_values_table.py           # prints the table
    .venv/bin/python scripts/helm_values_table.py --write   # rewrites it in the chart's README.md, between the markers

A key is documented by the "# -- text" comment right above it (further "# " lines continue the text). Keys
under a documented key are covered by it; every other key must be documented (tests/python/test_helm.py checks
that, and that the chart README's table is the one this prints). Needs PyYAML (in the test venv).
"""

import json
import pathlib
import re
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
VALUES = REPO / "helm" / "eventhub-gateway" / "values.yaml"
README = REPO / "helm" / "eventhub-gateway" / "README.md"
START = "<!-- helm-values:start (scripts/helm_values_table.py --write) -->"
END = "<!-- helm-values:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def documented_keys(text):
    """[(dotted key, description)] in file order, and the dotted paths of values (a scalar, a list or an empty
    map) that have no description of their own or of an enclosing key."""
    documented = []
    stack = []  # (indent, key)
    pending = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = stripped[len("# --"):].strip()
            continue
        if stripped.startswith("#"):
            continuation = stripped.lstrip("#").strip()
            if pending is not None and continuation:
                pending = f"{pending} {continuation}"
            continue
        match = KEY.match(line)
        if not match or stripped.startswith("-"):
            pending = None if stripped else pending
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if pending is not None:
            documented.append((".".join(key for _, key in stack), pending))
        pending = None
    covered = {path for path, _ in documented}

    def leaves(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        else:
            yield prefix

    parts = lambda path: [".".join(path.split(".")[:n]) for n in range(1, path.count(".") + 2)]
    undocumented = [
        path for path in leaves(yaml.safe_load(text) or {}, "") if not any(p in covered for p in parts(path))
    ]
    return documented, undocumented


def lookup(values, path):
    node = values
    for part in path.split("."):
        node = node[part]
    return node


def table(values_text=None):
    text = values_text if values_text is not None else VALUES.read_text()
    values = yaml.safe_load(text)
    documented, _ = documented_keys(text)
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for path, description in documented:
        default = json.dumps(lookup(values, path), separators=(", ", ": "))
        cell = lambda s: s.replace("|", "\\|")
        rows.append(f"| `{path}` | `{cell(default)}` | {cell(description)} |")
    return "\n".join(rows) + "\n"


def readme_block(readme_text):
    """The table in the chart's README, between the markers (None when the markers are missing)."""
    if START not in readme_text or END not in readme_text:
        return None
    return readme_text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv):
    generated = table()
    if "--write" in argv:
        text = README.read_text()
        if readme_block(text) is None:
            sys.exit(f"{README}: no {START} ... {END} markers")
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        README.write_text(f"{before}{START}\n{generated}{END}{after}")
    else:
        sys.stdout.write(generated)


if __name__ == "__main__":
    main(sys.argv[1:])
