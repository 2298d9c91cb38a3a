"""Gathering concurrent requests into one forward pass and one index search, on one thread.

Every request that needs the model (search, identify, embed, verify) becomes a ``Job`` on a
queue. One worker thread owns the model and the index (torch and faiss never run beside
themselves): it takes the first job the moment it arrives (a lone request never waits),
plus every job queued behind it, up to ``max_size``; when jobs were already waiting it holds
the door ``max_wait_ms`` for more. The batch's images go through ``gallery.embed`` together,
then each kind of job gets one gallery call for all its rows. A failure in one kind (identify
without a threshold) fails only those jobs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from siamese.gallery import Gallery

KINDS = ("search", "identify", "embed", "verify")


@dataclass
class Job:
    """One request's work: ``images`` (n, C, H, W), 2 rows for verify and 1 otherwise."""

    kind: str
    images: Tensor
    k: int = 0
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Verdict:
    """A verify answer: the pair's distance and whether it is under the threshold."""

    distance: float
    same: bool | None
    threshold: float | None


class Batcher:
    """Runs jobs on one worker thread, in batches of whatever arrived together."""

    def __init__(
        self,
        gallery: Gallery,
        *,
        max_size: int = 32,
        max_wait_ms: float = 1.0,
        identify_by: str = "nearest",
        identify_k: int = 5,
        threshold: float | None = None,
    ) -> None:
        self.gallery = gallery
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.identify_by = identify_by
        self.identify_k = identify_k
        self.threshold = threshold
        # Counters for the curious (and the tests): batches run, jobs in them, largest batch.
        self.batches = 0
        self.jobs = 0
        self.largest = 0
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Start the worker thread unless it runs (again after ``close``: an app's second
        lifespan, as a second ``with TestClient(app)`` makes)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="siamese-model", daemon=True
                )
                self._thread.start()

    async def run(self, kind: str, images: Tensor, k: int = 0) -> Any:
        """The answer to one job, computed in some batch; awaits without blocking the loop."""
        assert kind in KINDS, kind
        job = Job(kind, images, k)
        self.start()
        self._queue.put(job)
        # Cancelling the await (a client that went away) cancels the job if it has not begun.
        return await asyncio.wrap_future(job.future)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker once the jobs queued before this call are done."""
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                self._queue.put(None)
                thread.join(timeout)

    # -- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()  # blocks while idle: no polling, no fixed wait
            if first is None:
                return
            busy = not self._queue.empty()  # others were waiting behind a running batch
            jobs, stop = self._gather(first, busy)
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)
            if stop:
                return

    def _gather(self, first: Job, busy: bool) -> tuple[list[Job], bool]:
        """``first`` and the jobs queued behind it (waiting up to max_wait when ``busy``);
        also whether a stop came in."""
        jobs = [first]
        deadline = time.monotonic() + (self.max_wait_s if busy else 0.0)
        while len(jobs) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    job = self._queue.get(timeout=remaining)
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.jobs += len(jobs)
        self.largest = max(self.largest, len(jobs))
        try:
            images = torch.cat([job.images for job in jobs])  # (B, C, H, W)
            emb = self.gallery.embed(images)  # (B, D): the one forward pass
        except Exception as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        rows: dict[tuple[str, int], list[tuple[Job, int]]] = defaultdict(list)
        start = 0
        for job in jobs:
            # Search jobs asking for different k are searched apart (an approximate index
            # may answer a larger k differently); the usual batch is one group per kind.
            rows[(job.kind, job.k if job.kind == "search" else 0)].append((job, start))
            start += len(job.images)
        for (kind, k), group in rows.items():
            try:
                answers = self._answer(kind, k, emb, [s for _, s in group])
            except Exception as exc:
                for job, _ in group:
                    job.future.set_exception(exc)
                continue
            for (job, _), answer in zip(group, answers, strict=True):
                job.future.set_result(answer)

    def _answer(self, kind: str, k: int, emb: np.ndarray, starts: list[int]) -> list[Any]:
        """One gallery call for every job of a kind; ``starts``: each job's first row."""
        g = self.gallery
        first = emb[starts]  # (J, D)
        if kind == "search":
            return g.search_embeddings(first, k, threshold=self.threshold)
        if kind == "identify":
            return g.identify_embeddings(
                first, by=self.identify_by, k=self.identify_k, threshold=self.threshold
            )
        if kind == "embed":
            return [row.tolist() for row in first]
        second = emb[[s + 1 for s in starts]]
        threshold = self.threshold if self.threshold is not None else g.threshold
        return [
            Verdict(float(d), None if threshold is None else bool(d <= threshold), threshold)
            for d in g.distances(first, second)
        ]
