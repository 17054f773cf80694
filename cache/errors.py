"""User-facing error types, shared by every floor.

They live on the lowest floor (cache/) so that cache, stages and pipeline can all raise
them without importing upwards. The CLI turns any PipelineError into one line on stderr
and its exit status (2; 1 for RunFailedError); anything else is a bug and keeps its traceback.
"""

__all__ = [
    "PipelineError",
    "ConfigError",
    "RunFailedError",
    "DatasetError",
    "CacheError",
    "CacheMismatchError",
    "ModelError",
    "VideoDecodeError",
    "TrainingError",
]


class PipelineError(Exception):
    """Base class for every error a user can cause (the CLI exits with ``exit_code``)."""

    exit_code = 2


class RunFailedError(PipelineError, RuntimeError):
    """A run that could not do its work (every video failed, the disk is full): exit status 1."""

    exit_code = 1


class ConfigError(PipelineError, ValueError):
    """A bad option, override key or value type."""


class DatasetError(PipelineError, ValueError):
    """A bad list file, class file, label or dataset name."""


class CacheError(PipelineError, RuntimeError):
    """A cache that cannot be opened, created or written."""


class CacheMismatchError(CacheError, ValueError):
    """A cache that lacks what a head or command needs."""


class ModelError(PipelineError, ValueError):
    """An unknown model name or an unloadable checkpoint."""


class VideoDecodeError(PipelineError, RuntimeError):
    """Neither decoder could produce the frames of a video (recorded as a failure)."""


class TrainingError(RunFailedError):
    """A run that cannot go on (a non-finite loss, non-finite weights after a step): exit status 1."""


def decode_failure_reason(exc: Exception) -> str:
    """The policy for a video that does not decode, in extraction and fine-tuning alike: the run
    goes on and records this one line as the video's failure. A VideoDecodeError says why in its
    own words; any other exception is a decoder crash on that file, named with its class."""
    if isinstance(exc, VideoDecodeError):
        return str(exc)
    return f"decode error: {exc.__class__.__name__}: {str(exc)[:160]}"
