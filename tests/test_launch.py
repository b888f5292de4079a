"""The launcher and its ranks end together: a signalled or killed launcher
leaves no rank running and exits promptly, and a rank that dies fails its
world at once instead of after the world's time limit. Real processes and
real signals; every survivor is killed in teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pycomm.launch import JoinedWorld, LaunchEnvironmentError, WorldFailed, joined_world, run_world

REPO = Path(__file__).resolve().parents[1]
# The launcher imports torch and starts its fork server: slow on a small
# shared machine.
STARTUP_SECONDS = 120.0
# What "promptly" means here: the launcher's grace for its ranks plus slack
# for a loaded machine.
EXIT_SECONDS = 10.0


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return None if fields is None else fields[19]  # field 22, "starttime"


def _alive(pid: int, start_time: str | None) -> bool:
    """The process that had this pid when it was found is running or stopped:
    not gone, not a zombie (an orphan's zombie holds no ports and runs
    nothing) and not a newer process that got the pid."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == start_time


def _wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _interruptible() -> None:
    """SIGINT back to its default in the launcher: a shell runs background
    jobs (a CI step started with `&`, nohup) with SIGINT ignored, children
    inherit that, and Python then installs no KeyboardInterrupt handler, so
    these tests would only measure how the suite was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class Launched:
    """A launcher process, the rank processes it started, and its stderr."""

    launcher: subprocess.Popen
    stderr_path: Path
    rank_start_times: dict[int, str | None] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return list(self.rank_start_times)

    def found_ranks(self, pids: list[int]) -> None:
        self.rank_start_times = {pid: _start_time(pid) for pid in pids}

    def survivors(self) -> list[int]:
        return [pid for pid, start in self.rank_start_times.items() if _alive(pid, start)]

    def wait_launcher(self) -> int | None:
        try:
            return self.launcher.wait(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            return None

    def kill_everything(self) -> None:
        if self.launcher.poll() is None:
            self.launcher.kill()
        for pid in self.survivors():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.launcher.wait()


def _start(
    command: list[str], tmp_path: Path, ready: Callable[[int], list[int] | None]
) -> Launched:
    """Starts the launcher and waits until `ready(launcher pid)` names its ranks."""
    stderr_path = tmp_path / "launcher.stderr"
    with open(stderr_path, "w") as stderr:
        launcher = subprocess.Popen(
            command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
            preexec_fn=_interruptible,
        )
    launched = Launched(launcher, stderr_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and launcher.poll() is None:
        pids = ready(launcher.pid)
        if pids:
            launched.found_ranks(pids)
            return launched
        time.sleep(0.2)
    launched.found_ranks(_children(launcher.pid))
    launched.kill_everything()
    pytest.fail(f"the world did not start: {stderr_path.read_text()[-3000:]}")


def _start_busy_world(tmp_path: Path, *options: str) -> Launched:
    """Two ranks all-reducing in a loop, their pids in files."""

    def rank_pids(launcher_pid: int) -> list[int] | None:
        files = [tmp_path / f"rank{r}.pid" for r in range(2)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        return None

    command = [sys.executable, str(REPO / "tests" / "launch_ranks.py"), str(tmp_path), *options]
    return _start(command, tmp_path, rank_pids)


@pytest.fixture
def busy_world(tmp_path: Path) -> Iterator[Launched]:
    launched = _start_busy_world(tmp_path)
    yield launched
    launched.kill_everything()


@pytest.fixture
def stubborn_world(tmp_path: Path) -> Iterator[Launched]:
    """Ranks that ignore SIGTERM: stopping them takes the launcher's full grace."""
    launched = _start_busy_world(tmp_path, "--ignore-sigterm")
    yield launched
    launched.kill_everything()


def _assert_world_ended(launched: Launched) -> int:
    code = launched.wait_launcher()
    survivors_now = launched.survivors()
    assert code is not None, (
        f"the launcher still runs {EXIT_SECONDS:g} s after the signal; ranks alive: {survivors_now}"
    )
    assert _wait_until(lambda: not launched.survivors(), EXIT_SECONDS), (
        f"ranks {launched.survivors()} outlived the launcher (exit {code})"
    )
    return code


@pytest.mark.timeout(200)
def test_sigterm_to_the_launcher_stops_every_rank(busy_world: Launched) -> None:
    busy_world.launcher.send_signal(signal.SIGTERM)
    code = _assert_world_ended(busy_world)
    assert code == 128 + signal.SIGTERM  # as a shell reports a process SIGTERM ended


@pytest.mark.timeout(200)
def test_sigint_to_the_launcher_stops_every_rank_at_once(busy_world: Launched) -> None:
    signalled = time.monotonic()
    busy_world.launcher.send_signal(signal.SIGINT)
    assert _assert_world_ended(busy_world) == 1
    took = time.monotonic() - signalled
    assert busy_world.stderr_path.read_text().rstrip().endswith("pycomm.launch.WorldInterrupted")
    # Ranks that take SIGTERM end at once: nothing waits for them to finish.
    assert took < 3.0, f"the launcher took {took:.1f} s to stop ranks that were asked to stop"


@pytest.mark.timeout(200)
def test_a_second_sigint_kills_the_ranks_at_once(stubborn_world: Launched) -> None:
    first = time.monotonic()
    stubborn_world.launcher.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the launcher is now waiting for ranks that ignore its SIGTERM
    stubborn_world.launcher.send_signal(signal.SIGINT)
    assert _assert_world_ended(stubborn_world) == 1  # WorldInterrupted, once the ranks are gone
    took = time.monotonic() - first
    assert took < 2.5, f"the launcher took {took:.1f} s: it waited out its grace after the second SIGINT"


@pytest.mark.timeout(200)
def test_ranks_die_with_a_killed_launcher(busy_world: Launched) -> None:
    busy_world.launcher.kill()
    assert _assert_world_ended(busy_world) == -signal.SIGKILL


@pytest.mark.timeout(200)
def test_ranks_stuck_in_native_code_holding_the_gil_die_with_a_killed_launcher(tmp_path: Path) -> None:
    launched = _start_busy_world(tmp_path, "--hold-gil")
    try:
        servers = [pid for pid in _children(launched.launcher.pid) if "forkserver" in _cmdline(pid)]
        assert len(servers) == 1, servers
        launched.found_ranks([*launched.ranks, *servers])
        launched.launcher.kill()
        assert _assert_world_ended(launched) == -signal.SIGKILL
    finally:
        launched.kill_everything()


@pytest.mark.timeout(300)
def test_sigterm_to_the_demo_stops_its_ranks_and_says_so(tmp_path: Path) -> None:
    def training_ranks(launcher_pid: int) -> list[int] | None:
        # Rank 0's progress bar shows once every rank is in the world, training.
        if "training on 2 ranks" not in (tmp_path / "launcher.stderr").read_text():
            return None
        # The ranks are children of the launcher's fork server: it too must end.
        servers = [pid for pid in _children(launcher_pid) if "forkserver" in _cmdline(pid)]
        return [*servers, *(rank for server in servers for rank in _children(server))]

    command = [
        sys.executable, "-m", "pycomm", "demo", "--nproc-per-node", "2", "--steps", "1000000",
        "--out", str(tmp_path / "out"),
    ]
    launched = _start(command, tmp_path, training_ranks)
    try:
        assert len(launched.ranks) == 3, launched.ranks  # the fork server and 2 ranks
        launched.launcher.send_signal(signal.SIGTERM)
        assert _assert_world_ended(launched) == 128 + signal.SIGTERM
        assert "pycomm demo: SIGTERM: every rank was stopped" in launched.stderr_path.read_text()
    finally:
        launched.kill_everything()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.timeout(200)
def test_a_rank_that_dies_fails_the_world_at_once() -> None:
    from launch_ranks import dying_rank

    started = time.monotonic()
    with pytest.raises(WorldFailed) as failed:
        run_world(dying_rank, 2, timeout_seconds=120)
    elapsed = time.monotonic() - started
    assert "rank 1 died" in str(failed.value) and "SIGKILL" in str(failed.value), str(failed.value)
    assert elapsed < 60, f"the launcher waited {elapsed:.0f} s for a dead rank"


def test_ranks_start_in_a_fraction_of_a_torch_import_and_see_their_parents_world_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launch_ranks import environment_rank

    names = ["PYCOMM_TEST_SETTING", "TORCH_DISTRIBUTED_DEBUG"]
    run_world(environment_rank, 2, names)  # the fork server is up from here on
    monkeypatch.setenv("PYCOMM_TEST_SETTING", "set after the first world")
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    seen = run_world(environment_rank, 8, names)
    took = time.monotonic() - started
    for rank in seen:
        assert rank["environ"] == {"PYCOMM_TEST_SETTING": "set after the first world", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
        assert rank["debug_level"] == "DebugLevel.DETAIL"
        assert rank["cwd"] == str(tmp_path)
    assert len({rank["pid"] for rank in seen}) == 8
    # A rank that imports torch itself costs about 2 s of CPU: 8 of them on
    # 2 cores took 10-12 s, against 0.3 s forked from the preloaded server.
    assert took < 6.0, f"an 8-rank world took {took:.1f} s to start and end"
    monkeypatch.delenv("PYCOMM_TEST_SETTING")
    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG")
    assert run_world(environment_rank, 2, names)[1]["environ"] == {"PYCOMM_TEST_SETTING": None, "TORCH_DISTRIBUTED_DEBUG": None}


def test_a_rank_that_finishes_first_leaves_the_worlds_store_to_the_others() -> None:
    from launch_ranks import late_rank

    assert run_world(late_rank, 3, timeout_seconds=60) == [[], [1, 1], [2, 1]]


_PRELOADING_LAUNCHER = """
import logging, os, sys
sys.path.insert(0, {tests!r})
logging.basicConfig(level=logging.WARNING)
from pycomm.launch import preload_in_ranks, run_world
from launch_ranks import preload_report
preload_in_ranks("preload_broken", "preload_probe")
reports = run_world(preload_report, 2)
assert all(r["probe_imported_by"] != r["pid"] for r in reports), reports  # by the server
assert all(r["probe_imported_by"] == reports[0]["probe_imported_by"] for r in reports), reports
assert all(r["set_on_import"] == "by the server's import" for r in reports), reports
print("worlds run")
"""


def test_a_preloaded_module_that_fails_to_import_leaves_the_worlds_running() -> None:
    code = _PRELOADING_LAUNCHER.format(tests=str(REPO / "tests"))
    env = _env()
    # The server imports with its own sys.path (PYTHONPATH), not the launcher's.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worlds run" in result.stdout
    assert "the fork server could not import preload_broken" in result.stderr
    assert "RuntimeError: this module cannot be imported here" in result.stderr


TORCHRUN_ENV = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_the_launchers_environment_describes_the_world_to_join() -> None:
    assert joined_world(TORCHRUN_ENV) == JoinedWorld(
        rank=3, world_size=4, local_rank=1, master_addr="node0", master_port=29500
    )
    assert joined_world({}) is None
    assert joined_world({"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}) is None  # no rank: spawn


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"LOCAL_RANK": ""}, "LOCAL_RANK not set"),
        ({"RANK": "4"}, "need 0 <= RANK < WORLD_SIZE"),
        ({"WORLD_SIZE": "four"}, "must be integers"),
    ],
)
def test_a_partial_or_impossible_world_is_an_error(change: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchEnvironmentError, match=message):
        joined_world({**TORCHRUN_ENV, **change})
