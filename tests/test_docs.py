"""The docs stand alone: every cited section of docs/math.md exists, nothing cites a file users
do not have (the internal specification and design notes live outside the repository)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".cfg", ".txt", ".yml", ".yaml", ".sh", ".rst"}
# Where a citation may appear: the README, docs, the package, kernels, benchmarks, notebooks,
# tests, the CI scripts and the project file.
PLACES = ("README.md", "pyproject.toml", "docs", "energy_attn", "energy_attn_kernels", "benchmarks",
          "notebooks", "tests", ".ci")
# docs/zoo.md says once that its bare section numbers (§N) are docs/math.md's.
BARE_SECTIONS_ARE_MATH = {ROOT / "docs" / "zoo.md", MATH}

SECTION = r"§\s*(\d+(?:\.\d+)*)"
# "docs/math.md §4", "[math.md §1, §2, §4](math.md)", "(`docs/math.md` §4)", "math.md §4.3–§4.4"
CITATION = re.compile(r"math\.md`?\)?\s*((?:§\s*\d+(?:\.\d+)*(?:\s*(?:,|and|–|-)\s*)?)+)")
# Built from pieces so that this file does not cite them itself.
FORBIDDEN = re.compile("|".join([r"MATH" + r"\.md", r"DESIGN" + r"\.md",
                                 r"(?:\.\./|/work/)" + "shared"]))


def _files():
    for place in PLACES:
        path = ROOT / place
        if path.is_file():
            yield path
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                script = place == ".ci"  # the CI scripts have no suffix
                if f.is_file() and (f.suffix in SUFFIXES or script) and \
                        "__pycache__" not in f.parts:
                    yield f


def _headings():
    """Section numbers of docs/math.md's headings: '## 4. Title' -> '4', '### 4.3 Title'."""
    found = set()
    for line in MATH.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            found.add(m.group(1))
    return found


def _citations():
    """``{(file, line number, section)}`` for every section of docs/math.md cited in the repo."""
    cited = []
    for f in _files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            refs = []
            for m in CITATION.finditer(line):
                refs += re.findall(SECTION, m.group(1))
            if f in BARE_SECTIONS_ARE_MATH:  # every § there, except "other.md §N"
                refs = re.findall(SECTION, re.sub(r"\b(?!math\.md)\w+\.md\)?\]?\s*§", "", line))
            cited += [(f.relative_to(ROOT).as_posix(), lineno, r) for r in refs]
    return cited


def test_math_md_is_numbered_like_the_citations_expect():
    headings = _headings()
    # The sections the rest of the package is built on (docs/math.md's own contents line).
    for section in ("1", "1.2", "1.3", "1.4", "2", "3", "4", "4.3", "4.4", "5", "6", "6.3", "7",
                    "7.3", "8", "9", "10"):
        assert section in headings, f"docs/math.md has no section {section}"


def test_every_cited_math_section_exists():
    headings = _headings()
    cited = _citations()
    # The scanner finds the citations (a regex that matches nothing would pass vacuously).
    files = {f for f, _, _ in cited}
    assert {"README.md", "energy_attn/descent.py", "docs/zoo.md"} <= files, sorted(files)
    assert len(cited) > 40
    missing = [f"{f}:{n}: §{s}" for f, n, s in cited if s not in headings]
    assert not missing, "cited sections missing from docs/math.md:\n" + "\n".join(missing)


def test_citation_scanner_reads_the_forms_used():
    line = "see [math.md §1, §2, §4](math.md) and (`docs/math.md` §4.3) or docs/math.md §9.2."
    refs = [s for m in CITATION.finditer(line) for s in re.findall(SECTION, m.group(1))]
    assert refs == ["1", "2", "4", "4.3", "9.2"]


@pytest.mark.parametrize("place", PLACES)
def test_nothing_cites_files_outside_the_repository(place):
    bad = []
    for f in _files():
        if f.relative_to(ROOT).parts[0] != place and f.name != place:
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace")
                                      .splitlines(), 1):
            # Tests may run the peer projects beside the clone (CI has them) to make fixtures.
            if place == "tests" and "shared/peers/" in line:
                continue
            if FORBIDDEN.search(line):
                bad.append(f"{f.relative_to(ROOT).as_posix()}:{lineno}: {line.strip()[:100]}")
    assert not bad, "cite docs/math.md (or another file in the repository) instead:\n" + \
        "\n".join(bad)


def test_sections_cited_in_the_other_docs_exist():
    """``docs/zoo.md §6``, ``[results.md §2](results.md)``: numbered headings of that page."""
    other = re.compile(r"\b(zoo|results|kernels)\.md`?\)?\s*§\s*(\d+(?:\.\d+)*)")
    missing, seen = [], 0
    for f in _files():
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace")
                                      .splitlines(), 1):
            for name, section in other.findall(line):
                seen += 1
                page = (ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8")
                if not re.search(rf"^#{{2,4}}\s+{re.escape(section)}\.?\s", page, flags=re.M):
                    missing.append(f"{f.relative_to(ROOT).as_posix()}:{lineno}: {name}.md "
                                   f"§{section}")
    assert seen >= 2  # README's docs/zoo.md §6 and math.md's results.md §2
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("out", sorted(p.name for p in (ROOT / "docs" / "results").iterdir()
                                       if (p / "compare.md").is_file()))
def test_results_page_quotes_each_committed_table_as_rendered(out):
    """docs/results.md shows each committed ``docs/results/<dir>/compare.md`` table verbatim, so
    a re-rendered table (e.g. after a change to what its means cover) updates the page too."""
    table = (ROOT / "docs" / "results" / out / "compare.md").read_text().strip()
    assert table in (ROOT / "docs" / "results.md").read_text()
