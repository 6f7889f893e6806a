"""Featurizing one index range of a source: the unit of work of a shard, embedded or on a farm worker.

Decoding and resizing run in DataLoader worker processes while the network runs in this one, so a
GPU is not starved by PIL; a local array, which decodes nothing, is read by a thread one batch ahead.
Memory stays bounded by a few batches plus the shard's own features.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from evalfarm.errors import JobCancelled, MetricInputError, SourceError
from evalfarm.keys import INCEPTION
from evalfarm.metrics import FeatureStats
from evalfarm.models import NUM_LOGITS, FeatureExtractor
from evalfarm.models.featurizers import Featurizer
from evalfarm.models.resize import resize_clean_bicubic, resize_tf_bilinear
from evalfarm.sources import Source


class RowSink(Protocol):
    """Where an extractor's rows go as they are computed, instead of into its statistics (a shard's file)."""

    def write(self, rows: np.ndarray) -> None: ...


class _Failed:
    """A decode error carried out of a DataLoader worker, so it surfaces with its own clean message."""

    def __init__(self, message: str) -> None:
        self.message = message


class _BatchDataset(Dataset):
    """Item b is batch b of the range, read with one `Source.read` (one slice for array sources).

    Whole batches, not images, cross the worker boundary: no per-image tensor, copy or collate call.
    A same-size batch is returned as an NHWC array viewed as NCHW, which is already the channels-last
    layout the CPU network runs in; each extractor resizes it to its own input size. A batch of mixed sizes
    is resized image by image here, once per input size the job's extractors need.
    """

    def __init__(self, source: Source, start: int, stop: int, batch_size: int, resize: str,
                 sizes: tuple[int, ...]) -> None:
        self.source, self.start, self.stop, self.batch_size, self.resize = source, start, stop, batch_size, resize
        self.sizes = sizes

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __getitem__(self, b: int) -> torch.Tensor | dict[int, torch.Tensor] | _Failed:
        lo = self.start + b * self.batch_size
        try:
            images = self.source.read(lo, min(self.stop, lo + self.batch_size))
        except SourceError as exc:
            return _Failed(str(exc))
        if self.resize == "clean":  # Inception only (EvalConfig refuses it with other extractors)
            return torch.from_numpy(np.stack([resize_clean_bicubic(im) for im in images]))
        if len({im.shape for im in images}) == 1:
            return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        # Mixed sizes cannot share a batch tensor: resize each here (TF1-exact per image) in the worker.
        chw = [torch.from_numpy(im).permute(2, 0, 1)[None].float() for im in images]
        return {size: torch.cat([resize_tf_bilinear(x, size) for x in chw]) for size in self.sizes}


def _batches(dataset: _BatchDataset, workers: int, *, pin: bool) -> Iterator[Any]:
    """The range's batches, in order. A source that decodes gets `workers` loader processes. A local array
    only copies (`Source.copies_ranges`), so one thread reads a batch ahead instead: starting and stopping
    loader processes cost a shard 100-150 ms on the benchmark machine, more than the copies they took off
    the network's thread."""
    if not dataset.source.copies_ranges and workers > 0:
        yield from DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin, prefetch_factor=4)
        return

    def read(b: int) -> Any:
        batch = dataset[b]
        return batch.pin_memory() if pin and isinstance(batch, torch.Tensor) else batch

    reader = ThreadPoolExecutor(1, thread_name_prefix="evalfarm-read")
    try:
        ahead = reader.submit(read, 0) if len(dataset) else None
        for b in range(len(dataset)):
            batch = ahead.result()
            ahead = reader.submit(read, b + 1) if b + 1 < len(dataset) else None
            yield batch
    finally:  # the consumer stopped early (an error, a cancel): the batch read ahead is not waited for
        reader.shutdown(wait=False, cancel_futures=True)


def default_num_workers(processes: int = 1) -> int:
    """Decode processes for each of `processes` featurizing processes on this machine: the cores not
    running them, shared out, at most 8 each (one Celery child per GPU must not oversubscribe the host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, (cores - processes) // max(1, processes)))


def featurize_range(source: Source, start: int, stop: int, extractor: FeatureExtractor, **options: object) -> FeatureStats:
    """Statistics of samples [start, stop) with one extractor (see `featurize_extractors`)."""
    return featurize_extractors(source, start, stop, [extractor], **options)[extractor.name]


def featurize_extractors(
    source: Source,
    start: int,
    stop: int,
    featurizers: Sequence[Featurizer],
    *,
    resize: str = "tf",
    batch_size: int = 64,
    num_workers: int | None = None,
    split_ids: np.ndarray | None = None,
    splits: int = 0,
    on_batch: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    keep_features: bool | Collection[str] = True,
    row_sinks: Mapping[str, RowSink] | None = None,
    row_subsets: Mapping[str, np.ndarray] | None = None,
) -> dict[str, FeatureStats]:
    """Statistics of samples [start, stop) per extractor, each image decoded once: FID sums, feature rows, and
    (given split ids) Inception's IS split sums. `keep_features` may name the extractors whose rows are kept;
    an extractor in `row_sinks` sends its rows there, batch by batch, and its statistics keep none. An
    extractor in `row_subsets` keeps (or sends) only the rows at those sorted offsets from `start`."""
    sinks, subsets = dict(row_sinks or {}), dict(row_subsets or {})
    if not featurizers:
        raise ValueError("featurize_extractors needs at least one extractor")
    workers = default_num_workers() if num_workers is None else num_workers
    sizes = tuple(dict.fromkeys(f.input_size for f in featurizers))
    loader = _batches(_BatchDataset(source, start, stop, batch_size, resize, sizes), workers,
                      pin=any(f.device.type == "cuda" for f in featurizers))
    stats = {
        f.name: FeatureStats.new(f.dim, splits=splits if split_ids is not None and f.name == INCEPTION else 0,
                                 classes=NUM_LOGITS,
                                 keep_features=f.name not in sinks and (
                                     keep_features if isinstance(keep_features, bool) else f.name in keep_features),
                                 row_index=subsets.get(f.name))
        for f in featurizers
    }
    done = 0
    with contextlib.closing(loader):  # an error mid-range ends the reads (loader processes, or the thread)
        for batch in loader:
            if isinstance(batch, _Failed):
                raise SourceError(batch.message)
            if should_stop is not None and should_stop():
                raise JobCancelled("the job was cancelled")
            n = 0
            for f in featurizers:
                features = f(batch[f.input_size] if isinstance(batch, dict) else batch)
                n = len(features)
                if not np.all(np.isfinite(features)):
                    bad = start + done + int(np.argwhere(~np.isfinite(features).all(axis=1))[0, 0])
                    raise MetricInputError(f"non-finite {f.name} features for {source.name_of(bad)}")
                if f.name in sinks:  # first: the sink's thread writes them while the statistics are summed
                    sinks[f.name].write(stats[f.name].kept_of(features))
                if split_ids is not None and f.name == INCEPTION:
                    stats[f.name].add(features, f.logits(features), split_ids[done : done + n])
                else:
                    stats[f.name].add(features)
            done += n
            if on_batch is not None:
                on_batch(n)
    return stats
