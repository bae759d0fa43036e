"""The usage report's options and its two text forms, shared by the command line and the admin route."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime, time
from typing import Any

from gateway.storage.database import REPORT_DIMENSIONS

TOTALS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
DEFAULT_BY = "user,model,day"


def parse_dimensions(text: str) -> list[str]:
    """``user,model,day`` as a list; raises ``ValueError`` naming an unknown dimension."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REPORT_DIMENSIONS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(REPORT_DIMENSIONS)}")
    return list(dict.fromkeys(names))


def parse_day(text: str) -> datetime:
    """The start of a day (``2025-01-31``) or an exact UTC time (``2025-01-31T12:00``)."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time())
        return datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM)") from None


def as_csv(rows: list[dict[str, Any]], by: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*by, *TOTALS])
    for row in rows:
        writer.writerow([*(row[name] for name in by), *(row[name] for name in TOTALS)])
    return out.getvalue()


def as_table(rows: list[dict[str, Any]], by: list[str]) -> str:
    header = [*by, *TOTALS]
    lines = [[str(row[name]) if row[name] is not None else "-" for name in header] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=False)]
    numeric = [False] * len(by) + [True] * len(TOTALS)

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    table = [render(header), render(["-" * width for width in widths])]
    table += [render(line) for line in lines]
    if not rows:
        table.append("(no usage recorded)")
    return "\n".join(table) + "\n"
