"""Plain-text tables (the per-stage report, the benchmarks' output)."""
from __future__ import annotations

from numbers import Integral, Real
from typing import Any, Iterable, Sequence


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str],
                 floatfmt: str = ".3f") -> str:
    """Render ``rows`` as an aligned plain-text table with the given ``columns``."""
    def cell(value: Any) -> str:
        # Any real that is not an integer: NumPy's float32 and float16 scalars are no Python floats.
        return format(value, floatfmt) if isinstance(value, Real) and not isinstance(value, Integral) else str(value)

    body = [[cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in body]) for i, col in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in body])
