"""The comparison as Markdown and as one self-contained HTML page (inline CSS and chart, no fetches).

Every prompt and every generated output is escaped: model text is never markup.
"""

from __future__ import annotations

import base64
import io
import re
from html import escape

from tunelab.compare import LM_EVAL_PREFIX, Comparison

COLUMNS = [
    ("eval_loss", "eval loss"),
    ("perplexity", "ppl"),
    ("trainable_params", "trainable"),
    ("trainable_percent", "%"),
    ("scope", "scope"),
    ("train_seconds", "train s"),
    ("tokens_per_s", "tok/s"),
    ("peak_memory_bytes", "peak mem"),
    ("final_train_loss", "final train loss"),
    ("preference_accuracy", "pref acc"),
    ("eval_reward", "eval reward"),
    ("reward", "reward"),
    ("expectation_pass_rate", "expectations"),
    ("reference_f1", "ref F1"),
    ("exact_match", "exact"),
]

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}td.best{font-weight:bold;background:#eef7ee}
.out{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:90%}
.same{color:#888}.diff{background:#fffbe6}.pass{color:#176f2c}.fail{color:#b00020}.score{color:#555}
h2{margin-top:2em}.prompt{background:#f6f8fa;padding:6px;border-left:3px solid #999}
"""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def columns(c: Comparison) -> list[tuple[str, str]]:
    """The fixed columns, with one a further held-out set's loss after the eval loss ('eval general loss'), then one a
    stored lm-eval score (`tunelab eval`), titled 'task/metric'."""
    sets = sorted({k for v in c.variants for k in v.numbers if ALSO.fullmatch(k)} - {"eval_loss"})
    scores = sorted({k for v in c.variants for k in v.numbers if k.startswith(LM_EVAL_PREFIX)})
    also = [(k, k.replace("_", " ", 1).removesuffix("_loss") + " loss") for k in sets]
    # GRPO's columns and the reference scores only where a variant has the number
    fixed = [
        (k, t) for k, t in COLUMNS if k not in WHERE_MEASURED or any(v.numbers.get(k) is not None for v in c.variants)
    ]
    return fixed[:1] + also + fixed[1:] + [(k, k.removeprefix(LM_EVAL_PREFIX)) for k in scores]


WHERE_MEASURED = ("eval_reward", "reward", "reference_f1", "exact_match")


ALSO = re.compile(r"eval_[a-z0-9_]+_loss")


def summary_rows(c: Comparison) -> list[list[str]]:
    return [[v.name, *(_fmt(v.numbers.get(key)) for key, _ in columns(c))] for v in c.variants]


def seed_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The runs that repeat one experiment with other seeds (Comparison.over_seeds), as a table: its column titles,
    and a row a group: its label, how many runs, and each measured quality's mean ± standard deviation."""
    over = c.over_seeds()
    titles = {key: title for key, title in columns(c)}
    keys = [key for key in titles if any(key in group["numbers"] for group in over.values())]
    rows = [
        [label, str(len(group["runs"]))]
        + [
            f"{group['numbers'][key]['mean']:.4g} ± {group['numbers'][key]['sd']:.2g}"
            if key in group["numbers"]
            else "-"
            for key in keys
        ]
        for label, group in over.items()
    ]
    return ["variant", "runs", *(titles[key] for key in keys)], rows


NOT_TOLD_APART = "≈"  # marks a difference whose 95% interval holds 0


def holds_zero(difference: dict[str, float]) -> bool:
    """Whether a difference's interval (Comparison.differences) holds 0: the rows cannot tell it from none."""
    return difference["low"] <= 0 <= difference["high"]


def difference_rows(c: Comparison, shown: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """How far each variant is from the best of each quality measured row by row, or from the variant compare was
    told to set them against (Comparison.differences), as a table: its column titles (each quality's, with how many
    rows), and a row a variant: 'best' (or 'reference'), or its difference and 95% interval, marked NOT_TOLD_APART
    where the interval holds 0. `shown`: only those qualities (the terminal's columns)."""
    differences = c.differences()
    titles = dict(columns(c))
    keys = [key for key in titles if key in differences and (shown is None or key in shown)]

    def cell(key: str, name: str) -> str:
        d = differences[key]
        if name == d["reference"]:
            return "reference" if c.settings.get("against") else "best"
        if name not in d["against"]:
            return "-"
        x = d["against"][name]
        mark = f"{NOT_TOLD_APART} " if holds_zero(x) else ""
        return f"{mark}{x['difference']:+.3g} ({x['low']:+.3g} to {x['high']:+.3g})"

    names = [
        v.name
        for v in c.variants
        if any(v.name == differences[k]["reference"] or v.name in differences[k]["against"] for k in keys)
    ]
    rows = [[name, *(cell(key, name) for key in keys)] for name in names]
    counted = [f"{titles[key]} ({differences[key]['rows']} {measured_on(key)})" for key in keys]
    return ["variant", *counted], rows


def measured_on(key: str) -> str:
    """What a quality's rows are: held-out rows, pairs, prompts, or an lm-eval task's documents."""
    return "documents" if key.startswith(LM_EVAL_PREFIX) else MEASURED_ON.get(key, "rows")


MEASURED_ON = {
    "preference_accuracy": "pairs",
    "reward": "prompts",
    "expectation_pass_rate": "prompts",
    "reference_f1": "prompts",
    "exact_match": "prompts",
}


def not_told_apart_from_best(c: Comparison) -> dict[str, list[str]]:
    """Per quality, the variants whose difference from the best one the rows cannot tell apart from 0 (none where
    the variants are set against a named one)."""
    if c.settings.get("against"):
        return {}
    out = {}
    for key, d in c.differences().items():
        against = {name: x for name, x in d["against"].items() if name not in d["best"]}
        out[key] = [v.name for v in c.variants if v.name in against and holds_zero(against[v.name])]
    return out


def differences_title(c: Comparison) -> str:
    """The differences table's title: whom every variant is set against."""
    return f"Against {c.settings.get('against') or 'the best'}: difference (95% interval)"


def differences_note(c: Comparison) -> str:
    reference = c.settings.get("against") or "the best"
    return (
        "Each interval is a paired bootstrap over the rows every variant is measured on; "
        f"{NOT_TOLD_APART}: it holds 0, so these rows cannot tell that variant apart from {reference}. "
        "It does not measure the spread between seeds."
    )


def reference_note(c: Comparison, name: str, prompt: int) -> str:
    """A variant's reply to one prompt scored against the prompt's reference ('ref F1 0.67'); '' without one."""
    rows = c.per_row.get(name, {}).get("reference_f1")
    if not rows or not rows[prompt][1]:
        return ""
    return f"ref F1 {rows[prompt][0]:.2f}"


def best_cells(c: Comparison) -> set[tuple[int, int]]:
    """(row, column) of summary_rows' cells that hold a best value (Comparison.best), column 0 being the name."""
    best, keys = c.best(), [key for key, _ in columns(c)]
    return {
        (row, keys.index(key) + 1)
        for key, names in best.items()
        if key in keys
        for row, v in enumerate(c.variants)
        if v.name in names
    }


def loss_chart_png(c: Comparison) -> bytes | None:
    curves = [v for v in c.variants if v.curves.get("train")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for i, v in enumerate(curves):
        color = f"C{i % 10}"
        steps, losses = zip(*v.curves["train"], strict=True)
        ax.plot(steps, losses, color=color, label=f"{v.name} train")
        if v.curves.get("eval"):
            steps, losses = zip(*v.curves["eval"], strict=True)
            ax.plot(steps, losses, color=color, linestyle="--", marker="o", label=f"{v.name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html_table(table: str, title: str, titles: list[str], rows: list[list[str]]) -> str:
    """A titled table of text cells, the first column a name and the others numbers."""
    head = "".join(f"<th>{escape(t)}</th>" for t in titles)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i else ''}>{escape(x)}</td>" for i, x in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<h2>{escape(title)}</h2><table id='{table}'><tr>{head}</tr>{body}</table>"


def render_html(c: Comparison) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for _, title in columns(c))
    best = best_cells(c)

    def cell(r: int, i: int, text: str) -> str:
        if not i:
            return f"<td>{escape(text)}</td>"
        return f"<td class='{'num best' if (r, i) in best else 'num'}'>{escape(text)}</td>"

    rows = "".join(
        "<tr>" + "".join(cell(r, i, text) for i, text in enumerate(row)) + "</tr>"
        for r, row in enumerate(summary_rows(c))
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelab comparison</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Comparison on {escape(c.base_model)}</h1>",
        f"<p>{escape(', '.join(f'{k}: {v}' for k, v in c.settings.items()))}</p>",
        f"<table id='summary'><tr><th>variant</th>{head}</tr>{rows}</table>",
    ]
    if (note := c.trained_on_note()) is not None:
        parts.append(f"<p id='trained-on'><strong>{escape(note)}</strong></p>")
    for table, title, (titles, body), note in (
        ("differences", differences_title(c), difference_rows(c), differences_note(c)),
        ("over-seeds", "Over seeds", seed_rows(c), None),
    ):
        if body:
            parts.append(_html_table(table, title, titles, body) + (f"<p>{escape(note)}</p>" if note else ""))
    png = loss_chart_png(c)
    if png:
        data = base64.b64encode(png).decode()
        parts.append(
            f"<h2>Loss curves</h2><img id='loss-chart' alt='training and eval loss' src='data:image/png;base64,{data}'>"
        )
    names = [v.name for v in c.variants]
    base = c.outputs.get("base")
    for p in c.prompts:
        parts.append(f"<h2>Prompt {p.id + 1}</h2><div class='prompt out'>{escape(p.text)}</div>")
        if p.reference:
            parts.append(f"<p>reference: <span class='out'>{escape(p.reference)}</span></p>")
        parts.append("<table class='outputs'><tr><th>variant</th><th>output</th><th>checks</th></tr>")
        for name in names:
            output = c.outputs[name][p.id]
            css = "same" if base is not None and name != "base" and output == base[p.id] else "diff"
            marks = " ".join(
                f"<span class='{'pass' if k.passed else 'fail'}'>{'✓' if k.passed else '✗'} "
                f"{escape(k.kind)} {escape(k.expected)}</span>"
                for k in c.checks[name][p.id]
            )
            if scored := reference_note(c, name, p.id):
                marks = f"{marks} <span class='score'>{escape(scored)}</span>".strip()
            note = " <em>(same as base)</em>" if css == "same" else ""
            parts.append(
                f"<tr><td>{escape(name)}{note}</td><td class='out {css}'>{escape(output)}</td><td>{marks}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


MD_SPECIAL = re.compile(r"([\\`*_\[\](){}#!|~>])")


def _md_cell(text: str) -> str:
    """Model output as inert Markdown text: HTML escaped (renderers pass raw HTML through), Markdown syntax
    (links, emphasis, code) backslash-escaped, one line."""
    return MD_SPECIAL.sub(r"\\\1", escape(str(text), quote=False)).replace("\n", " ").replace("\r", " ")


def render_markdown(c: Comparison) -> str:
    lines = [
        f"# Comparison on {_md_cell(c.base_model)}",
        "",
        "| variant | " + " | ".join(_md_cell(t) for _, t in columns(c)) + " |",
        "|---" * (len(columns(c)) + 1) + "|",
    ]
    best = best_cells(c)
    lines += [
        "| " + " | ".join(f"**{_md_cell(x)}**" if (r, i) in best else _md_cell(x) for i, x in enumerate(row)) + " |"
        for r, row in enumerate(summary_rows(c))
    ]
    if (note := c.trained_on_note()) is not None:
        lines += ["", f"**{_md_cell(note)}**"]
    for title, (titles, body), note in (
        (differences_title(c), difference_rows(c), differences_note(c)),
        ("Over seeds", seed_rows(c), None),
    ):
        if body:
            lines += ["", f"## {_md_cell(title)}", "", "| " + " | ".join(_md_cell(t) for t in titles) + " |"]
            lines += ["|---" * len(titles) + "|", *("| " + " | ".join(_md_cell(x) for x in row) + " |" for row in body)]
            lines += ["", _md_cell(note)] if note else []
    for p in c.prompts:
        lines += ["", f"## Prompt {p.id + 1}: {_md_cell(p.text)}", ""]
        lines += [f"reference: {_md_cell(p.reference)}", ""] if p.reference else []
        lines += ["| variant | output | checks |", "|---|---|---|"]
        for v in c.variants:
            marks = " ".join(("✓" if k.passed else "✗") + f" {k.kind} {k.expected}" for k in c.checks[v.name][p.id])
            marks = " ".join(part for part in (marks, reference_note(c, v.name, p.id)) if part)
            lines.append(f"| {_md_cell(v.name)} | {_md_cell(c.outputs[v.name][p.id])} | {_md_cell(marks)} |")
    return "\n".join(lines) + "\n"
