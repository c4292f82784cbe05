"""How often a torchrun restart after a SIGKILLed worker resumes cleanly: the issue-19 command, N times in a row.

    python -m bench.restart_loop --runs 20                        # rank 1 killed after the first checkpoint
    python -m bench.restart_loop --runs 10 --kill-rank 0 --when validate --repo /tmp/old-checkout

Each run is tests/test_restarts.py's (torchrun, 2 processes, `--max-restarts=2`, 3 epochs of digits on the CPU,
`resume=auto`); it passes when torchrun exits 0, the log shows the resume and the final weights equal a straight
run's. A run not ended `--hang-after` seconds after the kill is a hang. Prints a JSON line per run and a count.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import startup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kill-rank", type=int, choices=(0, 1), default=1)
    parser.add_argument("--when", choices=("checkpoint", "validate"), default="checkpoint")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose run.py is launched (default: this one)")
    parser.add_argument("--hang-after", type=float, default=240, help="seconds after the kill that count as a hang")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    startup.exit_if_torch_is_broken()  # a mismatched torch/torchvision pair: one line, not a traceback
    import torch

    import tests.test_restarts as restarts

    restarts.REPO = args.repo.resolve()  # the helpers read it at each call
    work = Path(tempfile.mkdtemp(prefix="restart_loop_"))
    done = subprocess.run(restarts._command(work / "straight", restarts=0), cwd=restarts.REPO, env=restarts._env(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: the straight run failed (exit {done.returncode}): {done.stderr.strip()[-300:]}",
              file=sys.stderr)
        return startup.EXIT_ERROR
    reference, passed = restarts._weights(work / "straight"), 0
    for i in range(args.runs):
        run_dir, start = work / f"run{i}", time.monotonic()
        try:
            out = restarts._killed_run(run_dir, args.kill_rank, args.when, timeout=args.hang_after)
            weights = restarts._weights(run_dir)
            same = all(torch.equal(reference[k], weights[k]) for k in reference)
            verdict = "pass" if "resuming from" in out and same else "finished, but not equal to the straight run"
        except BaseException as err:  # noqa: BLE001 - pytest.fail raises a BaseException (hang or exit != 0)
            text = str(err).strip()
            verdict = "hang" if "hung" in text else f"failed: {text.splitlines()[-1][:200] if text else err!r}"
        passed += verdict == "pass"
        print(json.dumps({"run": i, "verdict": verdict, "seconds": round(time.monotonic() - start, 1)}), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{passed}/{args.runs} passed (kill rank {args.kill_rank} at {args.when}, {restarts.REPO})")
    shutil.rmtree(work, ignore_errors=True)
    return startup.EXIT_OK if passed == args.runs else startup.EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
