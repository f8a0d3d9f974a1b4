"""CSV cells that spreadsheet programs will not run as formulas (CSV / formula injection).

A photo named ``=cmd|' -C calc'!A0.png`` or ``@SUM(1+1)*cmd.png`` is a formula when a CSV cell
starts with it. OWASP's defence, on by default in every CSV headstart writes (predictions,
per-class metrics): a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return gets a leading ``'``, which spreadsheets show as text and do not display. ``--raw-csv``
turns it off; numbers written by headstart and JSON Lines output are never changed.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str, raw: bool = False) -> str:
    """``text``, with a leading ``'`` if a spreadsheet would read it as a formula (unless ``raw``)."""
    return "'" + text if not raw and text.startswith(FORMULA_STARTS) else text
