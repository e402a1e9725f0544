"""Renderers of results: the terminal, and the report files of a comparison. Producers never import them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.compare import Comparison


def write_report(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    from tunelab.report.html import render_html, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(comparison.to_json(), indent=2))
    paths["md"].write_text(render_markdown(comparison))
    paths["html"].write_text(render_html(comparison))
    return paths
