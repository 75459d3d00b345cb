"""The repository explains itself: every pointer into docs/references.md lands on a heading."""

from __future__ import annotations

import os
import re
import subprocess

from conftest import REPO

ANCHOR = re.compile(r"#([a-z0-9]+(?:-[a-z0-9]+)+)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_cited_anchor_of_the_references_exists():
    with open(os.path.join(REPO, "docs", "references.md"), encoding="utf-8") as file:
        headings = [line.lstrip("#") for line in file if line.startswith("#")]
    anchors = {github_anchor(heading) for heading in headings}
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    cited = {}
    for path in tracked:
        with open(os.path.join(REPO, path), encoding="utf-8") as file:
            text = file.read()
        if "references.md" not in text:
            continue
        for anchor in ANCHOR.findall(text):
            cited.setdefault(anchor, path)
    assert cited, "no file cites docs/references.md by anchor"
    missing = {anchor: path for anchor, path in cited.items() if anchor not in anchors}
    assert not missing, f"anchors cited but not in docs/references.md: {missing}"
