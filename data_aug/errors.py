"""The error every data set raises for data missing or damaged on disk (STL10's files, an image folder, ...)."""


class DataError(RuntimeError):
    """A data set on disk is missing or damaged; the message names the file and how to fix it."""
