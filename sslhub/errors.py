"""The base class of sslhub's own errors.

Every error that sslhub raises on purpose for bad input — a recipe key, a data file, a model folder, a
checkpoint, an index, a Hub repo — derives from :class:`SslhubError` and carries a message that says
what is wrong and what to do. The CLI prints those as one line (``sslhub: error: …``, exit 2); any
other exception is a bug and surfaces with its traceback.
"""


class SslhubError(Exception):
    """Bad input or an impossible request, explained in the message (never a bug in sslhub)."""


class InputError(SslhubError, ValueError):
    """A value, argument or file content that cannot work (a ``ValueError`` too, for callers that catch those)."""


class UnsupportedError(SslhubError, TypeError):
    """The model or data cannot do what was asked (e.g. text on an image-only model); a ``TypeError`` too."""
