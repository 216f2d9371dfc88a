"""Dynamic batching for the server: requests that arrive together share one sampler call.

Callers on the event loop `submit` a job (a group, its rows, a payload) and await its result. One
worker thread owns the device: it takes the oldest job, waits at most `max_wait_s` for jobs of
the same group to fill `max_batch` rows, hands the group's payloads to `handle` in one call and
gives each caller its result. It waits only while jobs keep company: after a batch of one job
it serves the next at once, so a lone client pays no wait. Jobs of other groups keep their place in the queue. The queue holds
at most `max_queue` jobs; beyond that `submit` raises `Overloaded` at once, so a burst costs a
fast refusal, not memory.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Hashable, Sequence


class Overloaded(RuntimeError):
  """The queue is full: the caller should retry later."""


class Closed(RuntimeError):
  """The batcher is draining or stopped and takes no new jobs."""


@dataclasses.dataclass
class _Job:
  group: Hashable
  rows: int
  payload: Any
  future: concurrent.futures.Future
  arrived: float


# handle(group, payloads) -> one result per payload, in order
Handler = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class Batcher:

  def __init__(self, handle: Handler, max_batch: int, max_wait_s: float, max_queue: int):
    if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
      raise ValueError(f"max_batch and max_queue must be at least 1 and max_wait_s at least 0, "
                       f"got {max_batch}, {max_queue}, {max_wait_s}")
    self.handle, self.max_batch = handle, max_batch
    self.max_wait_s, self.max_queue = max_wait_s, max_queue
    self.batches = collections.Counter()  # batch size (jobs) -> how many batches had it
    self._queue: collections.deque[_Job] = collections.deque()
    self._changed = threading.Condition()
    self._closed = False
    self._shared = True  # whether the last batch held more than one job
    self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
    self._worker.start()

  @property
  def queued(self) -> int:
    return len(self._queue)

  async def submit(self, group: Hashable, rows: int, payload: Any) -> Any:
    """The result `handle` gives for `payload`; raises what `handle` raised for it."""
    return await asyncio.wrap_future(self.put(group, rows, payload))

  def put(self, group: Hashable, rows: int, payload: Any) -> concurrent.futures.Future:
    if not 1 <= rows <= self.max_batch:
      raise ValueError(f"a job of {rows} rows does not fit a batch of {self.max_batch}")
    job = _Job(group, rows, payload, concurrent.futures.Future(), time.monotonic())
    with self._changed:
      if self._closed:
        raise Closed("the server is shutting down")
      if len(self._queue) >= self.max_queue:
        raise Overloaded(f"{len(self._queue)} requests are waiting")
      self._queue.append(job)
      self._changed.notify()
    return job.future

  def close(self, timeout: float = 600.0):
    """Takes no new jobs, finishes the queued ones, then stops the worker."""
    with self._changed:
      self._closed = True
      self._changed.notify()
    self._worker.join(timeout)

  def _next_batch(self) -> list[_Job]:
    """The oldest job and the jobs of its group behind it, up to max_batch rows; waits for more
    until the oldest has waited max_wait_s or the batch is full. [] once closed and empty."""
    with self._changed:
      while not self._queue:
        if self._closed:
          return []
        self._changed.wait()
      first = self._queue[0]
      wait_s = self.max_wait_s if self._shared else 0.0
      while True:
        batch = self._same_group(first)
        left = first.arrived + wait_s - time.monotonic()
        if sum(j.rows for j in batch) >= self.max_batch or left <= 0 or self._closed:
          break
        self._changed.wait(left)
      for job in batch:
        self._queue.remove(job)
      self._shared = len(batch) > 1
      return batch

  def _same_group(self, first: _Job) -> list[_Job]:
    batch, rows = [], 0
    for job in self._queue:
      if job.group == first.group and rows + job.rows <= self.max_batch:
        batch.append(job)
        rows += job.rows
    return batch

  def _work(self):
    while batch := self._next_batch():
      self.batches[len(batch)] += 1
      if len(batch) == 1:
        self._run_alone(batch[0])
        continue
      try:
        results = self.handle(batch[0].group, [j.payload for j in batch])
      except Exception:  # one bad payload must not fail the others: alone, each says its own
        for job in batch:
          self._run_alone(job)
        continue
      for job, result in zip(batch, results, strict=True):
        job.future.set_result(result)

  def _run_alone(self, job: _Job):
    try:
      job.future.set_result(self.handle(job.group, [job.payload])[0])
    except Exception as e:
      job.future.set_exception(e)
