"""The comparison as a page to open (compare.html) and a table to paste (compare.tex).

compare.html is one self-contained file: compare.md's text and tables, the comparison's pictures, the pictures of
each run that exist (loss curves, validation AUC, gradient conflicts, and its test evaluation's confusion matrices
and reliability diagrams), each run's recipe (config.yaml) and the command that made it. Pictures are embedded as
data: URIs and the style is inline, so the page opens offline, sent by e-mail or attached to a paper's review, with
no script. compare.tex is the main table of each metric in LaTeX with booktabs (\\usepackage{booktabs}): a row per
dataset, each run's value with its interval, each other run's paired difference, the mean and Δm.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from mmpt.io import write_text
from mmpt.runs.members import seed_folders
from mmpt.runs.names import DATA_RECORD, EVAL
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import FLAGS

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; }
th { border-bottom: 2px solid #444; text-align: left; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""
PICTURES = ("loss_curves.png", "val_auc.png", "gradient_conflicts.png")  # a run's own, where they exist
EVALUATED = ("confusion_", "reliability_")  # the pictures of a run's test evaluation (eval/test/)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _markdown_html(text: str) -> str:
    """compare.md as HTML: the few constructs it uses (headings, tables, bullets, paragraphs, **bold**)."""
    out, lines, i = [], text.splitlines(), 0

    def inline(s: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(s))

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]

    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            header, rule, rows = cells(line), cells(lines[i + 1]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            right = ['class="r"' if r.endswith(":") else "" for r in rule]
            out.append("<table><tr>" + "".join(f"<th {a}>{inline(h)}</th>" for a, h in zip(right, header)) + "</tr>")
            out += ["<tr>" + "".join(f"<td {a}>{inline(c)}</td>" for a, c in zip(right, r)) + "</tr>" for r in rows]
            out.append("</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _members(path: Path) -> list[tuple[str, Path]]:
    """The run folders whose pictures and recipe the page shows for a compared run: the run itself, its first
    seed's, and of an individual folder each dataset's run (label, folder)."""
    path = Path(path)
    seeds = seed_folders(path)
    first, label = (seeds[0], seeds[0].name) if seeds and not Results(path).predictions.is_dir() else (path, "")
    datasets = [first / f for f in FLAGS if (first / f).is_dir()]
    if datasets and not Results(first).predictions.is_dir():
        return [(" ".join(filter(None, (label, d.name))), d) for d in datasets]
    return [(label, first)]


def _recipe(folder: Path) -> Path | None:
    """The config.yaml of the run `folder` belongs to: its own, or that of the run whose evaluation it is (up to
    RUN/eval/<split>/calibrated), or of the checkpoint its predictions record."""
    run = RunDir.enclosing(folder, levels=4)
    if run is not None:
        return run.config
    # an evaluation written elsewhere (--output): the run of the checkpoint its predictions record
    try:
        record = json.loads((Results(folder).predictions / DATA_RECORD).read_text())
        run = RunDir.of_checkpoint(record["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run.config if run is not None and run.config.is_file() else None


def _run_section(run: dict) -> str:
    """A compared run's pictures and recipe, from the folders of its first member."""
    parts = [f"<h3>{html.escape(run['name'])}</h3>"]
    for label, folder in _members(Path(run["path"])):
        where = f" ({label})" if label else ""
        figures = [_image(folder / name, f"{name}{where}") for name in PICTURES if (folder / name).is_file()]
        # an evaluation's pictures: in the folder itself (an evaluate.py output), or in a run's eval/test
        for evaluated in (folder, folder / EVAL / "test"):
            figures += [
                _image(p, f"{p.name}{where}") for kind in EVALUATED for p in sorted(evaluated.glob(f"{kind}*.png"))
            ]
        if figures:
            parts.append("".join(figures))
        config = _recipe(folder)
        if config is not None:
            parts.append(
                f"<details><summary>recipe{where}: {html.escape(str(config))}</summary>"
                f"<pre>{html.escape(config.read_text())}</pre></details>"
            )
    return "\n".join(parts)


def compare_html(result: dict, markdown: str, written: Results, command: str) -> str:
    """The page (see the module docstring): `markdown` (compare.md), the comparison's pictures, each run's."""
    pictures = [p for p in (written.compare_forest_plot, written.compare_diff_plot) if p.is_file()]
    pictures += sorted(p for p in written.path.glob("compare_*.png") if p not in pictures)
    body = [
        _markdown_html(markdown),
        "<h2>Pictures of the comparison</h2>",
        "".join(_image(p, p.name) for p in pictures),
        "<h2>The runs</h2>",
        *(_run_section(r) for r in result["runs"]),
        "<h2>The command</h2>",
        f"<pre>{html.escape(command)}</pre>",
    ]
    title = html.escape(f"Comparison against {result['reference']}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    """`text` with LaTeX's special characters escaped, Δ and ± as math."""
    escaped = "".join(LATEX_SPECIAL.get(c, c) for c in text)
    return escaped.replace("Δ", r"$\Delta$").replace("±", r"$\pm$").replace("**", "")


def compare_tex(result: dict, tables: dict[str, tuple[list[str], list[list[str]]]]) -> str:
    """One booktabs table per metric (`tables`: metric -> compare.md's table of it, its mean row last; see the
    module docstring), intervals in brackets."""
    b = result["bootstrap"]
    level = int(b["confidence_level"] * 100)
    out = [
        f"% evaluate.py compare: against {result['reference']}; {level}% paired bootstrap intervals over the test "
        f"images ({b['n_resamples']} resamples, seed {b['seed']}). Needs \\usepackage{{booktabs}}.",
    ]
    for m, (header, rows) in tables.items():
        delta_m = [f"$\\Delta m$ (\\%, {_tex(','.join(result['metrics']))})", *([""] * len(result["runs"]))]
        for r in result["runs"][1:]:
            low, high = r.get("delta_m_ci_low"), r.get("delta_m_ci_high")
            interval = "" if low is None or low != low else f" [{low:+.2f}, {high:+.2f}]"
            delta_m.append(f"{r['delta_m']:+.2f}{interval}")
        columns = "l" + "r" * (len(header) - 1)
        out += [
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{Test {_tex(m)} per dataset with {level}\\% intervals; $\\Delta$: paired difference to "
            f"{_tex(result['reference'])}.}}",
            f"\\begin{{tabular}}{{{columns}}}",
            "\\toprule",
            " & ".join(_tex(h) for h in header) + " \\\\",
            "\\midrule",
            *(" & ".join(_tex(c) for c in row) + " \\\\" for row in rows[:-1]),
            "\\midrule",
            " & ".join(_tex(c) for c in rows[-1]) + " \\\\",
            " & ".join(delta_m) + " \\\\",
            "\\bottomrule",
            "\\end{tabular}",
            "\\end{table}",
            "",
        ]
    return "\n".join(out)


def write_pages(result: dict, markdown: str, tables: dict, written: Results, command: str) -> list[Path]:
    """compare.html and compare.tex into the `written` folder (after the pictures, which the page embeds)."""
    html_path, tex_path = written.compare_pages
    write_text(html_path, compare_html(result, markdown, written, command))
    write_text(tex_path, compare_tex(result, tables))
    return [html_path, tex_path]
