"""Latency of a runner: batch-1 timings after warm-up.

random_feed needs static input shapes (every dimension a number): a model with a dynamic
dimension has no single size to time, so it is refused with the input's name.
"""

import time

import numpy as np

from ..errors import OnnxqError


def random_feed(runner, seed=0) -> dict:
    """Uniform 0-1 values for float inputs (zeros for integer/bool inputs) in the runner's static shapes."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name in runner.input_names:
        shape = runner.input_shapes[name]
        if any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
            raise OnnxqError(f"{getattr(runner, 'model_path', 'model')}: input {name!r} has a dynamic shape {shape}; "
                             "benchmarking needs static shapes")
        dtype = np.dtype(getattr(runner, "input_dtypes", {}).get(name, np.float32))
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.random(tuple(shape), dtype=np.float64).astype(dtype)
        else:
            feed[name] = np.zeros(tuple(shape), dtype=dtype)
    return feed


def summarize(times_s) -> dict:
    """median/p90/mean in ms and throughput (1 / mean) of a list of per-call seconds."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "mean_ms": mean,
            "throughput_fps": 1e3 / mean if mean > 0 else float("inf"), "runs": int(ms.size)}


def _timed(runner, feed) -> float:
    t0 = time.perf_counter()
    runner(feed)
    return time.perf_counter() - t0


def measure_many(runners, feeds, warmup=10, runs=50, duration=None) -> list:
    """Time several runners interleaved (A, B, A, B...) so that load drifts hit them alike.

    Runs `runs` rounds, or rounds until `duration` seconds have passed (at least one) when given.
    """
    if warmup < 0 or runs <= 0:
        raise OnnxqError(f"warmup {warmup} / runs {runs}: need warmup >= 0 and runs > 0")
    for _ in range(warmup):
        for runner, feed in zip(runners, feeds):
            runner(feed)
    times = [[] for _ in runners]
    start = time.perf_counter()
    while True:
        for t, runner, feed in zip(times, runners, feeds):
            t.append(_timed(runner, feed))
        done = len(times[0])
        if duration is not None:
            if time.perf_counter() - start >= duration:
                break
        elif done >= runs:
            break
    return [summarize(t) for t in times]


def measure(runner, feed, warmup=10, runs=50, duration=None) -> dict:
    """median_ms, p90_ms, mean_ms, throughput_fps and runs of `runner(feed)` after `warmup` calls."""
    return measure_many([runner], [feed], warmup, runs, duration)[0]


__all__ = ["random_feed", "measure", "measure_many", "summarize"]
