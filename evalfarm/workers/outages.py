"""What counts as an outage of the database or the broker: the job is not at fault and must not fail for
it. The task policy retries such errors; the API answers them with 503, so that clients retry."""

from __future__ import annotations


def outage_types() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError, kombu.exceptions.OperationalError, ConnectionError)


def is_outage(exc: BaseException) -> bool:
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, outage_types())
