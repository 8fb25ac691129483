"""Calibration driver: run the float model over images, stream statistics.

The tensors to observe become extra graph outputs of one onnxruntime session.
Each batch's activations are folded into fixed-size histograms and dropped,
so memory does not grow with the number of images. Images are decoded in
background threads (onnxq.images.iter_batches) while the model runs, and the
histogram update of batch k runs in a thread (Numba releases the GIL) while
onnxruntime computes batch k+1. With `workers > 1` processes claim the
images one at a time (onnxq.workers); the power-of-two histogram grid makes the
merged statistics identical to one worker's.
"""

import ctypes
import functools
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxqError, first_line
from .images import image_bar, iter_batches, unreadable_error
from .preprocess import Preprocess
from .stats import Stats
from .workers import Workers, claimed, cores, started


def model_with_outputs(model: onnx.ModelProto, tensors) -> onnx.ModelProto:
    """A copy of the model whose outputs are exactly `tensors`, without the nodes none of them needs.

    Calibration observes the tensors to quantize, so the head's float output convs and the decode tail
    need not run: on yolov8n that is the DFL Softmax and 10% of the run. Nodes holding subgraphs may
    read any tensor of the outer graph, so with such a node nothing is pruned.
    """
    tensors = list(dict.fromkeys(tensors))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for node in graph.node for a in node.attribute)
    if not subgraphs:
        producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
        keep, todo = set(), [t for t in tensors if t in producer]
        while todo:
            i = producer.get(todo.pop())
            if i is None or i in keep:
                continue
            keep.add(i)
            todo.extend(t for t in graph.node[i].input if t)
        nodes = [node for i, node in enumerate(graph.node) if i in keep]
        used = {t for node in nodes for t in node.input} | set(tensors)
        inits = [init for init in graph.initializer if init.name in used]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(inits)
    typed = {vi.name: vi for vi in (*graph.value_info, *graph.input, *graph.output)}
    outputs = [onnx.ValueInfoProto(name=t, type=typed[t].type) if t in typed else
               onnx.helper.make_empty_tensor_value_info(t) for t in tensors]
    del graph.output[:]
    graph.output.extend(outputs)
    return out


@functools.lru_cache(maxsize=None)  # once per process
def _exact_growth_arena() -> bool:
    """Register a CPU arena that grows by what is asked rather than to the next power of two.

    onnxruntime hands its outputs to numpy without a copy, so each batch's activations stay in its arena
    while the statistics thread folds them and the next batch runs. A doubling arena fragments under that
    pattern and kept growing with the number of images (yolov5n: peak RSS +6% from 32 to 512 images);
    growing by the request keeps it within 3% and 80 MB lower, at the same speed (measured).
    """
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
        return True
    except Exception:  # an onnxruntime without shared allocators: each session keeps its own arena
        return False


def give_memory_back():
    """Return the activations' memory to the OS once calibration (and bias correction) is over.

    The shared arena outlives every session and keeps its peak (yolov5n: about 1 GB after one calibration,
    more after the next), which a script that quantizes model after model would carry. A run with arena
    shrinkage frees its wholly free regions, and malloc_trim hands the freed heap back (glibc only).
    """
    # (cache_info: only where a session registered the arena; asking _exact_growth_arena() would register it)
    if _exact_growth_arena.cache_info().currsize and _exact_growth_arena():
        h = onnx.helper
        one = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
        tiny = h.make_model(h.make_graph([h.make_node("Neg", ["x"], ["y"])], "shrink", one[:1], one[1:]),
                            opset_imports=[h.make_opsetid("", 13)], ir_version=8)
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        make_session(tiny, threads=1).run(None, {"x": np.zeros(1, np.float32)}, shrink)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def make_session(model: onnx.ModelProto, threads=None):
    """The session calibration (and bias correction, compare, the Hessians) runs a model in memory with."""
    from .backends.ort.runner import create_session, session_options

    # fatal only: a failing run reaches the user as one line (OnnxqError), not a log too
    opts = session_options(threads, log_severity=4)
    if _exact_growth_arena():
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return create_session(model, opts, "the model")


def split_threads(threads: int) -> tuple:
    """(concurrent runs, onnxruntime threads per run) for `threads` cores.

    Two runs of one thread each beat one run of two threads over the same images: a run's operators
    synchronize their threads at every node, and the statistics thread beside them stalls that
    barrier; two independent runs only share the cores (yolov5n, 128 images: measured). Two runs at
    most: each holds a batch's activations.
    """
    threads = max(1, int(threads))
    runs = 2 if threads >= 2 else 1
    return runs, max(1, threads // runs)


def run_concurrently(work, batches, runs):
    """Yield (batch, future of work(batch)), `runs` at a time, as each finishes.

    For onnxruntime runs: it releases the GIL, and one session may run from several threads at once,
    sharing its weights and arena."""
    with ThreadPoolExecutor(max_workers=runs, thread_name_prefix="onnxq-run") as pool:
        running = {}
        for batch in batches:
            if len(running) >= runs:
                for done in wait(running, return_when=FIRST_COMPLETED).done:
                    yield running.pop(done), done
            running[pool.submit(work, batch)] = batch
        for done in as_completed(list(running)):
            yield running.pop(done), done


def _run_shard(model, inputs, tensors, paths, pp: Preprocess, batch_size, threads, stats, progress_cb, decode_threads,
               channel_tensors=(), minmax_only=()):
    runs, per_run = split_threads(threads or cores())
    session = make_session(model_with_outputs(model, tensors), per_run)
    pending = queue.Queue(maxsize=1)  # bounded: one batch folding, one waiting, `runs` being computed
    failure = []

    def fold():
        while True:
            item = pending.get()
            if item is None:
                return
            try:
                for i, name in enumerate(tensors):
                    value, item[i] = item[i], None  # back to onnxruntime's arena once folded, not with the batch
                    stats.observe(name, value, histogram=name not in minmax_only)
                    if name in channel_tensors:
                        stats.observe_channels(name, value)
                    del value
            except BaseException as exc:  # surfaced in the main thread
                failure.append(exc)

    worker = threading.Thread(target=fold, daemon=True)
    worker.start()
    skipped = []
    batches = finished = None
    try:
        batches = iter_batches(paths, inputs.hw, pp, batch_size=batch_size, threads=decode_threads,
                               on_skip=lambda p, why: skipped.append((p, why)), require_readable=False)
        # the statistics do not depend on the order batches fold in (see kernels.histogram)
        finished = run_concurrently(lambda b: session.run(tensors, inputs.feed(b.images)), batches, runs)
        for batch, done in finished:
            try:
                outs = done.result()
            except Exception as exc:
                raise OnnxqError(f"onnxruntime failed during calibration on {batch.paths[0]}: "
                                 f"{first_line(exc)}") from exc
            if failure:
                raise failure[0]
            pending.put([inputs.real_rows(v, len(batch.images)) for v in outs])
            stats.num_images += len(batch.paths)
            if progress_cb:
                progress_cb(len(batch.paths))
    finally:
        if finished is not None:  # on an error: wait for the runs in flight, stop the image decoders
            finished.close()
        if batches is not None:
            batches.close()
        pending.put(None)
        worker.join()
    if failure:
        raise failure[0]
    stats.skipped += len(skipped)
    return skipped


@dataclass
class Shard:
    """What a process needs to count the images it claims from `paths` (pickled to the workers)."""

    model_bytes: bytes
    inputs: object  # model.ModelInputs
    tensors: list
    paths: list
    preprocess: dict
    model_hash: str
    batch_size: int
    threads: int  # cores for this process's runs
    channel_tensors: frozenset
    minmax_only: frozenset

    def count(self, next_image, tick, model=None, decode_threads=1):
        """(Stats, skipped) of the images claimed through `next_image`; tick(n) after each batch."""
        model = onnx.load_from_string(self.model_bytes) if model is None else model
        stats = Stats(self.model_hash, self.preprocess, self.inputs.hw, extras_digest=self.inputs.extras_digest())
        skipped = _run_shard(model, self.inputs, self.tensors, claimed(self.paths, next_image),
                             Preprocess.from_dict(self.preprocess), self.batch_size, self.threads, stats, tick,
                             decode_threads=decode_threads, channel_tensors=self.channel_tensors,
                             minmax_only=self.minmax_only)
        return stats, skipped


def merge_shards(results, paths):
    """One (Stats, skipped) from every process's, the skipped images in the order of `paths`."""
    stats, skipped = results[0][0], list(results[0][1])
    for s, sk in results[1:]:
        stats = stats.merge(s)
        skipped.extend(sk)
    order = {Path(p): i for i, p in enumerate(paths)}  # as a process reports them
    return stats, sorted(skipped, key=lambda item: order.get(Path(item[0]), len(order)))


def calibrate(model, inputs, tensors, paths, pp: Preprocess, model_hash, batch_size=None, workers=1,
              threads=None, progress=True, on_skip=None, channel_tensors=(), minmax_only=()) -> Stats:
    """Statistics of `tensors` over the images at `paths`.

    Per-channel maxima are kept for `channel_tensors`; `minmax_only` tensors keep no histogram.
    """
    channel_tensors = frozenset(channel_tensors)
    minmax_only = frozenset(minmax_only)
    tensors = list(tensors)
    batch_size = inputs.batch_size(batch_size)
    if not isinstance(workers, Workers):
        with started(min(int(workers), len(paths)), per_core=False) as started_workers:
            return calibrate(model, inputs, tensors, paths, pp, model_hash, batch_size=batch_size,
                             workers=started_workers,
                             threads=threads, progress=progress, on_skip=on_skip, channel_tensors=channel_tensors,
                             minmax_only=minmax_only)
    bar = image_bar(len(paths), "calibrating", progress)
    try:
        if workers.count == 1:
            stats = Stats(model_hash, pp.to_dict(), inputs.hw, extras_digest=inputs.extras_digest())
            skipped = _run_shard(model, inputs, tensors, paths, pp, batch_size, threads, stats, bar.update,
                                 decode_threads=2, channel_tensors=channel_tensors, minmax_only=minmax_only)
        else:
            stats, skipped = _calibrate_parallel(model, inputs, tensors, paths, pp, model_hash, batch_size,
                                                 workers, threads, bar, channel_tensors, minmax_only)
    finally:
        bar.close()
    for path, why in skipped:
        if on_skip:
            on_skip(path, why)
    if stats.num_images == 0:  # checked over all shards: one shard may hold only unreadable files
        path, why = skipped[0] if skipped else (paths[0], "unreadable")
        raise unreadable_error(paths, f"{path}: {why}")
    return stats


def _calibrate_parallel(model, inputs, tensors, paths, pp, model_hash, batch_size, workers: Workers, threads, bar,
                        channel_tensors, minmax_only):
    """This process and the workers claim the images one by one, each with its share of the cores."""
    shard = Shard(model.SerializeToString(), inputs, tensors, paths, pp.to_dict(), model_hash, batch_size,
                  threads or max(1, cores() // workers.count), channel_tensors, minmax_only)
    seen = 0

    def tick(n=0):  # this process's images, and the workers' counted so far
        nonlocal seen
        now = workers.counted.value
        bar.update(n + now - seen)
        seen = now

    results = workers.run(shard, lambda: shard.count(workers.next_image, tick, model=model), tick)
    return merge_shards(results, paths)
