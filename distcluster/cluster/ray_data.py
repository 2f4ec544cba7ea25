"""Ray Data, ordered and quiet: prepare's decoding spread over a Ray cluster's nodes, and the
settings predict's actors share with it.

`decoded_on_cluster` runs prepare's decode and resize (data.beton_writer.FitRange) as Ray Data
tasks of up to CHUNK images each, spread over the nodes, and yields their columns in order to
the one .beton writer on this machine, which only encodes and writes. Every node must see the images at
the same path (shared storage), as every training worker must see the .beton.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from functools import partial

import numpy as np
import ray

from distcluster.cluster.ray_train import init_ray, share_cpus
from distcluster.data.beton_writer import FitRange

CHUNK = 256  # images one decode task fits, at most: a small pile is cut finer (chunk_size)


def ordered_quiet_data() -> None:
    """Ray Data hands batches back in the dataset's order, without its progress bars and
    per-operator lines (the commands draw their own bar; stdout is theirs)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # and its warning that progress bars are off, as they are here on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def decoded_on_cluster(decoders: int, nodes: Counter) -> partial:
    """A data.beton_writer.Decoder running `decoders` tasks at once on the Ray cluster (RAY_ADDRESS,
    else a local instance, joined now); `nodes` counts the images each node decoded."""
    init_ray()  # before FFCV's writer forks its processes
    return partial(_decoded_in_order, decoders=decoders, nodes=nodes)


def _decoded_in_order(fit: FitRange, count: int, decoders: int,
                      nodes: Counter) -> Iterator[dict[str, np.ndarray]]:
    ordered_quiet_data()
    cpus = share_cpus(ray.cluster_resources().get("CPU", 1), decoders)
    chunk = chunk_size(count, decoders)
    starts = [{"start": start} for start in range(0, count, chunk)]
    # The chunk starts come from the driver: no read task waits for a CPU the decoders hold.
    chunks = ray.data.from_items(starts, override_num_blocks=len(starts))
    fit_chunk = partial(_fit_chunk, fit=fit, count=count, chunk=chunk)
    columns = chunks.map_batches(fit_chunk, batch_size=1, num_cpus=cpus,
                                 concurrency=min(decoders, len(starts)), scheduling_strategy="SPREAD")
    for batch in columns.iter_batches(batch_size=None, batch_format="numpy"):
        nodes.update(batch.pop("node").tolist())
        yield batch


def chunk_size(count: int, decoders: int) -> int:
    """Images a task fits: CHUNK, or fewer so that every decoder gets about 4 tasks (at least 16)."""
    return max(16, min(CHUNK, count // (4 * decoders)))


def _fit_chunk(batch: dict[str, np.ndarray], fit: FitRange, count: int, chunk: int) -> dict[str, np.ndarray]:
    start = int(batch["start"][0])
    columns = fit(start, min(start + chunk, count))
    columns["node"] = np.full(len(columns["position"]), ray.get_runtime_context().get_node_id())
    return columns
