"""The farm's Celery app, its thin tasks, and the Redis partial store."""
