"""The README's and docs/'s links: every relative link names a file of the repository, and every
anchor a heading of the file it points into (so a section renamed or lost shows here)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # (a '#' in a code block is no heading)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def test_the_slug_is_githubs():
    assert _slug("AMD EPYC Zen 4 (`znver4`): thirty-first sessions, 2026-12-05") == \
        "amd-epyc-zen-4-znver4-thirty-first-sessions-2026-12-05"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(document):
    assert document.exists()
    problems = []
    for target in LINK.findall(re.sub(r"```.*?```", "", document.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists():
            problems.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            problems.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not problems, problems
