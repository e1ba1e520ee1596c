"""The one exception type cpmkit raises for problems a user can fix."""


class CpmkitError(Exception):
    """A user-facing error: the message names the file, tensor or key, says what is wrong and,
    where there is one, what to do. The CLI prints it as one line and exits non-zero."""
