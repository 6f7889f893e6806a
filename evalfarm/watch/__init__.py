"""`evalfarm watch`: evaluate each new sample set of a training run exactly once, embedded or on the farm."""

from evalfarm.watch.watcher import EmbeddedBackend, FarmBackend, Watcher, WatchOptions

__all__ = ["EmbeddedBackend", "FarmBackend", "WatchOptions", "Watcher"]
