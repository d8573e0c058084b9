"""Time to a result: seeds of one dataset trained together through dac.py's own train(), evaluations included.

    python bench/time_to_result.py [dac.py flags] [--modes in-turn background] [--eval-length full|policy]
    python bench/time_to_result.py --dataset hopper_medium_1m.hdf5 --modes in-turn background   # before / after

Trains --seeds (default 0 1 2 3) of --env (default hopper-medium-v2) on one device exactly as `dac.py --seeds` does,
on the 1M-step schedule, stopped at --stop-at (default 60,000) with an evaluation every --eval-every (default
20,000) steps; any other dac.py flag is passed on. Without --dataset the data are synthetic: random arrays of the
task's shapes in D4RL's layout (--synthetic-rows of them), written to a temporary file. Each mode trains afresh:
`in-turn` evaluates the runs one after another between training windows (dac.py without the fast path on CUDA),
`background` evaluates them in a thread while training goes on (dac.py's fast path on CUDA); the default is the
one dac.py uses on the device.

With --eval-length full (the default) an episode ends only at the 1000-step time limit, never by falling, so each
evaluation costs what a trained policy's does (a short run's policies fall early); `policy` keeps the task as it
is. The first window (compiling, loading) and first evaluation are start-up; figures come from the rest: the
aggregate training rate between evaluations, the seconds each round of evaluations keeps training waiting, their
share of the wall time, and the projected wall time of the runs over 1M (and 2M) steps. Prints a table and writes
JSON. Timings only: nothing here asserts a speed.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dac  # noqa: E402

BENCH_DEFAULTS = {"--seeds": ["0", "1", "2", "3"], "--steps": ["1000000"], "--stop-at": ["60000"],
                  "--eval-every": ["20000"]}  # dac.py flags, unless given
PROJECTIONS = [(1_000_000, 20_000), (1_000_000, 10_000), (2_000_000, 10_000)]  # (steps per run, eval every)


def projection_name(runs: int, steps: int, every: int) -> str:
    return f"projected_min_{runs}x{steps // 1_000_000}M_every_{every // 1000}k"


def synthetic_dataset(path: Path, env: str, rows: int) -> Path:
    """Random data of `env`'s shapes in D4RL's layout: the speed of training does not depend on the values."""
    obs_dim, act_dim = dac.task_dims(env)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(rows, obs_dim)).astype(np.float32)
        f["next_observations"] = rng.normal(size=(rows, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(rows, act_dim)).astype(np.float32)
        f["rewards"] = rng.normal(size=rows).astype(np.float32)
        f["terminals"] = rng.random(rows) < 0.001
        f["timeouts"] = np.zeros(rows, bool)
    return path


MAKE_EVAL_ENVS = dac.make_eval_envs


def full_length_eval_envs(env: str, n: int):
    """dac.make_eval_envs, except that Hopper and Walker2d episodes end only at the time limit (Gymnasium's
    terminate_when_unhealthy=False): 1000 steps each, as a policy that does not fall. Others are unchanged."""
    import gymnasium as gym

    family = dac.family_of(env)
    if family not in ("hopper", "walker2d"):
        return MAKE_EVAL_ENVS(env, n)
    return gym.make_vec(dac.TASKS[family][0], num_envs=n, vectorization_mode="sync", terminate_when_unhealthy=False)


class Clock:
    """Wraps dac's evaluation entry points to time each round of evaluations in the training thread, as [start,
    end, seconds of it spent waiting for the background thread]; and, in any thread, the episodes (dac.evaluate)
    and each background round (the thread's work)."""

    def __init__(self, runs_per_round: int):
        self.runs_per_round, self.rounds, self.episodes, self.busy = runs_per_round, [], [], []
        self.calls = 0

    def patch(self) -> None:
        evaluate, in_turn = dac.evaluate, dac.Run.evaluate_and_save
        start, wait, thread = (dac.BackgroundEvaluation.start, dac.BackgroundEvaluation.wait,
                               dac.BackgroundEvaluation.evaluate_in_turn)
        clock = self

        def timed_evaluate(*args, **kwargs):
            tic = time.perf_counter()
            result = evaluate(*args, **kwargs)
            clock.episodes.append(time.perf_counter() - tic)
            return result

        def timed_in_turn(run, envs):
            tic = time.perf_counter()
            row = in_turn(run, envs)
            if clock.calls % clock.runs_per_round == 0:
                clock.rounds.append([tic, None, 0.0])
            clock.rounds[-1][1] = time.perf_counter()
            clock.calls += 1
            return row

        def timed_start(background):
            clock.rounds.append([time.perf_counter(), None, 0.0])
            start(background)
            clock.rounds[-1][1] = time.perf_counter()

        def timed_wait(background):  # in start (for the previous round), and after the last window
            tic = time.perf_counter()
            wait(background)
            clock.rounds[-1][2] += time.perf_counter() - tic
            if clock.rounds[-1][1] is not None:  # after the last window: part of the last round
                clock.rounds[-1][1] = time.perf_counter()

        def timed_thread(background, jobs):
            tic = time.perf_counter()
            thread(background, jobs)
            clock.busy.append(time.perf_counter() - tic)

        dac.evaluate, dac.Run.evaluate_and_save = timed_evaluate, timed_in_turn
        dac.BackgroundEvaluation.start, dac.BackgroundEvaluation.wait = timed_start, timed_wait
        dac.BackgroundEvaluation.evaluate_in_turn = timed_thread


def measure(cfgs: list, device: torch.device, mode: str, eval_length: str, work: Path) -> dict:
    """Train the runs of `cfgs` with train() in `mode` and time them; returns the figures and the raw rounds."""
    originals = (dac.evaluate, dac.Run.evaluate_and_save, dac.BackgroundEvaluation.start,
                 dac.BackgroundEvaluation.wait, dac.BackgroundEvaluation.evaluate_in_turn, dac.make_eval_envs,
                 dac.evaluates_in_background)
    runs, _ = dac.plan_runs([dataclasses.replace(cfg, out=str(work / mode)) for cfg in cfgs])
    every, stop = runs[0].eval_every, runs[0].stop_at or runs[0].steps
    if stop % every or stop < 3 * every:
        raise SystemExit(f"--stop-at ({stop}) must be a multiple of --eval-every ({every}), at least 3 times it: the "
                         f"first evaluation is start-up, the last is not overlapped by training")
    clock = Clock(len(runs))
    clock.patch()
    dac.evaluates_in_background = lambda cfg, dev: mode == "background"
    if eval_length == "full":
        dac.make_eval_envs = full_length_eval_envs
    try:
        entered = time.perf_counter()
        dac.train(runs, device)
    finally:
        (dac.evaluate, dac.Run.evaluate_and_save, dac.BackgroundEvaluation.start, dac.BackgroundEvaluation.wait,
         dac.BackgroundEvaluation.evaluate_in_turn, dac.make_eval_envs, dac.evaluates_in_background) = originals
    rounds = clock.rounds
    assert len(rounds) == stop // every, rounds
    windows = [a - b_prev for (a, _, _), (_, b_prev, _) in zip(rounds[1:], rounds[:-1])]  # training in between
    stalls = [b - a for a, b, _ in rounds]  # training waits this long at each round
    own = [b - a - waited for a, b, waited in rounds]  # ... of which the training thread's own work
    steps_per_window = every * len(runs)
    train_rate = steps_per_window * len(windows) / sum(windows)
    steady_wall = rounds[-1][1] - rounds[0][1]
    episodes_per_round = [sum(clock.episodes[i:i + len(runs)]) for i in range(0, len(clock.episodes), len(runs))]
    result = {
        "mode": mode, "runs": len(runs), "eval_every": every, "steps_per_run": stop,
        "eval_episodes": runs[0].eval_episodes, "eval_length": eval_length,
        "start_up_s": round(rounds[0][1] - entered, 1),
        "train_steps_per_sec": round(train_rate, 1),
        "steps_per_sec_with_eval": round(steps_per_window * len(windows) / steady_wall, 1),
        "eval_stall_s_per_round": round(float(np.mean(stalls[1:])), 3),
        "eval_share_of_wall": round(sum(stalls[1:]) / steady_wall, 4),
        "eval_own_s_per_round": round(float(np.mean(own[1:])), 3),
        "eval_thread_s_per_round": round(float(np.mean(clock.busy[1:])), 3) if clock.busy else 0.0,
        "eval_episodes_s_per_round": round(float(np.mean(episodes_per_round[1:])), 3),
        "raw": {"rounds": rounds, "episodes": clock.episodes, "busy": clock.busy, "entered": entered},
    }
    for steps, every_ in PROJECTIONS:
        result[projection_name(len(runs), steps, every_)] = round(project(result, steps, every_) / 60, 1)
    return result


def project(r: dict, steps: int, every: int) -> float:
    """Seconds for r['runs'] runs of `steps` steps evaluated every `every` steps, start-up excluded: training at the
    measured rate, and at each evaluation the training thread's own measured work, plus, in the background mode,
    the time by which the evaluation thread outlasts the next window (all of it after the last window)."""
    window = r["runs"] * every / r["train_steps_per_sec"]
    thread = r["eval_thread_s_per_round"]
    rounds = steps // every
    return (r["runs"] * steps / r["train_steps_per_sec"] + rounds * r["eval_own_s_per_round"]
            + (rounds - 1) * max(0.0, thread - window) + thread)


def machine(device: torch.device) -> dict:
    try:
        cpus = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")]
    except OSError:
        cpus = []
    info = {"cpu": cpus[0] if cpus else platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to dac.py (see "
                                "`python dac.py --help`); defaults here: " + " ".join(
                                    " ".join([flag, *values]) for flag, values in BENCH_DEFAULTS.items()))
    p.add_argument("--modes", nargs="+", choices=["in-turn", "background"],
                   help="how evaluations run, each mode trained afresh in this one call (default: dac.py's choice "
                        "for the device: background on CUDA with the fast path, in-turn otherwise)")
    p.add_argument("--eval-length", choices=["full", "policy"], default="full",
                   help="full: episodes end only at the 1000-step limit, as a trained policy's; policy: as the "
                        "policy plays them (default: full)")
    p.add_argument("--synthetic-rows", type=int, default=1_000_000,
                   help="rows of synthetic data without --dataset (default: 1,000,000, hopper-medium's size)")
    p.add_argument("--work", default="", help="folder for the runs' outputs (default: a temporary folder)")
    p.add_argument("--json", default="runs/bench/time_to_result.json",
                   help="where the JSON results go (default: runs/bench/time_to_result.json; runs/ is git-ignored)")
    args, rest = p.parse_known_args()
    given = {arg.split("=")[0] for arg in rest}
    defaults = [word for flag, values in BENCH_DEFAULTS.items() if flag not in given for word in (flag, *values)]
    try:
        cfgs, _ = dac.parse_config(defaults + rest)
        if len(cfgs) > 1:
            raise dac.UserError("give one --env: this benchmark trains the seeds of one dataset")
        cuda = torch.cuda.is_available() if cfgs[0].device == "auto" else cfgs[0].device == "cuda"
        device = torch.device("cuda" if cuda else "cpu")
        modes = args.modes or ["background" if dac.evaluates_in_background(cfgs[0], device) else "in-turn"]
        with tempfile.TemporaryDirectory() as tmp:
            work, synthetic = Path(args.work or tmp), not cfgs[0].dataset
            if synthetic:
                data = synthetic_dataset(Path(tmp) / "synthetic.hdf5", cfgs[0].env, args.synthetic_rows)
                cfgs = [dataclasses.replace(cfgs[0], dataset=[str(data)])]
            results = []
            for mode in modes:
                torch._dynamo.reset()  # the previous mode's compiled code holds its agents
                gc.collect()
                results.append(measure(cfgs, device, mode, args.eval_length, work))
    except dac.UserError as e:
        raise SystemExit(f"error: {e}") from None

    info = {**machine(device), "env": cfgs[0].env, "fast": cfgs[0].fast, "bf16": cfgs[0].bf16,
            "data": f"synthetic, {args.synthetic_rows} rows" if synthetic else cfgs[0].dataset}
    print(f"\n{json.dumps(info)}")
    n = results[0]["runs"]
    columns = ["mode", "train_steps_per_sec", "steps_per_sec_with_eval", "eval_stall_s_per_round",
               "eval_share_of_wall", "eval_own_s_per_round", "eval_thread_s_per_round", "eval_episodes_s_per_round",
               "start_up_s", *[projection_name(n, steps, every) for steps, every in PROJECTIONS]]
    print(f"{n} runs x {results[0]['steps_per_run']} steps, evaluation every {results[0]['eval_every']} steps, "
          f"{results[0]['eval_episodes']} episodes ({args.eval_length} length); figures after the first window:")
    for column in columns:
        print(f"  {column:<36}" + "".join(f"{r[column]!s:>14}" for r in results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
