"""The one exception type for problems a user can cause and fix."""


class VolfilterError(Exception):
    """Bad input, bad option or bad config: shown as one line without a traceback.

    The message says which file or option is wrong, what is wrong with it and,
    where it helps, what to do instead.
    """
