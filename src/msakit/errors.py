"""The one exception type for bad user input: the CLI prints its message on one line and exits with 2."""


class MsakitError(Exception):
    """A problem with what the user gave (a file, a key, a value): never a bug in msakit itself."""
