"""The one exception type users see: a message that names the problem and the fix."""


class AttnlabError(ValueError):
    """Bad input or a missing dependency. The message says what to do; the CLI prints it as one
    line and exits non-zero."""
