"""The report as a list of blocks, written once as Markdown and once as an HTML page.

A block is ``(kind, value)``: ``h1``–``h3`` and ``p`` hold text (``p`` may hold `code`),
``img`` holds ``(relative path, alt text)`` and ``table`` holds ``(header, rows of cells)``.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from string import Template
from typing import Any

from dfq.errors import DFQError

Block = tuple[str, Any]

_PAGE = Template(
    "<!DOCTYPE html>\n"
    '<html lang="en"><head><meta charset="utf-8">\n'
    "<title>$title</title><style>$css</style></head><body>\n"
    "$body\n"
    "</body></html>\n"
)
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:0.92em}th,td{border:1px solid #ccc;padding:0.3em 0.6em;"
    "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
    "code{background:#f3f3f3;padding:0 0.2em}"
)


def markdown(blocks: list[Block]) -> str:
    return "\n\n".join(_md_block(kind, value) for kind, value in blocks) + "\n"


def _md_block(kind: str, value: Any) -> str:
    if kind in ("h1", "h2", "h3"):
        return f"{'#' * int(kind[1])} {value}"
    if kind == "img":
        alt = str(value[1]).replace("[", "(").replace("]", ")")
        return f"![{alt}]({value[0]})"
    if kind == "table":
        header, rows = value
        lines = [_md_row(header), "|" + "|".join("---" for _ in header) + "|", *map(_md_row, rows)]
        return "\n".join(lines)
    return value  # "p"


def _md_row(cells: Any) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def html(blocks: list[Block], title: str) -> str:
    body = "\n".join(_html_block(kind, value) for kind, value in blocks)
    return _PAGE.substitute(title=escape(title), css=_CSS, body=body)


def _html_block(kind: str, value: Any) -> str:
    if kind in ("h1", "h2", "h3"):
        return f"<{kind}>{escape(value)}</{kind}>"
    if kind == "img":
        return f'<img src="{escape(value[0])}" alt="{escape(value[1])}">'
    if kind == "table":
        header, rows = value
        head = "<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"
        body = ["<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows]
        return "\n".join([head, *body, "</tbody></table>"])
    return "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(value)) + "</p>"  # "p"


def write_text(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DFQError(f"cannot write {path}: {e.strerror or e}") from e
    return path
