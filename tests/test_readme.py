"""The README's figures are the results files' figures: a re-run that changes one fails here until the README follows.

Every paragraph of the README that links a results file (``[...](benchmarks/results/NAME.md)``), and a table right
after such a paragraph, may quote only figures found in that file as its script rendered it (not in the raw rounds of
its JSON, where almost any figure would turn up): each number with a decimal point or a unit (x, ms, s, MB, GB, %)
must be some figure of the file rounded to the digits the README shows (a GB figure may be the file's MB over 1000
or 1024). Figures that are not measurements (gate thresholds, tolerances) go in paragraphs
without such a link; a figure derived from others (a ratio of two medians) is not quoted.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LINK = re.compile(r"\]\(benchmarks/results/([\w.-]+)\.md\)")
# a figure: 1,246 / 8.55 / 7.2e-8; not part of a word, a version (2.13.0), a date or a path
FIGURE = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(e-?\d+)?(?![\w.]*\d)")
UNIT = re.compile(r"\s?(x|ms|s|MB|GB|%)\b")


def blocks(text: str) -> list[str]:
    """Paragraphs, list items and tables (split at blank lines and at the start of a list item)."""
    return [block for block in re.split(r"\n\s*\n|\n(?=- )", text) if block.strip()]


def figures(block: str) -> list[str]:
    """The figures a block quotes, as written (commas dropped)."""
    out = []
    for match in FIGURE.finditer(block):
        whole, fraction, exponent = match.group(1), match.group(2) or "", match.group(3) or ""
        if fraction or exponent or UNIT.match(block, match.end()):
            out.append(whole.replace(",", "") + fraction + exponent)
    return out


def found(figure: str, values: list[float], *, gigabytes: bool) -> bool:
    """Whether ``figure`` is one of ``values`` rounded as the README writes it."""
    if "e" in figure:
        digits = len(figure.split("e")[0].partition(".")[2])
        return any(f"{v:.{digits}e}" == f"{float(figure):.{digits}e}" for v in values)
    digits = len(figure.partition(".")[2])
    scales = (1, 1000, 1024) if gigabytes else (1,)
    return any(abs(round(v / scale, digits) - float(figure)) < 1e-9 for v in values for scale in scales)


def unsupported(readme: str) -> list[str]:
    """'NAME: figure in "block..."' for each figure of a linked block not found in its results."""
    problems, linked = [], set()
    for block in blocks(readme):
        links = set(LINK.findall(block))
        is_table = all(line.strip().startswith("|") for line in block.strip().splitlines())
        if is_table and not links:
            links = linked  # a table belongs to the paragraph before it
        linked = links
        if not links:
            continue
        text = "".join((RESULTS / f"{name}.md").read_text(encoding="utf-8") for name in sorted(links)
                       if (RESULTS / f"{name}.md").is_file())
        values = [float(v) for v in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text.replace(",", ""))]
        for figure in figures(block):
            gigabytes = re.search(re.escape(figure) + r"\s?GB", block.replace(",", "")) is not None
            if not found(figure, values, gigabytes=gigabytes):
                problems.append(f"{', '.join(sorted(links))}: {figure} in {block.strip()[:80]!r}...")
    return problems


def test_every_linked_results_file_exists():
    missing = sorted({name for name in LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
                      if not (RESULTS / f"{name}.md").is_file()})
    assert missing == []


def test_readme_figures_are_the_results_figures():
    problems = unsupported((ROOT / "README.md").read_text(encoding="utf-8"))
    assert problems == [], "\n".join(problems)


def test_the_check_fails_on_a_figure_the_results_do_not_hold():
    """The check itself: a stale figure (or one rounded from no result) fails, a rounded one passes."""
    name = next(path.stem for path in sorted(RESULTS.glob("*.md")))
    text = (RESULTS / f"{name}.md").read_text(encoding="utf-8")
    values = sorted({float(v) for v in re.findall(r"\d+\.\d+", text)})
    assert values, name
    some = values[len(values) // 2]
    absent = next(x / 100 for x in range(1, 100000) if not any(round(v, 2) == x / 100 for v in values))
    assert unsupported(f"Figures ([{name}](benchmarks/results/{name}.md)): {some:.2f} ms.") == []
    stale = unsupported(f"Figures ([{name}](benchmarks/results/{name}.md)): {absent:.2f} ms.")
    assert len(stale) == 1 and f"{absent:.2f}" in stale[0]


def test_the_contributing_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("- Layout: one job per module"):readme.index("- Tests build tiny seeded models")]
    named = set(re.findall(r"`([\w/]+\.py)`", layout))
    modules = {path.name for folder in ("bge_onnx", "bge_onnx/serve", "export")
               for path in (ROOT / folder).glob("*.py") if path.name not in ("__init__.py", "__main__.py")}
    assert sorted(modules - named) == [] and sorted(named - modules) == []
