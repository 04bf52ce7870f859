"""Running scripts/gpu_check.py's steps within a budget of seconds: each step's commands in a session of their own
with logs under --out, stopped at their timeout, at the budget's end or once a signal came; each step's result
recorded and summary.json rewritten after it."""
from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from gpu_check_plan import ORDER, ROOT, STEPS, Profile  # scripts/, beside this file

BUDGET = "budget: "  # how a step skipped for the budget's sake starts its reason
POLL_S = 0.2  # how often a command's wait looks at its timeout, the budget and the stop flag
STOP_GRACE_S = 3  # from SIGTERM to SIGKILL for a command being stopped
RESERVE_S = STOP_GRACE_S + 2  # the budget's end kept free of commands: stopping the last ones, writing the JSON


@dataclass
class Stop:
    """The signal that cut the check short ("" while none has): set by the handler, read by every command's wait."""
    by: str = ""
    signum: int = 0

    def on_signal(self, signum: int, frame) -> None:
        # A flag only: each wait stops its command within POLL_S, the steps not started are skipped, the JSON follows.
        if not self.by:
            self.by, self.signum = signal.Signals(signum).name, signum


class Failed(Exception):
    """A step's check did not hold; the message says what and where its log is."""


class Skipped(Exception):
    """A step that cannot run here; the message is the reason."""


class Stopped(Exception):
    """A step whose command was stopped midway, at the budget's end or by a signal: the check was cut short."""


class Runner:
    """Steps run within a budget of seconds counted from `started` (time.monotonic()), and their results; the
    check's own steps are gpu_check_steps.Check's."""

    def __init__(self, profile: Profile, out: str, dry: bool, budget_s: float = 420.0, stop: Optional[Stop] = None,
                 about: Optional[dict] = None, started: Optional[float] = None):
        self.p, self.out, self.dry, self.budget = profile, out, dry, budget_s
        self.stop = stop or Stop()
        self.about = about or {}  # the interpreter, torch, CUDA, the device: for the summary
        self.started = time.monotonic() if started is None else started
        self.device = "cpu" if dry else "cuda:0"
        path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH", "")]))  # the project, uninstalled
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
                    "TORCHINDUCTOR_CACHE_DIR": os.path.join(out, "inductor_cache")}  # cold compiles: the worst case
        if dry:  # the CPU even on a machine with a GPU; one thread a process, as the tests run (2 cores, shared)
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.extra_env: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()

    # -- running commands ------------------------------------------------------------------------------------------

    def left(self) -> float:
        """Seconds left for commands: the budget less what has passed and RESERVE_S."""
        return self.started + self.budget - RESERVE_S - time.monotonic()

    def run(self, name: str, args: list[str], nproc: int = 1) -> str:
        """Run a repo command (under torchrun with nproc > 1) with its output in <out>/<name>.out/.err; its stdout,
        or Failed on a non-zero exit or past its timeout, Stopped at the budget's end or once a signal came."""
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                       if nproc > 1 else [])
        log = os.path.join(self.out, name)
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            # A session of its own: stopping it reaches all it started (torchrun's ranks); and a Ctrl-C reaches
            # this process alone, whose handler leaves the stopping to each command's wait.
            proc = subprocess.Popen(launcher + args, cwd=ROOT, env={**self.env, **self.extra_env}, stdout=out,
                                    stderr=err, start_new_session=True)
            code = self.wait(proc, name, log)
        if code != 0:
            raise Failed(f"{name}: exit {code}: {tail(log + '.err')} (log {log}.err)")
        with open(log + ".out") as f:
            return f.read()

    def wait(self, proc: subprocess.Popen, name: str, log: str) -> int:
        """The command's exit code, or it is stopped: past its timeout, at the budget's end, or once a signal has cut
        the check short."""
        start = time.monotonic()
        try:
            while (code := proc.poll()) is None:
                ran = time.monotonic() - start
                if self.stop.by:
                    raise Stopped(f"{name}: stopped after {ran:.0f} s: the check was cut short by {self.stop.by}")
                if ran > self.p.timeout:
                    raise Failed(f"{name}: still running after {self.p.timeout} s, stopped; log {log}.err")
                if self.left() <= 0:
                    raise Stopped(f"{name}: still running at the end of the budget (--budget-s {self.budget:g}) after "
                                  f"{ran:.0f} s, stopped: a hang, or slower than its STEPS entry; log {log}.err")
                time.sleep(POLL_S)
            return code
        except BaseException:
            stop(proc)
            raise

    def dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    # -- the steps -------------------------------------------------------------------------------------------------

    def expected(self, name: str) -> int:
        """The step's expected seconds here (STEPS; 0 for a name it lacks)."""
        return STEPS.get(name, (0, 0))[1 if self.dry else 0]

    def step(self, name: str, fn: Callable[..., dict], *args) -> dict:
        """Run one step unless the check was cut short or the budget's rest cannot hold it; record and print its
        result (ok with its figures, skipped with the reason, failed with the error, stopped) and rewrite
        summary.json."""
        start, need = time.perf_counter(), self.expected(name)
        try:
            if self.stop.by:
                raise Skipped(f"not started: the check was cut short by {self.stop.by}")
            if need > self.left():
                raise Skipped(f"{BUDGET}{max(0.0, self.left()):.0f} s left, step needs about {need} s")
            result = {"status": "ok", **fn(*args)}
        except Skipped as e:
            result = {"status": "skipped", "reason": str(e)}
        except Stopped as e:
            result = {"status": "stopped", "reason": str(e)}
        except Failed as e:
            result = {"status": "failed", "error": str(e)}
        except Exception as e:  # a bug or an unreadable file: this step fails, the others still run
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        result.update(seconds=round(time.perf_counter() - start, 1), expected_s=need)
        line = f"gpu_check: {name} {result['status']} in {result['seconds']} s" + "".join(
            f"; {result[k]}" for k in ("reason", "error") if k in result)
        with self.lock:  # whole lines and whole summaries from concurrent steps
            self.results[name] = result
            print(line, flush=True)
            self.write_summary("running")
        return result

    def concurrently(self, jobs: list[Callable[[], object]]) -> None:
        """Run the jobs a few at a time, in order, each of their commands on one thread, off each other's cores."""
        self.extra_env = {"OMP_NUM_THREADS": "1"}
        with concurrent.futures.ThreadPoolExecutor(self.p.jobs) as pool:  # threads that wait on subprocesses
            for future in [pool.submit(job) for job in jobs]:
                future.result()
        self.extra_env = {}

    def summary(self, state: str) -> dict:
        """The JSON of the check so far: its state, the steps' results in STEPS's order (names outside it after)."""
        names = [n for n in ORDER if n in self.results] + [n for n in self.results if n not in STEPS]
        steps = {n: self.results[n] for n in names}
        return {"gpu_check": state, "failed": [n for n in names if steps[n]["status"] == "failed"],
                "stopped": [n for n in names if steps[n]["status"] == "stopped"],
                "ran": [n for n in names if steps[n]["status"] != "skipped"],
                "skipped_for_budget": [n for n in names if steps[n].get("reason", "").startswith(BUDGET)],
                "cut_short_by": self.stop.by or None, "dry_run": self.dry, "budget_s": self.budget, **self.about,
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - self.started, 1), "out": self.out, "steps": steps}

    def write_summary(self, state: str) -> dict:
        """<out>/summary.json, replaced whole (a reader never sees half of one); the summary written."""
        summary = self.summary(state)
        path = os.path.join(self.out, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(path + ".tmp", path)
        return summary

    def finish(self) -> dict:
        """The last summary, its state "ok" only where no step failed or was stopped."""
        statuses = {r["status"] for r in self.results.values()}
        return self.write_summary("failed" if "failed" in statuses else f"cut short by {self.stop.by}" if self.stop.by
                                  else "cut short by the budget" if "stopped" in statuses else "ok")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's session (torchrun with its ranks, a trainer with its checkpoint writer), SIGKILL
    STOP_GRACE_S later."""
    signal_session(proc, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        signal_session(proc, signal.SIGKILL)
        proc.wait()


def signal_session(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # its process group: the session start_new_session made
    except ProcessLookupError:  # all of it gone already
        pass


def tail(path: str, lines: int = 3) -> str:
    """The last lines of a log, progress-bar redraws left out."""
    with open(path, errors="replace") as f:
        kept = [line.strip() for line in f.read().replace("\r", "\n").splitlines()
                if line.strip() and not line.startswith("epoch ")]
    return " | ".join(kept[-lines:]) or "(no output)"

