"""A world spawned here: `world_size` processes on 127.0.0.1, each running
the function as one rank, and every rank's result collected by the process
that spawned them.

A spawned world ends with the process that spawned it. SIGINT or SIGTERM
stops every rank before that process exits (a second signal kills them at
once), ranks die with a parent that is killed or crashes, a rank that dies
fails the world at once, and every wait is bounded, so a stuck rank is an
error, not a hang.

Ranks are forked from multiprocessing's fork server, started once per process
with torch.distributed and pycomm imported: a rank starts in tens of
milliseconds instead of importing torch again (about 2 s of CPU each, 10 s
for an 8-rank world on 2 cores). Like a spawned rank, a rank takes the
environment, working directory and sys.path its parent has when the world
starts, and imports the function's module itself; unlike one, the modules
the server preloaded were imported with the server's environment and
sys.path, and its standard output and error are those the process had when
the server started (its first world)."""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.forkserver
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable

import torch.distributed as dist

from pycomm.launch import fork_server
from pycomm.launch.device import bind_device
from pycomm.launch.errors import WorldFailed, WorldInterrupted, WorldTerminated

logger = logging.getLogger(__name__)

# Ranks that have reported exit on their own; past this they are stopped.
_EXIT_GRACE_SECONDS = 5.0
# Between asking ranks to stop (SIGTERM) and killing them (SIGKILL).
_STOP_GRACE_SECONDS = 3.0
# How often the parent looks at its ranks and at signals while it waits.
_POLL_SECONDS = 0.2
# A rank that exited may still have its result in the queue's pipe.
_DRAIN_SECONDS = 0.5
# What the fork server imports once, so that no rank imports it again.
# Forking after importing torch (no CUDA initialized, no thread pool started)
# is what torch's DataLoader workers do by default on Linux. fork_server comes
# last: it arms the server's parent-death signal and imports what
# preload_in_ranks asked for.
_SERVER_MODULES = ["torch.distributed", "pycomm", "pycomm.launch.fork_server"]
_asked_modules: list[str] = []
# The environment the fork server started with; None until it started.
_server_environ: dict[str, str] | None = None
_server_lock = threading.Lock()


def preload_in_ranks(*modules: str) -> None:
    """Has the fork server import `modules` too when it starts, so ranks find
    them imported (Megatron-Core's parallel_state costs a rank about 6 s of
    CPU otherwise). Takes effect only before the process's first spawned
    world: the server imports once. A module that starts threads or
    initializes CUDA when imported must not be preloaded: a process forked
    from the server would inherit a lock held by a thread that does not exist
    in it, or a CUDA context it cannot use. A module that fails to import is
    logged by the server and left for the ranks to import."""
    with _server_lock:
        if _server_environ is not None:
            logger.warning("preload_in_ranks(%s) after the first world: the ranks import them themselves", modules)
            return
        _asked_modules.extend(m for m in modules if m not in _asked_modules)


def _start_fork_server(ctx: Any) -> dict[str, str]:
    """Starts the fork server (once per process; multiprocessing starts it
    again if it died) and returns the environment it started with."""
    global _server_environ
    with _server_lock:
        if _server_environ is None:
            ctx.set_forkserver_preload(_SERVER_MODULES)
            _server_environ = dict(os.environ)
            os.environ[fork_server.MODULES_VARIABLE] = ",".join(_asked_modules)
            # The kernel's parent-death signal follows the thread that started
            # the server: only the main thread lives as long as the process.
            if threading.current_thread() is threading.main_thread():
                os.environ[fork_server.PARENT_VARIABLE] = str(os.getpid())
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                os.environ.pop(fork_server.MODULES_VARIABLE, None)
                os.environ.pop(fork_server.PARENT_VARIABLE, None)
        return _server_environ


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a store another process
    will serve (another process may take it first: prefer a store bound to
    port 0, as run_world's is)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple[Any, ...],
    results: "mp.Queue[tuple[int, bool, Any]]",
    timeout_seconds: float,
    environ_changes: tuple[dict[str, str], list[str]],
) -> None:
    _end_with_parent()
    _take_environment(*environ_changes)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        timeout = datetime.timedelta(seconds=timeout_seconds)
        dist.init_process_group(
            backend,
            store=dist.TCPStore("127.0.0.1", port, world_size, False, timeout=timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=bind_device(backend, rank),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def _environment_changes(server_environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """What this process's environment set and removed since the fork
    server started with `server_environ`: what a rank takes."""
    changed = {name: value for name, value in os.environ.items() if server_environ.get(name) != value}
    return changed, sorted(server_environ.keys() - os.environ.keys())


def _take_environment(changed: dict[str, str], removed: list[str]) -> None:
    """The parent's environment when it started the world, not the fork
    server's from when that started: what the parent set or removed since (a
    test's PYCOMM_DEBUG, TORCH_DISTRIBUTED_DEBUG) is set or removed here, as
    a spawned rank would have it, while what the server's own imports set
    stays. torch.distributed read its debug level when the server imported
    it, so it reads it again. Variables that a module reads when it is
    imported keep the server's values for the modules it preloaded."""
    for name in removed:
        os.environ.pop(name, None)
    os.environ.update(changed)
    if changed or removed:
        dist.set_debug_level_from_env()


def _end_with_parent() -> None:
    """A rank must not outlive its parent: nobody would stop it or read its
    result, and it would go on training with its ports open. Stopping is the
    parent's call, so SIGINT (a Ctrl-C reaches the whole process group) is
    ignored here and SIGTERM ends the rank at once.

    The rank's process parent is the fork server, which the kernel kills when
    the parent ends; the rank is tied to the server the same way. Besides (a
    server started from another thread than the main one is not tied, and
    other kernels have no parent-death signal), a thread waits on the pipe
    multiprocessing hands the rank, which reaches end-of-file when the parent
    is gone (`multiprocessing.parent_process().sentinel`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = mp.parent_process()
    if parent is None:
        return
    fork_server.end_with_parent_process(os.getppid())
    if not parent.is_alive():  # the parent died before the rank got here
        os._exit(1)
    threading.Thread(
        target=_exit_when_parent_ends, args=(parent.sentinel,), name="pycomm-parent-watch", daemon=True
    ).start()


def _exit_when_parent_ends(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


class _SignalLog:
    """While a spawned world runs, SIGINT and SIGTERM only record themselves:
    the parent then stops its ranks and raises, and a signal during that
    clean-up makes it kill them at once. Raising from the handler could land
    inside the clean-up and leave ranks running while interpreter exit waits
    for them forever."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Takes over SIGINT and SIGTERM where they have their default
        actions and this is the main thread (the only one Python delivers
        signals to); a handler the program set itself stays."""
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum, default in defaults.items():
                if signal.getsignal(signum) is default:
                    previous[signum] = signal.signal(signum, self)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def raise_first(self) -> None:
        if not self.received:
            return
        first = self.received[0]
        logger.info("%s: every rank was stopped", signal.Signals(first).name)
        if first == signal.SIGINT:
            raise WorldInterrupted
        raise WorldTerminated


def _living(procs: Sequence[mp.process.BaseProcess]) -> list[mp.process.BaseProcess]:
    return [p for p in procs if p.exitcode is None]


def _join_until(procs: Sequence[mp.process.BaseProcess], deadline: float, stop_early: Callable[[], bool]) -> None:
    while _living(procs) and time.monotonic() < deadline and not stop_early():
        for p in _living(procs):
            p.join(timeout=_POLL_SECONDS / len(procs))


def _stop_ranks(procs: Sequence[mp.process.BaseProcess], signals: _SignalLog, exit_grace: float) -> None:
    """Lets ranks exit on their own for `exit_grace` seconds, asks the rest to
    stop (SIGTERM), then kills whatever is left (SIGKILL). A signal that
    arrives meanwhile cuts every wait short."""
    signals_before = len(signals.received)

    def signalled() -> bool:
        return len(signals.received) > signals_before

    _join_until(procs, time.monotonic() + exit_grace, signalled)
    for p in _living(procs):
        p.terminate()
    _join_until(procs, time.monotonic() + _STOP_GRACE_SECONDS, signalled)
    for p in _living(procs):
        logger.warning("rank process %d did not stop within %g s; killing it", p.pid, _STOP_GRACE_SECONDS)
        p.kill()
    for p in procs:
        p.join(timeout=_STOP_GRACE_SECONDS)


def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _drain(results: "mp.Queue[tuple[int, bool, Any]]", values: dict[int, Any], failures: dict[int, str]) -> None:
    while True:
        try:
            rank, ok, value = results.get(timeout=_DRAIN_SECONDS)
        except queue.Empty:
            return
        (values if ok else failures)[rank] = value


def _host_store(timeout_seconds: float) -> dist.TCPStore:
    """The world's store, served by this process as torchrun's agent serves
    its ranks' one: a rank that finishes first (rank 0 included) can exit
    while the others still create groups through the store, and the port is
    the one the store bound, not a free one picked earlier that another
    process may take meanwhile."""
    return dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout_seconds), wait_for_workers=False
    )


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_seconds: float = 120.0,
    allow_dead: frozenset[int] = frozenset(),
) -> list[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` spawned ranks inside an
    initialized torch.distributed world and returns the values by rank.

    `fn` must be importable (a module-level function). Ranks in `allow_dead`
    may exit without a result (they get None); any other rank that does fails
    the world at once. Raises WorldFailed with every failing rank's traceback,
    WorldInterrupted on SIGINT and WorldTerminated on SIGTERM, in each case
    after every rank has ended.
    """
    ctx = mp.get_context("forkserver")
    environ_changes = _environment_changes(_start_fork_server(ctx))
    results: "mp.Queue[tuple[int, bool, Any]]" = ctx.Queue()
    store_host = _host_store(timeout_seconds)
    port = store_host.port
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, backend, args, results, timeout_seconds, environ_changes),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    started: list[mp.process.BaseProcess] = []
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    died: set[int] = set()
    signals = _SignalLog()
    with signals.installed():
        try:
            for p in procs:
                p.start()
                started.append(p)
            died = _collect(procs, results, values, failures, allow_dead, timeout_seconds, signals)
        finally:
            # Ranks that reported get a moment to exit on their own; a world
            # cut short (signal, death, time limit, error here) is stopped now.
            reported = values.keys() | failures.keys()
            everyone_reported = all(r in reported for r, p in enumerate(started) if p.exitcode is None)
            exit_grace = _EXIT_GRACE_SECONDS if everyone_reported and not signals.received else 0.0
            _stop_ranks(started, signals, exit_grace)
            del store_host  # every rank has ended: the store's port and thread go now
    signals.raise_first()
    missing = [r for r in range(world_size) if r not in values and r not in failures and r not in allow_dead]
    if failures or missing:
        raise WorldFailed(_failure_text(failures, missing, died, procs, timeout_seconds))
    return [values.get(r) for r in range(world_size)]


def _collect(
    procs: Sequence[mp.process.BaseProcess],
    results: "mp.Queue[tuple[int, bool, Any]]",
    values: dict[int, Any],
    failures: dict[int, str],
    allow_dead: frozenset[int],
    timeout_seconds: float,
    signals: _SignalLog,
) -> set[int]:
    """Fills values and failures until every rank reported, a rank not in
    `allow_dead` died without reporting, time ran out or a signal came.
    Returns the ranks that died without reporting."""
    deadline = time.monotonic() + timeout_seconds
    pending = set(range(len(procs)))
    while pending and not signals.received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return set()
        try:
            rank, ok, value = results.get(timeout=min(remaining, _POLL_SECONDS))
        except queue.Empty:
            if not any(procs[r].exitcode is not None for r in pending):
                continue
            _drain(results, values, failures)
            pending -= values.keys() | failures.keys()
            died = {r for r in pending if procs[r].exitcode is not None}
            if died - allow_dead:
                return died
            pending -= died
            continue
        (values if ok else failures)[rank] = value
        pending.discard(rank)
    return set()


def _failure_text(
    failures: dict[int, str],
    missing: list[int],
    died: set[int],
    procs: Sequence[mp.process.BaseProcess],
    timeout_seconds: float,
) -> str:
    parts = [f"rank {r} raised:\n{tb}" for r, tb in sorted(failures.items())]
    for r in sorted(died & set(missing)):
        parts.append(f"rank {r} died without a result ({_exit_text(procs[r].exitcode)})")
    silent = [r for r in missing if r not in died]
    if silent and died:
        parts.append(f"ranks {silent} were stopped when a rank died")
    elif silent:
        parts.append(
            f"ranks {silent} returned nothing within {timeout_seconds:g} s "
            f"({', '.join(_exit_text(procs[r].exitcode) for r in silent)})"
        )
    return "\n".join(parts)
