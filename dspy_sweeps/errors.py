"""The one exception type for bad input: the CLI prints it as one line and exits 2."""


class SweepError(Exception):
    """Bad input found before any LM call: a sweep file, data, endpoint or key problem.

    The message is complete on its own and names the file, field or row at fault.
    """
