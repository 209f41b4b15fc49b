"""The base of every error omnitune raises for a person to act on (bad recipe, record, media, checkpoint...).

The CLI prints these as one `error: ...` line and exits 1; anything else is a bug and keeps its traceback.
"""


class OmnituneError(Exception):
    """An input or state the user can fix; the message says what, where and how."""
