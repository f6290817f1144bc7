"""The one exception type for bad input (the CLI prints it as one line and exits 2), the one-line
form of another library's error that goes into such a message, and `BudgetSpent`, which the
gateway's engine raises and the trial recognises without knowing the gateway."""

import re


class SweepError(Exception):
    """Bad input found before any LM call: a sweep file, data, endpoint or key problem.

    The message is complete on its own and names the file, field or row at fault.
    """


class BudgetSpent(Exception):
    """The sweep's budget is spent: not retried, and the trial is marked as cut short."""


def first_line(exc: BaseException) -> str:
    """An error's first line, at most 300 characters, with any user:password@ in a URL blanked out."""
    return re.sub(r"//[^/@\s]+@", "//***@", (str(exc).strip().splitlines() or [""])[0])[:300]
