"""Mapping a function over many files on all cores, in order, with progress logs."""

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from absl import logging

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool costs more than it saves.
_MIN_ITEMS_FOR_POOL = 64
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def default_workers() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def make_pool(num_workers: int) -> Optional[concurrent.futures.Executor]:
  """A process pool, or None for `num_workers` <= 1 (run in this process).

  'spawn' starts clean interpreters: forking this process would copy
  TensorFlow's and JAX's threads and state, which is not fork-safe. The
  workers only import PIL, numpy and `vit_jax_ft.data.images`.
  """
  if num_workers <= 1:
    return None
  return concurrent.futures.ProcessPoolExecutor(
      max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(os.getpid(),))


def _init_worker(parent_pid: int) -> None:
  """Runs first in each worker: ignore Ctrl-C, and die with the parent."""
  # Ctrl-C in a terminal signals the whole process group; the parent handles it
  # and stops the workers (without a traceback from each of them).
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
  """On Linux, has the kernel SIGKILL this process when its parent dies.

  That covers the one exit no handler sees (SIGKILL, e.g. the OOM killer);
  elsewhere this is a no-op. The kernel watches the thread that started us,
  which is the parent's main thread (the pool spawns workers from `submit`).
  """
  if not sys.platform.startswith("linux"):
    return
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    failed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0
  except (OSError, AttributeError):
    failed = True
  if failed:
    logging.warning("Worker %d cannot ask to die with its parent (prctl failed).", os.getpid())
  elif os.getppid() != parent_pid:
    os._exit(1)  # The parent died before prctl took effect: nobody wants our results.


@contextlib.contextmanager
def worker_pool(num_workers: int) -> Iterator[Optional[concurrent.futures.Executor]]:
  """`make_pool(num_workers)` for a block; the workers never outlive it.

  When the block ends normally the pool finishes and shuts down. When it
  raises (an error, Ctrl-C, SIGTERM turned into an exception) queued work is
  cancelled and the workers are terminated at once instead of finishing
  their current images.
  """
  before = set(multiprocessing.active_children())
  pool = make_pool(num_workers)
  try:
    yield pool
  except BaseException:
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
      # The executor has no public way to stop its workers (before Python 3.14):
      # they are our new multiprocessing children.
      _terminate(set(multiprocessing.active_children()) - before)
    raise
  if pool is not None:
    pool.shutdown(cancel_futures=True)


def _terminate(processes, timeout: float = 10.0) -> None:
  """SIGTERM (then, after `timeout` seconds, SIGKILL) to `processes`; waits for them."""
  for p in processes:
    p.terminate()
  deadline = time.monotonic() + timeout
  for p in processes:
    p.join(max(0.0, deadline - time.monotonic()))
    if p.is_alive():
      p.kill()
      p.join()


def _eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


def ordered_map(fn: Callable[[T], R], items: Sequence[T], *, pool, num_workers: int, what: str,
                log_every: int = 1000) -> Iterator[R]:
  """Yields fn(item) for every item, in order, logging progress every `log_every` items.

  Uses `pool` (from `make_pool`) when there are enough items to be worth it.
  """
  total = len(items)
  if pool is not None and total >= _MIN_ITEMS_FOR_POOL:
    # Small chunks keep the order of results flowing (the writer consumes them
    # as they come); 8 chunks per worker balance uneven image sizes.
    chunksize = max(1, min(32, total // (8 * max(num_workers, 1))))
    results = pool.map(fn, items, chunksize=chunksize)
  else:
    results = map(fn, items)
  start = time.monotonic()
  for done, result in enumerate(results, 1):
    # Log before yielding: a consumer that zips may never resume us after the last item.
    if done % log_every == 0 or done == total:
      elapsed = max(time.monotonic() - start, 1e-9)
      rate = done / elapsed
      logging.info("%s: %d/%d files (%.0f files/s, ETA %s)", what, done, total, rate,
                   _eta((total - done) / rate))
    yield result
