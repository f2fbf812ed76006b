"""The exception types: problems a user can cause and fix, and a stale kernel library."""


class VolfilterError(Exception):
    """Bad input, bad option or bad config: shown as one line without a traceback.

    The message says which file or option is wrong, what is wrong with it and,
    where it helps, what to do instead.
    """


class StaleKernelsError(ImportError):
    """The compiled kernels were built from another version of ``pipeline/_native.c`` than the one
    beside them (a checkout updated without a rebuild): they are not used."""


class GeometryWarning(UserWarning):
    """The header's geometry is valid but limits what a filter in mm can mean (a sheared affine)."""
