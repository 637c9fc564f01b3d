"""The manual builds and the README stays a front door: `mkdocs build --strict`, the README's length and links.

A broken link or anchor in docs/, or a page left out of mkdocs.yml's nav, fails the strict build (mkdocs.yml's
`validation` turns each into a warning, and `--strict` makes a warning an error). Starts no server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 150

# [text](target) and [text]: target; the target ends at whitespace or the closing parenthesis.
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)


def _relative_links(markdown: str) -> list[str]:
    """The link targets of a Markdown text that point into the repository (no URL scheme, no bare anchor)."""
    text = _FENCE.sub("", markdown)
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages, "docs/ holds no pages"
    missing = [page for page in pages if not re.search(rf":\s*{re.escape(page)}\s*$", nav, re.MULTILINE)]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_readme_links_point_at_existing_files() -> None:
    links = _relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links to no file: it should link the docs pages"
    broken = [link for link in links if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not broken, f"README.md links to missing files: {broken}"


def test_relative_links_finds_what_it_should() -> None:
    text = (
        "[a](docs/data.md) [b](docs/x.md#part) [c](https://example.com) [d](#top)\n"
        "[ref]: docs/ref.md\n"
        "```\n[in](code.md)\n```\n"
    )
    assert _relative_links(text) == ["docs/data.md", "docs/x.md#part", "docs/ref.md"]
