"""The docs stay true: the planner's tables are the planner's, docs/layout.md lists every module by its docstring's
first line, links resolve, the README stays a front door, and user docs carry results, not history.

    python tests/test_docs.py --write   # rewrite docs/layout.md's module list from the docstrings
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lomo_trainer.bench import doc_tables  # noqa: E402

USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("README.md"))]
MODULES_START, MODULES_END = "<!-- modules -->\n", "<!-- /modules -->"


def test_planner_tables_match_the_planner():
    """Each block is what the planner prints now; ``python -m lomo_trainer.bench.doc_tables --write`` refreshes."""
    stale = [f"{p.relative_to(ROOT)}: {name}" for p in doc_tables.doc_files() for name in doc_tables.refresh(p.read_text())[1]]
    assert not stale, f"planner tables differ from the planner: {stale}; run python -m lomo_trainer.bench.doc_tables --write"


def test_a_changed_figure_is_caught(tmp_path):
    """The check can fail: one figure edited by hand is named."""
    text = (ROOT / "README.md").read_text()
    edited = re.sub(r"(<!-- planner-table 8x24 -->\n(?:.*\n){2}\| LLaMA-7B \| )\d+\.\d", r"\g<1>0.1", text, count=1)
    assert edited != text
    assert doc_tables.refresh(edited)[1] == ["8x24"]


def test_every_table_is_in_the_docs_and_no_planned_figure_outside_one():
    used = [m.group(2) for p in doc_tables.doc_files() for m in doc_tables.BLOCK.finditer(p.read_text())]
    assert sorted(set(used)) == sorted(doc_tables.TABLES), "a table in doc_tables.TABLES is in no doc, or a block repeats"
    for path in doc_tables.doc_files():
        outside = doc_tables.BLOCK.sub("", path.read_text())
        rows = [line for line in outside.splitlines()
                if line.startswith("|") and "does not fit" in line and re.search(r"\d GiB", line)]
        if path.name == "README.md":  # every memory figure in the README is planned
            rows += [line for line in outside.splitlines() if line.startswith("|") and "GiB" in line]
        assert not rows, f"{path.name}: planner figures outside a planner-table block: {rows}"


def module_lines() -> list[str]:
    lines = []
    for path in sorted((ROOT / "lomo_trainer").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        first = doc.splitlines()[0].strip() if doc else ""
        assert first, f"{path.relative_to(ROOT)}: no docstring"
        lines.append(f"- `{path.relative_to(ROOT)}`: {first}")
    return lines


def test_every_module_says_its_concern_in_one_line_and_layout_lists_it():
    for line in module_lines():
        first = line.split(": ", 1)[1]
        assert len(first) <= 120 and re.search(r"[.)`]$", first), f"a first line that is not one statement: {line}"
    text = (ROOT / "docs" / "layout.md").read_text()
    listed = text.split(MODULES_START, 1)[1].split(MODULES_END, 1)[0].splitlines()
    assert listed == module_lines(), "docs/layout.md's module list is stale: run python tests/test_docs.py --write"


def test_relative_links_resolve():
    for path in USER_DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: broken link {target}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to docs/"
    first_screen = "\n".join(lines[:30])
    assert "bash scripts/default_run.sh" in first_screen and "bash scripts/test.sh" in first_screen
    for page in ["configuration", "differences", "trl", "engine", "checkpoints", "adalomo", "lora", "accumulation",
                 "memory", "benchmarks", "quality", "superglue", "layout"]:
        assert f"(docs/{page}.md)" in "\n".join(lines), f"README does not link docs/{page}.md"


HISTORY = r"this session|previous (round|session)|this round|new in this|was lent|fixed since|used to |the old \w+|" \
          r"no longer|the issue quoted|not yet run|has not been (run|executed)|at first|we (tried|found)|20\d\d-\d\d|" \
          r"\btoday\b|\bnow (models|uses|says|counts)\b"


def test_user_docs_carry_results_not_history():
    for path in USER_DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            hit = re.search(HISTORY, line, re.I)
            assert not hit, f"{path.relative_to(ROOT)}:{n}: history in a user doc ({hit.group(0)!r}): {line.strip()}"


if __name__ == "__main__" and "--write" in sys.argv:
    layout = ROOT / "docs" / "layout.md"
    head, rest = layout.read_text().split(MODULES_START, 1)
    layout.write_text(head + MODULES_START + "\n".join(module_lines()) + "\n" + MODULES_END + rest.split(MODULES_END, 1)[1])
