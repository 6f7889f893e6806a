"""Errors a user can act on: each message says what went wrong and what to do."""

from __future__ import annotations


class EvalfarmError(Exception):
    """Base of every error evalfarm raises on purpose (the CLI prints these without a traceback)."""


class SourceError(EvalfarmError):
    """A sample set cannot be read: missing, empty, unsupported or corrupt (names the file or index)."""


class WeightsError(EvalfarmError):
    """Inception weights are missing, unreadable, or not the expected file."""


class MetricInputError(EvalfarmError):
    """The statistics cannot give a trustworthy metric (too few samples, non-finite features, ...)."""


class ReferenceMismatchError(EvalfarmError):
    """Reference statistics were computed with other weights, resize mode or feature layout."""


class JobError(EvalfarmError):
    """A job failed, was cancelled, or is not in a state that allows the request."""


class JobNotFound(JobError):
    """No job has this id."""


class NotAllowed(EvalfarmError):
    """The farm's policy refuses the request: a path outside EVALFARM_SAMPLE_ROOTS, a callback host outside
    EVALFARM_CALLBACK_HOSTS, a job that is not the caller's. Nothing was read or sent."""


class InvalidField(EvalfarmError):
    """A field of a request the farm cannot accept, named (the API answers 422 with it)."""

    def __init__(self, field: str, message: str, *, where: str = "body") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.where = field, message, where


class Conflict(EvalfarmError):
    """The request contradicts what the farm already holds: an idempotency key reused with another body,
    weights that no worker of the farm holds."""


class JobCancelled(JobError):
    """Raised inside shard work when the job was cancelled, to stop between batches."""
