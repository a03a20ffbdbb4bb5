"""Where the runs of an analysis execute: this process, local worker processes, or Ray.

``normprobe analyze`` trains every (normalizer, learning rate, seed) run of
a config. By default the runs go one after another in the calling process
(``executor="local"``, ``jobs`` None or 1). With ``jobs=N`` (N > 1) they go
to N worker processes on this machine (``concurrent.futures`` with the
``spawn`` start method); with ``executor="ray"`` each run is one Ray task,
on a local Ray instance or on an existing cluster (``address``).

Whichever executor runs them, the driver (the process that called
:func:`normprobe.analyze`) is the only one that writes: the workers return
each run's :class:`~normprobe.results.RunRecord` and the driver writes its
folder atomically as it arrives, so resuming after an interruption and the
result tables are exactly as without workers. The workers get the run
specifications (each carrying its resolved config) and the data the driver
prepared (pickled once per analysis), so every run sees the same tensors bit
for bit. Every executor calls the same :func:`normprobe.run.run_one`.

Torch threads: every run uses :func:`run_threads` CPU threads, the same in
this process, a worker process or a Ray task: ``train.threads``, or with
``auto`` (the default) a count from the model's size, this machine's cores
and ``jobs`` (:mod:`normprobe.threads`), 1 for a Ray task. A Ray task asks
Ray for that many CPUs, and for one GPU when ``train.device`` is ``cuda``.

Failures: a run that raises (a bug, a model that cannot train) is recorded
as ``failed`` by the worker and never retried; a worker process that dies
(killed, out of memory, a crash in native code) is retried. Locally, the
runs that were in flight when a worker died are run again one at a time,
so the one that kills its worker is found; that one is retried up to
:data:`RETRIES` times, then recorded as ``failed`` with the reason. On Ray,
Ray itself retries a task whose worker died (``max_retries``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from normprobe.errors import NormprobeError
from normprobe.plan import RunSpec
from normprobe.results import RunRecord
from normprobe.run import run_one
from normprobe.threads import AUTO, Threads, auto_threads

__all__ = ["EXECUTORS", "RETRIES", "ExecutorError", "check_executor", "run_threads"]

#: The executors ``analyze`` knows.
EXECUTORS = ("local", "ray")
#: How many times a run whose worker process died is tried again.
RETRIES = 2
RAY_MISSING = "the ray executor needs ray: pip install 'normprobe[ray]'"

# Test-only hook: the worker running the run named here exits (os._exit(1))
# halfway through its training, as a killed worker would. With a marker file
# path in NORMPROBE_TEST_KILL_MARKER it does so once (the marker records it);
# without one, on every attempt.
KILL_RUN_ENV = "NORMPROBE_TEST_KILL_RUN"
KILL_MARKER_ENV = "NORMPROBE_TEST_KILL_MARKER"

Log = Callable[[str], None]
OnRecord = Callable[[RunRecord], None]


class ExecutorError(NormprobeError, ValueError):
    """An executor that cannot be used as asked (unknown name, bad jobs, ray missing)."""


def check_executor(executor: str, jobs: int | None, address: str | None) -> None:
    """Refuse an unknown executor, a bad ``jobs``, or ray when it is not installed.

    >>> check_executor("local", 2, None)
    >>> check_executor("dask", None, None)
    Traceback (most recent call last):
    ...
    normprobe.executors.ExecutorError: executor: 'dask' is not one of local, ray
    """
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ExecutorError(f"jobs: give a positive number of runs at once, got {jobs!r}")
    if address is not None and executor != "ray":
        raise ExecutorError(
            f"address: {address!r} is a Ray cluster address; use it with executor 'ray'"
        )
    if executor == "ray":
        _import_ray()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(RAY_MISSING) from None
    return ray


def in_process(executor: str, jobs: int | None) -> bool:
    """Whether the runs go one after another in the calling process (today's default)."""
    return executor == "local" and (jobs is None or jobs == 1)


def run_threads(threads: Threads, parameters: int, executor: str, jobs: int | None) -> int:
    """The torch threads each run of an analysis uses, whichever process runs it.

    A number is used as given. ``"auto"`` (or None) is
    :func:`normprobe.threads.auto_threads` of the largest model's
    ``parameters``, this machine's cores and ``jobs`` runs at once (one in
    this process without ``jobs``); a Ray task gets 1 thread (Ray runs one
    task per CPU it counts, on machines this one cannot see).

    >>> run_threads(3, 10**9, "local", 4), run_threads("auto", 10_000, "local", None)
    (3, 1)
    >>> run_threads("auto", 10**9, "ray", None)
    1
    """
    if threads is not None and threads != AUTO:
        return int(threads)
    if executor == "ray":
        return 1
    return auto_threads(parameters, jobs=jobs or 1)


# ---------------------------------------------------------------------------
# The worker side: the same in a local worker process and in a Ray task.

# payload key -> {variant: ProbeData}; one analysis at a time
_PAYLOAD: dict[str, Any] = {}
_PAYLOAD_BYTES: dict[str, bytes] = {}
_PAYLOAD_ERRORS: dict[str, str] = {}


def _payload(key: str, load: Callable[[], bytes] | None = None) -> dict[Any, Any]:
    if key not in _PAYLOAD:
        raw = _PAYLOAD_BYTES.pop(key, None)
        if raw is None:
            if load is None:
                why = _PAYLOAD_ERRORS.get(key, "it was given none")
                raise RuntimeError(f"the worker could not read the analysis' data: {why}")
            raw = load()
        _PAYLOAD.clear()
        _PAYLOAD[key] = pickle.loads(raw)
    return _PAYLOAD[key]


def _execute(spec: RunSpec, key: str, threads: int, device: str, load: Any = None) -> RunRecord:
    """Train one run in a worker and return its record (the driver writes it)."""
    data = _payload(key, load)[spec.variant]
    torch.set_num_threads(threads)
    return run_one(spec, data, device=device, progress_bar=_test_kill_bar(spec.run))


def _test_kill_bar(run: str) -> Any:
    """A progress bar that kills its process halfway through the run (test hook), or None."""
    if os.environ.get(KILL_RUN_ENV) != run:
        return None
    marker = os.environ.get(KILL_MARKER_ENV)
    if marker and Path(marker).exists():
        return None

    class DieHalfway:
        def __init__(self, total: int, **_: Any) -> None:
            self.total, self.count = total, 0

        def update(self, n: int = 1) -> None:
            self.count += n
            if self.count >= max(1, self.total // 2):
                if marker:
                    Path(marker).touch()
                os._exit(1)

        def set_postfix(self, **_: Any) -> None:
            pass

        def close(self) -> None:
            pass

    return DieHalfway


def _init_pool_worker(key: str, payload: str, parent: int) -> None:
    """Initializer of a local worker process (spawned: a fresh interpreter).

    ``payload`` is the file the driver wrote the pickled configs and data to
    (a file, not an argument: the start of a worker would wait on the driver
    writing it through a pipe).
    """
    # Ctrl-C reaches the whole process group; the driver stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _PAYLOAD_BYTES[key] = Path(payload).read_bytes()
    except OSError as err:  # each run reports it (failed) rather than the pool breaking
        _PAYLOAD_ERRORS[key] = f"{type(err).__name__}: {err}"

    def orphaned() -> None:  # the driver was killed (kill -9): do not train on for nobody
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=orphaned, name="normprobe-orphan-watch", daemon=True).start()


def _ray_task(spec: RunSpec, key: str, box: list[Any], threads: int, device: str) -> RunRecord:
    """One run as a Ray task: ``box`` holds the payload's object ref (fetched once per worker)."""
    import ray

    return _execute(spec, key, threads, device, lambda: ray.get(box[0]))


# ---------------------------------------------------------------------------
# The driver side.


def run_in_pool(
    todo: Iterable[RunSpec],
    payload: bytes,
    *,
    jobs: int,
    threads: int,
    device: str,
    on_record: OnRecord,
    log: Log,
    retries: int = RETRIES,
    folder: Path | None = None,
) -> None:
    """Run ``todo`` on ``jobs`` local worker processes; ``on_record`` gets each record as it ends.

    The workers read ``payload`` from a temporary file in ``folder`` (the
    output folder, whose ``.*.tmp`` leftovers the next analysis there
    removes; default: the system's temporary folder).

    At most ``jobs`` runs are in flight, so every submitted run is running.
    When a worker dies the pool breaks and every run in flight is lost
    (finished ones are already written): each is queued again as a suspect,
    and a suspect runs alone, so a death with one run in flight names its
    culprit. A run whose worker died while it ran alone ``retries + 1``
    times is recorded as failed.
    """
    key = uuid.uuid4().hex
    context = multiprocessing.get_context("spawn")  # fork after torch's threads start is unsafe
    fd, file = tempfile.mkstemp(dir=folder, prefix=".payload.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        _pool_loop(todo, key, file, context, jobs, threads, device, on_record, log, retries)
    finally:
        Path(file).unlink(missing_ok=True)


def _pool_loop(
    todo: Iterable[RunSpec],
    key: str,
    payload: str,
    context: Any,
    jobs: int,
    threads: int,
    device: str,
    on_record: OnRecord,
    log: Log,
    retries: int,
) -> None:
    queue: deque[RunSpec] = deque(todo)
    suspects: set[str] = set()
    deaths: dict[str, int] = {}
    running: dict[Future[RunRecord], RunSpec] = {}
    pool: ProcessPoolExecutor | None = None

    def fill() -> bool:
        """Submit runs up to ``jobs`` in flight; False if the pool turned out broken."""
        assert pool is not None
        while queue and len(running) < jobs:
            alone = queue[0].run in suspects or any(s.run in suspects for s in running.values())
            if alone and running:
                break
            spec = queue.popleft()
            try:
                running[pool.submit(_execute, spec, key, threads, device)] = spec
            except BrokenProcessPool:
                queue.appendleft(spec)
                return False
            if spec.run in suspects:
                break
        return True

    try:
        while queue or running:
            if pool is None:
                pool = ProcessPoolExecutor(
                    max_workers=jobs,
                    mp_context=context,
                    initializer=_init_pool_worker,
                    initargs=(key, payload, os.getpid()),
                )
            intact = fill()
            finished, _ = wait(running, return_when=FIRST_COMPLETED) if running else (set(), set())
            records: list[RunRecord] = []
            lost: list[RunSpec] = []
            for future in finished:
                spec = running.pop(future)
                try:
                    records.append(future.result())
                except BrokenProcessPool:
                    lost.append(spec)
                except Exception as err:  # the call itself failed outside the run
                    records.append(spec.failed(f"{type(err).__name__}: {err}"))
            if lost or not intact:
                # a broken pool fails every run in flight; collect them all
                for future in wait(running)[0]:
                    spec = running.pop(future)
                    try:
                        records.append(future.result())
                    except BrokenProcessPool:
                        lost.append(spec)
                    except Exception as err:
                        records.append(spec.failed(f"{type(err).__name__}: {err}"))
                # the pool kills its workers when it breaks, but misses one that it was
                # still starting then (and would wait for it forever): stop them all
                _stop_workers(pool)
                pool.shutdown(wait=True)
                pool = None
                records += _requeue(lost, queue, suspects, deaths, retries, log)
            elif queue:
                fill()  # keep the workers busy while the driver writes
            for record in records:
                on_record(record)
    except BaseException:
        if pool is not None:
            _terminate(pool)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _requeue(
    lost: list[RunSpec],
    queue: deque[RunSpec],
    suspects: set[str],
    deaths: dict[str, int],
    retries: int,
    log: Log,
) -> list[RunRecord]:
    """Queue the runs lost with a broken pool again (first), or fail those out of retries."""
    records = []
    alone = len(lost) == 1
    for spec in sorted(lost, key=lambda s: s.run, reverse=True):
        if alone:
            deaths[spec.run] = deaths.get(spec.run, 0) + 1
        tries = deaths.get(spec.run, 0)
        if tries > retries:
            records.append(
                spec.failed(
                    f"WorkerDied: the worker process died running this run alone {tries} times "
                    "(killed, out of memory, or a crash in native code); not retried further",
                )
            )
            continue
        if alone:
            log(f"{spec.run}: its worker process died; retrying ({tries} of {retries})")
        else:
            log(
                f"{spec.run}: a worker process died with {len(lost)} runs in flight; "
                "rerunning each of them alone"
            )
        suspects.add(spec.run)
        queue.appendleft(spec)
    return records


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Send SIGTERM to every worker process of ``pool`` (those already gone are skipped)."""
    stop = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if stop is not None:
        stop()
        return
    # before 3.14 there is no public way to reach the workers
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now, killing the runs in flight (Ctrl-C in the driver)."""
    _stop_workers(pool)
    pool.shutdown(wait=False, cancel_futures=True)


def run_on_ray(
    todo: Iterable[RunSpec],
    payload: bytes,
    *,
    jobs: int | None,
    address: str | None,
    threads: int,
    device: str,
    on_record: OnRecord,
    log: Log,
    retries: int = RETRIES,
) -> None:
    """Run each of ``todo`` as a Ray task; ``on_record`` gets each record as it ends.

    Connects to the cluster at ``address`` ("auto": the one this machine
    belongs to), else to the Ray instance already started in this process,
    else starts a local one with ``jobs`` CPUs (default: all cores) and shuts
    it down at the end. ``jobs`` also caps the runs in flight.
    """
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if address is not None:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, TimeoutError, ValueError) as err:
                raise ExecutorError(
                    f"address: cannot connect to the Ray cluster at {address!r}: {err}"
                ) from None
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, logging_level=logging.WARNING)
        started = True
    gpu = device.startswith("cuda")
    task = ray.remote(_ray_task).options(
        num_cpus=threads,
        num_gpus=1 if gpu else 0,
        max_retries=retries,
        retry_exceptions=False,
    )
    # a task sees only its own GPU (CUDA_VISIBLE_DEVICES), as cuda:0
    task_device = "cuda" if gpu else device
    key = uuid.uuid4().hex
    queue = deque(todo)
    running: dict[Any, RunSpec] = {}
    try:
        box = [ray.put(payload)]  # in a list: fetched inside the task, once per worker
        limit = jobs if jobs is not None else len(queue)
        while queue or running:
            while queue and len(running) < limit:
                spec = queue.popleft()
                running[task.remote(spec, key, box, threads, task_device)] = spec
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                spec = running.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # raised outside the run itself
                    cause = err.cause if getattr(err, "cause", None) is not None else err
                    record = spec.failed(f"{type(cause).__name__}: {cause}")
                except ray.exceptions.RayError as err:  # worker or node lost, retries spent
                    record = spec.failed(
                        f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                    )
                    log(f"{spec.run}: Ray could not finish it: {type(err).__name__}")
                if queue:  # keep the cluster busy while the driver writes
                    spec = queue.popleft()
                    running[task.remote(spec, key, box, threads, task_device)] = spec
                on_record(record)
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
