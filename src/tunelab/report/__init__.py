"""Renderers of results: the terminal, and the report files of a comparison. Producers never import them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.compare import Comparison


def write_report(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    """The comparison as report.json, report.md and report.html in `out_dir`, each written whole or not at all (a
    report there before is replaced only by a complete one)."""
    from tunelab.errors import TunelabError
    from tunelab.report.html import render_html, render_markdown
    from tunelab.runs import write_atomic

    if out_dir.exists() and not out_dir.is_dir():
        raise TunelabError(f"--out: {out_dir} is a file; give a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    texts = {"json": json.dumps(comparison.to_json(), indent=2), "md": render_markdown(comparison)}
    texts["html"] = render_html(comparison)
    for kind, path in paths.items():
        write_atomic(path, texts[kind])
    return paths
