"""Worker processes: the one way the package runs work in several processes (align, mask, features, the raw
manifest, the mask CLI).

Mechanism, and why:

* ``concurrent.futures.ProcessPoolExecutor``, never ``multiprocessing.Pool``: when a worker dies (killed,
  out of memory, a crash in C code, an initializer that raises) the executor is *broken* and every pending
  result raises at once. ``multiprocessing.Pool`` silently starts a replacement and waits forever for the lost
  task (a job that never ends).
* ``spawn`` start method: a fresh interpreter per worker. ``fork`` after torch, OpenMP, OpenCV or tqdm have
  started threads in the parent can deadlock the child (a lock held by a thread that does not exist there);
  Python 3.12 warns about it and 3.14 no longer uses it by default.
* Workers never re-run the caller's script. ``spawn`` normally re-imports the parent's ``__main__`` in every
  child. A Snakemake ``script:`` runs as ``__main__`` from a temporary copy whose ``__file__`` points back to
  ``workflow/scripts/<rule>.py``; the child would run that file without the ``snakemake`` object Snakemake
  prepended, die with a NameError, and (with ``multiprocessing.Pool``) be replaced forever. While the workers
  start, the parent's ``__main__`` names this module as its ``__spec__`` (as ``python -m`` does), so a child
  imports ``maskface.workers`` as its main module instead of the script. The worker functions and initializers
  are package functions (picklable by reference); a function defined in a script cannot be sent to a worker
  and fails with a clear pickling error instead.
* Each worker gets one compute thread (torch, OpenCV): the stages run processes, not threads.

A worker's own error (its traceback) goes to the job's stderr, which :func:`maskface.smk.logged` points at the
rule's log file; the parent raises :class:`WorkerError` naming the exit code.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import multiprocessing as mp
import os
import signal
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

# Fault injection for the tests that kill a worker mid-job (tests/test_workers.py): a worker that starts a task
# while this variable names the task's index kills itself with SIGKILL, as the out-of-memory killer would.
KILL_ENV = "MASKFACE_TEST_KILL_WORKER_AT"


class WorkerError(RuntimeError):
    """A worker process died or could not start; the job stops instead of waiting for it."""


def one_thread() -> None:
    """One compute thread in this process (OpenCV, torch when imported)."""
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - a dependency
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _init(initializer: Optional[Callable[..., None]], initargs: tuple) -> None:
    one_thread()
    if initializer is None:
        return
    try:
        initializer(*initargs)
    except BaseException:
        print(f"maskface worker {os.getpid()}: its initializer {getattr(initializer, '__qualname__', initializer)} "
              f"failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    one_thread()      # again: the initializer may have imported torch, which took OMP_NUM_THREADS (the job's)


def _call(fn: Callable[[Any], Any], index: int, task: Any) -> Any:
    kill_at = os.environ.get(KILL_ENV)
    if kill_at is not None and kill_at.strip() == str(index):
        os.kill(os.getpid(), signal.SIGKILL)
    return fn(task)


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """While processes start: the children import this module as their main module, not the parent's script."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None or not getattr(main, "__file__", None):
        yield       # `python -m ...`, pytest, an interactive session: nothing of the caller is re-run
        return
    main.__spec__ = importlib.util.find_spec(__name__)
    try:
        yield
    finally:
        main.__spec__ = None


def _describe(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer sends it, among others)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    if code == 0:      # concurrent.futures' worker returns when its initializer raised
        return "ended during its start (its set-up raised)"
    return f"exited with code {code}"


def _broken(what: str, ex: ProcessPoolExecutor, procs: dict, exc: BaseException) -> WorkerError:
    """The job's error for a broken pool: how the workers ended. When one dies, the executor stops the others
    with SIGTERM; those are left out unless nothing else is known.

    The exit codes are read only after the executor's manager thread has finished: it reaps every worker
    itself, and a ``join`` from this thread racing with it can find the dead worker already reaped but its exit
    code not yet recorded (``exitcode`` None), which left only the survivors' SIGTERM to report (about 1 run in
    100 under load)."""
    manager = getattr(ex, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(timeout=30)
    for p in procs.values():
        p.join(timeout=5)
    codes = [p.exitcode for p in procs.values() if p.exitcode is not None]
    first = [c for c in codes if c != -signal.SIGTERM] or codes
    why = "; ".join(sorted({_describe(c) for c in first})) or "ended"
    return WorkerError(f"{what}: a worker process died or could not start ({why}); the job stops. "
                       f"A worker's own error, if it printed one, is above in this log.")


def imap(fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int, *,
         initializer: Optional[Callable[..., None]] = None, initargs: tuple = (),
         what: str = "worker", ahead: Optional[int] = None) -> Iterator[Any]:
    """``fn(task)`` for every task, computed in ``workers`` spawned processes, yielded in task order.

    ``fn`` and ``initializer`` must be importable package functions; tasks and results must pickle. A task that
    raises re-raises here (with the worker's traceback as its cause); a worker that dies or cannot start raises
    :class:`WorkerError` within moments. Either way the remaining workers are stopped, and so they are when the
    caller closes the generator early.

    ``ahead``: at most that many tasks submitted and not yet taken by the caller (at least ``workers``), so that
    results wait in memory only that far ahead of a slower consumer; None: every task at once."""
    tasks = list(tasks)
    if not tasks:
        return
    n = max(1, min(int(workers), len(tasks)))
    limit = len(tasks) if ahead is None else max(n, int(ahead))
    ex = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(initializer, tuple(initargs)))
    procs: dict = {}
    futures: collections.deque = collections.deque()
    pending = iter(enumerate(tasks))

    def submit() -> None:
        while len(futures) < limit:
            nxt = next(pending, None)
            if nxt is None:
                return
            with _main_not_rerun():   # the executor starts its processes as tasks are submitted
                futures.append(ex.submit(_call, fn, *nxt))
            procs.update(getattr(ex, "_processes", None) or {})

    try:
        try:
            submit()
            while futures:
                result = futures.popleft().result()
                submit()
                yield result
        except BrokenProcessPool as exc:
            procs.update(getattr(ex, "_processes", None) or {})
            raise _broken(what, ex, procs, exc) from exc
    except BaseException:
        for p in procs.values():      # do not wait for running tasks of a failed job
            if p.is_alive():
                p.terminate()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive lists of ``size`` (the last may be shorter)."""
    size = max(1, int(size))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
