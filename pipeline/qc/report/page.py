"""The report's ``index.html``: one row per field, the run's facts, links to the figures."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX_FILE = "index.html"


def safe_name(field_path: str) -> str:
    """File-name stem of a field: ``"A/1/0"`` gives ``"A1_0"``, a lone image (``""``) ``"image"``.

    Parameters
    ----------
    field_path
        Path of the field inside the output (``row/column/field``), or ``""``.

    Returns
    -------
    str
        Letters, digits, ``_`` and ``-`` only.
    """
    parts = [part for part in field_path.strip("/").split("/") if part]
    if not parts:
        return "image"
    stem = "".join(parts[:-1]) + "_" + parts[-1] if len(parts) > 1 else parts[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


@dataclass
class FieldEntry:
    """One row of the report's table of fields."""

    path: str
    status: str
    error: str | None = None
    note: str | None = None
    cells: str = "–"
    tracks: str = "–"
    daughters: str = "–"
    merge_qc: str = "–"
    images: list[tuple[str, str]] = field(default_factory=list)

    @property
    def well_name(self) -> str:
        parts = self.path.split("/")
        return "/".join(parts[:2]) if len(parts) == 3 else "–"

    @property
    def field_name(self) -> str:
        parts = self.path.split("/")
        return parts[2] if len(parts) == 3 else (self.path or "image")


def merge_qc_text(attrs: dict[str, Any]) -> str:
    qc = attrs.get("merge_qc")
    if not isinstance(qc, dict) or "fraction" not in qc:
        return "–"
    return f"{qc['fraction']:.1%} ({qc.get('large_increase', '?')}/{qc.get('links', '?')} links)"


def unique_name(path: str, taken: set[str]) -> str:
    name, number = safe_name(path), 1
    while name in taken:
        number += 1
        name = f"{safe_name(path)}-{number}"
    taken.add(name)
    return name


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; white-space: nowrap; }
.failed { color: #b00020; }
.note { color: #8a6d00; }
img.field { max-width: 640px; height: auto; display: block; margin-bottom: 4px; }
img.heatmap { max-width: 100%; height: auto; }
code { white-space: pre-wrap; }
"""


def _row_html(entry: FieldEntry) -> str:
    ok = entry.status == "complete" and entry.error is None
    status = html.escape(entry.status)
    if entry.error:
        status += f"<br><code>{html.escape(entry.error)}</code>"
    if entry.note:
        status += f'<br><span class="note">{html.escape(entry.note)}</span>'
    images = "".join(
        f'<a href="{html.escape(file)}"><img class="field" src="{html.escape(file)}" '
        f'alt="{html.escape(alt)}"></a>'
        for file, alt in entry.images
    )
    cells = [
        f"<td>{html.escape(entry.well_name)}</td>",
        f"<td>{html.escape(entry.field_name)}</td>",
        f'<td class="num">{html.escape(entry.cells)}</td>',
        f'<td class="num">{html.escape(entry.tracks)}</td>',
        f'<td class="num">{html.escape(entry.daughters)}</td>',
        f'<td class="num">{html.escape(entry.merge_qc)}</td>',
        f'<td class="{"ok" if ok else "failed"}">{status}</td>',
        f"<td>{images}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def index_html(
    output: str,
    run: dict[str, Any],
    entries: list[FieldEntry],
    plate_figures: list[tuple[str, str]],
) -> str:
    """The report page: the run's facts, the plate's figures (``(title, file)``), the fields."""
    failed = sum(entry.status != "complete" or entry.error is not None for entry in entries)
    facts = [
        ("output", output),
        ("run status", str(run.get("status", "unknown"))),
        ("fields", f"{len(entries)} ({failed} failed)"),
    ]
    if "wall_seconds" in run:
        facts.append(("wall time", f"{run['wall_seconds']} s"))
    if "version" in run:
        facts.append(("pipeline version", str(run["version"])))
    summary = "".join(
        f"<li><b>{html.escape(key)}</b>: {html.escape(value)}</li>" for key, value in facts
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>QC report: {html.escape(Path(output).name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>QC report: {html.escape(Path(output).name)}</h1>",
        f"<ul>{summary}</ul>",
    ]
    for title, figure in plate_figures:
        parts.append(
            f'<h2>{html.escape(title)}</h2><a href="{html.escape(figure)}">'
            f'<img class="heatmap" src="{html.escape(figure)}" alt="{html.escape(title)}"></a>'
        )
    header = "".join(
        f"<th>{name}</th>"
        for name in (
            "well",
            "field",
            "cells (first → last t)",
            "tracks",
            "daughters",
            "merge QC",
            "status",
            "images",
        )
    )
    parts += [
        "<h2>Fields</h2>",
        f"<table><thead><tr>{header}</tr></thead><tbody>",
        *(_row_html(entry) for entry in entries),
        "</tbody></table>",
        "<p>Outlines: label boundaries (red) over the contrast-stretched image, z as a maximum "
        "projection. Tracks: centroid paths coloured by frame over the last frame; dotted "
        "orange lines link a dividing track's last point (star) to its daughters. Merge QC: "
        "share of frame-to-frame links whose size grows by 30% or more.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
