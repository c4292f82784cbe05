"""torchrun restarts (`--max-restarts`) on a store that keeps the killed processes' keys (issue 19).

torchrun's agent hosts one TCPStore for the whole job and every restart reuses it, so the process groups of a
restarted job must not read the addresses that the killed processes published there (docs/RESUMING.md).

How often a restart resumes cleanly, the killed-worker cases N times in a row, here or on an older checkout's run.py:

    RESTART_REPEATS=20 python -m pytest -q -rA tests/test_restarts.py -k rank1-after-checkpoint
    RESTART_REPEATS=20 RESTART_HANG_AFTER=120 RESTART_REPO=/tmp/old-checkout python -m pytest -q -rA \\
        tests/test_restarts.py -k killed

A run not ended `RESTART_HANG_AFTER` seconds (240) after the kill fails as a hang; `--durations=0` lists each run's time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simclr.dist import StartError, attempt_token

REPO = Path(os.environ.get("RESTART_REPO") or Path(__file__).resolve().parents[1]).resolve()  # whose run.py runs
REPEATS = int(os.environ.get("RESTART_REPEATS") or 1)  # each killed-worker case, this many times
HANG_AFTER = float(os.environ.get("RESTART_HANG_AFTER") or 240)  # seconds after the kill


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_attempt_token_is_agreed_and_never_an_earlier_starts():
    """Both ranks return the same token although the store still holds a finished start's hello/ack/done keys."""
    store = dist.HashStore()
    first_start = {}

    def start(name: str) -> None:
        for rank in (0, 1):
            threading.Thread(target=lambda r=rank: first_start.setdefault((name, r), attempt_token(store, r, 2))).start()

    start("first")
    deadline = time.monotonic() + 10
    while len(first_start) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    first = first_start[("first", 0)]
    assert first_start[("first", 1)] == first
    # the second start: rank 1 comes first and finds the first start's keys (its echo, rank 0's answer)
    results = {}
    one = threading.Thread(target=lambda: results.setdefault(1, attempt_token(store, 1, 2)))
    one.start()
    time.sleep(0.2)  # rank 1 polls the old ack/1 (the first start's nonce and token) meanwhile
    results[0] = attempt_token(store, 0, 2)
    one.join(10)
    assert results[0] == results[1] != first


def test_attempt_token_gives_up_with_one_clear_line():
    """A peer that never comes ends the start with StartError (exit 1, so torchrun may restart), not a hang."""
    with pytest.raises(StartError, match=r"rank 0: ranks \[1\] did not answer within 0 s"):
        attempt_token(dist.HashStore(), 0, 2, timeout=timedelta(seconds=0.2))
    with pytest.raises(StartError, match="rank 1: rank 0 did not answer"):
        attempt_token(dist.HashStore(), 1, 2, timeout=timedelta(seconds=0.2))


def _worker(rank: int, port: int, delay: float, out) -> None:
    """One process of a start: joins through simclr.dist (as run.py does), then makes the stop vote's group."""
    from simclr.dist import DistInfo, StopVote, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    time.sleep(delay)
    try:
        info = init_distributed("cpu")
        StopVote(DistInfo(info.rank, 2, info.rank, info.device))  # a second gloo group, as RunGuard makes
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)
        out.put((rank, value.item()))
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _start(port: int, delays: tuple[float, float]) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, delays[r], out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
    return results


@pytest.mark.slow
def test_a_restarted_start_on_the_same_store_connects():
    """As torchrun's agent does, one store serves two starts. In the second, rank 0 joins 2 s before rank 1 and
    reads rank 1's key first: without a per-start prefix it read the dead rank 1's address from the first start
    ("Connection refused" as it connects; the restart is lost)."""
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the agent's, outlives both
    assert _start(port, (0.0, 0.0)) == {0: 3.0, 1: 3.0}
    assert _start(port, (0.0, 2.0)) == {0: 3.0, 1: 3.0}
    del store


# --- the command, end to end under torchrun, with a worker SIGKILLed -------------------------------------

def _command(run_dir: Path, script: str = "run.py", restarts: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", str(REPO / script), "dataset.name=digits", "device=cpu", "epochs=3",
            "batch_size=64", "dataset.input_shape=(32,32,3)", "dataset.num_workers=0", "seed=3",
            "fine_tune_from=None", "final_eval=false", "eval_every_n_epochs=1", f"run_dir={run_dir}", "resume=auto"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "FAULT_PAUSE": "2",
            "FAULT_PAUSE_ON": "validate"}


def _workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes now."""
    found = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        found.update({int(kv[5:]): int(pid) for kv in env if kv.startswith(b"RANK=")})
    return found


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The command once, with nothing killed: the reference every restarted run must equal."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(_command(run_dir, restarts=0), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    return run_dir


def _killed_run(run_dir: Path, rank: int, when: str, timeout: float = HANG_AFTER) -> str:
    """Run the command, SIGKILL worker `rank` when `when` happens; torchrun's output once it ends (<= `timeout` s)."""
    script = "tests/fault_runner.py" if when == "validate" else "run.py"  # prints @@validate as validation starts
    launcher = subprocess.Popen(_command(run_dir, script), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(launcher.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        # after the first checkpoint: at once, or as the second epoch's validation starts
        while not ((run_dir / "checkpoints" / "last.pt").exists()
                   and (when == "checkpoint" or sum(line.startswith("@@validate") for line in lines) >= 3)):
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        os.kill(_workers(launcher)[rank], signal.SIGKILL)
        launcher.wait(timeout=timeout)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            reader.join(5)
            pytest.fail("the restarted run hung:\n" + "".join(lines)[-3000:])
    reader.join(5)
    out = "".join(lines)
    assert launcher.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("repeat", range(REPEATS), ids=lambda i: f"run{i + 1}")
@pytest.mark.parametrize("rank, when", [(1, "checkpoint"), (0, "checkpoint"), (1, "validate")],
                         ids=["rank1-after-checkpoint", "rank0-lock-holder", "rank1-in-validation"])
def test_torchrun_restart_after_a_killed_worker_resumes_and_matches_a_straight_run(tmp_path, straight_run, rank,
                                                                                   when, repeat):
    run_dir = tmp_path / "run"
    out = _killed_run(run_dir, rank, when)
    assert "resuming from" in out and "after epoch" in out
    straight = _weights(straight_run)
    restarted = _weights(run_dir)
    assert straight.keys() == restarted.keys()
    assert all(torch.equal(straight[k], restarted[k]) for k in straight)


def test_restart_repeats_runs_each_killed_worker_case_that_many_times():
    """RESTART_REPEATS=N collects each killed-worker case N times (the loop that measured the issue-19 fix)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__))], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RESTART_REPEATS": "3"})
    killed = [line for line in done.stdout.splitlines() if "matches_a_straight_run[" in line]
    assert done.returncode == 0 and len(killed) == 9, done.stdout[-2000:]
    assert sum(line.endswith("-run3]") for line in killed) == 3
