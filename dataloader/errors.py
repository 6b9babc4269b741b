"""Error types raised by the data package; each message names the file or folder and the fix."""


class DataError(Exception):
    """Base class of every data error, so a script can report them all the same way."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset's files are missing (and could not be downloaded), or a folder holds no images."""


class DatasetFormatError(DataError, ValueError):
    """A dataset file exists but its content is not in the expected format."""


class BadImageError(DataError, OSError):
    """An image file cannot be decoded (corrupt, truncated or not an image)."""
