"""Command-line argument helpers shared by the alice3d-* commands.

argparse takes a value that starts with '-' for an option unless it is one plain negative
number ('-5', '-97.8'): ``--point -97.8,-129.1,136.5`` or ``--window -1000,400`` stop with
"expected one argument". World coordinates in RAS are negative for every patient-right and
posterior point and HU windows start below zero, so every option that takes numbers has to
accept a leading minus. `attach_negative_values` rewrites such pairs into the ``--opt=value``
form, which argparse never mistakes for an option.
"""

from __future__ import annotations

import re
from typing import Collection, Sequence

# '-' followed by a digit or a decimal point: a (list of) negative number(s) such as
# '-1000,400', '-.5' or '-97.8;-129.1;136.5', never an option name ('--size', '-v').
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def attach_negative_values(argv: Sequence[str], options: Collection[str]) -> list[str]:
    """``argv`` with ``OPT -1,2`` rewritten to ``OPT=-1,2`` for every OPT in ``options``.

    Only a value that starts with a minus and a digit (or '.') is attached, so a missing value
    (``--window --size 64``) still gets argparse's own error; tokens after ``--`` and values
    already attached (``--window=-1,2``) are left as they are."""
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a in options and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out
