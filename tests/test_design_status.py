"""ops/ says what is production (issue 25 item 5): fastnpo/ops/DESIGNS.md's status table names every
`impl` and `design` the code accepts, puts each experimental one under fastnpo/ops/experimental/,
cites only numbers that its results files hold, and README.md's `impl` paragraph (Public API) names
the same designs with the same status."""

import re
from pathlib import Path

from fastnpo.ops import DESIGNS, IMPLS
from fastnpo.ops.backends import DEPRECATED_IMPLS

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "fastnpo" / "ops" / "DESIGNS.md"
STATUSES = ("production", "experimental", "reference")
ROW = re.compile(r'^\| (impl|design) \| `"(\w+)"` \| (production|experimental|reference) \| (.*) \| (.*) \|$')
# In the README paragraph each design is written `"name"` (status...; other names carry no status.
README_ENTRY = re.compile(r'`"(\w+)"` \((production|experimental|reference)\b')


def table_rows() -> list[tuple[str, str, str, str, str]]:
    rows = [m.groups() for line in TABLE.read_text().splitlines() if (m := ROW.match(line))]
    assert rows, f"no status rows in {TABLE}"
    return rows


def readme_impl_paragraph(text: str) -> str:
    """The Public API section's paragraph that holds "All are differentiable" and "`impl`:"."""
    section = text.split("\n## Public API", 1)[1].split("\n## ", 1)[0]
    paragraphs = [p for p in section.split("\n\n") if "All are differentiable" in p and "`impl`:" in p]
    assert len(paragraphs) == 1, "README.md's Public API section needs one paragraph with the impl list"
    return paragraphs[0]


def readme_statuses(text: str) -> dict[str, str]:
    paragraph = " ".join(readme_impl_paragraph(text).split())
    found = README_ENTRY.findall(paragraph)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"a design is named twice with a status: {found}"
    return dict(found)


def test_the_table_names_every_impl_and_design_the_code_accepts():
    rows = table_rows()
    impls = {name for kind, name, *_ in rows if kind == "impl"}
    designs = {name for kind, name, *_ in rows if kind == "design"}
    assert impls == set(IMPLS) - {"auto"} - set(DEPRECATED_IMPLS)
    assert designs == set(DESIGNS)
    assert len(rows) == len(impls) + len(designs)


def test_experimental_designs_live_in_their_own_package_and_production_ones_do_not():
    ops = ROOT / "fastnpo" / "ops"
    for _, name, status, code, _ in table_rows():
        module = re.match(r"`([\w/]+\.py)`", code)
        assert module, f"{name}: the code cell must start with its module, got {code!r}"
        assert (ops / module[1]).is_file(), f"{name}: {module[1]} does not exist under fastnpo/ops"
        assert module[1].startswith("experimental/") == (status == "experimental"), (name, status, module[1])


def test_every_number_in_the_table_is_in_the_results_file_it_names():
    for _, name, _, _, measured in table_rows():
        files = re.findall(r"`(?:benchmarks/results/)?([\w.]+\.md)`", measured)
        numbers = re.findall(r"(\d+\.\d+) (?:ms|MiB)", measured)
        if not numbers:
            assert "never measured" in measured, f"{name}: no number and no 'never measured': {measured!r}"
            continue
        assert files, f"{name}: numbers {numbers} without a results file"
        texts = [(ROOT / "benchmarks" / "results" / f).read_text() for f in files]
        for number in numbers:
            assert any(re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", t) for t in texts), (
                f"{name}: {number} is in none of {files}"
            )


def test_readme_impl_paragraph_names_the_same_designs_with_the_same_status():
    want = {name: status for _, name, status, _, _ in table_rows()}
    got = readme_statuses((ROOT / "README.md").read_text())
    assert got == want, f"README.md's impl paragraph says {got}, fastnpo/ops/DESIGNS.md says {want}"


def test_the_readme_check_reads_the_paragraph_it_should():
    # The parser on a paragraph of the README's shape: statuses found, unmarked names ignored.
    text = (
        "# x\n\n## Public API\n\nintro\n\n`hidden` ... All are differentiable. `impl`: `\"triton\"`\n"
        '(production: kernels), `"auto"` (triton on CUDA), `"cublas"` (deprecated name of "split"),\n'
        '`"split"` (experimental: ...). `design`: `"two_call"` (production, the default).\n\n'
        'Other paragraph `"naive"` (reference).\n\n## Next\n'
    )
    assert readme_statuses(text) == {"triton": "production", "split": "experimental", "two_call": "production"}
    assert set(STATUSES) >= set(readme_statuses(text).values())
