"""Throughput benchmark for dac.py: gradient steps/s (eager vs fast), acting latency, evaluation time, memory.

    python bench/throughput.py [--devices cpu cuda] [--modes eager fast] [--precisions fp32 bf16]
                               [--seeds 2 4 8] [--batch-multiples 2 4 8] [--out runs/bench/throughput.json]

Shapes are the paper's defaults (B=256, H=10, N=10, N_a=10, T=5, hidden 256) at hopper (S=11, A=3) and
walker2d (S=17, A=6) sizes, on random data resident on the device. With `--precisions fp32 bf16` each row is
measured in float32 and then with dac.py's --bf16, in this one call, and each bf16 row gives its steps/s as a
multiple of the float32 row's (vs_fp32). Prints a table and writes JSON.
"""

import argparse
import gc
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dac  # noqa: E402

SHAPES = {"hopper": (11, 3), "walker2d": (17, 6)}
BATCH = dac.Config().batch_size  # the paper's 256


def random_data(obs_dim, act_dim, device, n=100_000):
    rng = np.random.default_rng(0)
    d = {"observations": rng.normal(size=(n, obs_dim)), "next_observations": rng.normal(size=(n, obs_dim)),
         "actions": rng.uniform(-1, 1, size=(n, act_dim)), "rewards": rng.normal(size=n),
         "terminals": (rng.random(n) < 0.01)}
    return dac.DeviceData({k: v.astype(np.float32) for k, v in d.items()}, device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_per_sec(device, shape, fast, seeds=1, seconds=3.0, warmup=5, batch_size=BATCH, bf16=False):
    """Aggregate gradient steps/s of `seeds` independent agents trained in lock-step, as `dac.py --seeds` does
    (with bf16, as `dac.py --bf16` trains them)."""
    cfg = dac.Config(fast=fast, steps=2_000_000, batch_size=batch_size, bf16=bf16)
    data = random_data(*shape, device)
    agents = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        agents.append(dac.DAC(dac.dataclasses.replace(cfg, seed=seed), *shape, device))
    metric_sums = [{name: torch.zeros((), device=device) for name in dac.Metrics._fields} for _ in agents]
    if fast:
        round_ = dac.make_fast_step(agents, [data] * seeds, metric_sums, device)
    else:
        def round_():
            for agent, sums in zip(agents, metric_sums):
                dac.gradient_step(agent, data, sums)

    for _ in range(warmup):
        round_()
    sync(device)
    n, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        for _ in range(10 if device.type == "cuda" else 1):
            round_()
            n += 1
        sync(device)
    elapsed = time.perf_counter() - tic
    for agent in agents:
        assert torch.isfinite(agent.eta).item()
    return n * seeds / elapsed, agents[0]


def act_latency_ms(agent, obs_dim, batch, device, fast, repeats=50):
    gen = torch.Generator(device).manual_seed(0)
    act = dac.make_policy(agent, fast)
    states = torch.randn(batch, obs_dim, device=device)
    for _ in range(5):
        act(states, gen)[0].cpu()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        act(states, gen)[0].cpu()  # includes the copy back to the host, as when acting in an env
        times.append(time.perf_counter() - tic)
    return 1000 * float(np.median(times))


def eval_seconds(agent, device, episodes=10, steps=1000):
    """Seconds for a full-length evaluation: `episodes` environments stepped `steps` times (the time limit) with
    one batched policy call per step. An untrained policy falls early, so episodes are not awaited."""
    try:
        envs = dac.make_eval_envs("hopper-medium-v2", episodes)
    except Exception as e:  # gymnasium / mujoco missing
        return f"n/a ({type(e).__name__})"
    act = dac.make_policy(agent, fast=True)
    gen = torch.Generator(device).manual_seed(0)
    obs, _ = envs.reset(seed=0)
    act(torch.as_tensor(obs, dtype=torch.float32, device=device), gen)
    tic = time.perf_counter()
    for _ in range(steps):
        action, _ = act(torch.as_tensor(obs, dtype=torch.float32, device=device), gen)
        obs, *_ = envs.step(action.cpu().numpy())
    envs.close()
    return round(time.perf_counter() - tic, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                   default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
                   help="devices to measure (default: cpu, and cuda when a GPU is visible)")
    p.add_argument("--modes", nargs="+", choices=["eager", "fast"], default=["eager", "fast"],
                   help="eager and/or the fast path (default: both)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="float32 and/or dac.py's --bf16: each row measured in each, one after the other, in this one "
                        "call (default: fp32)")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="timing window per measurement, in seconds (at least 10 on the CPU) (default: 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[4],
                   help="CUDA only: numbers of seeds trained together in the multi-seed measurements (default: 4)")
    p.add_argument("--batch-multiples", type=int, nargs="+", default=[4],
                   help="also time one seed whose batch is this many times 256: the samples of that many seeds in "
                        "one step, an estimate of what training seeds as one more batch dimension could give "
                        "(CUDA only; default: 4)")
    p.add_argument("--out", default="runs/bench/throughput.json",
                   help="where the JSON results go (default: runs/bench/throughput.json; runs/ is git-ignored)")
    args = p.parse_args()

    rows, modes = [], [mode == "fast" for mode in args.modes]

    def record(row: dict) -> None:
        same = [r for r in rows if r["precision"] == "fp32" and all(r[k] == row[k] for k in
                                                                    ("device", "shape", "mode", "seeds", "batch"))]
        if row["precision"] == "bf16" and same:
            row["vs_fp32"] = round(row["steps_per_sec"] / same[0]["steps_per_sec"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    info = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name in args.devices:
        device = torch.device(name)
        seconds = args.seconds if name == "cuda" else max(args.seconds, 10.0)
        for shape_name, shape in SHAPES.items():
            for fast, precision in itertools.product(modes, args.precisions):
                if name == "cuda":
                    torch._dynamo.reset()  # drop the earlier rows' compiled code, which holds their agents
                    gc.collect()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                sps, agent = steps_per_sec(device, shape, fast, seconds=seconds, bf16=precision == "bf16")
                row = {"device": name, "shape": shape_name, "mode": "fast" if fast else "eager",
                       "precision": precision, "seeds": 1, "batch": BATCH, "steps_per_sec": round(sps, 1)}
                if name == "cuda":
                    row["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20)
                if shape_name == "hopper":
                    row["act_1_ms"] = round(act_latency_ms(agent, shape[0], 1, device, fast), 2)
                    row["act_10_ms"] = round(act_latency_ms(agent, shape[0], 10, device, fast), 2)
                    if fast:
                        row["eval_10_episodes_s"] = eval_seconds(agent, device)
                record(row)
        if name == "cuda" and "fast" in args.modes:
            single = {r["precision"]: r["steps_per_sec"] for r in rows
                      if r["device"] == name and r["shape"] == "hopper" and r["mode"] == "fast"}
            for seeds, precision in itertools.product(args.seeds, args.precisions):
                sps, _ = steps_per_sec(device, SHAPES["hopper"], True, seeds=seeds, seconds=seconds,
                                       bf16=precision == "bf16")
                row = {"device": name, "shape": "hopper", "mode": "fast", "precision": precision, "seeds": seeds,
                       "batch": BATCH, "steps_per_sec": round(sps, 1), "vs_one_seed": round(sps / single[precision], 2)}
                record(row)
            for k, precision in itertools.product(args.batch_multiples, args.precisions):
                sps, _ = steps_per_sec(device, SHAPES["hopper"], True, seconds=seconds, batch_size=BATCH * k,
                                       bf16=precision == "bf16")
                row = {"device": name, "shape": "hopper", "mode": "fast", "precision": precision, "seeds": 1,
                       "batch": BATCH * k, "steps_per_sec": round(sps, 1),
                       "samples_vs_one_seed": round(k * sps / single[precision], 2)}
                record(row)

    print(f"\n{info}")
    cols = ["device", "shape", "mode", "precision", "seeds", "batch", "steps_per_sec", "vs_fp32", "vs_one_seed",
            "samples_vs_one_seed", "act_1_ms", "act_10_ms", "eval_10_episodes_s", "peak_mem_mib"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
