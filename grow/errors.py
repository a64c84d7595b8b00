"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input: a config field, a flag, a path.

    The message must name the field or flag and say what was expected; the CLI prints it
    as ``grow: error: <message>`` without a traceback.
    """
