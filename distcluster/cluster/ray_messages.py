"""What Ray's nodes publish to the driver, kept off the command's stdout.

A Ray driver runs a thread that prints on stdout every message the cluster publishes to it
(`ray._private.worker.listen_error_messages`), whatever `log_to_driver` says: the raylet's
"N PYTHON worker processes have been started ... maximum expected startup concurrency"
hint among them, which fractional-CPU workers on a small machine trigger in every sweep.
stdout belongs to the command (its result, its JSON), so `route_driver_messages` swaps that
thread for one that sends Ray's tuning hints (NOISE, already in the raylet's own log) to the
`distcluster.ray` logger at DEBUG and every other message (a dead worker, an actor killed
for memory, a node removed) to stderr, formatted and de-duplicated as Ray does.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray._private.worker as ray_worker

NOISE = frozenset({"worker_pool_large"})  # Ray's error types that tell the user nothing to do
logger = logging.getLogger("distcluster.ray")


def route_driver_messages() -> None:
    """Before `ray.init`: the driver's message thread prints none of NOISE and nothing on stdout."""
    ray_worker.listen_error_messages = _listen


def show(message: dict[str, Any]) -> None:
    """One published message: NOISE to the log, the rest to stderr."""
    if message.get("type") in NOISE:
        logger.debug("ray: %s", message["error_message"])
    else:
        ray_worker.print_to_stdstream({"lines": [message["error_message"]], "pid": "raylet", "is_err": True},
                                      ignore_prefix=False)


def _listen(worker: Any, threads_stopped: threading.Event) -> None:
    """Ray's loop (an autoscaler error kept from before, then subscribe, poll, keep this job's
    messages and the cluster's), each one shown."""
    from ray._raylet import JobID

    worker.gcs_error_subscriber.subscribe()
    ours = frozenset([worker.current_job_id.binary(), JobID.nil().binary()])
    try:
        if ray_worker._internal_kv_initialized():  # an autoscaler error from before the subscription
            found = ray_worker._internal_kv_get(ray_worker.ray_constants.DEBUG_AUTOSCALING_ERROR)
            if found is not None:
                show({"type": "autoscaler", "error_message": found.decode()})
        while not threads_stopped.is_set():
            _, message = worker.gcs_error_subscriber.poll()
            if message is not None and message["job_id"] in (None, *ours):
                show(message)
    except (OSError, ConnectionError) as e:
        logger.error("listening to Ray's messages: %s", e)
