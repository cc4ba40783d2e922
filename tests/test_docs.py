"""The documentation's promises that a machine can check: every relative link in README.md and
docs/*.md reaches an existing file (and its #anchor a heading there, by GitHub's slug rules),
README.md stays a front door of at most 200 lines, and every `make <target>` it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_MAKE = re.compile(r"(?<![\w./-])make((?:\s+[A-Z_][A-Z0-9_]*=\S*)*)\s+([a-z][\w-]*)")
_RULE = re.compile(r"^([A-Za-z0-9_.%/-]+(?:[ \t]+[A-Za-z0-9_.%/-]+)*)[ \t]*:(?!=)", re.M)


def _prose(text: str) -> str:
    """The text with fenced code blocks and inline code removed: links there are not links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _code(text: str) -> list[str]:
    """Fenced code blocks and inline code spans: where commands are written."""
    return [m.group(0) for m in _FENCE.finditer(text)] + [
        m.group(2) for m in _INLINE_CODE.finditer(_FENCE.sub("", text))
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup dropped, lowercased, punctuation
    other than - and _ removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor the page's headings get; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(_prose(page.read_text()))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto:
    ]


def make_targets() -> set[str]:
    """The Makefile's targets: the names before `:` on rule lines (not `:=` assignments)."""
    text = (REPO / "Makefile").read_text()
    return {
        name
        for names in _RULE.findall(text)
        for name in names.split()
        if not name.startswith(".") and "%" not in name
    }


def test_the_pages_exist():
    assert (REPO / "README.md").is_file()
    assert len(PAGES) > 1, "docs/*.md holds no page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved.relative_to(REPO)}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_mentioned_exists(page: Path):
    targets = make_targets()
    mentioned = {m.group(2) for code in _code(page.read_text()) for m in _MAKE.finditer(code)}
    assert not mentioned - targets, (
        f"{page.relative_to(REPO)} names make targets the Makefile lacks: "
        f"{sorted(mentioned - targets)} (targets: {sorted(targets)})"
    )


def test_the_checks_catch_what_they_claim_to(tmp_path):
    """The helpers themselves: a slug as GitHub makes it, a link in code is no link, the
    Makefile's real targets are found and an assignment is not one."""
    assert slug("`training`: `DistributedConfig` (flyray/raytrain.py)") == (
        "training-distributedconfig-flyrayraytrainpy"
    )
    assert slug("Shared inputs (all four workflows)") == "shared-inputs-all-four-workflows"
    page = tmp_path / "p.md"
    page.write_text("# A b\n\n# A b\n\n[x](y.md#z) `[no](code.md)`\n```\n[no](block.md)\n```\n")
    assert relative_links(page) == ["y.md#z"]
    assert anchors(page) == {"a-b", "a-b-1"}
    targets = make_targets()
    assert {"setup", "run", "test", "test-quick", "bench", "ui"} <= targets
    assert not {"PYTHON", "VENV", "EXTRAS", "comma"} & targets
