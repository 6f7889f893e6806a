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


class JobCancelled(JobError):
    """Raised inside shard work when the job was cancelled, to stop between batches."""
