"""The one exception type for problems the user can fix (bad path, bad config, bad input)."""


class DiffalignError(Exception):
    """A user-caused error: the CLI prints its message on one line and exits non-zero.

    Messages say what is wrong and what to do. Anything else raised inside diffalign is a bug and
    keeps its traceback.
    """
