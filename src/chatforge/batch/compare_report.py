"""The views of a compare grid (:mod:`~chatforge.batch.compare`): a self-contained HTML
report and a terminal table, both prompts down and (model, setting) across.

Both are made from the grid's rows, as written to its output: a row per (prompt,
model, setting, sample) with ``prompt_id``, ``prompt``, ``model``, ``setting``,
``sample``, ``text``, ``completion_tokens``, ``tok_s``, ``finish_reason`` and ``error``.
What makes differences easy to see: in each prompt's row, replies that are the same
get the same letter (and tint), a row where every cell says the same is marked
"all identical", a reply cut by its length limit (``finish_reason`` "length") is marked,
and error cells stand out. Every text from a model or a prompt file is HTML-escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.fsutil import atomic_write

# Background tints for groups of identical replies within a row (A, B, C, ...).
_TINTS = ("#e8f1ff", "#fff3d6", "#e6f7e9", "#fbe7f3", "#efe9ff", "#e3f6f8", "#f6efe2")


@dataclass
class GridView:
    """The rows arranged as the grid: prompts down, (model, setting label) across."""

    columns: list[tuple[str, str, dict[str, Any]]]  # (model, setting label, setting values)
    prompts: list[tuple[Any, str]]  # (prompt_id, prompt text), in order
    cells: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    # (prompt id as text, column index) -> the cell's rows, by sample

    def groups(self, prompt: Any) -> list[list[int | None]]:
        """Per column, per sample: the index of its group of identical replies in this
        prompt's row (first seen first); None for a failed sample."""
        seen: dict[str, int] = {}
        out: list[list[int | None]] = []
        for col in range(len(self.columns)):
            groups: list[int | None] = []
            for row in self.cells.get((str(prompt), col), []):
                text = row.get("text")
                if text is None or row.get("error") is not None:
                    groups.append(None)
                    continue
                groups.append(seen.setdefault(text, len(seen)))
            out.append(groups)
        return out

    def identical(self, prompt: Any) -> bool:
        """Every column gave the same replies to this prompt (and there are several)."""
        groups = self.groups(prompt)
        flat = [g for col in groups for g in col]
        return (
            len(groups) > 1
            and bool(flat)
            and None not in flat
            and len(set(map(tuple, groups))) == 1
        )


def grid_view(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, Any]]) -> GridView:
    """Arrange ``rows`` (in grid order) under ``columns``: ``(model, Column)`` pairs, as
    :attr:`~chatforge.batch.compare.CompareSummary.columns` lists them."""
    view = GridView([(m, c.label, c.values) for m, c in columns], [])
    index = {(m, c.label): i for i, (m, c) in enumerate(columns)}
    seen: set[str] = set()
    for row in rows:
        label = setting_label(row.get("setting") or {})
        col = index.get((row.get("model"), label))
        if col is None:
            continue
        pid = str(row.get("prompt_id"))
        if pid not in seen:
            seen.add(pid)
            view.prompts.append((row.get("prompt_id"), row.get("prompt") or ""))
        view.cells.setdefault((pid, col), []).append(row)
    for cell in view.cells.values():
        cell.sort(key=lambda r: r.get("sample") or 0)
    return view


def setting_label(values: dict[str, Any]) -> str:
    """A column's grid values as its header shows them: ``temperature=0.3 top_p=0.9``
    (``default`` for a grid without keys)."""
    if not values:
        return "default"
    return " ".join(f"{k}={_show(v)}" for k, v in values.items())


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem;color:#222}
h1{font-size:1.2rem}
table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:.4rem;vertical-align:top}
thead th{background:#f4f4f4;position:sticky;top:0}
th.model{text-align:center}
th.setting{font-weight:normal;font-family:monospace;font-size:12px}
td.prompt{max-width:22rem;white-space:pre-wrap;background:#fafafa}
td.cell{min-width:14rem;max-width:28rem}
.sample{white-space:pre-wrap;margin-bottom:.4rem}
.sample+.sample{border-top:1px dashed #ccc;padding-top:.4rem}
.meta{font-size:11px;color:#666}
.tag{display:inline-block;font:bold 11px monospace;border-radius:3px;padding:0 .3rem;
background:#fff;border:1px solid #999;margin-right:.3rem}
.sample{padding:.2rem .3rem;border-left:3px solid transparent}
.length{border-left-color:#e0a000}
.error{background:#fde2e2 !important;color:#900}
tr.same td.prompt:after{content:"all identical";display:block;font-size:11px;color:#080}
.legend{font-size:12px;color:#555;margin-bottom:.6rem}
"""


def render_html(view: GridView, title: str = "chatforge compare") -> str:
    """The grid as one self-contained HTML page (inline CSS, no scripts)."""
    e = html.escape
    models: list[tuple[str, int]] = []  # (model, columns it spans)
    for model, _, _ in view.columns:
        if models and models[-1][0] == model:
            models[-1] = (model, models[-1][1] + 1)
        else:
            models.append((model, 1))
    head = ["<tr><th rowspan=2>prompt</th>"]
    head += [f"<th class=model colspan={n}>{e(m)}</th>" for m, n in models]
    head.append("</tr><tr>")
    head += [f"<th class=setting>{e(label)}</th>" for _, label, _ in view.columns]
    head.append("</tr>")
    body: list[str] = []
    for pid, prompt in view.prompts:
        groups = view.groups(pid)
        same = " class=same" if view.identical(pid) else ""
        body.append(f"<tr{same}><td class=prompt>{e(prompt)}</td>")
        for col, col_groups in enumerate(groups):
            body.append(_html_cell(view.cells.get((str(pid), col), []), col_groups))
        body.append("</tr>")
    legend = (
        "Replies with the same letter (and tint) in a row are identical; "
        "an orange edge marks a reply cut at its length limit (finish_reason length)."
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1><p class=legend>{legend}</p>"
        f"<table><thead>{''.join(head)}</thead><tbody>{''.join(body)}</tbody></table>"
        "</body></html>\n"
    )


def _html_cell(rows: list[dict[str, Any]], groups: list[int | None]) -> str:
    e = html.escape
    parts = ["<td class=cell>"]
    for row, group in zip(rows, groups, strict=True):
        if group is None:
            parts.append(f"<div class='sample error'>{e(str(row.get('error')))}</div>")
            continue
        cut = " length" if row.get("finish_reason") == "length" else ""
        tint = _TINTS[group % len(_TINTS)]
        parts.append(
            f"<div class='sample{cut}' style='background:{tint}'>{e(row['text'])}</div>"
            f"<div class=meta><span class=tag>{_letter(group)}</span>{e(_meta(row))}</div>"
        )
    parts.append("</td>")
    return "".join(parts)


def _meta(row: dict[str, Any]) -> str:
    """``#0 seed 1 · 48 tok · 61.2 tok/s · length``."""
    bits = [f"#{row.get('sample', 0)}"]
    if row.get("seed") is not None:
        bits[0] += f" seed {row['seed']}"
    bits.append(f"{row.get('completion_tokens', 0)} tok")
    if row.get("tok_s") is not None:
        bits.append(f"{row['tok_s']:.1f} tok/s")
    bits.append(str(row.get("finish_reason")))
    return " · ".join(bits)


def write_report(
    path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, Any]]
) -> Path:
    """Write the HTML report of ``rows`` to ``path`` atomically; returns the path."""
    out = Path(path)
    atomic_write(out, render_html(grid_view(rows, columns), title=f"chatforge compare: {out.stem}"))
    return out


# -- terminal --------------------------------------------------------------------------


def table(view: GridView, width: int = 60) -> Any:
    """A rich Table of the grid: prompts down, cells across, texts cut to ``width``
    characters (the HTML report has them whole); the same letter marks identical cells."""
    from rich.table import Table
    from rich.text import Text

    t = Table(show_lines=True)
    t.add_column("prompt", overflow="fold")
    for model, label, _ in view.columns:
        t.add_column(Text(f"{model}\n{label}"), overflow="fold")
    for pid, prompt in view.prompts:
        groups = view.groups(pid)
        cells: list[Any] = [Text(_cut(prompt, width))]
        for col, col_groups in enumerate(groups):
            text = Text()
            rows = view.cells.get((str(pid), col), [])
            for i, (row, group) in enumerate(zip(rows, col_groups, strict=True)):
                if i:
                    text.append("\n")
                if group is None:
                    text.append(_cut(str(row.get("error")), width), style="red")
                    continue
                if len(view.columns) > 1:
                    text.append(f"[{_letter(group)}] ", style="bold")
                text.append(_cut(row["text"], width))
                style = "yellow" if row.get("finish_reason") == "length" else "dim"
                tok_s = f" {row['tok_s']:.0f}/s" if row.get("tok_s") is not None else ""
                meta = f"{row.get('completion_tokens', 0)} tok{tok_s} {row.get('finish_reason')}"
                text.append(f"\n{meta}", style=style)
            cells.append(text)
        t.add_row(*cells)
    return t


def _letter(group: int) -> str:
    """A, B, ... Z, then A1, B1, ...: the tag of a group of identical replies."""
    return chr(65 + group % 26) + (str(group // 26) if group >= 26 else "")


def _cut(text: str, width: int) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


__all__ = ["GridView", "grid_view", "render_html", "table", "write_report"]
