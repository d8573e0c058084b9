"""Diffusion Actor-Critic (DAC) for offline reinforcement learning, in one file.

Paper: Fang, Liu, Zhang, Wang, Jing. "Diffusion Actor-Critic: Formulating Constrained Policy Iteration as
Diffusion Noise Regression for Offline Reinforcement Learning". arXiv:2405.20555 (2024).
Official code (JAX): https://github.com/Fang-Lin93/DAC

The policy is a diffusion model trained by noise regression whose target is shifted by the Q-gradient
("soft Q-guidance", section 2 below); the critic is an ensemble whose TD target is a lower confidence bound
over the ensemble (section 3). The file reads in the paper's order: config -> data -> diffusion schedule and
sampler -> networks -> losses -> update step -> fast path -> evaluation -> main.

    python dac.py --env hopper-medium-v2

Deliberate differences from the official code (README.md lists them with reasons):
* Evaluation runs on Gymnasium's v5 MuJoCo tasks (Hopper-v5, ...), not D4RL's mujoco-py v2 tasks; scores are
  normalised with D4RL's constants but are not the same benchmark as the paper's table.
* Data come from D4RL hdf5 files or Minari (mujoco/*-v0, recorded on v5 tasks) instead of the d4rl package;
  transitions that end in a time-out are kept (their next observation is in the file) where d4rl's
  `qlearning_dataset` drops them.
* Weights use PyTorch's default initialisation, not Flax's.
* Antmaze (max-Q backup, fixed eta) is not included: there are no v5 antmaze tasks with D4RL's layout.
* Each agent owns a torch.Generator; evaluation draws from a separate one, so it never shifts training noise.
* The fast path on CUDA runs float32 matrix products in TF32, as JAX does by default on GPUs.
* `--guidance none` (diffusion BC) and `--no-clip-sample` exist for the toy bandit and ablations.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ======================================================================================================
# Config and presets
# ======================================================================================================
def arg(default, help, **kwargs):
    """A Config field: its default, its --help text, and extra argparse settings (choices, type of items)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(help=help, **kwargs))
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class Config:
    # --- task and data
    env: str = arg("hopper-medium-v2", "D4RL-style dataset name; picks the task, the presets and the data")
    dataset: list = arg([], "D4RL-layout hdf5 files and/or Minari ids, concatenated in order (default: from --env)")
    # --- run length, evaluation, output
    steps: int = arg(2_000_000, "gradient steps (the cosine learning-rate decay spans them)")
    eval_every: int = arg(10_000, "gradient steps between evaluations (and checkpoints)")
    eval_episodes: int = arg(10, "episodes per evaluation, run together in a vector env")
    seed: int = arg(0, "random seed (networks, batches, noise)")
    seeds: list = arg([], "train several seeds at once on one device, each with its own outputs (overrides --seed)",
                      type=int)
    device: str = arg("auto", "where to train", choices=["auto", "cpu", "cuda"])
    out: str = arg("", "output folder (default runs/<env>/seed<seed>)")
    resume: bool = arg(False, "continue from <out>/checkpoint.pt with exactly its state")
    eval_only: str = arg("", "evaluate the agent in this checkpoint and exit")
    fast: bool = arg(True, "torch.compile the gradient step and acting; on CUDA also replay each as a CUDA graph "
                           "(--no-fast: plain eager PyTorch)")
    # --- actor: diffusion policy and Q-guidance (paper sections 2, 4, 5)
    guidance: str = arg("soft", "Q-guidance of the actor loss ('none': plain diffusion behaviour cloning)",
                        choices=["soft", "hard", "denoised", "none"])
    T: int = arg(5, "diffusion steps")
    clip_sample: bool = arg(True, "clip the sampler's x0 estimate to [-1, 1] at every reverse step")
    eta: float = arg(1.0, "initial weight of the behaviour-cloning term (KL constraint strength)")
    eta_lr: float = arg(1e-3, "dual-ascent step size for eta (0 keeps eta fixed)")
    bc_threshold: float = arg(1.0, "b: eta rises while the noise-regression loss exceeds b, falls below it")
    num_action_samples: int = arg(10, "N_a: actions sampled per state when acting; the best by Q is taken")
    actor_lr: float = arg(3e-4, "actor Adam learning rate (cosine-decayed to 0)")
    actor_ema_tau: float = arg(0.005, "EMA rate of the target actor")
    actor_ema_every: int = arg(5, "update the target actor every this many steps ...")
    actor_ema_start: int = arg(1000, "... once the step count exceeds this")
    # --- critic: Q-ensemble with LCB target (paper section 3)
    num_qs: int = arg(10, "H: critics in the ensemble")
    rho: float = arg(1.0, "LCB pessimism: target = mean_h V - rho * std_h V")
    q_target: str = arg("lcb", "ensemble target", choices=["lcb", "min"])
    num_next_actions: int = arg(10, "N: next actions drawn from the target actor per next state")
    critic_lr: float = arg(3e-4, "critic Adam learning rate (cosine-decayed to 0)")
    tau: float = arg(0.005, "Polyak rate of the target critics")
    gamma: float = arg(0.99, "discount")
    # --- shared
    batch_size: int = arg(256, "transitions per gradient step")
    hidden_dim: int = arg(256, "width of the 3 hidden layers of every network")
    grad_clip: float = arg(1.0, "global gradient-norm clip per network")


# Official per-dataset settings (PAPER.md section 7); any command-line flag overrides them.
PRESETS = {
    **{f"walker2d-{d}-v2": dict(rho=1.0, bc_threshold=1.0) for d in ("medium", "medium-replay", "medium-expert")},
    "hopper-medium-v2": dict(rho=1.5, bc_threshold=1.0),
    "hopper-medium-replay-v2": dict(rho=1.5, bc_threshold=1.0),
    "hopper-medium-expert-v2": dict(rho=1.5, bc_threshold=0.05),
    "halfcheetah-medium-v2": dict(rho=0.0, bc_threshold=1.0),
    "halfcheetah-medium-replay-v2": dict(rho=0.0, bc_threshold=1.0),
    "halfcheetah-medium-expert-v2": dict(rho=0.0, bc_threshold=0.1),
}

# Task family -> (Gymnasium task used for evaluation, D4RL random score, D4RL expert score).
TASKS = {
    "hopper": ("Hopper-v5", -20.272305, 3234.3),
    "walker2d": ("Walker2d-v5", 1.629008, 4592.3),
    "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0),
}
LEVELS = ("medium", "medium-replay", "medium-expert", "expert")
ENV_NAMES = [f"{family}-{level}-v2" for family in TASKS for level in LEVELS]
# Fields that may change between a run and its resumption (they do not change what is learned).
RUN_ONLY_FIELDS = {"out", "resume", "eval_only", "device", "fast", "eval_episodes", "seeds"}


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one paragraph and exits non-zero, no traceback."""


def family_of(env: str) -> str:
    return env.split("-")[0]


def check_config(cfg: Config) -> None:
    """Reject values the method cannot run with, naming the flag and what it accepts."""
    if cfg.env not in ENV_NAMES:
        raise UserError(f"unknown --env '{cfg.env}'. Valid names: {', '.join(ENV_NAMES)}.")
    positive = ["steps", "eval_every", "eval_episodes", "T", "num_action_samples", "num_qs", "num_next_actions",
                "batch_size", "hidden_dim", "actor_ema_every"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}.")
    for name in ["eta", "actor_lr", "critic_lr", "grad_clip"]:
        if not 0 < getattr(cfg, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(cfg, name)}.")
    for name in ["eta_lr", "rho", "bc_threshold", "actor_ema_start"]:
        if not 0 <= getattr(cfg, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(cfg, name)}.")
    if not 1e-3 <= cfg.eta <= 100:
        raise UserError(f"--eta must lie in [0.001, 100] (the range dual ascent keeps it in), got {cfg.eta}.")
    if min([cfg.seed, *cfg.seeds]) < 0:
        raise UserError(f"--seed and --seeds must be >= 0 (Gymnasium refuses negative seeds), got "
                        f"{[cfg.seed, *cfg.seeds]}.")
    for name in ["tau", "actor_ema_tau", "gamma"]:
        if not 0 < getattr(cfg, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must lie in (0, 1], got {getattr(cfg, name)}.")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU. Use --device cpu or auto.")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds has repeated values {cfg.seeds}; give each seed once.")


# ======================================================================================================
# Data: D4RL hdf5 files and Minari datasets -> one array dict (PAPER.md sections 6 and 9)
# ======================================================================================================
HDF5_KEYS = ("observations", "actions", "rewards", "terminals")


def load_hdf5(path: str) -> dict:
    """Read a D4RL-layout hdf5 file. Without `next_observations`, derive them from the next row and drop the
    last transition of every time-out episode, as d4rl.qlearning_dataset does."""
    import h5py

    keys = (*HDF5_KEYS, "timeouts", "next_observations")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in HDF5_KEYS if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                raise UserError(f"'{path}' is not a D4RL-layout dataset: it lacks the arrays {missing}. Expected "
                                f"arrays {list(HDF5_KEYS)} (+ optional timeouts, next_observations), one row per "
                                f"transition.")
            d = {k: np.asarray(f[k][()]) for k in keys if isinstance(f.get(k), h5py.Dataset)}
    except OSError as e:
        raise UserError(f"cannot read '{path}' as HDF5 ({e}). Check that the file is complete (re-download or "
                        f"re-copy it) and that it is an .hdf5 file in D4RL's layout.") from None
    n = len(d["observations"])
    d.setdefault("timeouts", np.zeros(n, bool))
    for k in ("terminals", "timeouts"):
        d[k] = d[k].astype(bool)
    ndim = {"observations": 2, "next_observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1}
    bad = [f"{k} {v.shape}" for k, v in d.items() if v.ndim != ndim[k] or len(v) != n]
    if "next_observations" in d and d["next_observations"].shape[1:] != d["observations"].shape[1:]:
        bad.append(f"next_observations {d['next_observations'].shape} vs observations {d['observations'].shape}")
    if bad or n == 0:
        raise UserError(f"'{path}' is malformed: {', '.join(bad) or 'it has no rows'}. Expected observations and "
                        f"next_observations (N, S), actions (N, A), rewards, terminals and timeouts (N,), N > 0.")
    if "next_observations" not in d:
        keep = ~d["timeouts"]
        keep[-1] = False
        d["next_observations"] = np.roll(d["observations"], -1, axis=0)
        d = {k: v[keep] for k, v in d.items()}
    return d


def load_minari(dataset_id: str) -> dict:
    """Read a Minari dataset (local, else downloaded) into D4RL's flat layout."""
    try:
        import minari
    except ImportError:
        raise UserError(f"'{dataset_id}' looks like a Minari id, but minari is not installed: "
                        f"pip install 'minari[hf]'.") from None
    try:
        ds = minari.load_dataset(dataset_id)
    except Exception:
        try:
            ds = minari.load_dataset(dataset_id, download=True)
        except Exception as e:
            raise FileNotFoundError(f"Minari '{dataset_id}' is neither in "
                                    f"{os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')} nor "
                                    f"downloadable ({type(e).__name__}: {str(e)[:200]})") from None
    parts = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for ep in ds.iterate_episodes():
        parts["observations"].append(ep.observations[:-1])
        parts["next_observations"].append(ep.observations[1:])
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["terminals"].append(np.asarray(ep.terminations, bool))
        parts["timeouts"].append(np.asarray(ep.truncations, bool))
    if not parts["actions"]:
        raise UserError(f"Minari dataset '{dataset_id}' has no episodes.")
    return {k: np.concatenate(v) for k, v in parts.items()}


def default_sources(env: str) -> tuple:
    """Where a D4RL name's data is looked for: D4RL's own cache file, else its Minari counterpart(s).
    Returns (sources, places already looked at in vain)."""
    family, level = family_of(env), env[len(family_of(env)) + 1:-3]
    d4rl_dir = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()
    d4rl_file = d4rl_dir / f"{family}_{level.replace('-', '_')}-v2.hdf5"
    if d4rl_file.exists():
        return [str(d4rl_file)], []
    tried = f"D4RL file {d4rl_file} (does not exist)"
    if level == "medium-replay":
        raise UserError(f"no data for {env}: D4RL's file {d4rl_file} does not exist and Minari has no "
                        f"medium-replay counterpart. Provide it with --dataset PATH.hdf5 (a D4RL-layout file, "
                        f"e.g. d4rl's {family}_medium_replay-v2.hdf5), or copy that file to {d4rl_file}.")
    levels = ["medium", "expert"] if level == "medium-expert" else [level]
    return [f"mujoco/{family}/{lv}-v0" for lv in levels], [tried]


def episode_ends(d: dict) -> np.ndarray:
    """True where an episode ends: terminal, time-out, a jump between next_observation and the next row, or
    the last row (the IQL convention for splitting a flat dataset into trajectories)."""
    ends = d["terminals"].astype(bool) | d["timeouts"].astype(bool)
    ends[:-1] |= np.abs(d["next_observations"][:-1] - d["observations"][1:]).max(axis=1) > 1e-6
    ends[-1] = True
    return ends


def reward_scale(rewards: np.ndarray, ends: np.ndarray) -> float:
    """1000 / (max episode return - min episode return) (PAPER.md section 6)."""
    returns = np.add.reduceat(rewards, np.r_[0, np.flatnonzero(ends[:-1]) + 1])
    spread = returns.max() - returns.min()
    return 1000.0 / spread if spread > 0 else 1.0


def load_dataset(cfg: Config, obs_dim: int, act_dim: int) -> dict:
    """Load, check and concatenate the sources; clip actions; rescale rewards. Returns float32 arrays."""
    sources, looked = (cfg.dataset, []) if cfg.dataset else default_sources(cfg.env)
    parts, failed = [], []
    for src in sources:
        is_file = src.endswith((".hdf5", ".h5")) or os.path.exists(src)
        if is_file and not os.path.exists(src):
            failed.append(f"file {src} (does not exist)")
            continue
        try:
            parts.append((src, load_hdf5(src) if is_file else load_minari(src)))
        except FileNotFoundError as e:
            failed.append(str(e))
    if failed:
        raise UserError(
            f"dataset not found for {cfg.env}. Tried: {'; '.join(looked + failed)}. Ways to provide data: pass "
            f"--dataset FILE.hdf5 [FILE2.hdf5 ...] (D4RL layout); or put d4rl's file in ~/.d4rl/datasets/ (or "
            f"$D4RL_DATASET_DIR); or install 'minari[hf]' and run online once so Minari caches the dataset in "
            f"$MINARI_DATASETS_PATH (default ~/.minari/datasets), after which it loads offline.")
    for src, d in parts:
        if d["observations"].shape[1] != obs_dim or d["actions"].shape[1] != act_dim:
            raise UserError(
                f"'{src}' does not fit {cfg.env}: it has observations of size {d['observations'].shape[1]} and "
                f"actions of size {d['actions'].shape[1]}, the task {TASKS[family_of(cfg.env)][0]} has "
                f"{obs_dim} and {act_dim}. Pick the --env that matches the data.")
        d["timeouts"][-1] |= ~d["terminals"][-1]  # a source's last row ends its episode
    d = {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]}
    for k in ("observations", "actions", "rewards", "next_observations"):
        if not np.isfinite(d[k]).all():
            raise UserError(f"the dataset ({', '.join(sources)}) has NaN or infinite values in '{k}'; "
                            f"clean or regenerate it.")
    d["actions"] = np.clip(d["actions"], -1 + 1e-5, 1 - 1e-5)
    d["rewards"] = d["rewards"] * reward_scale(d["rewards"], episode_ends(d))
    print(f"data: {len(d['rewards'])} transitions from {', '.join(sources)}")
    return {k: d[k].astype(np.float32) for k in ("observations", "actions", "rewards", "next_observations",
                                                  "terminals")}


class Batch(NamedTuple):
    obs: torch.Tensor       # (B, S)
    act: torch.Tensor       # (B, A)
    rew: torch.Tensor       # (B,)
    next_obs: torch.Tensor  # (B, S)
    terminal: torch.Tensor  # (B,)


class DeviceData:
    """The whole dataset as tensors on the training device; batches are drawn there (no host round trip)."""

    def __init__(self, d: dict, device: torch.device):
        self.tensors = [torch.as_tensor(d[k], device=device) for k in
                        ("observations", "actions", "rewards", "next_observations", "terminals")]
        self.size = len(d["rewards"])

    def sample(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(self.size, (batch_size,), device=gen.device, generator=gen)
        return Batch(*(t[idx] for t in self.tensors))


# ======================================================================================================
# Diffusion schedule and sampler (PAPER.md section 5)
# ======================================================================================================
def vp_schedule(T: int, b_min: float = 0.1, b_max: float = 10.0) -> dict:
    """VP schedule, alpha_t = exp(-b_min/T - (b_max-b_min)(2t-1)/(2T^2)), t = 1..T, with alpha_0 = 1 prepended
    so that index t is step t and abar_0 = 1. Returns float32 tensors of length T + 1."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    alphas = torch.cat([torch.ones(1, dtype=torch.float64),
                        torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)])
    abar = torch.cumprod(alphas, 0)
    return {"alphas": alphas.float(), "betas": (1 - alphas).float(), "abar": abar.float()}


def noisy_action(a: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps (section 1). a, eps (B, A); t (B,)."""
    ab = abar[t].unsqueeze(-1)  # (B, 1)
    return ab.sqrt() * a + (1 - ab).sqrt() * eps


def ddpm_sample(actor: nn.Module, state: torch.Tensor, sched: dict, gen: torch.Generator,
                clip_x0: bool = True) -> torch.Tensor:
    """Reverse chain x_T ~ N(0, I) -> x_0 with the DDPM posterior mean written through x0_hat (section 5).
    state (M, S) -> actions (M, A). Gradients flow through the chain unless the caller disables them."""
    alphas, betas, abar = sched["alphas"], sched["betas"], sched["abar"]
    M, T = state.shape[0], len(alphas) - 1
    noise = torch.randn(T, M, actor.act_dim, device=state.device, generator=gen)  # (T, M, A): all draws at once
    temb = actor.time_embedding(torch.arange(1, T + 1, device=state.device))  # (T, 32): row t - 1 is step t
    x = noise[0]  # (M, A): x_T; noise[T - t + 1] is the noise added at step t
    for t in range(T, 0, -1):
        eps = actor.predict(state, x, temb[t - 1])  # (M, A)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        x = (abar[t - 1].sqrt() * betas[t] * x0 + alphas[t].sqrt() * (1 - abar[t - 1]) * x) / (1 - abar[t])
        if t > 1:
            x = x + betas[t].sqrt() * noise[T - t + 1]
    return x


# ======================================================================================================
# Networks (PAPER.md section 5)
# ======================================================================================================
def timestep_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    """Fixed sinusoidal features of the integer step: [cos(t f_k), sin(t f_k)], f_k = exp(-log(1e4) k/(dim/2-1)).
    t (M,) -> (M, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / (half - 1))  # (dim/2,)
    angles = t.float().unsqueeze(-1) * freqs  # (M, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish, x tanh(softplus(x)). Under torch.compile it is written with one exp, tanh(softplus(x)) = n / (n + 2)
    with n = e^x (e^x + 2), which compiles to much faster code (on the 2-core CPU 1.6 ms against 16 ms for a
    (10, 2560, 256) tensor; max difference 5e-7). Eagerly, F.mish's single kernel is the faster one."""
    if not torch.compiler.is_compiling():
        return F.mish(x)
    e = torch.exp(x.clamp(max=20.0))  # above 20, n / (n + 2) is 1 in float32
    n = e * (e + 2)
    return x * n / (n + 2)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class NoiseMLP(nn.Module):
    """eps_theta(s, x_t, t): MLP on [s, x_t, time MLP(sinusoidal(t))], 3 hidden layers, Mish."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, time_dim: int = 16):
        super().__init__()
        self.act_dim = act_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 32), Mish(), nn.Linear(32, 32))
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim + 32, hidden), Mish(),
                                 nn.Linear(hidden, hidden), Mish(),
                                 nn.Linear(hidden, hidden), Mish(),
                                 nn.Linear(hidden, act_dim))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t (M,) integer steps -> (M, 32)."""
        return self.time_mlp(timestep_features(t))

    def predict(self, s: torch.Tensor, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """eps_theta from a ready time embedding: s (M, S), x (M, A), temb (M, 32) or one row (32,) for all M."""
        return self.net(torch.cat([s, x, temb.expand(x.shape[0], -1)], dim=-1))  # (M, A)

    def forward(self, s: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s (M, S), x (M, A), t (M,) -> (M, A)."""
        return self.predict(s, x, self.time_embedding(t))


class VectorizedLinear(nn.Module):
    """H independent linear layers as one batched matmul: weight (H, in, out). x (H, M, in) or (M, in)."""

    def __init__(self, in_dim: int, out_dim: int, ensemble: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_dim))
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], -1, -1)  # the same input for every member
        # bmm, then the bias: baddbmm would first copy the broadcast bias into the output, a full extra pass on
        # the large (H, B*N, hidden) activations of the critic target; the separate add fuses with the activation.
        return torch.bmm(x, self.weight) + self.bias  # (H, M, out)


class EnsembleCritic(nn.Module):
    """H Q-networks Q_h(s, a): 3 hidden layers, Mish, scalar output, all evaluated in one batched pass."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, num_qs: int = 10):
        super().__init__()
        self.net = nn.Sequential(VectorizedLinear(obs_dim + act_dim, hidden, num_qs), Mish(),
                                 VectorizedLinear(hidden, hidden, num_qs), Mish(),
                                 VectorizedLinear(hidden, hidden, num_qs), Mish(),
                                 VectorizedLinear(hidden, 1, num_qs))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], dim=-1)).squeeze(-1)  # (H, M)


# ======================================================================================================
# Losses: one small function per equation
# ======================================================================================================
def ensemble_value(v: torch.Tensor, kind: str, rho: float) -> torch.Tensor:
    """Section 3. v (H, B) -> (B): LCB  mean_h v - rho std_h v (ddof 0), or  min_h v."""
    if kind == "lcb":
        return v.mean(0) - rho * v.std(0, correction=0)
    return v.min(0).values


def td_target(reward: torch.Tensor, terminal: torch.Tensor, next_value: torch.Tensor, gamma: float):
    """Section 3. y = r + gamma (1 - terminal) V(s'). All (B,)."""
    return reward + gamma * (1 - terminal) * next_value


def critic_loss(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Section 3. Mean over critics and batch of (Q_h(s, a) - y)^2. q (H, B), y (B,)."""
    return (q - y).pow(2).mean()


def q_gradient(critic: nn.Module, s: torch.Tensor, x_t: torch.Tensor, q_norm: torch.Tensor) -> torch.Tensor:
    """Section 2. g = grad_{x_t} mean_h Q_h(s, x_t) / (Q_norm + 1e-6), taken at the NOISY action. (B, A)."""
    x_t = x_t.detach().requires_grad_(True)
    q = critic(s, x_t).mean(0)  # (B,)
    (g,) = torch.autograd.grad(q.sum(), x_t)
    return g / (q_norm + 1e-6)


def bc_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Section 2. Noise regression: mean((eps_theta - eps)^2)."""
    return (eps_pred - eps).pow(2).mean()


def soft_guidance_loss(eps_pred, g, noise_level):
    """Section 2. mean(sqrt(1 - abar_t) g . eps_theta): with eta * bc this is eta times the expanded square
    ||eps_theta - eps + sqrt(1 - abar_t) g / (2 eta)||^2 up to a constant (Theorem 1's soft Q-guidance)."""
    return (noise_level * g * eps_pred).mean()


def hard_guidance_loss(eps_pred, g):
    """Section 2 (ablation). mean(g . eps_theta), without the noise-level factor."""
    return (g * eps_pred).mean()


def denoised_guidance_loss(critic, s, a0, q_norm):
    """Section 2 (ablation, Diffusion-QL style). -mean_h Q_h(s, a0) / (Q_norm + 1e-6), a0 sampled WITH grads."""
    return -critic(s, a0).mean() / (q_norm + 1e-6)


def dual_ascent_eta(eta, bc_after, bc_threshold: float, eta_lr: float):
    """Section 2. eta <- clip(eta + eta_lr clip(bc' - b, -1, 1), 0.001, 100)."""
    return (eta + eta_lr * (bc_after - bc_threshold).clamp(-1, 1)).clamp(1e-3, 100.0)


def cosine_lr(base_lr: float, step: torch.Tensor, total: int) -> torch.Tensor:
    """Section 6. base_lr * (1 + cos(pi min(step, total) / total)) / 2."""
    return base_lr * 0.5 * (1 + torch.cos(math.pi * step.clamp(max=total) / total))


def clip_grad_norm(grads: list, max_norm: float) -> list:
    """Section 6. Global gradient-norm clipping, as nn.utils.clip_grad_norm_ computes it, on a list of gradients."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch._foreach_mul(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


class Adam(nn.Module):
    """Adam (Kingma & Ba), the same arithmetic as torch.optim.Adam, written out with foreach ops: torch.optim's
    step splits a compiled graph, so with it the fast path's gradient step could not compile as one graph. The
    moments and the step count are buffers, so they are saved with the agent's state_dict."""

    def __init__(self, params, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        super().__init__()
        self.params = list(params)
        (self.beta1, self.beta2), self.eps = betas, eps
        self.register_buffer("count", torch.zeros((), device=self.params[0].device))
        for i, p in enumerate(self.params):
            self.register_buffer(f"m{i}", torch.zeros_like(p))  # first moment
            self.register_buffer(f"v{i}", torch.zeros_like(p))  # second moment

    @torch.no_grad()
    def step(self, grads: list, lr: torch.Tensor) -> None:
        m = [self.get_buffer(f"m{i}") for i in range(len(self.params))]
        v = [self.get_buffer(f"v{i}") for i in range(len(self.params))]
        self.count += 1
        torch._foreach_lerp_(m, grads, 1 - self.beta1)  # m <- beta1 m + (1 - beta1) g
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - self.beta2)  # v <- beta2 v + (1 - beta2) g^2
        step_size = lr / (1 - self.beta1**self.count)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(v), (1 - self.beta2**self.count).sqrt()),
                                   self.eps)
        torch._foreach_sub_(self.params, torch._foreach_mul(torch._foreach_div(m, denom), step_size))


@torch.no_grad()
def soft_update_(target: nn.Module, source: nn.Module, rate) -> None:
    """Section 6. Polyak / EMA averaging, target <- target + rate (source - target), for all parameters at once.
    `rate` may be a tensor (the actor's EMA is gated on the step count inside the step)."""
    targets, sources = list(target.parameters()), list(source.parameters())
    torch._foreach_add_(targets, torch._foreach_mul(torch._foreach_sub(sources, targets), rate))


def pick_best(actions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Section 4. actions (B, N, A), q (B, N) -> the argmax-Q action of each state, clipped to [-1, 1]. (B, A)"""
    best = q.argmax(dim=1)  # (B,)
    return actions[torch.arange(actions.shape[0], device=actions.device), best].clamp(-1, 1)


# ======================================================================================================
# The agent and its update step
# ======================================================================================================
class DAC(nn.Module):
    """Actor, target actor (EMA), critic ensemble, target critics, eta and the step counter, plus their
    optimisers. `update` is the whole gradient step; it runs the same eagerly or captured as a CUDA graph."""

    def __init__(self, cfg: Config, obs_dim: int, act_dim: int, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.actor = NoiseMLP(obs_dim, act_dim, cfg.hidden_dim)
        self.target_actor = NoiseMLP(obs_dim, act_dim, cfg.hidden_dim)
        self.critic = EnsembleCritic(obs_dim, act_dim, cfg.hidden_dim, cfg.num_qs)
        self.target_critic = EnsembleCritic(obs_dim, act_dim, cfg.hidden_dim, cfg.num_qs)
        self.target_actor.load_state_dict(self.actor.state_dict())
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_actor.requires_grad_(False)
        self.target_critic.requires_grad_(False)
        for name, value in vp_schedule(cfg.T).items():
            self.register_buffer(name, value)
        self.register_buffer("eta", torch.tensor(float(cfg.eta)))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.to(device)
        self.gen = torch.Generator(device).manual_seed(cfg.seed)  # all of this agent's training randomness
        self.actor_opt = Adam(self.actor.parameters())
        self.critic_opt = Adam(self.critic.parameters())

    @property
    def sched(self) -> dict:
        return {"alphas": self.alphas, "betas": self.betas, "abar": self.abar}

    def _optimise(self, opt: Adam, loss: torch.Tensor, base_lr: float) -> None:
        grads = torch.autograd.grad(loss, opt.params)
        opt.step(clip_grad_norm(grads, self.cfg.grad_clip), cosine_lr(base_lr, self.step, self.cfg.steps))

    @torch.no_grad()
    def critic_target(self, batch: Batch) -> torch.Tensor:
        """Section 3. y = r + gamma (1 - terminal) LCB_h(mean_n Q'_h(s', a'_n)), a'_n ~ target actor. (B,)"""
        B, N, H = batch.obs.shape[0], self.cfg.num_next_actions, self.cfg.num_qs
        s2 = batch.next_obs.repeat_interleave(N, dim=0)  # (B*N, S)
        a2 = ddpm_sample(self.target_actor, s2, self.sched, self.gen, self.cfg.clip_sample)  # (B*N, A)
        v2 = self.target_critic(s2, a2).view(H, B, N).mean(-1)  # (H, B)
        return td_target(batch.rew, batch.terminal, ensemble_value(v2, self.cfg.q_target, self.cfg.rho),
                         self.cfg.gamma)

    def update(self, batch: Batch) -> torch.Tensor:
        """One gradient step: critic, Polyak, actor, eta, target actor. Returns the metrics as one (6,) tensor
        (critic_loss, bc_loss, guidance_loss, eta, q_mean, q_ensemble_std) without syncing with the host."""
        cfg, (s, a, _, _, _) = self.cfg, batch
        B = s.shape[0]
        # The actor's draws come first, just before the critic target's: torch.compile cannot trace a draw from a
        # torch.Generator and splits its graph there, so drawing early keeps the rest of the step one graph.
        t = torch.randint(1, cfg.T + 1, (B,), device=s.device, generator=self.gen)  # (B,)
        eps = torch.randn(a.shape, device=s.device, generator=self.gen)  # (B, A)

        # --- critic (section 3) ---
        y = self.critic_target(batch)  # (B,)
        q = self.critic(s, a)  # (H, B)
        loss_q = critic_loss(q, y)
        self._optimise(self.critic_opt, loss_q, cfg.critic_lr)
        soft_update_(self.target_critic, self.critic, cfg.tau)

        # --- actor: noise regression with the Q-gradient shift (section 2) ---
        x_t = noisy_action(a, t, eps, self.abar)  # (B, A)
        noise_level = (1 - self.abar[t]).sqrt().unsqueeze(-1)  # (B, 1)
        with torch.no_grad():
            q_norm = self.target_critic(s, a).abs().mean()
        if cfg.guidance in ("soft", "hard"):
            g = q_gradient(self.target_critic, s, x_t, q_norm)  # (B, A)
        eps_pred = self.actor(s, x_t, t)  # (B, A)
        loss_bc = bc_loss(eps_pred, eps)
        if cfg.guidance == "soft":
            loss_guide = soft_guidance_loss(eps_pred, g, noise_level)
        elif cfg.guidance == "hard":
            loss_guide = hard_guidance_loss(eps_pred, g)
        elif cfg.guidance == "denoised":
            a0 = ddpm_sample(self.actor, s, self.sched, self.gen, cfg.clip_sample)  # (B, A), grads through chain
            loss_guide = denoised_guidance_loss(self.target_critic, s, a0, q_norm)
        else:
            loss_guide = torch.zeros((), device=s.device)
        self._optimise(self.actor_opt, self.eta * loss_bc + loss_guide, cfg.actor_lr)

        with torch.no_grad():
            if cfg.eta_lr > 0:  # dual ascent with the updated actor on the same (s, x_t, t, eps)
                self.eta.copy_(dual_ascent_eta(self.eta, bc_loss(self.actor(s, x_t, t), eps),
                                               cfg.bc_threshold, cfg.eta_lr))
            due = (self.step % cfg.actor_ema_every == 0) & (self.step > cfg.actor_ema_start)
            soft_update_(self.target_actor, self.actor, cfg.actor_ema_tau * due.float())
            self.step += 1
            return torch.stack([loss_q, loss_bc, loss_guide, self.eta, q.mean(), q.std(0, correction=0).mean()])

    @torch.no_grad()
    def act(self, states: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Policy extraction (section 4): N_a actions per state from the online actor, the argmax of the
        ensemble-mean target Q. states (B, S) -> (B, A). One call for any number of states."""
        B, N = states.shape[0], self.cfg.num_action_samples
        s = states.repeat_interleave(N, dim=0)  # (B*N, S)
        a = ddpm_sample(self.actor, s, self.sched, gen, self.cfg.clip_sample)  # (B*N, A)
        q = self.target_critic(s, a).mean(0).view(B, N)  # (B, N)
        return pick_best(a.view(B, N, -1), q)

    def full_state(self) -> dict:
        """Networks, optimiser moments, eta, step count (all in state_dict) and the generator's state."""
        return {"nets": self.state_dict(), "rng": self.gen.get_state()}

    def load_full_state(self, state: dict) -> None:
        self.load_state_dict(state["nets"])
        self.gen.set_state(state["rng"].cpu())  # generator states are CPU byte tensors, even for CUDA generators


METRICS = ("critic_loss", "bc_loss", "guidance_loss", "eta", "q_mean", "q_ensemble_std")


# ======================================================================================================
# Fast path: the same step and policy, captured as CUDA graphs and replayed
# ======================================================================================================
@contextlib.contextmanager
def side_stream():
    """Run the enclosed CUDA work on a fresh stream that starts after, and is awaited by, the current one: warm-up
    runs and graph captures must stay off the default stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield side
    torch.cuda.current_stream().wait_stream(side)


class CapturedStep:
    """Wraps `step_fn` (one whole gradient step, batch sampling included, of one or several agents). The first
    `warmup` calls run it eagerly on a side stream (CUDA graphs need that); the next call captures it as one CUDA
    graph, with the agents' generators registered; every later call replays that graph. Each call is exactly one
    training step, so eager and fast runs count alike."""

    def __init__(self, step_fn, gens: list, warmup: int = 3):
        self.step_fn, self.gens, self.warmup, self.calls = step_fn, gens, warmup, 0
        self.graph = None

    def __call__(self) -> None:
        if self.graph is None:
            with side_stream() as side:
                if self.calls < self.warmup:
                    self.calls += 1
                    self.step_fn()
                else:
                    self.graph = torch.cuda.CUDAGraph()
                    for gen in self.gens:
                        self.graph.register_generator_state(gen)
                    with torch.cuda.graph(self.graph, stream=side):
                        self.step_fn()
            if self.graph is None:
                return
        self.graph.replay()


class CapturedPolicy:
    """`act(states, gen)` (compiled DAC.act) captured as a CUDA graph for one batch size and one generator, and
    replayed: an evaluation makes 1000 calls with the same ones. A new batch size or generator (each evaluation
    has its own) captures again, after two warm-up calls that draw from a scratch generator, so the actions are
    those of the uncaptured policy. The returned actions are overwritten by the next call."""

    def __init__(self, act):
        self.act, self.key, self.graph = act, None, None

    def __call__(self, states: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.key != (states.shape, gen):
            self.states, scratch = states.clone(), torch.Generator(states.device).manual_seed(0)
            with side_stream():
                for _ in range(2):
                    self.act(self.states, scratch)
            self.graph = torch.cuda.CUDAGraph()
            self.graph.register_generator_state(gen)
            with torch.cuda.graph(self.graph):
                self.actions = self.act(self.states, gen)
            self.key = (states.shape, gen)
        self.states.copy_(states)
        self.graph.replay()
        return self.actions


def make_policy(agent: DAC, fast: bool):
    """Policy extraction as used for acting and evaluation: DAC.act; on the fast path compiled, and on CUDA
    also captured as a CUDA graph."""
    if not fast:
        return agent.act
    act = torch.compile(agent.act)
    return CapturedPolicy(act) if agent.step.device.type == "cuda" else act


def make_train_step(agents: list, data: DeviceData, metric_sums: list, fast: bool):
    """One call = one gradient step of every agent (independent seeds on the same data), each on a fresh batch
    from its own generator; agent k's metrics are added to metric_sums[k] on the device. On CUDA each agent runs
    on its own stream, so several seeds share the GPU concurrently. fast: torch.compile each agent's step, batch
    sampling included (one graph from the batch to the metrics), and on CUDA capture the whole call, all agents
    together, as one CUDA graph."""
    def make_agent_step(agent: DAC, sums: torch.Tensor):
        def agent_step() -> None:
            metrics = agent.update(data.sample(agent.cfg.batch_size, agent.gen))
            sums.add_(metrics)
        return torch.compile(agent_step) if fast else agent_step

    if fast:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one per seed
        if hasattr(torch._dynamo.config, "trace_autograd_ops"):  # (torch 2.11, 2.13) autograd.grad joins the graph
            torch._dynamo.config.trace_autograd_ops = True
    agent_steps = [make_agent_step(agent, sums) for agent, sums in zip(agents, metric_sums)]
    cuda = metric_sums[0].device.type == "cuda"
    streams = [torch.cuda.Stream() for _ in agents] if cuda and len(agents) > 1 else None

    def step() -> None:
        if streams is None:
            for agent_step in agent_steps:
                agent_step()
            return
        main = torch.cuda.current_stream()
        for agent_step, stream in zip(agent_steps, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                agent_step()
        for stream in streams:
            main.wait_stream(stream)

    if fast and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default for float32 matmuls on GPUs
        torch.backends.cuda.preferred_blas_library("cublaslt")  # faster kernels for these small products (+3%)
        if hasattr(torch._inductor.config, "combo_kernels"):  # independent small kernels launched as one (+5%)
            torch._inductor.config.combo_kernels = True
        # Inductor's loop reordering fails an assertion on some small networks' steps (torch 2.11: toy_bandit's);
        # without it the hopper step runs as fast.
        torch._inductor.config.loop_ordering_after_fusion = False
        return CapturedStep(step, [a.gen for a in agents])
    return step


# ======================================================================================================
# Evaluation: all episodes at once in a Gymnasium vector env (D4RL normalised score, PAPER.md section 8)
# ======================================================================================================
def task_dims(env: str) -> tuple:
    import gymnasium as gym

    e = gym.make(TASKS[family_of(env)][0])
    dims = e.observation_space.shape[0], e.action_space.shape[0]
    e.close()
    return dims


def make_eval_envs(env: str, n: int):
    import gymnasium as gym

    return gym.make_vec(TASKS[family_of(env)][0], num_envs=n, vectorization_mode="sync")


def evaluate(act, envs, seed: int, device: torch.device) -> np.ndarray:
    """One episode per sub-environment, one batched policy call `act(states, gen)` (DAC.act, or its compiled
    version) per time step. Returns the (n,) returns. Uses its own generator, so evaluating never changes the
    training run's random stream."""
    gen = torch.Generator(device).manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(envs.num_envs)
    running = np.ones(envs.num_envs, dtype=bool)
    while running.any():
        action = act(torch.as_tensor(obs, dtype=torch.float32, device=device), gen)  # (n, A)
        obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
        returns += reward * running
        running &= ~(terminated | truncated)
    return returns


def normalized_score(env: str, returns) -> np.ndarray:
    """100 (return - random) / (expert - random) with D4RL's reference returns."""
    _, random_score, expert_score = TASKS[family_of(env)]
    return 100 * (np.asarray(returns) - random_score) / (expert_score - random_score)


def score_note(cfg: Config) -> str:
    """The label every reported score carries: which task and data it comes from."""
    task = TASKS[family_of(cfg.env)][0]
    data = ", ".join(cfg.dataset) if cfg.dataset else f"default sources for {cfg.env}"
    return (f"returns on Gymnasium {task} normalised with D4RL's {family_of(cfg.env)} constants; data: {data}. "
            f"Not D4RL's {cfg.env} benchmark, so not directly comparable with the paper's table.")


# ======================================================================================================
# Main: outputs, checkpoints, the training loop, the command line
# ======================================================================================================
PROGRESS_COLUMNS = ("step", "return_mean", "return_std", "normalized_score", *METRICS, "steps_per_sec")


class Diverged(Exception):
    pass


class Run:
    """One seed's training: its agent, step function, history, and the files in its output folder."""

    def __init__(self, cfg: Config, data: DeviceData, dims: tuple, device: torch.device):
        self.cfg, self.out = cfg, Path(cfg.out)
        torch.manual_seed(cfg.seed)  # network initialisation
        self.agent = DAC(cfg, *dims, device)
        self.metric_sum = torch.zeros(len(METRICS), device=device)
        self.metric_count, self.history, self.wall_seconds = 0, [], 0.0
        ckpt_path = self.out / "checkpoint.pt"
        if cfg.resume:
            if not ckpt_path.exists():
                raise UserError(f"--resume: there is no checkpoint at {ckpt_path}. Start without --resume, or "
                                f"point --out at the folder of the run to continue.")
            self.load(load_checkpoint(ckpt_path, device, cfg))
        elif ckpt_path.exists():
            raise UserError(f"{ckpt_path} already exists. Continue that run with --resume, or choose another "
                            f"--out (nothing was overwritten).")
        self.step = int(self.agent.step)
        self.act = make_policy(self.agent, cfg.fast)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        self.started = time.perf_counter()

    def load(self, ckpt: dict) -> None:
        self.agent.load_full_state(ckpt["agent"])
        self.metric_sum.copy_(ckpt["metric_sum"])
        self.metric_count, self.history, self.wall_seconds = ckpt["metric_count"], ckpt["history"], ckpt["wall"]

    def after_step(self) -> None:
        """Book-keeping after each gradient step (the step itself is train()'s, shared by all seeds)."""
        self.step += 1
        self.metric_count += 1
        if self.step % 1000 == 0:
            self.check_finite()

    def check_finite(self) -> None:
        finite = torch.isfinite(self.metric_sum).tolist()
        if not all(finite):
            bad = [m for m, ok in zip(METRICS, finite) if not ok]
            kept = (f"The last good checkpoint (step {self.history[-1]['step']}) is kept in "
                    f"{self.out / 'checkpoint.pt'}." if self.history else "No checkpoint had been written yet.")
            raise Diverged(
                f"seed {self.cfg.seed}: training diverged before step {self.step}: {', '.join(bad)} became NaN or "
                f"infinite. {kept} Try a smaller --actor-lr/--critic-lr, a larger --rho, or another --seed.")

    def elapsed(self) -> float:
        return self.wall_seconds + time.perf_counter() - self.started

    def evaluate_and_save(self, envs, train_seconds: float) -> dict:
        """Evaluate, append a progress row, rewrite every output file, checkpoint. Returns the row."""
        self.check_finite()
        returns = evaluate(self.act, envs, self.cfg.seed * 1_000_003 + self.step, self.metric_sum.device)
        means = (self.metric_sum / max(self.metric_count, 1)).tolist()
        row = {"step": self.step, "return_mean": float(returns.mean()), "return_std": float(returns.std()),
               "normalized_score": float(normalized_score(self.cfg.env, returns).mean()),
               **dict(zip(METRICS, means)),
               "steps_per_sec": self.metric_count / max(train_seconds, 1e-9)}
        self.history.append(row)
        self.metric_sum.zero_()
        self.metric_count = 0
        self.write_outputs()
        self.save_checkpoint()
        return row

    def write_outputs(self) -> None:
        with open(self.out / "progress.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=PROGRESS_COLUMNS)
            writer.writeheader()
            writer.writerows(self.history)
        scores = [r["normalized_score"] for r in self.history]
        summary = {"final_score": float(np.mean(scores[-5:])), "best_score": float(np.max(scores)),
                   "steps": self.step, "wall_seconds": round(self.elapsed(), 1), "env": self.cfg.env,
                   "seed": self.cfg.seed, "note": score_note(self.cfg)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curve(self.history, self.out / "curve.png", f"DAC {self.cfg.env} seed {self.cfg.seed}")

    def save_checkpoint(self) -> None:
        ckpt = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.cfg), "agent": self.agent.full_state(),
                "metric_sum": self.metric_sum.cpu(), "metric_count": self.metric_count, "history": self.history,
                "wall": self.elapsed()}
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")


def plot_curve(history: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ax1.plot(steps, [r["normalized_score"] for r in history], marker="o")
    ax1.set_ylabel("normalised score\n(Gymnasium v5 task)")
    ax1.set_title(title)
    ax2.plot(steps, [r["eta"] for r in history], color="tab:orange")
    ax2.set_ylabel("eta")
    ax2.set_xlabel("gradient step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CHECKPOINT_FORMAT = 2  # 2: the optimiser moments are buffers of the agent, saved with its networks


def load_checkpoint(path: Path, device: torch.device, cfg: Config | None = None) -> dict:
    """Load a checkpoint; with `cfg`, refuse one whose learning-relevant settings differ from it."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        saved = ckpt["config"]
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}). Expected a checkpoint.pt "
                        f"written by dac.py.") from None
    fmt = ckpt.get("format", 1)  # checkpoints before format 2 had no number
    if fmt != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {fmt}, written by another version of "
                        f"dac.py; this one reads format {CHECKPOINT_FORMAT}. Resume or evaluate it with the dac.py "
                        f"that wrote it, or start a new run in another --out.")
    if cfg is not None:
        differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in dataclasses.asdict(cfg).items()
                  if k not in RUN_ONLY_FIELDS and saved.get(k) != v]
        if differ:
            raise UserError(f"checkpoint {path} comes from another configuration ({'; '.join(differ)}). Resume "
                            f"with the same flags as the original run, or start a new run in another --out.")
    return ckpt


def train(cfgs: list, device: torch.device) -> None:
    """Train one or several seeds on one device in lock-step: one call of the step function advances every seed
    (on CUDA each on its own stream, all captured in one graph on the fast path)."""
    dims = task_dims(cfgs[0].env)
    data = DeviceData(load_dataset(cfgs[0], *dims), device)
    runs = [Run(cfg, data, dims, device) for cfg in cfgs]
    if len({run.step for run in runs}) > 1:
        raise UserError(f"--resume: the seeds' checkpoints are at different steps "
                        f"({', '.join(f'seed {r.cfg.seed}: {r.step}' for r in runs)}), but --seeds trains its seeds "
                        f"in lock-step. Resume each seed on its own (--seed N --resume).")
    step_all = make_train_step([r.agent for r in runs], data, [r.metric_sum for r in runs], cfgs[0].fast)
    envs = make_eval_envs(cfgs[0].env, cfgs[0].eval_episodes)
    total, eval_every = cfgs[0].steps, cfgs[0].eval_every
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    from tqdm import tqdm

    bar = tqdm(total=total * len(runs), initial=sum(r.step for r in runs), unit="step", disable=None)
    try:
        while not interrupted and runs[0].step < total:
            tic = time.perf_counter()
            stop = min(total, (runs[0].step // eval_every + 1) * eval_every)
            while not interrupted and runs[0].step < stop:
                step_all()
                for run in runs:
                    run.after_step()
                bar.update(len(runs))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - tic
            if runs[0].step % eval_every == 0 or runs[0].step == total:
                for run in runs:
                    row = run.evaluate_and_save(envs, seconds)
                    bar.write(f"seed {run.cfg.seed} step {row['step']}: score {row['normalized_score']:.1f} "
                              f"(return {row['return_mean']:.0f}), eta {row['eta']:.3f}, "
                              f"{row['steps_per_sec']:.0f} steps/s")
                    bar.set_postfix(score=f"{row['normalized_score']:.1f}", sps=f"{row['steps_per_sec']:.0f}")
    except Exception:
        if not interrupted:
            raise
        # A terminal's Ctrl-C reaches the whole process group, so it also stops the compiler processes (g++,
        # ptxas) that torch.compile runs at the start and at the first evaluation, and that compile fails. A step
        # may then be half done, so nothing is saved: the checkpoints of the last evaluation stay as they were.
        saved_before = any((r.out / "checkpoint.pt").exists() for r in runs)
        print(f"interrupted while torch.compile was compiling (Ctrl-C stops its compiler too). Nothing was "
              f"saved at this point; " + ("the checkpoints of the last evaluation are intact: continue with the "
                                          "same command + --resume" if saved_before else "no checkpoint was written "
                                          "yet: run the same command again to start over"), file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        envs.close()
    if interrupted:
        for run in runs:
            run.save_checkpoint()
        print(f"interrupted: checkpoints saved at step {runs[0].step}; continue with the same command + --resume")
        sys.exit(130)
    for run in runs:
        print(f"seed {run.cfg.seed}: done, outputs in {run.out} "
              f"(final score {json.loads((run.out / 'summary.json').read_text())['final_score']:.1f})")


def eval_only(cfg: Config, given: set, device: torch.device) -> None:
    ckpt = load_checkpoint(Path(cfg.eval_only), device)
    saved = Config(**ckpt["config"])
    clash = [k for k in given if k not in RUN_ONLY_FIELDS and getattr(cfg, k) != getattr(saved, k)]
    if clash:
        raise UserError(f"--eval-only {cfg.eval_only}: the checkpoint was trained with other settings for "
                        f"{', '.join('--' + k.replace('_', '-') for k in clash)}; drop those flags (the checkpoint's "
                        f"own configuration is used).")
    torch.manual_seed(saved.seed)
    agent = DAC(saved, *task_dims(saved.env), device)
    agent.load_full_state(ckpt["agent"])
    envs = make_eval_envs(saved.env, cfg.eval_episodes)
    act = make_policy(agent, cfg.fast)
    returns = evaluate(act, envs, saved.seed * 1_000_003 + int(agent.step), device)
    envs.close()
    result = {"checkpoint": cfg.eval_only, "step": int(agent.step), "episodes": cfg.eval_episodes,
              "return_mean": float(returns.mean()), "return_std": float(returns.std()),
              "normalized_score": float(normalized_score(saved.env, returns).mean()), "note": score_note(saved)}
    print(json.dumps(result, indent=2))


def config_parser(cls, description: str) -> argparse.ArgumentParser:
    """One flag per field of a config dataclass (Config, or toy_bandit's), with the field's help and default.
    Flags not given stay out of the parsed namespace, so presets can sit between defaults and flags."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        meta, default = dict(f.metadata), getattr(cls(), f.name)
        kwargs = dict(default=argparse.SUPPRESS, help=f"{meta.pop('help')} (default: {default!r})")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(nargs="+", type=meta.pop("type", str), **meta)
        else:
            kwargs.update(type=type(default), **meta)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def parse_config(argv: list | None = None) -> tuple:
    """Command line generated from Config: presets for --env first, then every flag given overrides them.
    Returns (config, names of the flags given)."""
    given = vars(config_parser(Config, __doc__.split("\n\n")[0]).parse_args(argv))
    cfg = Config(**{**PRESETS.get(given.get("env", Config.env), {}), **given})
    check_config(cfg)
    return cfg, set(given)


def main(argv: list | None = None) -> None:
    try:
        cfg, given = parse_config(argv)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                              else cfg.device)
        if cfg.eval_only:
            return eval_only(cfg, given, device)
        seeds = cfg.seeds or [cfg.seed]
        base = cfg.out or f"runs/{cfg.env}"
        cfgs = [dataclasses.replace(cfg, seed=s, seeds=[],
                                    out=cfg.out if cfg.out and not cfg.seeds else f"{base}/seed{s}")
                for s in seeds]
        print("config:", json.dumps({k: v for k, v in dataclasses.asdict(cfgs[0]).items()}, indent=None))
        print(f"device: {device}{' (fast path: CUDA graph)' if cfg.fast and device.type == 'cuda' else ''}; "
              f"seeds {seeds}; outputs in {', '.join(c.out for c in cfgs)}")
        train(cfgs, device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before or after the training loop, which saves a checkpoint itself
        print("interrupted (outside the training loop: nothing was in progress to save)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
