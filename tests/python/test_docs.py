"""The documentation's shape: README.md stays a front page, and every relative link between the Markdown files
(a file, or a heading in it) leads somewhere, so text moved from one file to another stays reachable."""

import re
import subprocess

from conftest import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```$", re.S | re.M)


def markdown_files():
    """The repository's Markdown files (tracked, or new and not ignored), as paths relative to it."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted({name for name in listed if "node_modules/" not in name and (REPO / name).is_file()})


def anchors(path):
    """GitHub's ids for the headings of a Markdown file: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen = {}
    ids = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def broken_links(name):
    """The relative links of one file whose target file or heading does not exist."""
    source = REPO / name
    broken = []
    for target in LINK.findall(FENCE.sub("", source.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked (the tests reach no network)
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    return broken


def test_every_relative_link_between_the_docs_leads_somewhere():
    files = markdown_files()
    assert {"README.md", "ARCHITECTURE.md", "helm/eventhub-gateway/README.md", "crates/emulator/README.md"} <= set(
        files
    )
    broken = {name: links for name in files if (links := broken_links(name))}
    assert broken == {}


def test_the_link_check_notices_a_missing_file_and_a_missing_heading(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [gone](b.md) [wrong](#nowhere)\n```\n[code](x.md)\n```\n")
    monkeypatch.setattr("test_docs.REPO", tmp_path)
    assert broken_links("a.md") == ["b.md: no such file", "#nowhere: no heading #nowhere"]


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move reference material under docs/"
