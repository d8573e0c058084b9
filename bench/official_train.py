"""Train the official JAX DAC agent on a local D4RL-layout hdf5 file, to set its curves beside dac.py's.

    python bench/official_train.py --official PATH --env walker2d-medium-v2 \
        --dataset walker2d_medium_1m.hdf5 --seed 0 --stop-at 150000 --out runs/official/walker2d-medium/seed0

PATH is a checkout of https://github.com/Fang-Lin93/DAC (checked at e254357). The official code is GPL-3.0: it is
imported at run time from PATH, never copied here. One process trains one seed, as each of the official main.py's
ray workers does; start several for several seeds (on one GPU: XLA_PYTHON_CLIENT_PREALLOCATE=false, as main.py sets).

What is the official code's and what is this script's:
* The agent, its update and its policy extraction: the official `agents/dac.py` DACLearner, built as main.py builds
  it (main.py's flag defaults, runs.sh's per-dataset rho and bc_threshold, which dac.PRESETS holds too, the 2M-step
  cosine schedule, seed = the official local seed, seed * 100 + worker index: --seed is that number).
* The data, prepared as main.py prepares D4RL data (datasets/d4rl_dataset.py, datasets/dataset_utils.py): the
  rows of d4rl.qlearning_dataset (next observation = the next row; every time-out row dropped; the file's
  next_observations ignored, as qlearning_dataset ignores them), actions clipped to 1 - 1e-5, masks = 1 - terminals,
  the iql_locomotion reward scale 1000 / (max - min episode return) computed with the official
  split_into_trajectories, and the official Dataset's shuffled scanning batches after np.random.seed(seed).
  d4rl and gym are not imported: the d4rl functions are restated here in a few lines.
* Evaluation (this script): --eval-episodes episodes of the Gymnasium v5 task in one vector env, one batched
  `sample_actions(..., batch_act=True)` call per step (the official eval.py runs the episodes one by one in
  mujoco-py's v2 task); scores use D4RL's constants (dac.normalized_score).
* Outputs (this script): progress.csv with dac.py's column names where both exist (step, return_mean, return_std,
  normalized_score, critic_loss, bc_loss, guidance_loss, eta, q_mean, q_ensemble_std: means since the previous row
  of the official update's critic_loss, bc_loss, guidance_loss, eta, qs, qs_std; steps_per_sec), summary.json,
  config.json, so that `python dac.py --report` and bench/compare_codes.py read them like dac.py's runs.
A checkpoint (checkpoint.pkl: the four models' parameters and Adam states, eta, the agent's key and step count,
the Dataset's scanning order and position, numpy's global random state, the rows so far) is written atomically at
every evaluation; --resume continues from it, so a run can span several GPU leases.

The GPU machine this was written for has jax, flax, optax and orbax but not tensorflow-probability, which the
official networks/critics.py imports for critics DAC does not use: parity_official.import_official puts in a
stand-in that raises on any use.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dac  # noqa: E402
from parity_official import fail, import_official, import_official_dataset  # noqa: E402

COLUMNS = ("step", "return_mean", "return_std", "normalized_score", "critic_loss", "bc_loss", "guidance_loss", "eta",
           "q_mean", "q_ensemble_std", "steps_per_sec")
OFFICIAL_METRICS = {"critic_loss": "critic_loss", "bc_loss": "bc_loss", "guidance_loss": "guidance_loss",
                    "eta": "eta", "q_mean": "qs", "q_ensemble_std": "qs_std"}  # our column -> official info key


def learner_kwargs(env: str) -> dict:
    """main.py's flag defaults with runs.sh's settings for `env` (DACLearner's own defaults for the rest)."""
    preset = dac.PRESETS.get(env, {})
    return dict(T=5, eta=1.0, eta_min=0.001, eta_max=100.0, eta_lr=0.001, rho=preset.get("rho", 1.0),
                bc_threshold=preset.get("bc_threshold", 1.0), actor_lr=3e-4, critic_lr=3e-4, ema_tau=0.005,
                q_tar="lcb", Q_guidance="soft", maxQ=bool(preset.get("next_action_max", False)), resnet=False,
                num_qs=10, num_q_samples=10, num_action_samples=10, temperature=0.0, discount=0.99)


def read_raw(paths: list) -> dict:
    """The raw rows of one or more D4RL-layout files, concatenated (a file's last row ends its episode)."""
    import h5py

    parts = []
    for path in paths:
        with h5py.File(path, "r") as f:
            d = {k: np.asarray(f[k][()]) for k in ("observations", "actions", "rewards", "terminals")}
            d["timeouts"] = np.asarray(f["timeouts"][()]) if "timeouts" in f else np.zeros(len(d["rewards"]), bool)
        d["terminals"], d["timeouts"] = d["terminals"].astype(bool), d["timeouts"].astype(bool)
        d["timeouts"][-1] |= ~d["terminals"][-1]
        parts.append(d)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def qlearning_rows(raw: dict) -> dict:
    """d4rl.qlearning_dataset(env) with terminate_on_end=False: for i < N - 1, skip time-out rows, else the
    transition (obs[i], action[i], reward[i], obs[i + 1], terminal[i])."""
    keep = ~raw["timeouts"][:-1]
    return {"observations": raw["observations"][:-1][keep], "actions": raw["actions"][:-1][keep],
            "next_observations": raw["observations"][1:][keep], "rewards": raw["rewards"][:-1][keep],
            "terminals": raw["terminals"][:-1][keep].astype(np.float32)}


def official_dataset(od_dataset, paths: list, seed: int):
    """The official D4RLDataset + iql_locomotion reward tune on these files; returns (Dataset, reward scale)."""
    d = qlearning_rows(read_raw(paths))
    d["actions"] = np.clip(d["actions"], -(1 - 1e-5), 1 - 1e-5)  # D4RLDataset(clip_to_eps=True, eps=1e-5)
    dones = np.zeros_like(d["rewards"])  # D4RLDataset: a trajectory ends where obs[i+1] != next_obs[i] or terminal
    jump = np.linalg.norm(d["observations"][1:] - d["next_observations"][:-1], axis=1) > 1e-6
    dones[:-1] = (jump | (d["terminals"][:-1] == 1.0)).astype(np.float32)
    dones[-1] = 1
    np.random.seed(seed)  # main.py seeds numpy before building the dataset: the scanning order comes from it
    ds = od_dataset.Dataset(d["observations"].astype(np.float32), actions=d["actions"].astype(np.float32),
                            rewards=d["rewards"].astype(np.float32), masks=1.0 - d["terminals"],
                            dones_float=dones.astype(np.float32),
                            next_observations=d["next_observations"].astype(np.float32),
                            size=len(d["observations"]), scanning=True)
    _, returns = od_dataset.split_into_trajectories(ds.observations, ds.actions, ds.rewards, ds.masks,
                                                    ds.dones_float, ds.next_observations)
    gap = max(returns) - min(returns)  # utils.traj_return_normalize(dataset, scale=1000.)
    ds.rewards = 1000.0 * ds.rewards / gap
    return ds, float(1000.0 / gap)


def evaluate(agent, envs, env: str, seed: int) -> tuple:
    """One episode per sub-environment, the official policy extraction batched over them. -> (returns, scores)"""
    obs, _ = envs.reset(seed=seed)
    running, returns = np.ones(envs.num_envs, bool), np.zeros(envs.num_envs)
    while running.any():
        action = np.asarray(agent.sample_actions(obs.astype(np.float32), batch_act=True))
        obs, reward, terminated, truncated, _ = envs.step(np.clip(action, -1, 1))
        returns += reward * running
        running &= ~(terminated | truncated)
    return returns, dac.normalized_score(env, returns)


MODELS = ("actor", "actor_tar", "critic", "critic_tar")


def save_state(path: Path, agent, ds, step: int, history: list) -> None:
    """Everything --resume needs, as numpy arrays (pytree leaves), written atomically."""
    import jax

    state = {"models": {name: jax.device_get(jax.tree_util.tree_leaves(getattr(agent, name))) for name in MODELS},
             "eta": np.asarray(agent.eta), "rng": np.asarray(agent.rng), "updates": agent._n_training_steps,
             "scanning_indices": ds.scanning_indices, "batch_idx": ds.batch_idx,
             "numpy_random": np.random.get_state(), "step": step, "history": history}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps(state))
    os.replace(tmp, path)


def load_state(path: Path, agent, ds) -> tuple:
    """Restore save_state's checkpoint into a freshly built agent and dataset. -> (step, history)"""
    import jax
    import jax.numpy as jnp

    state = pickle.loads(path.read_bytes())
    for name in MODELS:
        treedef = jax.tree_util.tree_structure(getattr(agent, name))
        setattr(agent, name, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in state["models"][name]]))
    agent.eta, agent.rng = jnp.asarray(state["eta"]), jnp.asarray(state["rng"])
    agent._n_training_steps = state["updates"]
    ds.scanning_indices, ds.batch_idx = state["scanning_indices"], state["batch_idx"]
    np.random.set_state(state["numpy_random"])
    return state["step"], state["history"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--official", required=True, help="root of a checkout of the official DAC code")
    p.add_argument("--env", default="walker2d-medium-v2", choices=[n for n in dac.ENV_NAMES if "antmaze" not in n],
                   help="dataset name: its runs.sh preset and its Gymnasium v5 evaluation task")
    p.add_argument("--dataset", nargs="+", required=True, help="D4RL-layout hdf5 file(s), concatenated")
    p.add_argument("--seed", type=int, default=0, help="the official local seed (seed * 100 + worker in main.py)")
    p.add_argument("--steps", type=int, default=2_000_000, help="the cosine schedule's length (main.py: 2M)")
    p.add_argument("--stop-at", type=int, default=0, help="stop after this many steps (0: --steps)")
    p.add_argument("--eval-every", type=int, default=10_000, help="steps between evaluations (main.py: 10k)")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True, help="output folder (progress.csv, summary.json, config.json, "
                                                "checkpoint.pkl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pkl")
    p.add_argument("--cpu", action="store_true", help="run JAX on the CPU (the smoke test)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    out = Path(args.out)
    ckpt = out / "checkpoint.pkl"
    if args.resume and not ckpt.exists():
        fail(f"--resume: there is no {ckpt}. Start without --resume, or point --out at the run to continue.")
    if not args.resume and (out / "progress.csv").exists():
        fail(f"{out / 'progress.csv'} exists: continue that run with --resume, or choose another --out.")
    missing = [p for p in args.dataset if not Path(p).is_file()]
    if missing:
        fail(f"--dataset: no such file(s): {', '.join(missing)}. Give D4RL-layout hdf5 files.")
    od, _ = import_official(args.official, x64=False, cpu=args.cpu)
    import jax

    od_dataset = import_official_dataset(Path(args.official).expanduser().resolve())
    ds, scale = official_dataset(od_dataset, args.dataset, args.seed)
    dims = dac.task_dims(args.env)
    if (ds.observations.shape[1], ds.actions.shape[1]) != dims:
        fail(f"the data have observations of size {ds.observations.shape[1]} and actions of size "
             f"{ds.actions.shape[1]}; {args.env}'s task has {dims[0]} and {dims[1]}. Pick the --env of the data.")
    kwargs = learner_kwargs(args.env)
    agent = od.DACLearner(ds.observations[:1], ds.actions[:1], seed=args.seed, lr_decay_steps=args.steps, **kwargs)
    envs = dac.make_eval_envs(args.env, args.eval_episodes)
    out.mkdir(parents=True, exist_ok=True)
    config = {"code": "official", "official": str(Path(args.official).resolve()), "env": args.env,
              "dataset": args.dataset, "seed": args.seed, "steps": args.steps, "stop_at": args.stop_at,
              "eval_every": args.eval_every, "eval_episodes": args.eval_episodes, "transitions": int(ds.size),
              "reward_scale": scale, "learner": kwargs, "jax": jax.__version__, "device": str(jax.devices()[0])}
    if args.resume:
        saved = json.loads((out / "config.json").read_text())
        changed = [k for k in ("env", "seed", "steps", "eval_every", "transitions", "learner") if saved[k] != config[k]]
        if changed:
            fail(f"--resume: {', '.join(changed)} differ from the run in {out}; give the same settings and data.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"official DAC, {args.env} seed {args.seed}: {ds.size} transitions from {', '.join(args.dataset)}, "
          f"rewards x {scale:.4f}, on {jax.devices()[0]}", flush=True)
    end, history, infos, train_seconds, started = min(args.stop_at or args.steps, args.steps), [], [], 0.0, time.time()
    step = 0
    if args.resume:
        step, history = load_state(ckpt, agent, ds)
        print(f"resumed at step {step}", flush=True)
    tic = time.perf_counter()
    while step < end:
        info = agent.update(ds.sample(batch_size=256))
        infos.append({k: info[v] for k, v in OFFICIAL_METRICS.items()})
        step += 1
        if step % args.eval_every and step < end:
            continue
        means = {k: float(np.mean(v)) for k, v in jax.device_get({k: [i[k] for i in infos] for k in infos[0]}).items()}
        train_seconds += time.perf_counter() - tic
        returns, scores = evaluate(agent, envs, args.env, args.seed * 1_000_003 + step)
        history.append({"step": step, "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                        "normalized_score": float(scores.mean()), **means,
                        "steps_per_sec": len(infos) / train_seconds})
        infos, train_seconds = [], 0.0
        save_state(ckpt, agent, ds, step, history)  # the checkpoint first, then the row it holds
        with open(out / "progress.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(history)
        final = [h["normalized_score"] for h in history[-5:]]
        (out / "summary.json").write_text(json.dumps({
            "final_score": float(np.mean(final)), "best_score": max(h["normalized_score"] for h in history),
            "steps": step, "schedule_steps": args.steps, "wall_seconds": round(time.time() - started, 1),
            "env": args.env, "seed": args.seed, "data": args.dataset,
            "note": f"the official JAX code; returns on Gymnasium {dac.TASKS[dac.family_of(args.env)][0]} "
                    f"normalised with D4RL's constants; data: {', '.join(args.dataset)}. Not D4RL's benchmark."},
            indent=2))
        row = history[-1]
        print(f"step {step}: score {row['normalized_score']:.1f}, q_mean {row['q_mean']:.4g}, eta {row['eta']:.3f}, "
              f"{row['steps_per_sec']:.0f} steps/s", flush=True)
        tic = time.perf_counter()
    envs.close()


if __name__ == "__main__":
    main()
