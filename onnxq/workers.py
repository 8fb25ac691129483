"""Calibration worker processes (`--workers N`): start them, hand each the same job, collect the results,
stop them on an error. What a worker runs is calibrate.Shard.count; this module is only the processes.
"""

import multiprocessing as mp
import os
import queue
import warnings

from .errors import OnnxqError

_NO_MORE_IMAGES = 1 << 62


def cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def started(count, per_core=True) -> "Workers":
    """Workers(count), the one place calibration processes are started; per_core: at most one per core (the
    user's --workers: a process more than the cores only adds its start-up). Use as a context manager."""
    if per_core and int(count) > cores():
        warnings.warn(f"--workers {count}: this process may use {cores()} core(s); running {cores()}")
        count = cores()
    return Workers(count)


class Workers:
    """Calibration processes besides this one, started ahead of the work so that their start-up (Python,
    onnxruntime, Numba: about 1.3 s of a core) overlaps the model's preparation rather than the first images.

    Images are claimed one at a time from an index all processes share, so a process that started late or
    runs slower counts fewer of them and all finish together; the statistics do not depend on which process
    counted which image (see kernels.histogram). Use as a context manager: leaving it on an error stops the
    workers at once, without waiting for the image they are on.
    """

    def __init__(self, count: int):
        self.count = max(1, int(count))
        self._procs, self._jobs = [], []
        if self.count == 1:
            return
        ctx = mp.get_context("spawn")  # the parent holds onnxruntime threads: never fork them
        self.counted = ctx.Value("q", 0)  # images the workers have counted (progress)
        self.next_image = ctx.Value("q", 0)  # the next unclaimed image of the current set
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.count - 1)]  # one each: every worker runs every job
        for jobs in self._jobs:
            proc = ctx.Process(target=_worker_main, name="onnxq-calibrate", daemon=True,
                               args=(jobs, self._results, self.counted, self.next_image))
            proc.start()
            self._procs.append(proc)

    def run(self, shard, own_share, tick):
        """Every worker counts what it claims of `shard` (a calibrate.Shard) while this process runs
        own_share(); the results, this process's first."""
        self.counted.value = 0
        self.next_image.value = 0
        for jobs in self._jobs:
            jobs.put(shard)
        try:
            results = [own_share()]
        except BaseException:
            stop_claiming(self.next_image)
            raise
        while len(results) < self.count:
            try:
                ok, value = self._results.get(timeout=0.2)
            except queue.Empty:
                tick()
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead and self._results.empty():
                    raise OnnxqError(_death(dead[0].exitcode)) from None
                continue
            if not ok:
                raise value
            results.append(value)
        tick()
        return results

    def close(self, error=False):
        for proc, jobs in zip(self._procs, self._jobs):
            if error:
                proc.terminate()
                jobs.cancel_join_thread()  # what it had not sent yet is dropped, not waited for at exit
            else:
                jobs.put(None)
        for proc in self._procs:
            proc.join(timeout=None if error else 10)
            if proc.exitcode is None:
                proc.terminate()
                proc.join()
        self._procs = []
        self.count = 1  # closed: a later calibration runs in this process alone

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(error=exc_type is not None)


def _death(exitcode) -> str:
    if exitcode < 0:  # a signal: the OOM killer, a kill from outside
        return f"a calibration worker process was killed (signal {-exitcode})"
    return (f"a calibration worker process stopped (exit code {exitcode}); from a script, call onnxq under "
            "`if __name__ == '__main__':` (worker processes re-import the main module)")


def stop_claiming(next_image):
    """No process claims another image of the current set (one has failed)."""
    with next_image.get_lock():
        next_image.value = _NO_MORE_IMAGES


def claimed(paths, next_image):
    """The images of `paths` this process claims, one at a time, from the index all processes share."""
    while True:
        with next_image.get_lock():
            i = next_image.value
            next_image.value = i + 1
        if i >= len(paths):
            return
        yield paths[i]


def _worker_main(jobs, results, counted, next_image):
    """A worker process: set Numba up while waiting, then run each job until None arrives."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    from .kernels import warm_up

    warm_up()  # in a thread, while this one imports the rest and the first job's model loads

    def tick(n):
        with counted.get_lock():
            counted.value += n

    while (shard := jobs.get()) is not None:
        try:
            results.put((True, shard.count(next_image, tick)))
        except BaseException as exc:
            stop_claiming(next_image)  # the other processes stop too
            # pickled to the parent: keep only what is sure to travel, the message
            results.put((False, exc if isinstance(exc, OnnxqError) else OnnxqError(f"{type(exc).__name__}: {exc}")))
