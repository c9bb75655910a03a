"""The base class of sslhub's own errors.

Every error that sslhub raises on purpose for bad input — a recipe key, a data file, a model folder, a
checkpoint, an index, a Hub repo — derives from :class:`SslhubError` and carries a message that says
what is wrong and what to do. The CLI prints those as one line (``sslhub: error: …``, exit 2); any
other exception is a bug and surfaces with its traceback.
"""


class SslhubError(Exception):
    """Bad input or an impossible request, explained in the message (never a bug in sslhub)."""
