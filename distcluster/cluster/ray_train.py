"""Ray Train wiring: a TorchTrainer whose workers run distcluster.engine.loop.train_loop.

The only Ray lines are here: resources, the worker entry point, checkpoints
reported with `ray.train.report`, restarts, resuming, and the workers' output, which
the driver prints itself (one line per event, in order: see WORKER_LABEL).

Failures: `FailureConfig(max_failures)` restarts the worker group when a
worker dies; the new group resumes from the newest checkpoint that verifies,
among the one Ray offers and the run's checkpoint folders in storage. Running
the driver again with the same run name and storage folder resumes the same
way (Ray may not have recorded the last checkpoints of a killed driver, but
they are on disk, each with its hash). A small `RunMonitor` actor records each worker-group
start (time, epoch, size: restarts and resizes come from it) and carries a divergence message
back to the driver, because a diverged run should end, not be retried.

Elastic groups (`min_workers` > 0): `ScalingConfig(num_workers=(min, max))`. A lost node fails
the group like a dead worker; Ray restarts it with as many workers as the live nodes hold
(at least min), and every `resize_check_seconds` restarts it larger when nodes have joined.
Each start resumes as above; the loop takes its world size from Ray, so shards and each
worker's share of the global batch follow.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distcluster.cluster.ray_messages import route_driver_messages
from distcluster.cluster.run_monitor import RunMonitor
from distcluster.common.errors import ResumeRefused, RunFailed, Terminated, UserError
from distcluster.config import Config, from_dict
from distcluster.data.sources import open_source
from distcluster.engine.build import WorkerContext, set_cpu_speedups
from distcluster.engine.checkpoint import (
    KEEP_CHECKPOINTS,
    agreed_resume_state,
    newest_valid_checkpoint,
    save_checkpoint,
)
from distcluster.engine.loop import EpochReport, train_loop
from distcluster.tracking.runs import RunTracker

# Forwarded to Ray workers when set (the test-only NaN and pause hooks, MLflow client settings, and the
# cluster's address: Ray Train's placement-group cleaner looks its cluster up by RAY_ADDRESS, or
# else by the newest one on the machine, which may be another).
# Ray Train's controller takes the workers' reports when it polls them, every 2 s by default,
# and a worker's next report waits until then: with short epochs (0.3 s on digits) the poll set
# the pace (8 epochs of 512 digits: 10.5 s from the first epoch line to the last; 2.3 s at
# 0.25 s). Polling every 0.25 s costs a few actor calls a second. Ray's own variable.
CONTROLLER_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
FORWARDED_ENV = ("DISTCLUSTER_TEST_NAN_STEPS", "DISTCLUSTER_TEST_PAUSE_AFTER_EPOCH",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "DISTCLUSTER_CACHE",
                 "RAY_ADDRESS", CONTROLLER_POLL[0])
JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what `ray job submit` gives its entrypoint


@dataclass
class RayRun:
    """Where a Ray Train run left its checkpoints, and each start of its worker group."""

    checkpoint_dirs: list[Path]  # the newest first
    starts: list[dict[str, Any]]  # {"time", "epoch" it resumed at, "workers"}, in order


def init_ray() -> None:
    """Join RAY_ADDRESS when set (as under `ray job submit`), else start a local instance.
    What Ray's processes write stays in Ray's logs (`log_to_driver` off: training relays its
    workers' lines itself, the other commands need none), and so do the hints Ray's nodes
    publish to the driver (ray_messages): the command's stdout is its own."""
    if ray.is_initialized():
        return
    use_fast_controller_poll(os.environ)
    route_driver_messages()
    env = ray_env(os.environ)
    runtime_env = {"env_vars": env} if env else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        # Ray's own logging would print "Connecting to existing Ray cluster" lines on stderr,
        # before a later one-line error.
        ray.init(address=address, configure_logging=False, runtime_env=runtime_env, log_to_driver=False)
    else:  # never join whatever a stale address file points at
        # Ray announces on stderr that the instance it starts for us has token auth (the safe
        # default): noise that would break a later one-line error.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        _own_ray_temp_dir()
        ray.init(address="local", configure_logging=False, runtime_env=runtime_env, log_to_driver=False)
    _end_on_sigterm()


def _end_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does, its clean-up included (the local instance's
    processes and temp folder): Ray's core worker replaces the handler ray.init sets with one
    that ends the process on the spot."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def ray_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The FORWARDED_ENV variables `environ` sets, for every Ray process of the run, less those
    the runtime env of a submitted job sets already (they reach every process of the job, and
    Ray refuses to merge a variable named twice)."""
    job = json.loads(environ.get(JOB_CONFIG) or "{}")
    set_by_job = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: environ[k] for k in FORWARDED_ENV if k in environ and k not in set_by_job}


def use_fast_controller_poll(environ: MutableMapping[str, str]) -> None:
    """CONTROLLER_POLL in `environ`, unless the user chose a value: seconds > 0."""
    name, default = CONTROLLER_POLL
    value = environ.setdefault(name, default)
    try:
        valid = 0 < float(value) < math.inf
    except ValueError:
        valid = False
    if not valid:
        raise UserError(f"{name} must be a number of seconds > 0, got {value!r}")


def _own_ray_temp_dir() -> None:
    """A temp folder of its own for the local instance (unless RAY_TMPDIR names one): its
    processes inherit it, so Ray's helpers that look "the newest cluster on this machine" up
    (Ray Train's placement-group cleaner) find this one, not another process's instance. It is
    removed at exit."""
    if "RAY_TMPDIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="dc-ray-", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = folder

    def remove() -> None:
        ray.shutdown()  # its processes gone first (shutting down twice is harmless)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)


def release_placement_groups() -> int:
    """Remove the placement groups this job created that still reserve resources; returns how
    many. For a Tune sweep once every trial has ended: Tune kills the trials it stops, and Ray
    Train's cleaner can miss such a trial's worker group (seen after `tune --space digits-smoke`:
    0.75 CPU still reserved when the sweep had ended, and the next job on the cluster waited for
    ever)."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    try:  # Ray's state API answers through the dashboard, which a cluster may run without
        reserved = list_placement_groups(filters=[("creator_job_id", "=", job), ("state", "!=", "REMOVED")])
        for group in reserved:  # pending ones too: they would take CPUs as they free up
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
    except Exception as exc:  # noqa: BLE001 - a clean-up must not hide the sweep's own outcome
        print(f"warning: cannot release this job's placement groups: {exc}", file=sys.stderr)
        return 0
    return len(reserved)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Stop within seconds, in one line, when RAY_ADDRESS names a host and port that do not
    answer (Ray itself retries for minutes). `auto` and addresses without a port are left
    to Ray."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: "
                        f"{exc.strerror or exc}") from None


def warn_if_oversubscribed(cfg: Config, resources: dict[str, float],
                           warn: Callable[[str], object] = print) -> None:
    """More workers than the cluster's GPUs (with --gpu) or CPUs: they would share them and
    run slower than fewer workers would (or, for GPUs, wait for ever). An elastic group only
    needs room for its smallest size: below that it waits for nodes."""
    kind = "GPU" if cfg.gpu else "CPU"
    have = resources.get(kind, 0.0)
    if cfg.elastic:
        need = cfg.min_workers * (1 if cfg.gpu else cpus_per_worker(cfg, resources))
        if need > have:
            warn(f"warning: the smallest group, {cfg.min_workers} workers, needs {need:g} {kind}s and "
                 f"the cluster has {have:g}: training waits until nodes join")
        return
    if cfg.workers > have:
        warn(f"warning: {cfg.workers} workers on a cluster with {have:g} {kind}s: "
             f"{'they wait for GPUs that are not there' if cfg.gpu else 'each gets a fraction of a CPU'}; "
             f"use --workers {max(1, int(have))} or fewer")


def cpus_per_worker(cfg: Config, resources: dict[str, float], offered: float = 0.0) -> float:
    """CPUs for each worker: cfg.cpus_per_worker when set, else `offered` (a sweep's share for
    each trial's workers) or the cluster's CPUs shared among the workers (share_cpus: one worker
    on a 2-core laptop gets 1.5, two get 0.75 each). Workers of an elastic group hold whole CPUs
    (Ray counts how many fit on each node by whole division), as many as the share leaves each."""
    if cfg.cpus_per_worker:
        return cfg.cpus_per_worker
    total = resources.get("CPU", 1.0)
    if cfg.elastic:
        return max(1.0, float(int(offered or total / cfg.workers)))
    return offered or share_cpus(total, cfg.workers)


def share_cpus(total: float, workers: int) -> float:
    """CPUs for each of `workers` workers on a cluster of `total`, half a core kept for Ray."""
    return round(max(0.1, (total - 0.5) / workers), 3)


def worker_threads(cpus: float) -> int:
    """Torch (and FFCV) threads of a worker holding `cpus` CPUs."""
    return max(1, math.ceil(cpus - 1e-6))


class _RayReporter:
    def __init__(self, rank: int, tracking: dict[str, str]) -> None:
        self.tracker = RunTracker(tracking["uri"], tracking["run_id"]) if rank == 0 else None

    def epoch_end(self, report: EpochReport) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(report.metrics, step=report.epoch + 1)
        metrics = {**report.metrics, "epoch": report.epoch + 1}
        # Every rank reports on the same epochs (checkpoint or evaluation), so reports stay in
        # step; evaluated epochs reach Ray Tune's schedulers through TuneReportCallback.
        if not report.save and not report.evaluated:
            return
        if report.checkpoint is None or not report.save:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(report.checkpoint(), Path(folder))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _resume_state(run_dir: Path, earlier: list[Path]) -> dict[str, Any] | None:
    """The newest verified checkpoint rank 0 sees, on every rank: among the one Ray offers
    (after a worker-group restart, or when Ray restored its list from storage), every
    checkpoint folder of this run on disk (a driver killed before Ray recorded its latest
    ones) and `earlier` (the run's checkpoints from before it used Ray). Damaged ones are
    passed over."""

    def newest() -> dict[str, Any] | None:
        folders = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()] + earlier
        offered = ray.train.get_checkpoint()
        with offered.as_directory() if offered else contextlib.nullcontext() as folder:
            found = newest_valid_checkpoint(folders + ([Path(folder)] if folder else []))
        if found:
            print(f"resuming from epoch {found[0]['epoch']} ({found[1].name})", flush=True)
        return found[0] if found else None

    return agreed_resume_state(newest)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    # Ray Train 2.60 logs a line per report per rank through loggers named by file
    # path, which its own log-level filter misses; quiet them at the root. (Its print, which
    # also logs each line at INFO through the root logger, so prints only once.)
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    with _output_to_driver(loop_config["output"], f"rank {rank} of {size}"):
        _train(loop_config, rank, size)


def _train(loop_config: dict[str, Any], rank: int, size: int) -> None:
    monitor = loop_config["monitor"]
    torch.set_num_threads(loop_config["threads"])
    set_cpu_speedups()
    cfg = from_dict(loop_config["config"])
    source = open_source(loop_config["data"], cfg.max_samples, loop_config["threads"])
    ctx = WorkerContext(rank, size, ray.train.torch.get_device())
    start = _resume_state(Path(loop_config["run_dir"]), [Path(p) for p in loop_config["earlier"]])
    reporter = _RayReporter(rank, loop_config["tracking"])
    if rank == 0:
        epoch = start["epoch"] if start else 0
        print(f"training on {ctx.world_size} worker{'s' if ctx.world_size > 1 else ''} from epoch {epoch}",
              flush=True)
        ray.get(monitor.started.remote(epoch, ctx.world_size))
        reporter.tracker.log_metrics({"train/workers": ctx.world_size}, step=epoch)
    try:
        train_loop(cfg, source, ctx, reporter, start=start)
    except RunFailed as exc:  # every rank sees it alike (a divergence at the same step, a
        if rank == 0:         # torch.compile failure of the same graph): the run ends, no retry
            ray.get(monitor.diverged.remote(str(exc)))
    except ResumeRefused as exc:  # the same on every rank (the state is rank 0's, broadcast)
        if rank == 0:
            ray.get(monitor.refused.remote(str(exc)))


# A worker's lines reach the user through the driver, not through Ray's log forwarding
# (`log_to_driver`), which printed them with faults: every line once per Ray node on the worker's
# machine (each node's log monitor reads the one session folder), the lines of all but one rank
# held back by Ray's de-duplication (rank 1's "done" came after the summary, at Ray's shutdown),
# and Ray's own internal errors (core_worker.cc) among them. Ray's logs keep all of it.
WORKER_LABEL = "RayTrainWorker"  # the prefix Ray itself gives these lines: (RayTrainWorker pid=N)


class _DriverStream(io.TextIOBase):
    """A worker's stdout or stderr while it trains: each whole line is put in the driver's
    `queue` (the put returns once the line is there), and all of it still goes to the stream it
    replaces, the worker's log file in Ray's logs."""

    def __init__(self, stream: TextIO, queue: Any, source: tuple[int, str], is_err: bool) -> None:
        super().__init__()
        self.stream, self.queue, self.source, self.is_err = stream, queue, source, is_err
        self.partial = ""
        self.lock = threading.Lock()  # lines of two threads stay whole and in order

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def write(self, text: str) -> int:
        self.stream.write(text)
        with self.lock:
            *lines, self.partial = (self.partial + text).split("\n")
            for line in lines:
                self._send(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def finish(self) -> None:
        """Send a last line left without its newline."""
        with self.lock:
            if self.partial:
                self._send(self.partial)
            self.partial = ""

    def _send(self, line: str) -> None:
        with contextlib.suppress(ray.exceptions.RayError):  # the driver is gone: the log has it
            self.queue.put((self.source, self.is_err, line))


@contextlib.contextmanager
def _output_to_driver(queue: Any, who: str) -> Iterator[None]:
    """While the worker trains, its lines go to the driver that prints them (_DriverStream);
    an error that ends its training is said there too, in one line, whether Ray restarts the
    group or the run fails. `queue` None: left to Ray (a Tune trial's workers)."""
    if queue is None:
        yield
        return
    source = (os.getpid(), ray.util.get_node_ip_address())
    replaced = sys.stdout, sys.stderr
    streams = [_DriverStream(stream, queue, source, is_err) for is_err, stream in enumerate(replaced)]
    sys.stdout, sys.stderr = streams
    try:
        yield
    except Exception as exc:
        said = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"{who} stopped: {type(exc).__name__}: {said}", file=sys.stderr, flush=True)
        raise
    finally:
        for stream in streams:
            stream.finish()
        sys.stdout, sys.stderr = replaced


@contextlib.contextmanager
def _printed_worker_output(here: NodeAffinitySchedulingStrategy) -> Iterator[Any]:
    """The queue (an actor placed `here`, on the driver's node) that the workers' lines go to; a thread
    prints them here as they come, `(RayTrainWorker pid=N) line`, each once, on stdout or stderr
    as the worker wrote them. All of them are printed when the block ends: a worker's put
    returns once its line is queued, and fit returns after the workers' last lines. None (Ray's
    forwarding left on) when this process is itself a Ray worker: a Tune trial, whose workers'
    lines its driver shows."""
    if ray.get_runtime_context().get_actor_id() is not None:
        yield None
        return
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    driver_ip = ray.util.get_node_ip_address()
    ended = threading.Event()

    def relay() -> None:
        with contextlib.suppress(ray.exceptions.RayError):  # Ray is going down (Ctrl-C)
            while (waiting := queue.qsize()) or not ended.is_set():
                if not waiting:
                    ended.wait(0.25)
                    continue
                for (pid, ip), is_err, line in queue.get_nowait_batch(waiting):
                    where = f"pid={pid}" if ip == driver_ip else f"pid={pid}, ip={ip}"
                    print(f"({WORKER_LABEL} {where}) {line}", file=sys.stderr if is_err else sys.stdout,
                          flush=True)

    thread = threading.Thread(target=relay, name="distcluster-worker-output", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        ended.set()
        thread.join(timeout=10)
        with contextlib.suppress(ray.exceptions.RayError):
            queue.shutdown(force=True)


def _trainer(cfg: Config, loop_config: dict[str, Any], cpus: float, storage: Path, name: str,
             callbacks: tuple) -> TorchTrainer:
    return TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.workers) if cfg.elastic else cfg.workers, use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cpus}, elastic_resize_monitor_interval_s=cfg.resize_check_seconds),
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             callbacks=list(callbacks),
                             # Ray's INFO lines (one per report per rank) would drown the epochs.
                             logging_config=ray.LoggingConfig(log_level="WARNING")),
    )


@contextlib.contextmanager
def _interrupt_watch() -> Iterator[Callable[[], None]]:
    """A function raising KeyboardInterrupt once SIGINT (Ctrl-C) has arrived, Terminated once
    SIGTERM has. Ray Train puts its own SIGINT handler in place during fit (it aborts the run
    and the process then exits 1) and turns what a handler raises into its own exceptions, so
    the signals are seen through the wakeup file descriptor, which any handler leaves intact."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write)
    seen: set[int] = set()

    def raise_if_stopped() -> None:
        with contextlib.suppress(BlockingIOError):
            seen.update(os.read(read, 4096))
        if signal.SIGTERM in seen:
            raise Terminated
        if signal.SIGINT in seen:
            raise KeyboardInterrupt

    try:
        yield raise_if_stopped
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def fit(cfg: Config, data: str, tracking: dict[str, str], storage: Path, name: str,
        callbacks: tuple = (), offered_cpus: float = 0.0, earlier: Sequence[Path] = ()) -> RayRun:
    """Train on Ray workers; `data` is what sources.resolve_data returned for cfg.data.
    `callbacks`: Ray Train UserCallbacks (Tune's TuneReportCallback in a sweep); `offered_cpus`:
    each worker's share of the cluster when others run beside it (see cpus_per_worker);
    `earlier`: checkpoints of this run written without Ray, to resume from when newer."""
    init_ray()
    resources = ray.cluster_resources()
    warn_if_oversubscribed(cfg, resources)
    cpus = cpus_per_worker(cfg, resources, offered_cpus)
    # On the driver's node, as Ray Train's controller: it must outlive any other node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    monitor = RunMonitor.options(scheduling_strategy=here).remote()
    loop_config = {"config": cfg.to_dict(), "data": data, "tracking": tracking, "monitor": monitor,
                   "threads": worker_threads(cpus), "run_dir": str(storage.resolve() / name),
                   "earlier": [str(p.resolve()) for p in earlier]}
    with _printed_worker_output(here) as output, _interrupt_watch() as raise_if_stopped:
        trainer = _trainer(cfg, {**loop_config, "output": output}, cpus, storage, name, callbacks)
        try:
            result = trainer.fit()
        except BaseException:
            raise_if_stopped()  # Ray ends its own way on a signal; say it as --workers 0 does
            raise
        raise_if_stopped()
    starts, failure, mistake = ray.get(monitor.summary.remote())
    if mistake:
        raise UserError(mistake)
    if failure:
        raise RunFailed(failure)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    latest = Path(result.checkpoint.path)
    older = [p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p != latest]
    return RayRun([latest, *older], starts)
