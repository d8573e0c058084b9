"""Diffusion Actor-Critic (DAC) for offline reinforcement learning, in one file.

Paper: Fang, Liu, Zhang, Wang, Jing. "Diffusion Actor-Critic: Formulating Constrained Policy Iteration as
Diffusion Noise Regression for Offline Reinforcement Learning". arXiv:2405.20555 (2024).
Official code (JAX): https://github.com/Fang-Lin93/DAC

The policy is a diffusion model trained by noise regression whose target is shifted by the critic's action
gradient (the paper's soft Q-guidance, from its Theorem 1); the critic is a Q-ensemble whose TD target is a lower
confidence bound (LCB) over the ensemble. The file reads in the paper's order:

    config and presets -> diffusion schedule and sampler -> networks -> losses, one function per equation ->
    the agent's update (one gradient step) -> training loop -> evaluation -> data loading ->
    checkpoints and command line -> appendix: the fast path (torch.compile and CUDA graphs)

    python dac.py --env hopper-medium-v2 --dataset hopper_medium-v2.hdf5

Deliberate differences from the official code (README.md, "Deliberate differences", gives the reasons):
* Evaluation runs on Gymnasium's v5 MuJoCo tasks (Hopper-v5, ...), not D4RL's mujoco-py v2 tasks; scores are
  normalised with D4RL's constants but are not the same benchmark as the paper's table.
* Data come from D4RL hdf5 files or Minari (mujoco/*-v0, recorded on v5 tasks) instead of the d4rl package;
  transitions that end in a time-out are kept (their next observation is in the file) where d4rl's
  `qlearning_dataset` drops them.
* Batches come in shuffled passes over the data as in the official code, but every batch is full and from one
  pass: a pass's last (size mod batch) rows are skipped, where the official code's short last batch makes each later
  pass start one short batch early.
* AntMaze runs on Minari's D4RL/antmaze datasets in Gymnasium-Robotics' AntMaze-v4 (D4RL's maze maps, goal
  radius 0.45 where D4RL's is 0.5), not on D4RL's mujoco-py antmaze; the network input adds the desired goal.
* Each agent owns a torch.Generator; evaluation draws from a separate one, so it never shifts training noise.
* The fast path on CUDA runs float32 matrix products in TF32, as JAX does by default on GPUs.
* `--guidance none` (diffusion BC) and `--no-clip-sample` exist for ablations; `--critic-layer-norm` and
  `--clip-target`, off by default, are remedies for a diverging critic; `--bf16`, off by default and experimental,
  runs the networks' hidden layers in bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
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
    """A Config field: its default, its --help text, and extra argparse settings (choices, type of items); the first
    field of each group of flags names it (section="...")."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(help=help, **kwargs))
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class Config:
    env: str = arg("hopper-medium-v2", "D4RL-style dataset name(s) (the valid names are listed at the end); each picks "
                                       "its task, preset and data. Several names: one run per name and seed",
                   nargs="+", section="task and data")
    dataset: list = arg([], "D4RL-layout hdf5 files and/or Minari ids, concatenated in order (default: the --env "
                            "name's data: D4RL's cache file, else Minari)")
    steps: int = arg(2_000_000, "gradient steps (the cosine learning-rate decay spans them)",
                     section="run length, evaluation, output")
    stop_at: int = arg(0, "stop after this many gradient steps, keeping the schedule of --steps (0: run all --steps); "
                          "a stopped run continues with --resume --stop-at N")
    eval_every: int = arg(10_000, "gradient steps between evaluations (and checkpoints)")
    eval_episodes: int = arg(10, "episodes per evaluation, run together in a vector env")
    seed: int = arg(0, "random seed (networks, batches, noise)")
    seeds: list = arg([], "train several seeds at once on one device, each with its own outputs (overrides --seed)",
                      type=int)
    device: str = arg("auto", "where to train", choices=["auto", "cpu", "cuda"])
    out: str = arg("", "output folder (default: runs/<env>/seed<seed>; with --seeds, runs/<env>, one seed<N> "
                       "folder in it per seed)")
    resume: bool = arg(False, "continue the run in --out from its checkpoint, with exactly its state and "
                              "configuration; flags given again must agree with it")
    eval_only: str = arg("", "evaluate the agent in this checkpoint (checkpoint.pt, or the run folder holding it) "
                             "and exit")
    video: str = arg("", "write one evaluation episode, rendered offscreen by MuJoCo, to this .gif file (or .mp4, "
                         "with ffmpeg): with --eval-only, or at the end of training (several runs: one file each, "
                         "its name + _<env>_seed<seed>)")
    report: list = arg([], "write report.md and report.png over the runs found in these folders and exit")
    fast: bool = arg(True, "torch.compile the gradient step and acting; on CUDA also replay each as a CUDA graph "
                           "(--no-fast: plain eager PyTorch)")
    guidance: str = arg("soft", "Q-guidance of the actor loss ('none': plain diffusion behaviour cloning)",
                        choices=["soft", "hard", "denoised", "none"],
                        section="actor: diffusion policy and Q-guidance")
    T: int = arg(5, "diffusion steps")
    clip_sample: bool = arg(True, "clip the sampler's x0 estimate to [-1, 1] at every reverse step")
    eta: float = arg(1.0, "initial weight of the behaviour-cloning term (KL constraint strength)")
    eta_lr: float = arg(1e-3, "dual-ascent step size for eta (0 keeps eta fixed)")
    bc_threshold: float = arg(1.0, "b: eta rises while the noise-regression loss exceeds b, falls below it "
                                   "(default: the --env name's preset, listed at the end; 1.0 without one)")
    num_action_samples: int = arg(10, "N_a: actions sampled per state when acting; the best by Q is taken")
    actor_lr: float = arg(3e-4, "actor Adam learning rate (cosine-decayed to 0)")
    actor_ema_tau: float = arg(0.005, "EMA rate of the target actor")
    actor_ema_every: int = arg(5, "update the target actor every this many steps ...")
    actor_ema_start: int = arg(1000, "... once the step count exceeds this")
    num_qs: int = arg(10, "H: critics in the ensemble", section="critic: Q-ensemble with LCB target")
    rho: float = arg(1.0, "LCB pessimism: target = mean_h V - rho * std_h V (default: the --env name's preset, "
                          "listed at the end; 1.0 without one)")
    q_target: str = arg("lcb", "ensemble target", choices=["lcb", "min"])
    num_next_actions: int = arg(10, "N: next actions drawn from the target actor per next state")
    next_action_max: bool = arg(False, "V(s') per critic: the max of its Q over the N next actions instead of their "
                                       "mean (the official code's maxQ, its AntMaze setting)")
    critic_lr: float = arg(3e-4, "critic Adam learning rate (cosine-decayed to 0)")
    tau: float = arg(0.005, "Polyak rate of the target critics")
    gamma: float = arg(0.99, "discount")
    critic_layer_norm: bool = arg(False, "LayerNorm in the critics' 3 hidden layers, between each linear map and its "
                                         "Mish, with each critic's own scale and shift: a remedy for Q divergence in "
                                         "offline RL (Yue et al. 2023, 'Understanding, predicting and better "
                                         "resolving Q-value divergence in offline RL'; Ball et al. 2023, 'Efficient "
                                         "online reinforcement learning with offline data')")
    clip_target: bool = arg(False, "clip the TD target to the range of discounted returns the data's rewards allow, "
                                   "on the training reward scale: [min r, max r] / (1 - gamma), or min r (max r) "
                                   "itself as the lower (upper) end where that is further out, since a terminal's "
                                   "target is r (as Andrychowicz et al. 2017, 'Hindsight experience replay', clip "
                                   "their critic's targets to the range of possible values)")
    batch_size: int = arg(256, "transitions per gradient step", section="shared")
    hidden_dim: int = arg(256, "width of the 3 hidden layers of every network")
    grad_clip: float = arg(1.0, "global gradient-norm clip per network")
    init: str = arg("flax", "weight initialisation: flax = the official code's (Xavier-uniform weights, zero biases), "
                            "torch = PyTorch's nn.Linear initialisation", choices=["flax", "torch"])
    batch_order: str = arg("epochs", "epochs = shuffled passes over the data without replacement (the official code's "
                                     "order), random = independent uniform draws", choices=["epochs", "random"])
    bf16: bool = arg(False, "the networks' hidden layers (matrix products and activations) in bfloat16 under "
                            "torch.autocast; output layers, parameters, Adam states, losses, targets and eta stay "
                            "float32. Opt-in and experimental: its speed and scores against float32 are not measured "
                            "on a GPU yet (docs/performance.md)")


# AntMaze: D4RL's names (v0 and v2) -> the Minari datasets recorded on Gymnasium-Robotics' AntMaze-v4 with D4RL's
# maze maps. Each dataset names the environment it is evaluated in.
ANTMAZE = {f"antmaze-{maze}-{v}": f"D4RL/antmaze/{maze}-v1"
           for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
           for v in ("v0", "v2")}

# The official per-dataset settings (the official repository's runs.sh); any command-line flag overrides them.
PRESETS = {
    **{f"walker2d-{d}-v2": dict(rho=1.0, bc_threshold=1.0) for d in ("medium", "medium-replay", "medium-expert")},
    "hopper-medium-v2": dict(rho=1.5, bc_threshold=1.0),
    "hopper-medium-replay-v2": dict(rho=1.5, bc_threshold=1.0),
    "hopper-medium-expert-v2": dict(rho=1.5, bc_threshold=0.05),
    "halfcheetah-medium-v2": dict(rho=0.0, bc_threshold=1.0),
    "halfcheetah-medium-replay-v2": dict(rho=0.0, bc_threshold=1.0),
    "halfcheetah-medium-expert-v2": dict(rho=0.0, bc_threshold=0.1),
    # AntMaze: max over the next actions and eta fixed at 0.1; rho 1.1 on large-play, critic lr 1e-3 on the large
    # mazes. Rewards get the locomotion return-range scale (the official runs pass no antmaze reward option).
    **{name: dict(next_action_max=True, eta=0.1, eta_lr=0.0, rho=1.1 if "large-play" in name else 1.0,
                  critic_lr=1e-3 if "large" in name else 3e-4) for name in ANTMAZE},
}

# Task family -> (Gymnasium task used for evaluation, D4RL random score, D4RL expert score). AntMaze evaluates in
# the environment its Minari dataset names, where an episode's return is 1 if it reached the goal and 0 if not.
TASKS = {
    "hopper": ("Hopper-v5", -20.272305, 3234.3),
    "walker2d": ("Walker2d-v5", 1.629008, 4592.3),
    "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0),
    "antmaze": ("AntMaze_*-v4", 0.0, 1.0),
}
LEVELS = ("medium", "medium-replay", "medium-expert", "expert")
ENV_NAMES = [f"{family}-{level}-v2" for family in ("hopper", "walker2d", "halfcheetah") for level in LEVELS]
ENV_NAMES += ANTMAZE


# Fields that may change between a run and its resumption (they do not change what is learned).
RUN_ONLY_FIELDS = {"out", "resume", "eval_only", "report", "device", "fast", "eval_episodes", "seeds", "stop_at",
                   "video"}


def family_of(env: str) -> str:
    return env.split("-")[0]


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one paragraph and exits non-zero, no traceback."""


# ======================================================================================================
# Diffusion schedule and sampler (the paper's diffusion model: a T = 5 step VP schedule, DDPM sampling)
# ======================================================================================================
def vp_schedule(T: int, b_min: float = 0.1, b_max: float = 10.0) -> dict:
    """VP schedule, alpha_t = exp(-b_min/T - (b_max-b_min)(2t-1)/(2T^2)), t = 1..T, with alpha_0 = 1 prepended
    so that index t is step t and abar_0 = 1. Computed in float64; returns tensors of length T + 1 in torch's
    default dtype."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    alphas = torch.cat([torch.ones(1, dtype=torch.float64),
                        torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)])
    abar = torch.cumprod(alphas, 0)
    dtype = torch.get_default_dtype()
    return {"alphas": alphas.to(dtype), "betas": (1 - alphas).to(dtype), "abar": abar.to(dtype)}


def noisy_action(a: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps. a, eps (B, A); t (B,) -> (B, A)."""
    ab = abar[t].unsqueeze(-1)  # (B, 1)
    return ab.sqrt() * a + (1 - ab).sqrt() * eps


def ddpm_sample(actor: nn.Module, state: torch.Tensor, sched: dict, gen: torch.Generator,
                clip_x0: bool = True) -> torch.Tensor:
    """Reverse chain x_T ~ N(0, I) -> x_0, the DDPM posterior mean written through the x0 estimate:
    x0 = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) (clipped to [-1, 1]),
    x_{t-1} = (sqrt(abar_{t-1}) beta_t x0 + sqrt(alpha_t) (1 - abar_{t-1}) x_t) / (1 - abar_t) + sqrt(beta_t) z,
    no noise at t = 1. state (M, S) -> actions (M, A). Gradients flow through the chain unless disabled."""
    alphas, betas, abar = sched["alphas"], sched["betas"], sched["abar"]
    M, T = state.shape[0], len(alphas) - 1
    noise = torch.randn(T, M, actor.act_dim, device=state.device, generator=gen)  # (T, M, A): x_T, then z per step
    temb = actor.time_embedding(torch.arange(1, T + 1, device=state.device))  # (T, 32): row t - 1 is step t
    x = noise[0]  # (M, A): x_T
    for t in range(T, 0, -1):
        eps = actor.predict(state, x, temb[t - 1])  # (M, A)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        x = (abar[t - 1].sqrt() * betas[t] * x0 + alphas[t].sqrt() * (1 - abar[t - 1]) * x) / (1 - abar[t])
        if t > 1:
            x = x + betas[t].sqrt() * noise[T - t + 1]  # the noise of step t
    return x


# ======================================================================================================
# Networks: the noise predictor eps_theta(s, x_t, t) and the Q-ensemble, 3 hidden layers of 256 with Mish
# ======================================================================================================
def timestep_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    """Fixed sinusoidal features of the integer step: [cos(t f_k), sin(t f_k)], f_k = exp(-log(1e4) k/(dim/2-1)).
    t (M,) -> (M, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / (half - 1))  # (dim/2,)
    angles = t.to(freqs.dtype).unsqueeze(-1) * freqs  # (M, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Mish(nn.Module):
    """nn.Mish, x tanh(softplus(x)). Hand-written for speed: compiled F.mish (three transcendentals) cost 41% of the
    compiled CPU step's speed (docs/performance.md). Compiled, this is x n / (n + 2) with n = e^x (e^x + 2), one exp,
    equal to F.mish within 5e-7 (test_mish_equals_torch_mish); eagerly it is F.mish, whose one kernel is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.mish(x)
        e = torch.exp(x.clamp(max=20.0))  # above 20, n / (n + 2) is 1 in float32
        n = e * (e + 2)
        return x * n / (n + 2)


def run_network(net: nn.Sequential, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """net(x). With --bf16 its hidden layers run under torch.autocast in bfloat16 (matrix products and activations)
    and its output layer in float32: bfloat16's 8 significant bits would resolve a Q of 100-250 only to 0.5-1, about
    one step's reward on the training scale, likely coarser than the gaps policy extraction's argmax compares. So the
    sampler, targets, losses and eta get float32, and gradients reach the float32 parameters through autocast's
    casts. Autocast's cache of cast weights is off, as PyTorch requires where CUDA graphs are captured (fast path)."""
    if not bf16:
        return net(x)
    with torch.autocast(x.device.type, torch.bfloat16, cache_enabled=False):
        hidden = net[:-1](x)
    return net[-1](hidden.float())


class NoiseMLP(nn.Module):
    """eps_theta(s, x_t, t): MLP on [s, x_t, time MLP(sinusoidal(t))], 3 hidden layers, Mish."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, time_dim: int = 16, bf16: bool = False):
        super().__init__()
        self.act_dim, self.bf16 = act_dim, bf16
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 32), Mish(), nn.Linear(32, 32))
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim + 32, hidden), Mish(),
                                 nn.Linear(hidden, hidden), Mish(),
                                 nn.Linear(hidden, hidden), Mish(),
                                 nn.Linear(hidden, act_dim))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t (M,) integer steps -> (M, 32)."""
        return run_network(self.time_mlp, timestep_features(t), self.bf16)

    def predict(self, s: torch.Tensor, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """eps_theta from a ready time embedding: s (M, S), x (M, A), temb (M, 32) or one row (32,) for all M."""
        return run_network(self.net, torch.cat([s, x, temb.expand(x.shape[0], -1)], dim=-1), self.bf16)  # (M, A)

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
        out = torch.bmm(x, self.weight)  # (H, M, out)
        return out + self.bias.to(out.dtype)  # under --bf16's autocast the product is bfloat16, and so the sum


class VectorizedLayerNorm(nn.Module):
    """LayerNorm for H ensemble members: each member's features normalised over the feature dimension, then scaled
    and shifted by that member's own parameters, as in the vmapped critic ensembles of RLPD (Ball et al. 2023) and
    of the official code (its EnsembleQ's `layer_norm`, off for DAC). Flax's epsilon, 1e-6. x (H, M, features)."""

    def __init__(self, features: int, ensemble: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ensemble, 1, features))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias  # (H, M, features)


def flax_init_(net: nn.Module) -> None:
    """The official code's initialisation (Flax Dense with xavier_uniform): Xavier-uniform weights, U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)), drawn per ensemble member, and zero biases."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, VectorizedLinear)):
            for w in m.weight.view(-1, *m.weight.shape[-2:]):  # (out, in) or each member's (in, out)
                nn.init.xavier_uniform_(w)
            nn.init.zeros_(m.bias)


class EnsembleCritic(nn.Module):
    """H Q-networks Q_h(s, a): 3 hidden layers, Mish, scalar output, all evaluated in one batched pass. With
    layer_norm (--critic-layer-norm, not the paper's), each hidden layer is linear -> LayerNorm -> Mish: LayerNorm
    before the activation, as Ball et al. (2023) and Yue et al. (2023) place it."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, num_qs: int = 10, layer_norm: bool = False,
                 bf16: bool = False):
        super().__init__()
        self.bf16 = bf16
        norm = lambda: [VectorizedLayerNorm(hidden, num_qs)] if layer_norm else []
        self.net = nn.Sequential(VectorizedLinear(obs_dim + act_dim, hidden, num_qs), *norm(), Mish(),
                                 VectorizedLinear(hidden, hidden, num_qs), *norm(), Mish(),
                                 VectorizedLinear(hidden, hidden, num_qs), *norm(), Mish(),
                                 VectorizedLinear(hidden, 1, num_qs))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return run_network(self.net, torch.cat([s, a], dim=-1), self.bf16).squeeze(-1)  # (H, M)


# ======================================================================================================
# Losses: one small function per equation of the paper
# ======================================================================================================
def ensemble_value(v: torch.Tensor, kind: str, rho: float) -> torch.Tensor:
    """The ensemble's value target. v (H, B) -> (B): the LCB  mean_h v - rho std_h v (ddof 0), or  min_h v
    (the paper's ablation)."""
    if kind == "lcb":
        return v.mean(0) - rho * v.std(0, correction=0)
    return v.min(0).values


def td_target(reward: torch.Tensor, terminal: torch.Tensor, next_value: torch.Tensor, gamma: float):
    """y = r + gamma (1 - terminal) V(s'). All (B,)."""
    return reward + gamma * (1 - terminal) * next_value


def return_range(r_min: float, r_max: float, gamma: float) -> tuple:
    """The range of the discounted returns sum_k gamma^k r_k of episodes of any length >= 1 whose rewards lie in
    [r_min, r_max] (for --clip-target, not the paper's): [min(r_min, r_min / (1 - gamma)), max(r_max, r_max /
    (1 - gamma))], which is [r_min, r_max] / (1 - gamma) when r_min <= 0 <= r_max; were every reward positive, the
    lowest return would be one reward, r_min (a one-step episode). A TD target y = r + gamma (1 - terminal) V(s')
    with V(s') in this range stays in it, a terminal's y = r included."""
    horizon = 1 / (1 - gamma) if gamma < 1 else math.inf  # sum_k gamma^k
    return (r_min if r_min >= 0 else r_min * horizon), (r_max if r_max <= 0 else r_max * horizon)


def critic_loss(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over critics and batch of (Q_h(s, a) - y)^2. q (H, B), y (B,)."""
    return (q - y).pow(2).mean()


def q_gradient(critic: nn.Module, s: torch.Tensor, x_t: torch.Tensor, q_norm: torch.Tensor) -> torch.Tensor:
    """g = grad_{x_t} mean_h Q_h(s, x_t) / (Q_norm + 1e-6), taken at the NOISY action x_t. (B, A)"""
    x_t = x_t.detach().requires_grad_(True)
    q = critic(s, x_t).mean(0)  # (B,)
    (g,) = torch.autograd.grad(q.sum(), x_t)
    return g / (q_norm + 1e-6)


def bc_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Noise regression (diffusion behaviour cloning): mean((eps_theta - eps)^2)."""
    return (eps_pred - eps).pow(2).mean()


def soft_guidance_loss(eps_pred, g, noise_level):
    """Soft Q-guidance: mean(sqrt(1 - abar_t) g . eps_theta). With eta * bc this is eta times the expanded square
    ||eps_theta - eps + sqrt(1 - abar_t) g / (2 eta)||^2 up to a constant: noise regression towards the shifted
    target eps - sqrt(1 - abar_t) grad Q / eta of Theorem 1."""
    return (noise_level * g * eps_pred).mean()


def hard_guidance_loss(eps_pred, g):
    """Hard Q-guidance (the paper's ablation): mean(g . eps_theta), without the noise-level factor."""
    return (g * eps_pred).mean()


def denoised_guidance_loss(critic, s, a0, q_norm):
    """Denoised guidance (the paper's ablation, Diffusion-QL style): -mean_h Q_h(s, a0) / (Q_norm + 1e-6), with a0
    sampled through the whole reverse chain WITH gradients."""
    return -critic(s, a0).mean() / (q_norm + 1e-6)


def dual_ascent_eta(eta, bc_after, bc_threshold: float, eta_lr: float):
    """Dual gradient ascent on the constraint strength: eta <- clip(eta + eta_lr clip(bc' - b, -1, 1), 0.001, 100)."""
    return (eta + eta_lr * (bc_after - bc_threshold).clamp(-1, 1)).clamp(1e-3, 100.0)


def pick_best(actions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Policy extraction: actions (B, N, A), q (B, N) -> the argmax-Q action of each state, clipped to [-1, 1].
    (B, A)"""
    best = q.argmax(dim=1)  # (B,)
    return actions[torch.arange(actions.shape[0], device=actions.device), best].clamp(-1, 1)


def cosine_lr(base_lr: float, step: torch.Tensor, total: int) -> torch.Tensor:
    """The learning rate of gradient step `step` (0-based): base_lr (1 + cos(pi min(step, total) / total)) / 2."""
    return base_lr * 0.5 * (1 + torch.cos(math.pi * step.clamp(max=total) / total))


@torch.no_grad()
def soft_update_(target: nn.Module, source: nn.Module, rate) -> None:
    """Polyak / EMA averaging, target <- target + rate (source - target); `rate` may be a tensor."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.add_((s - t) * rate)


# ======================================================================================================
# The agent and its update: one gradient step of the critic, then of the actor
# ======================================================================================================
class Batch(NamedTuple):
    obs: torch.Tensor       # (B, S)
    act: torch.Tensor       # (B, A)
    rew: torch.Tensor       # (B,)
    next_obs: torch.Tensor  # (B, S)
    terminal: torch.Tensor  # (B,)


class Metrics(NamedTuple):
    """What one update reports (0-d tensors, left on the device)."""
    critic_loss: torch.Tensor     # TD loss of the ensemble
    bc_loss: torch.Tensor         # noise-regression loss of the actor, before its step (drives eta)
    guidance_loss: torch.Tensor   # the Q-guidance term of the actor loss
    eta: torch.Tensor             # the constraint strength after this step's dual ascent
    q_mean: torch.Tensor          # mean Q_h(s, a) over the ensemble and the batch
    q_ensemble_std: torch.Tensor  # spread of the ensemble: std over h of Q_h(s, a), averaged over the batch


class DAC(nn.Module):
    """Actor, target actor (EMA), critic ensemble, target critics, eta and the step count, plus the two Adam
    optimisers. `update` is one whole gradient step."""

    def __init__(self, cfg: Config, obs_dim: int, act_dim: int, device: torch.device,
                 reward_range: tuple = (-math.inf, math.inf)):
        """reward_range: the lowest and highest reward of the training data, as scaled for training; with
        clip_target the TD target's bounds come from it (unbounded without it: for an agent about to load a
        checkpoint, which holds the bounds)."""
        super().__init__()
        self.cfg = cfg
        self.actor = NoiseMLP(obs_dim, act_dim, cfg.hidden_dim, bf16=cfg.bf16)
        self.target_actor = NoiseMLP(obs_dim, act_dim, cfg.hidden_dim, bf16=cfg.bf16)
        critic = lambda: EnsembleCritic(obs_dim, act_dim, cfg.hidden_dim, cfg.num_qs, cfg.critic_layer_norm, cfg.bf16)
        self.critic, self.target_critic = critic(), critic()
        if cfg.init == "flax":
            flax_init_(self.actor)
            flax_init_(self.critic)
        self.target_actor.load_state_dict(self.actor.state_dict())
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_actor.requires_grad_(False)
        self.target_critic.requires_grad_(False)
        for name, value in vp_schedule(cfg.T).items():
            self.register_buffer(name, value)
        self.register_buffer("eta", torch.tensor(float(cfg.eta)))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))  # gradient steps taken
        if cfg.clip_target:  # the TD target's bounds, kept on the device and in checkpoints with the networks
            low, high = return_range(*reward_range, cfg.gamma)
            self.register_buffer("target_min", torch.tensor(float(low)))
            self.register_buffer("target_max", torch.tensor(float(high)))
        self.to(device)
        self.gen = torch.Generator(device).manual_seed(cfg.seed)  # all of this agent's training randomness
        # The learning rates are tensors, set from the cosine schedule inside `update`, so that a step replayed
        # as a CUDA graph follows the schedule. Fused Adam takes them on the CPU and, capturable, on CUDA.
        cuda = device.type == "cuda"
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=torch.tensor(cfg.actor_lr, device=device),
                                          fused=True, capturable=cuda)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=torch.tensor(cfg.critic_lr, device=device),
                                           fused=True, capturable=cuda)

    @property
    def sched(self) -> dict:
        return {"alphas": self.alphas, "betas": self.betas, "abar": self.abar}

    def optimise(self, opt: torch.optim.Optimizer, loss: torch.Tensor, base_lr: float) -> None:
        """One Adam step on `loss`: gradients clipped to a global norm, learning rate from the cosine schedule."""
        params = opt.param_groups[0]["params"]
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.param_groups[0]["lr"].copy_(cosine_lr(base_lr, self.step, self.cfg.steps))
        opt.step()

    @torch.no_grad()
    def critic_target(self, batch: Batch) -> torch.Tensor:
        """y = r + gamma (1 - terminal) LCB_h(mean_n Q'_h(s', a'_n)), a'_n ~ the target actor (N per state); with
        next_action_max, max_n in place of mean_n (the official code's AntMaze backup); with clip_target, y clipped
        to return_range of the data's rewards. (B,)"""
        B, N, H = batch.obs.shape[0], self.cfg.num_next_actions, self.cfg.num_qs
        s2 = batch.next_obs.repeat_interleave(N, dim=0)  # (B*N, S)
        a2 = ddpm_sample(self.target_actor, s2, self.sched, self.gen, self.cfg.clip_sample)  # (B*N, A)
        q2 = self.target_critic(s2, a2).view(H, B, N)  # (H, B, N)
        v2 = q2.amax(-1) if self.cfg.next_action_max else q2.mean(-1)  # (H, B)
        y = td_target(batch.rew, batch.terminal, ensemble_value(v2, self.cfg.q_target, self.cfg.rho), self.cfg.gamma)
        return y.clamp(self.target_min, self.target_max) if self.cfg.clip_target else y

    def update(self, batch: Batch) -> Metrics:
        """One gradient step: critic, target critics, actor, eta, target actor."""
        cfg, (s, a, _, _, _) = self.cfg, batch
        B = s.shape[0]

        # --- critic: TD regression onto the LCB target; then Polyak averaging of the target critics
        y = self.critic_target(batch)  # (B,)
        q = self.critic(s, a)  # (H, B)
        loss_q = critic_loss(q, y)
        self.optimise(self.critic_opt, loss_q, cfg.critic_lr)
        soft_update_(self.target_critic, self.critic, cfg.tau)

        # --- actor: noise regression with the Q-gradient shift, on noisy dataset actions
        t = torch.randint(1, cfg.T + 1, (B,), device=s.device, generator=self.gen)  # (B,)
        eps = torch.randn(a.shape, device=s.device, generator=self.gen)  # (B, A)
        x_t = noisy_action(a, t, eps, self.abar)  # (B, A)
        noise_level = (1 - self.abar[t]).sqrt().unsqueeze(-1)  # (B, 1): sqrt(1 - abar_t)
        with torch.no_grad():
            q_norm = self.target_critic(s, a).abs().mean()  # scale of Q at the dataset actions
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
        self.optimise(self.actor_opt, self.eta * loss_bc + loss_guide, cfg.actor_lr)

        with torch.no_grad():
            # --- eta: dual ascent on this step's noise-regression loss. The official code evaluates it after the
            # actor's step but with the actor from before it (its Flax model is immutable), i.e. this same loss.
            if cfg.eta_lr > 0:
                self.eta.copy_(dual_ascent_eta(self.eta, loss_bc, cfg.bc_threshold, cfg.eta_lr))
            # --- target actor: EMA every `actor_ema_every` steps once past `actor_ema_start` (else rate 0)
            due = (self.step % cfg.actor_ema_every == 0) & (self.step > cfg.actor_ema_start)
            soft_update_(self.target_actor, self.actor, torch.where(due, cfg.actor_ema_tau, 0.0))
            self.step += 1
            return Metrics(critic_loss=loss_q.detach(), bc_loss=loss_bc.detach(), guidance_loss=loss_guide.detach(),
                           eta=self.eta.clone(), q_mean=q.mean().detach(),
                           q_ensemble_std=q.std(0, correction=0).mean().detach())

    @torch.no_grad()
    def act(self, states: torch.Tensor, gen: torch.Generator) -> tuple:
        """Policy extraction: N_a actions per state from the online actor, the argmax of the ensemble-mean target
        Q. states (B, S) -> actions (B, A) and their Q (B,). One call for any number of states."""
        B, N = states.shape[0], self.cfg.num_action_samples
        s = states.repeat_interleave(N, dim=0)  # (B*N, S)
        a = ddpm_sample(self.actor, s, self.sched, gen, self.cfg.clip_sample)  # (B*N, A)
        q = self.target_critic(s, a).mean(0).view(B, N)  # (B, N)
        return pick_best(a.view(B, N, -1), q), q.max(dim=1).values

    def full_state(self) -> dict:
        """Everything a resumed run needs: networks, eta, step count (state_dict), both optimisers' moments and
        step counts, and the generator's state."""
        return {"nets": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "rng": self.gen.get_state()}

    def load_full_state(self, state: dict) -> None:
        rng = state["rng"].cpu()  # generator states are CPU byte tensors, even for CUDA generators
        if rng.numel() != self.gen.get_state().numel():  # CUDA and CPU generators keep states of different sizes
            where = "a CUDA GPU" if self.gen.device.type == "cpu" else "the CPU"
            raise UserError(f"this checkpoint's random generator state is that of a run trained on {where}, and "
                            f"continuing exactly needs the same kind of device: resume it on {where} (--device "
                            f"{'cuda' if where == 'a CUDA GPU' else 'cpu'}). --eval-only evaluates it on any device.")
        self.load_state_dict(state["nets"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.gen.set_state(rng)


# ======================================================================================================
# Training loop
# ======================================================================================================
def gradient_step(agent: DAC, data: DeviceData, metric_sums: dict) -> None:
    """One gradient step, written plainly: a fresh batch, the agent's update, its metrics added to the running sums
    on the device (no wait for the GPU). The fast path (appendix) compiles and captures exactly this function."""
    batch = data.sample(agent.cfg.batch_size, agent.gen)
    metrics = agent.update(batch)
    for name, value in metrics._asdict().items():
        metric_sums[name] += value


class Diverged(Exception):
    pass


PROGRESS_COLUMNS = ("step", "return_mean", "return_std", "normalized_score", "eval_q_mean", "eval_discounted_return",
                    "eval_action_at_bound", *Metrics._fields, "steps_per_sec")


class Run:
    """One (dataset, seed) training run: its agent and batches, the metric sums since the last evaluation, the
    history of evaluations, and the files in its output folder."""

    def __init__(self, cfg: Config, data: DeviceData, dims: tuple, device: torch.device):
        self.cfg, self.data, self.out = cfg, data, Path(cfg.out)
        torch.manual_seed(cfg.seed)  # network initialisation
        self.agent = DAC(cfg, *dims, device, data.reward_range)
        self.batches = EpochBatches(data, cfg.batch_size, cfg.seed) if cfg.batch_order == "epochs" else data
        self.metric_sums = {name: torch.zeros((), device=device) for name in Metrics._fields}
        self.metric_count, self.history, self.wall_seconds = 0, [], 0.0
        self.train_seconds = 0.0  # training time of the metric_count steps (across a resume): their steps/s
        self.saving = None  # the thread that saves this run's last evaluation, if one does (appendix)
        if cfg.resume:  # main() has checked that the checkpoint exists, or that none does without --resume
            self.load(load_checkpoint(self.out / "checkpoint.pt", device, cfg))
        self.step = int(self.agent.step)
        self.act = make_policy(self.agent, cfg.fast)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        self.started = time.perf_counter()

    def load(self, ckpt: dict) -> None:
        self.agent.load_full_state(ckpt["agent"])
        if self.cfg.batch_order == "epochs":
            self.batches.load_state(ckpt["batches"])
        for name, value in ckpt["metric_sums"].items():
            self.metric_sums[name].copy_(value)
        self.metric_count, self.history, self.wall_seconds = ckpt["metric_count"], ckpt["history"], ckpt["wall"]
        self.train_seconds = ckpt.get("train_seconds", 0.0)  # checkpoints before it was kept lack it

    def after_step(self) -> None:
        """Book-keeping on the host after each gradient step."""
        self.step += 1
        self.metric_count += 1
        if self.cfg.batch_order == "epochs":
            self.batches.next_step()
        if self.step % 1000 == 0:
            self.check_finite()

    def check_finite(self) -> None:
        bad = [name for name, value in self.metric_sums.items() if not torch.isfinite(value)]
        if bad:
            if self.saving is not None:
                self.saving.join()  # the checkpoint it saves is the last good one
            kept = (f"The last good checkpoint (step {self.history[-1]['step']}) is kept in "
                    f"{self.out / 'checkpoint.pt'}." if self.history else "No checkpoint had been written yet.")
            raise Diverged(
                f"{self.cfg.env} seed {self.cfg.seed}: training diverged before step {self.step}: {', '.join(bad)} "
                f"became NaN or infinite. {kept} Try a smaller --actor-lr/--critic-lr, a larger --rho, or another "
                f"--seed.")

    def elapsed(self) -> float:
        return self.wall_seconds + time.perf_counter() - self.started

    def evaluate_and_save(self, envs) -> dict:
        """Evaluate, append a progress row, checkpoint, rewrite the other output files. Returns the row."""
        self.check_finite()
        result = evaluate(self.act, envs, evaluation_seed(self.cfg, self.step), self.agent.step.device,
                          self.cfg.gamma, self.data.reward_scale)
        window = self.end_window()  # before the checkpoint: it holds the sums of the next window
        return self.save_evaluation(self.step, result, window, self.checkpoint())

    def end_window(self) -> dict:
        """The means of the training metrics since the last progress row, and those steps' steps/s; then the sums
        start again."""
        window = {name: value.item() / max(self.metric_count, 1) for name, value in self.metric_sums.items()}
        window["steps_per_sec"] = self.metric_count / max(self.train_seconds, 1e-9)
        for value in self.metric_sums.values():
            value.zero_()
        self.metric_count, self.train_seconds = 0, 0.0
        return window

    def save_evaluation(self, step: int, result: Evaluation, window: dict, ckpt: dict) -> dict:
        """Append the progress row of the evaluation at `step` (training metrics: `window`), save `ckpt` (the state
        at `step`) with that row in its history, then rewrite the other output files. Returns the row."""
        row = {"step": step, "return_mean": float(result.returns.mean()), "return_std": float(result.returns.std()),
               "normalized_score": float(normalized_score(self.cfg.env, result.returns).mean()),
               "eval_q_mean": result.q_mean, "eval_discounted_return": result.discounted_return,
               "eval_action_at_bound": result.action_at_bound, **window}
        self.history.append(row)
        save_checkpoint(self.out / "checkpoint.pt", {**ckpt, "history": self.history})
        self.write_outputs()
        return row

    def write_outputs(self) -> None:
        """progress.csv, summary.json and curve.png from the history; the checkpoint holding it is already written."""
        try:
            with open(self.out / "progress.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=PROGRESS_COLUMNS)
                writer.writeheader()
                writer.writerows(self.history)
            scores = [r["normalized_score"] for r in self.history]
            summary = {"final_score": float(np.mean(scores[-5:])), "best_score": float(np.max(scores)),
                       "steps": self.history[-1]["step"], "schedule_steps": self.cfg.steps,
                       "stop_at": self.cfg.stop_at, "wall_seconds": round(self.elapsed(), 1), "env": self.cfg.env,
                       "seed": self.cfg.seed, "data": self.cfg.dataset or default_sources(self.cfg.env)[0],
                       "behaviour_score": self.data.behaviour_score, "note": score_note(self.cfg)}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_curve(self.history, self.out / "curve.png",
                       f"DAC {self.cfg.env} seed {self.cfg.seed}\ndata: {data_names(self.cfg)}",
                       self.data.behaviour_score)
        except OSError as e:
            raise UserError(f"cannot write {e.filename or self.out} ({e.strerror or e}). The checkpoint of step "
                            f"{self.history[-1]['step']} was written before it and is intact: free space (or make "
                            f"{self.out} writable), then continue with the same command + --resume, which writes the "
                            f"outputs again.") from None

    def checkpoint(self) -> dict:
        """What checkpoint.pt holds: the configuration, the agent's and the batches' state, the metric sums and the
        history so far."""
        return {"config": dataclasses.asdict(self.cfg), "agent": self.agent.full_state(),
                "batches": self.batches.state() if self.cfg.batch_order == "epochs" else {},
                "metric_sums": {name: value.cpu() for name, value in self.metric_sums.items()},
                "metric_count": self.metric_count, "train_seconds": self.train_seconds,
                "history": self.history, "wall": self.elapsed(), "reward_scale": self.data.reward_scale,
                "data_files": {src: file_fingerprint(src) for src in self.cfg.dataset if is_file_source(src)}}

    def save_checkpoint(self) -> None:
        save_checkpoint(self.out / "checkpoint.pt", self.checkpoint())


PROGRESS_EVERY_SECONDS = 30.0  # output not a terminal (nohup, a cluster job, CI): a plain progress line this often


def duration(seconds: float) -> str:
    """Roughly, for people: 45 s, 12 min, 3.4 h, 2.3 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172_800 else f"{seconds / 86400:.1f} days"


def progress_line(runs: list, total: int, steps_per_sec: float | None) -> str:
    """What the progress bar shows, as one plain line: step, steps/s, last score(s), training time left. None for
    steps/s: the line right after the fast path's first step, which includes torch.compile's compiling."""
    step, scores = runs[0].step, [f"{r.history[-1]['normalized_score']:.1f}" for r in runs if r.history]
    speed = ("first step done, compiling included (steps/s and time left follow)" if steps_per_sec is None else
             f"{steps_per_sec:.1f} steps/s")
    left = "" if steps_per_sec is None else f", about {duration((total - step) / max(steps_per_sec, 1e-9))} left"
    score = ", ".join(scores) or "none yet"
    return f"step {step}/{total} ({100 * step / total:.1f}%), {speed}, last score {score}{left}"


def train(cfgs: list, device: torch.device) -> None:
    """Train several runs (seeds, datasets) on one device in lock-step, evaluating and checkpointing every
    eval_every steps, until --stop-at or --steps. Ctrl-C finishes the current step, saves a checkpoint and exits
    with code 130."""
    datas, envs = {}, {}
    for cfg in cfgs:  # one copy of each dataset on the device, shared by that dataset's seeds
        if cfg.env not in datas:
            datas[cfg.env] = (DeviceData(load_dataset(cfg, *task_dims(cfg.env)), device), task_dims(cfg.env))
    runs = [Run(cfg, *datas[cfg.env], device) for cfg in cfgs]
    if len({run.step for run in runs}) > 1:
        raise UserError(f"--resume: the runs' checkpoints are at different steps "
                        f"({', '.join(f'{r.cfg.env} seed {r.cfg.seed}: {r.step}' for r in runs)}), but runs "
                        f"launched together train in lock-step. Resume each on its own (--env E --seed N --resume).")
    # The fast path (appendix): every run's gradient_step compiled, and on CUDA all replayed as one CUDA graph.
    fast_step = make_fast_step([r.agent for r in runs], [r.batches for r in runs], [r.metric_sums for r in runs],
                               device) if cfgs[0].fast else None
    for cfg in cfgs:
        envs.setdefault(cfg.env, make_eval_envs(cfg.env, cfg.eval_episodes))

    def show(run: Run, row: dict) -> None:  # a line per evaluation, above the progress bar
        bar.write(f"{run.cfg.env} seed {run.cfg.seed} step {row['step']}: score {row['normalized_score']:.1f} "
                  f"(return {row['return_mean']:.0f}), eta {row['eta']:.3f}, {row['steps_per_sec']:.0f} steps/s")
        bar.set_postfix(score=f"{row['normalized_score']:.1f}", sps=f"{row['steps_per_sec']:.0f}")

    # The fast path on CUDA evaluates in a thread while training goes on (appendix); else each run in turn, below.
    background = (BackgroundEvaluation(runs, envs, show, fast_step) if evaluates_in_background(cfgs[0], device)
                  else None)
    total, eval_every = cfgs[0].steps, cfgs[0].eval_every
    end = cfgs[0].stop_at or total  # check_config keeps --stop-at within --steps
    interrupted = []

    def on_ctrl_c(*_) -> None:  # said at once: the step may still be compiling for a minute
        if not interrupted:
            print("\nCtrl-C: stopping after the current step, then saving checkpoints (the first step after a start "
                  "compiles on the fast path, which can take a minute)", file=sys.stderr, flush=True)
        interrupted.append(True)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    from tqdm import tqdm

    last = {"score": f"{runs[-1].history[-1]['normalized_score']:.1f}"} if runs[-1].history else None  # resumed
    bar = tqdm(total=end * len(runs), initial=sum(r.step for r in runs), unit="step", disable=None, postfix=last)
    first_step = runs[0].step  # the fast path compiles during this process's first step: a line of its own
    try:
        while not interrupted and runs[0].step < end:
            tic = shown = time.perf_counter()
            start, stop = runs[0].step, min(end, (runs[0].step // eval_every + 1) * eval_every)
            shown_step = start
            while not interrupted and runs[0].step < stop:
                if fast_step is not None:
                    fast_step()
                else:
                    for run in runs:
                        gradient_step(run.agent, run.batches, run.metric_sums)
                for run in runs:
                    run.after_step()
                if runs[0].step == first_step + 1:  # the bar's rate and time left leave out the first step's
                    bar.unpause()                   # one-time costs (compiling, on the fast path)
                bar.update(len(runs))
                compiled = fast_step is not None and runs[0].step == first_step + 1
                if bar.disable and (compiled or time.perf_counter() - shown >= PROGRESS_EVERY_SECONDS):  # no bar
                    now = time.perf_counter()  # steps/s over the time since the last line
                    rate = None if compiled else (runs[0].step - shown_step) / max(now - shown, 1e-9)
                    print(progress_line(runs, end, rate), flush=True)
                    shown, shown_step = now, runs[0].step
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - tic
            for run in runs:
                run.train_seconds += seconds
            if runs[0].step % eval_every == 0 or runs[0].step == end:
                if background is not None:
                    background.start()
                else:
                    for run in runs:
                        show(run, run.evaluate_and_save(envs[run.cfg.env]))
        if background is not None:
            background.wait()  # the last rows and checkpoints are saved
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
        if background is not None:
            background.join()  # it uses the environments and the bar
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        for e in envs.values():
            e.close()
    if interrupted:
        for run in runs:
            run.save_checkpoint()
        print(f"interrupted: checkpoints saved at step {runs[0].step}; continue with the same command + --resume")
        sys.exit(130)
    for run in runs:
        stopped = (f", stopped at step {run.step} of the {run.cfg.steps}-step schedule (continue with --resume "
                   f"--stop-at 0)" if run.step < run.cfg.steps else "")
        print(f"{run.cfg.env} seed {run.cfg.seed}: done{stopped}, outputs in {run.out} "
              f"(final score {json.loads((run.out / 'summary.json').read_text())['final_score']:.1f})")


# ======================================================================================================
# Evaluation: all episodes at once in a Gymnasium vector env; D4RL's normalised score
# ======================================================================================================
def task_dims(env: str) -> tuple:
    import gymnasium as gym

    e = antmaze_eval_env(antmaze_dataset(env)) if family_of(env) == "antmaze" else gym.make(TASKS[family_of(env)][0])
    dims = e.observation_space.shape[0], e.action_space.shape[0]
    e.close()
    return dims


def make_eval_envs(env: str, n: int):
    import gymnasium as gym

    if family_of(env) == "antmaze":
        dataset = antmaze_dataset(env)
        return gym.vector.SyncVectorEnv([lambda: antmaze_eval_env(dataset)] * n)
    return gym.make_vec(TASKS[family_of(env)][0], num_envs=n, vectorization_mode="sync")


def antmaze_observation(obs: dict) -> np.ndarray:
    """The network input on AntMaze: the robot's state laid out as in D4RL's AntMaze (torso x, y, which is
    Gymnasium-Robotics' `achieved_goal`, then its 27-dim `observation`: the other 13 joint positions and the 14
    velocities), followed by the desired goal (x, y). (..., 2), (..., 27), (..., 2) -> (..., 31)"""
    return np.concatenate([obs["achieved_goal"], obs["observation"], obs["desired_goal"]], axis=-1)


def antmaze_dataset(env: str):
    """The Minari dataset of an AntMaze name: it holds the training data and names the evaluation environment."""
    try:
        import gymnasium_robotics  # noqa: F401  (the evaluation environment's code)
    except ImportError:
        raise UserError(f"{env} is evaluated in Gymnasium-Robotics' AntMaze, but gymnasium-robotics is not "
                        f"installed: pip install 'gymnasium-robotics>=1.4'.") from None
    try:
        return open_minari(ANTMAZE[env])
    except FileNotFoundError as e:
        raise UserError(
            f"no AntMaze data for {env}: {e}. dac.py needs Minari's {ANTMAZE[env]} for the training data and for "
            f"the environment it is evaluated in. Provide it: run `minari download {ANTMAZE[env]}` on a machine with "
            f"internet access (or run dac.py there once), then copy its folder {ANTMAZE[env]} from that machine's "
            f"~/.minari/datasets into $MINARI_DATASETS_PATH here (default ~/.minari/datasets).") from None


def antmaze_eval_env(dataset, **render):
    """One evaluation episode's environment on AntMaze: the one the Minari dataset names (recover_environment with
    eval_env=True), made episodic as D4RL's AntMaze evaluation is. With continuing_task=False an episode ends when
    the ant is within 0.45 of the goal (Gymnasium-Robotics' info["success"]), the one step whose sparse reward is
    1, so an episode's return is 1 if it reached the goal and 0 if not. Observations become antmaze_observation.
    `render`: render_mode, width, height, for a video."""
    import gymnasium as gym

    env = dataset.recover_environment(eval_env=True, continuing_task=False, **render)
    size = sum(space.shape[0] for space in env.observation_space.values())
    return gym.wrappers.TransformObservation(env, antmaze_observation,
                                             gym.spaces.Box(-np.inf, np.inf, (size,), np.float64))


class Evaluation(NamedTuple):
    returns: np.ndarray            # (n,) undiscounted episode returns, in the task's own reward scale
    q_mean: float                  # mean over visited states of the ensemble-mean target Q of the action taken
    discounted_return: float       # mean over the same states of the discounted return actually obtained from them,
                                   # in the training reward scale (so it is what that Q should estimate)
    action_at_bound: float         # fraction of action components at the +-1 bounds


def evaluation_seed(cfg: Config, step: int) -> int:
    """The seed of a run's evaluation at `step`: of its environments and of its policy's generator."""
    return cfg.seed * 1_000_003 + step


def evaluate(act, envs, seed: int, device: torch.device, gamma: float, reward_scale: float,
             gen: torch.Generator | None = None) -> Evaluation:
    """One episode per sub-environment, one batched policy call `act(states, gen)` (DAC.act, or its compiled
    version) per time step. Uses its own generator (`gen`, else a new one seeded with `seed`), so evaluating never
    changes the training run's random stream.
    Q is compared with the return only at states whose discounted return is known to within 1%: every state of an
    episode that terminated, and states at least log(0.01)/log(gamma) steps before a time-limit cut."""
    gen = torch.Generator(device).manual_seed(seed) if gen is None else gen
    obs, _ = envs.reset(seed=seed)
    n = envs.num_envs
    running, cut = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    rewards, qs, alive, at_bound = [], [], [], []
    while running.any():
        action, q = act(torch.as_tensor(obs, dtype=torch.float32, device=device), gen)  # (n, A), (n,)
        action = action.cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(action)
        rewards.append(reward * running)
        qs.append(q.cpu().numpy())
        alive.append(running.copy())
        at_bound.append((np.abs(action) >= 1 - 1e-6).mean(1))
        cut |= running & truncated & ~terminated
        running &= ~(terminated | truncated)
    rewards, qs, alive = np.array(rewards), np.array(qs), np.array(alive)  # (L, n)
    discounted = np.zeros_like(rewards)  # (L, n): sum_k gamma^k r_{t+k}, in the training reward scale
    running_sum = np.zeros(n)
    for t in range(len(rewards) - 1, -1, -1):
        running_sum = reward_scale * rewards[t] + gamma * running_sum
        discounted[t] = running_sum
    horizon = math.ceil(math.log(0.01) / math.log(gamma))
    steps_left = alive[::-1].cumsum(0)[::-1]  # (L, n): steps from t to the episode's end
    known = alive & (~cut | (steps_left > horizon))
    return Evaluation(returns=rewards.sum(0), q_mean=float(qs[known].mean()) if known.any() else math.nan,
                      discounted_return=float(discounted[known].mean()) if known.any() else math.nan,
                      action_at_bound=float(np.array(at_bound)[alive].mean()))


def normalized_score(env: str, returns) -> np.ndarray:
    """100 (return - random) / (expert - random) with D4RL's reference returns; on AntMaze, 100 x the success rate."""
    _, random_score, expert_score = TASKS[family_of(env)]
    return 100 * (np.asarray(returns) - random_score) / (expert_score - random_score)


def score_note(cfg: Config) -> str:
    """The label every reported score carries: which task and data it comes from."""
    task = TASKS[family_of(cfg.env)][0]
    data = ", ".join(cfg.dataset) if cfg.dataset else f"default sources for {cfg.env}"
    if family_of(cfg.env) == "antmaze":
        return (f"success rate x 100 in the evaluation environment of Minari's {ANTMAZE[cfg.env]} (Gymnasium-Robotics "
                f"{task}, goal radius 0.45); data: {data}. Not D4RL's {cfg.env} benchmark, so not directly comparable "
                f"with the paper's table.")
    return (f"returns on Gymnasium {task} normalised with D4RL's {family_of(cfg.env)} constants; data: {data}. "
            f"Not D4RL's {cfg.env} benchmark, so not directly comparable with the paper's table.")


# ======================================================================================================
# Data loading: D4RL hdf5 files and Minari datasets -> one array dict on the training device
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


def open_minari(dataset_id: str):
    """A Minari dataset: from $MINARI_DATASETS_PATH (default ~/.minari/datasets), else downloaded once one request
    without retries has found it on Minari's server, so that a mistyped id or no network fails at once. A failed
    lookup leaves behind no folder that it created."""
    if not re.fullmatch(r"(?:[-\w]+/)*[-\w]+-v\d+", dataset_id):
        raise FileNotFoundError(f"'{dataset_id}' is neither an existing file nor a Minari id (namespace/name-vN, e.g. "
                                f"mujoco/hopper/medium-v0)")
    try:
        import minari
    except ImportError:
        raise UserError(f"'{dataset_id}' looks like a Minari id, but minari is not installed: "
                        f"pip install 'minari[hf]'.") from None
    root = Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")
    missing = [p for p in (root, *root.parents) if not p.exists()]  # Minari creates them all, even to fail
    try:
        if not (root / dataset_id / "data").exists():
            check_minari_server(dataset_id, root)
        return minari.load_dataset(dataset_id, download=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise FileNotFoundError(f"Minari '{dataset_id}' is neither in {root} nor downloadable "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        if missing and missing[-1].exists() and not any(p.is_file() for p in missing[-1].rglob("*")):
            shutil.rmtree(missing[-1])


def load_minari(dataset_id: str) -> dict:
    """Read a Minari dataset into D4RL's flat layout."""
    ds = open_minari(dataset_id)
    parts = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for ep in ds.iterate_episodes():
        # AntMaze's observations are dicts: flatten them into the network input, as its evaluation does
        obs = antmaze_observation(ep.observations) if isinstance(ep.observations, dict) else ep.observations
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["terminals"].append(np.asarray(ep.terminations, bool))
        parts["timeouts"].append(np.asarray(ep.truncations, bool))
    if not parts["actions"]:
        raise UserError(f"Minari dataset '{dataset_id}' has no episodes.")
    return {k: np.concatenate(v) for k, v in parts.items()}


def check_minari_server(dataset_id: str, root: Path) -> None:
    """Ask Minari's default server (Hugging Face's farama-minari) once, without retries, whether it has
    `dataset_id`; raise FileNotFoundError if it has not or cannot be reached. Other servers ($MINARI_REMOTE) are
    left to Minari."""
    server = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if not server.startswith("hf://"):
        return
    repo, _, path = dataset_id.partition("/")
    try:
        from huggingface_hub import HfApi

        found = HfApi().file_exists(f"{server[5:]}/{repo}", "/".join(filter(None, [path, "data/metadata.json"])),
                                    repo_type="dataset")
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise FileNotFoundError(f"Minari '{dataset_id}' is not in {root}, and Minari's server {server} could not be "
                                f"asked for it ({type(e).__name__}: {reason})") from None
    if not found:
        raise FileNotFoundError(f"Minari '{dataset_id}' is neither in {root} nor on Minari's server {server}: check "
                                f"the id (e.g. mujoco/hopper/medium-v0)")


def default_sources(env: str) -> tuple:
    """Where a D4RL name's data is looked for: D4RL's own cache file (for medium-expert, else its medium and expert
    files there, concatenated), else its Minari counterpart(s).
    Returns (sources, places already looked at in vain). AntMaze's data is its Minari dataset."""
    if env in ANTMAZE:
        return [ANTMAZE[env]], []
    family, level = family_of(env), env[len(family_of(env)) + 1:-3]
    d4rl_dir = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()
    d4rl_file = d4rl_dir / f"{family}_{level.replace('-', '_')}-v2.hdf5"
    if d4rl_file.exists():
        return [str(d4rl_file)], []
    parts = [d4rl_dir / f"{family}_{lv}-v2.hdf5" for lv in ("medium", "expert")]
    if level == "medium-expert" and all(part.exists() for part in parts):  # D4RL built it as medium + expert
        return [str(part) for part in parts], []
    tried = f"D4RL file {d4rl_file} (does not exist)"
    if level == "medium-replay":
        raise UserError(f"no data for {env}: D4RL's file {d4rl_file} does not exist and Minari has no "
                        f"medium-replay counterpart. Provide it with --dataset PATH.hdf5 (a D4RL-layout file, "
                        f"e.g. d4rl's {family}_medium_replay-v2.hdf5), or copy that file to {d4rl_file}.")
    levels = ["medium", "expert"] if level == "medium-expert" else [level]
    return [f"mujoco/{family}/{lv}-v0" for lv in levels], [tried]


def is_file_source(src: str) -> bool:
    """Whether a --dataset entry names a file (an .hdf5/.h5 name, or any existing path) rather than a Minari id."""
    return src.endswith((".hdf5", ".h5")) or os.path.exists(src)


@functools.lru_cache
def file_fingerprint(path: str) -> dict:
    """A data file's size and SHA-256, recorded in each checkpoint: --resume accepts a --dataset at another path
    when these match."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def same_data(saved: list, now: list, recorded: dict) -> bool:
    """Whether --dataset `now` names the data a run was trained on (`saved`, with the fingerprints `recorded` in its
    checkpoint): entry by entry the same Minari id or path, the same file under another path, or a file whose size
    and SHA-256 match those recorded."""
    if len(saved) != len(now):
        return False
    for old, new in zip(saved, now):
        if old == new:
            continue
        if not (is_file_source(old) and os.path.isfile(new)):
            return False
        if not (os.path.exists(old) and os.path.samefile(old, new)) and recorded.get(old) != file_fingerprint(new):
            return False
    return True


def data_names(cfg: Config) -> str:
    """The data a run trains on, by name: its --dataset files (without folders) and Minari ids, or its default ones."""
    sources = cfg.dataset or default_sources(cfg.env)[0]
    names = ", ".join(Path(s).name if is_file_source(s) else s for s in sources)
    return names if len(names) <= 80 else names[:77] + "..."


def episode_ends(d: dict) -> np.ndarray:
    """True where an episode ends: terminal, time-out, a jump between next_observation and the next row, or
    the last row (the IQL convention for splitting a flat dataset into trajectories)."""
    ends = d["terminals"].astype(bool) | d["timeouts"].astype(bool)
    ends[:-1] |= np.abs(d["next_observations"][:-1] - d["observations"][1:]).max(axis=1) > 1e-6
    ends[-1] = True
    return ends


def episode_returns(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The return of each episode; `ends` marks their last rows."""
    return np.add.reduceat(rewards, np.r_[0, np.flatnonzero(ends[:-1]) + 1])


def reward_scale(returns: np.ndarray) -> float:
    """1000 / (max episode return - min episode return), the official code's locomotion reward scale."""
    spread = returns.max() - returns.min()
    return 1000.0 / spread if spread > 0 else 1.0


def load_dataset(cfg: Config, obs_dim: int, act_dim: int) -> dict:
    """Load, check and concatenate the sources; clip actions; rescale rewards. Returns float32 arrays."""
    sources, looked = (cfg.dataset, []) if cfg.dataset else default_sources(cfg.env)
    parts, failed = [], []
    for src in sources:
        if is_file_source(src) and not os.path.exists(src):
            failed.append(f"file {src} (does not exist)")
            continue
        try:
            parts.append((src, load_hdf5(src) if is_file_source(src) else load_minari(src)))
        except FileNotFoundError as e:
            failed.append(str(e))
    if failed and cfg.resume and cfg.dataset:
        raise UserError(
            f"the data of the run in {cfg.out} is not where it was: {'; '.join(failed)}. Give its files again with "
            f"--resume --out {cfg.out} --dataset FILE [FILE ...], at their new place: copies are accepted when their "
            f"size and SHA-256 match those recorded in the checkpoint.")
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
    returns = episode_returns(d["rewards"], episode_ends(d))
    scale = reward_scale(returns)
    d["rewards"] = d["rewards"] * scale
    # the data's own score: its mean episode return, normalised (AntMaze's continuing-task returns are no success rate)
    behaviour = None if family_of(cfg.env) == "antmaze" else float(normalized_score(cfg.env, returns.mean()))
    print(f"data: {len(d['rewards'])} transitions from {', '.join(sources)}; rewards scaled by {scale:.4g}"
          + (f"; behaviour score {behaviour:.1f}" if behaviour is not None else ""))
    return {**{k: d[k].astype(np.float32) for k in ("observations", "actions", "rewards", "next_observations",
                                                     "terminals")}, "reward_scale": np.float32(scale),
            "behaviour_score": behaviour}


class DeviceData:
    """The whole dataset as tensors on the training device; batches are drawn there (no host round trip).
    `sample` draws independent uniform rows (--batch-order random)."""

    def __init__(self, d: dict, device: torch.device):
        self.tensors = [torch.as_tensor(d[k], device=device) for k in
                        ("observations", "actions", "rewards", "next_observations", "terminals")]
        self.size = len(d["rewards"])
        self.reward_scale = float(d.get("reward_scale", 1.0))  # what the rewards were multiplied by
        self.reward_range = float(d["rewards"].min()), float(d["rewards"].max())  # as scaled; for --clip-target
        self.behaviour_score = d.get("behaviour_score")  # the data's mean episode return, normalised (or None)

    def sample(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(self.size, (batch_size,), device=gen.device, generator=gen)
        return Batch(*(t[idx] for t in self.tensors))


class EpochBatches:
    """One run's batches in the official code's order (--batch-order epochs): shuffled passes over the data without
    replacement; a pass's last incomplete batch is dropped. `sample` has DeviceData's interface and runs on the device,
    inside the compiled and captured step; `next_step` runs on the host after every step and reshuffles when a pass
    is used up. Each pass's permutation comes from this object's own CPU generator."""

    def __init__(self, data: DeviceData, batch_size: int, seed: int):
        if data.size < batch_size:
            raise UserError(f"the dataset has {data.size} transitions, fewer than one batch (--batch-size "
                            f"{batch_size}). Use a smaller --batch-size or more data.")
        self.data, self.batch_size, self.batches_per_pass = data, batch_size, data.size // batch_size
        self.passes = torch.Generator().manual_seed(seed)
        device = data.tensors[0].device
        self.order = torch.empty(data.size, dtype=torch.long, device=device)  # (N,): this pass's permutation
        self.position = torch.zeros((), dtype=torch.long, device=device)  # where the next batch starts in it
        self.offsets = torch.arange(batch_size, device=device)  # (B,)
        self.count = 0  # batches drawn so far
        self.new_pass()

    def new_pass(self) -> None:
        self.pass_rng = self.passes.get_state()
        self.order.copy_(torch.randperm(self.data.size, generator=self.passes))
        self.position.zero_()

    def sample(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = self.order[self.position + self.offsets]  # (B,)
        self.position += batch_size
        return Batch(*(t[idx] for t in self.data.tensors))

    def next_step(self) -> None:
        self.count += 1
        if self.count % self.batches_per_pass == 0:
            self.new_pass()

    def state(self) -> dict:
        return {"count": self.count, "pass_rng": self.pass_rng}

    def load_state(self, state: dict) -> None:
        self.count = state["count"]
        self.passes.set_state(state["pass_rng"].cpu())
        self.new_pass()
        self.position.fill_(self.count % self.batches_per_pass * self.batch_size)


# ======================================================================================================
# Outputs, checkpoints and the command line
# ======================================================================================================
def plot_curve(history: list, path: Path, title: str, behaviour_score: float | None = None) -> None:
    """Normalised score against step on a fixed scale (-5 to 110, wider only if a score is outside), with lines at 0
    (D4RL's random policy), 100 (its expert) and the behaviour data's score; eta below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, scores = [r["step"] for r in history], [r["normalized_score"] for r in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for level in (0, 100):
        ax1.axhline(level, color="grey", linewidth=0.8)
    if behaviour_score is not None:
        ax1.axhline(behaviour_score, color="tab:green", linestyle="--", label=f"behaviour data ({behaviour_score:.1f})")
    ax1.plot(steps, scores, marker="o", label="DAC")
    shown = [*scores, *([behaviour_score] if behaviour_score is not None else [])]
    ax1.set_ylim(min(-5, min(shown) - 5), max(110, max(shown) + 5))
    ax1.set_ylabel("normalised score, v5 task\n(0 random, 100 expert)")
    ax1.set_title(title)
    ax1.legend(fontsize=7, loc="upper left")
    ax2.plot(steps, [r["eta"] for r in history], color="tab:orange", marker="o", markersize=3)
    ax2.set_ylabel("eta")
    ax2.set_xlabel("gradient step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


VIDEO_SIZE = (320, 240)  # width, height in pixels
VIDEO_FPS = 30  # about: each frame a whole number of environment steps after the last, shown in simulated time
VIDEO_MAX_FRAMES = 300  # hopper and walker2d: a whole episode (1000 steps, every 4th); halfcheetah: its first 15 s


def render_env(env: str):
    """One evaluation environment of `env` that renders VIDEO_SIZE frames offscreen."""
    import gymnasium as gym

    size = dict(render_mode="rgb_array", width=VIDEO_SIZE[0], height=VIDEO_SIZE[1])
    if family_of(env) == "antmaze":
        return antmaze_eval_env(antmaze_dataset(env), **size)
    return gym.make(TASKS[family_of(env)][0], **size)


def check_video(path: Path, env: str) -> None:
    """Refuse, before any training or evaluation, a --video that cannot be made: not .gif or .mp4, .mp4 without
    ffmpeg, a folder that cannot be written, or no offscreen rendering (one frame is rendered to find out). On Linux
    without MUJOCO_GL, picks EGL (GPU drivers or Mesa) if its library is installed, else OSMesa (Mesa on the CPU)."""
    import ctypes.util

    if path.suffix.lower() not in (".gif", ".mp4"):
        raise UserError(f"--video {path}: expected a file name ending in .gif (written with Pillow) or .mp4 (with "
                        f"ffmpeg). Name the file with one of these endings.")
    if path.suffix.lower() == ".mp4" and not shutil.which("ffmpeg"):
        raise UserError(f"--video {path}: an .mp4 is written by the ffmpeg program, which is not on PATH. Install it "
                        f"(apt-get install ffmpeg, or conda install ffmpeg), or name a .gif file.")
    check_writable(path.parent, "--video's folder")
    if sys.platform == "linux" and not os.environ.get("MUJOCO_GL"):
        found = [gl for gl, library in (("egl", "EGL"), ("osmesa", "OSMesa")) if ctypes.util.find_library(library)]
        if found:
            os.environ["MUJOCO_GL"] = found[0]  # read when MuJoCo first renders
    try:
        probe = render_env(env)
        probe.reset(seed=0)
        probe.render()
        probe.close()
    except UserError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"--video: MuJoCo cannot render offscreen here (MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}: "
            f"{type(e).__name__}: {reason}). It needs an OpenGL backend: with an NVIDIA GPU, MUJOCO_GL=egl; on a CPU, "
            f"Mesa's OSMesa (Debian or Ubuntu: apt-get install libosmesa6, then MUJOCO_GL=osmesa); with a display, "
            f"MUJOCO_GL=glfw. Or drop --video and make the video later: --eval-only RUN_FOLDER --video FILE.") from None


def record_video(agent: DAC, env: str, path: Path) -> dict:
    """One evaluation episode of the agent's policy (DAC.act, eager), rendered: a frame at the start and every k-th
    step after it (k steps last about 1 / VIDEO_FPS s), up to VIDEO_MAX_FRAMES frames, written to `path` as an
    animated GIF (Pillow, one 256-colour palette) or an .mp4 (H.264, by ffmpeg) that plays in simulated time. The
    episode has the seed of the evaluation at the agent's step: with --eval-episodes 1 it is that evaluation's
    episode. Returns what the video shows."""
    seed, device = evaluation_seed(agent.cfg, int(agent.step)), agent.step.device
    gen, e = torch.Generator(device).manual_seed(seed), render_env(env)
    every = max(1, round(e.metadata["render_fps"] / VIDEO_FPS))
    obs, _ = e.reset(seed=seed)
    frames, episode_return, steps, ended = [e.render()], 0.0, 0, False
    while not ended and len(frames) < VIDEO_MAX_FRAMES:
        action, _ = agent.act(torch.as_tensor(obs[None], dtype=torch.float32, device=device), gen)  # (1, A)
        obs, reward, terminated, truncated, _ = e.step(action[0].cpu().numpy())
        episode_return, steps, ended = episode_return + float(reward), steps + 1, terminated or truncated
        if steps % every == 0 or ended:
            frames.append(e.render())
    seconds_per_frame = every / e.metadata["render_fps"]
    e.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".mp4":
            height, width, _ = frames[0].shape
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                            f"{width}x{height}", "-r", f"{1 / seconds_per_frame:g}", "-i", "-", "-pix_fmt", "yuv420p",
                            str(path)], input=np.stack(frames).tobytes(), capture_output=True, check=True)
        else:
            from PIL import Image

            palette = Image.fromarray(np.concatenate([frames[0], frames[len(frames) // 2], frames[-1]])).quantize(256)
            images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
            images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 * seconds_per_frame),
                           loop=0)
    except (OSError, subprocess.CalledProcessError) as e:
        path.unlink(missing_ok=True)
        reason = (e.stderr.decode(errors="replace").strip()[-200:] if isinstance(e, subprocess.CalledProcessError)
                  else e.strerror or str(e))
        raise UserError(f"--video: cannot write {path} ({reason}). The checkpoints are intact: make the video again "
                        f"with --eval-only RUN_FOLDER --video FILE.") from None
    return {"file": str(path), "frames": len(frames), "seconds": round(len(frames) * seconds_per_frame, 1),
            "steps": steps, "whole_episode": ended, "return": episode_return,
            "normalized_score": float(normalized_score(env, episode_return))}


def video_line(video: dict) -> str:
    shown = "the whole episode" if video["whole_episode"] else f"its first {video['steps']} steps"
    return (f"video: {video['file']}, {video['frames']} frames ({video['seconds']} s) of one evaluation episode, "
            f"{shown}: return {video['return']:.0f}, score {video['normalized_score']:.1f}")


def run_record(out: Path) -> dict:
    """A finished run's results, from its output folder: configuration, evaluations, summary."""
    with open(out / "progress.csv", newline="") as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {"out": str(out), "config": json.loads((out / "config.json").read_text()), "history": history,
            "summary": json.loads((out / "summary.json").read_text())}


def read_runs(folders: list) -> list:
    """The records of every run (a folder with config.json, progress.csv and summary.json) in or under `folders`."""
    outs = sorted({f.parent for folder in folders for f in Path(folder).rglob("summary.json")
                   if (f.parent / "progress.csv").exists() and (f.parent / "config.json").exists()})
    if not outs:
        raise UserError(f"--report: no runs found in {', '.join(folders)} (a run folder holds config.json, "
                        f"progress.csv and summary.json). Point --report at run folders or at folders above them.")
    return [run_record(out) for out in outs]


def report_groups(records: list) -> dict:
    """The report's rows: (label, data) -> the runs of one dataset, data source and configuration (seed and run-only
    fields aside), by seed. The label is the dataset, and the settings that set the row apart from the dataset's
    other rows. A seed twice in a row is refused: the mean over seeds would count it twice."""
    def settings(r: dict) -> str:
        config = {**ADDED_FIELDS, **r["config"]}  # older runs: the values they were trained with
        return json.dumps({k: v for k, v in config.items() if k not in RUN_ONLY_FIELDS | {"env", "dataset", "seed"}},
                          sort_keys=True)

    groups = {}
    for r in sorted(records, key=lambda r: (r["config"]["env"], r["config"]["seed"])):
        data = ", ".join(r["config"]["dataset"]) or f"default sources for {r['config']['env']}"
        groups.setdefault((r["config"]["env"], data, settings(r)), []).append(r)
    rows = {}
    for (env, data, key), runs in groups.items():
        mine, others = json.loads(key), [json.loads(k) for e, _, k in groups if e == env and k != key]
        apart = [f"--{k.replace('_', '-')} {mine[k]}" for k in mine if any(o.get(k) != mine[k] for o in others)]
        label = f"{env} ({', '.join(apart)})" if apart else env
        seeds = [r["config"]["seed"] for r in runs]
        for seed in seeds:
            if seeds.count(seed) > 1:
                twice = " and ".join(r["out"] for r in runs if r["config"]["seed"] == seed)
                raise UserError(f"--report: {twice} are both seed {seed} of {label}, with the same data and "
                                f"configuration, so the mean over seeds would count that seed twice (a copy of a run "
                                f"folder?). Point --report at folders that hold each run once.")
        rows[label, data] = runs
    return rows


def write_report(records: list, folder: Path) -> Path:
    """report.md (a row per dataset and configuration: seeds, steps, final score mean and std over seeds, each seed's
    final and best score, the data, and the critics' Q against the obtained return at the last evaluation) and
    report.png (normalised score against step: the mean over seeds, and a band from the lowest to the highest
    seed). Returns report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report_groups(records)
    lines = ["# DAC report", "",
             "Normalised score: 100 (return - random) / (expert - random) with D4RL's reference returns, on the "
             "Gymnasium v5 task of each dataset; on locally generated or Minari data it is not D4RL's benchmark. "
             "Final score: the mean of a run's last 5 evaluations; mean ± std (ddof 0) over seeds. Q / return: at the "
             "last evaluation, the critics' mean Q of the actions the policy took against the discounted return it "
             "obtained from those states (training reward scale); at ±1: the fraction of action components at the "
             "bounds.", "",
             "| dataset | data | seeds | steps | final score | per seed: final (best) | Q / return, last evaluation "
             "| at ±1 |",
             "|---|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, ((label, data), runs) in zip(axes[0], groups.items()):
        finals = np.array([r["summary"]["final_score"] for r in runs])
        seeds = ", ".join(str(r["config"]["seed"]) for r in runs)
        steps = ", ".join(sorted({str(r["summary"]["steps"]) for r in runs}))
        per_seed = "; ".join(f"{r['summary']['final_score']:.1f} ({r['summary']['best_score']:.1f})" for r in runs)
        q_vs_g = "; ".join(f"{r['history'][-1]['eval_q_mean']:.1f} / {r['history'][-1]['eval_discounted_return']:.1f}"
                           for r in runs)
        at_bound = "; ".join(f"{r['history'][-1]['eval_action_at_bound']:.2f}" for r in runs)
        lines.append(f"| {label} | {data} | {seeds} | {steps} of {runs[0]['config']['steps']} | "
                     f"{finals.mean():.1f} ± {finals.std():.1f} | {per_seed} | {q_vs_g} | {at_bound} |")
        common = sorted(set.intersection(*({h["step"] for h in r["history"]} for r in runs)))
        scores = np.array([[next(h["normalized_score"] for h in r["history"] if h["step"] == s) for s in common]
                           for r in runs])  # (seeds, steps)
        ax.fill_between(common, scores.min(0), scores.max(0), alpha=0.25, label="lowest to highest seed")
        ax.plot(common, scores.mean(0), label=f"mean of {len(runs)} seed(s)")
        ax.set(title=label, xlabel="gradient step", ylabel="normalised score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "report.png", dpi=100)
    plt.close(fig)
    lines += ["", f"Runs: {', '.join(r['out'] for r in records)}", "", "![report](report.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return folder / "report.md"


CHECKPOINT_FORMAT = 3  # 2: hand-written Adam's moments as buffers; 3: torch.optim.Adam's state_dicts
# Config fields newer than some format-3 checkpoints, each with the value that trains as dac.py did before the field
# existed: a checkpoint without the field was trained with that value, and loads as if it held it.
ADDED_FIELDS = {"critic_layer_norm": False, "clip_target": False, "bf16": False}


def checksum_path(path: Path) -> Path:
    """Where a checkpoint's SHA-256 is kept: <path>.sha256, in sha256sum's format (`sha256sum -c` checks it)."""
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write the checkpoint and its SHA-256 to temporary files, then rename both over the previous pair: a crash or a
    full disk while writing leaves the previous pair intact, and a failed write leaves no temporary file."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **ckpt}, buffer)
    data = buffer.getvalue()
    checksum = f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode()
    files = {path: data, checksum_path(path): checksum}
    temporary = {target: target.with_name(target.name + ".tmp") for target in files}
    try:
        for target, content in files.items():
            temporary[target].write_bytes(content)
    except OSError as e:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path} ({e.strerror or e}). Nothing was replaced: the previous "
                        f"checkpoint there, if any, is intact (with its progress.csv rows), and no temporary file is "
                        f"left. Free space (or make {path.parent} writable), then continue with the same command + "
                        f"--resume.") from None
    for target, tmp in temporary.items():
        os.replace(tmp, target)


def load_checkpoint(path: Path, device: torch.device, cfg: Config | None = None) -> dict:
    """Load a checkpoint that save_checkpoint wrote: its bytes must match the SHA-256 beside it, and it is unpickled
    with weights_only=True (tensors and plain values only, never code). With `cfg`, refuse one whose
    learning-relevant settings differ from it."""
    sums = checksum_path(path)
    trust = (f"if you trust the file as it is, record its checksum (cd {path.parent} && sha256sum {path.name} > "
             f"{sums.name}) and run again")
    try:
        data = path.read_bytes()
        expected = sums.read_text().split()[:1] if sums.exists() else None
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path} ({e.strerror or type(e).__name__}). Expected the "
                        f"checkpoint.pt of a dac.py run.") from None
    if expected is not None and expected != [hashlib.sha256(data).hexdigest()]:
        raise UserError(f"cannot read checkpoint {path}: its SHA-256 differs from the one recorded in {sums.name} "
                        f"when dac.py wrote it, so it was damaged or changed since. Use an intact copy, or start a "
                        f"new run in another --out; {trust}.")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        saved = ckpt["config"]
    except Exception as e:  # PyTorch's own message is several lines and suggests weights_only=False: not shown
        if data.startswith(b"PK") and not isinstance(e, pickle.UnpicklingError):  # a zip archive, as torch.save's
            recorded = (f" Its SHA-256 in {sums.name} matches, so it was recorded after the damage." if expected
                        else "")
            raise UserError(f"cannot read checkpoint {path}: it is a PyTorch file, but damaged or incomplete (PyTorch: "
                            f"{str(e).split('. ')[0]}; a file cut short by a copy or a full disk reads like this)."
                            f"{recorded} Use an intact copy, or start a new run in another --out.") from None
        raise UserError(f"cannot read checkpoint {path}: it is not a checkpoint written by dac.py (PyTorch's "
                        f"weights-only loader, which accepts tensors and plain values only, failed with "
                        f"{type(e).__name__}). Point --out or --eval-only at a dac.py checkpoint.") from None
    fmt = ckpt.get("format", 1)  # checkpoints before format 2 had no number
    if fmt != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {fmt}, written by another version of "
                        f"dac.py; this one reads format {CHECKPOINT_FORMAT}. Resume or evaluate it with the dac.py "
                        f"that wrote it, or start a new run in another --out.")
    for name, value in ADDED_FIELDS.items():
        saved.setdefault(name, value)
    if expected is None:
        raise UserError(f"checkpoint {path} has no {sums.name} beside it (dac.py writes one with every checkpoint, "
                        f"to detect damage), so it cannot be checked. Copy that file along with the checkpoint; "
                        f"{trust}.")
    if cfg is not None:
        refuse_other_configuration(path, ckpt, dataclasses.asdict(cfg))
    return ckpt


def refuse_other_configuration(path: Path, ckpt: dict, now: dict) -> None:
    """Refuse to continue the checkpoint at `path` with settings `now` that change what is learned; run-only fields
    may differ, and --dataset may name the same files at other paths."""
    saved, recorded = ckpt["config"], ckpt.get("data_files", {})
    if "dataset" in now and not same_data(saved["dataset"], now["dataset"], recorded):
        missing = [new for new in now["dataset"] if is_file_source(new) and not os.path.exists(new)]
        unchecked = [old for old in saved["dataset"] if is_file_source(old) and old not in recorded]
        trained_on = " ".join(saved["dataset"]) or "the --env name's default sources"
        raise UserError(
            f"--dataset {' '.join(now['dataset']) or '(none)'}: " +
            (f"{', '.join(missing)} does not exist" if missing else
             f"not the data the run in {path.parent} was trained on") +
            ". With --resume, --dataset must name the run's own files: the same paths, or copies elsewhere whose "
            "size and SHA-256 match those recorded in its checkpoint" +
            (" (this checkpoint, from an older dac.py, has none recorded: resume it from the folder it was started "
             "in, where its relative paths hold)" if unchecked else "") +
            f". Or drop --dataset to use the run's own ({trained_on}).")
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
              if k not in RUN_ONLY_FIELDS and k != "dataset" and saved.get(k) != v]
    if differ:
        longer = (" --steps is the span of the cosine learning-rate decay, so a longer schedule is a new run; "
                  "--stop-at stops and continues within one." if now.get("steps", saved["steps"]) != saved["steps"]
                  else "")
        raise UserError(f"checkpoint {path} comes from another configuration ({'; '.join(differ)}).{longer} Resume "
                        f"with --resume --out {path.parent} alone (the run's own configuration is used) or with flags "
                        f"that agree with it, or start a new run in another --out.")


def check_config(cfg: Config) -> None:
    """Reject values the method cannot run with, naming the flag and what it accepts."""
    if cfg.env not in ENV_NAMES:
        close = difflib.get_close_matches(cfg.env, ENV_NAMES, n=1)
        raise UserError(f"unknown --env '{cfg.env}'{f' (did you mean {close[0]}?)' if close else ''}. Valid names: "
                        f"{', '.join(ENV_NAMES)}.")
    positive = ["steps", "eval_every", "eval_episodes", "T", "num_action_samples", "num_qs", "num_next_actions",
                "batch_size", "hidden_dim", "actor_ema_every"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}.")
    for name in ["eta", "actor_lr", "critic_lr", "grad_clip"]:
        if not 0 < getattr(cfg, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(cfg, name)}.")
    for name in ["eta_lr", "rho", "bc_threshold", "actor_ema_start", "stop_at"]:
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
    if len(set(cfg.dataset)) != len(cfg.dataset):
        raise UserError(f"--dataset names {', '.join(sorted({d for d in cfg.dataset if cfg.dataset.count(d) > 1}))} "
                        f"more than once, so its transitions would be trained on twice over. Give each file or "
                        f"Minari id once.")
    if cfg.stop_at > cfg.steps:
        raise UserError(f"--stop-at {cfg.stop_at} lies past the end of the --steps {cfg.steps} schedule, where every "
                        f"run stops. Give --stop-at at most {cfg.steps} (0: the whole schedule), or a longer --steps "
                        f"(which also stretches the cosine learning-rate decay).")


def load_agent(path: Path, device: torch.device) -> tuple:
    """The agent in a checkpoint, for acting: its networks, eta and step (not its optimisers or training generator,
    so a checkpoint trained on a GPU loads on a CPU too), and the checkpoint."""
    ckpt = load_checkpoint(path, device)
    saved = Config(**ckpt["config"])
    torch.manual_seed(saved.seed)
    agent = DAC(saved, *task_dims(saved.env), device)
    agent.load_state_dict(ckpt["agent"]["nets"])
    return agent, ckpt


def eval_only(cfg: Config, given: set, device: torch.device) -> None:
    path = Path(cfg.eval_only) / "checkpoint.pt" if Path(cfg.eval_only).is_dir() else Path(cfg.eval_only)
    inside = sorted(str(p.parent) for p in Path(cfg.eval_only).glob("*/checkpoint.pt")) if not path.exists() else []
    if inside:  # the folder of a launch of several runs
        raise UserError(f"--eval-only {cfg.eval_only} holds no checkpoint.pt itself, but its run folders do: "
                        f"{', '.join(inside)}. Name one of them.")
    agent, ckpt = load_agent(path, device)
    saved = agent.cfg
    clash = [k for k in given if k not in RUN_ONLY_FIELDS and getattr(cfg, k) != getattr(saved, k)]
    if clash:
        raise UserError(f"--eval-only {cfg.eval_only}: the checkpoint was trained with other settings for "
                        f"{', '.join('--' + k.replace('_', '-') for k in clash)}; drop those flags (the checkpoint's "
                        f"own configuration is used).")
    if cfg.video:
        check_video(Path(cfg.video), saved.env)
    envs = make_eval_envs(saved.env, cfg.eval_episodes)
    act = make_policy(agent, cfg.fast)
    result = evaluate(act, envs, evaluation_seed(saved, int(agent.step)), device, saved.gamma, ckpt["reward_scale"])
    envs.close()
    result = {"checkpoint": str(path), "step": int(agent.step), "episodes": cfg.eval_episodes,
              "return_mean": float(result.returns.mean()), "return_std": float(result.returns.std()),
              "normalized_score": float(normalized_score(saved.env, result.returns).mean()),
              "eval_q_mean": result.q_mean, "eval_discounted_return": result.discounted_return,
              "eval_action_at_bound": result.action_at_bound, "note": score_note(saved)}
    if cfg.video:
        result["video"] = record_video(agent, saved.env, Path(cfg.video))
    print(json.dumps(result, indent=2))


def integer(text: str) -> int:
    """argparse type of the integer flags: a whole number, also written as a float (--steps 1e6)."""
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        if float(text).is_integer():
            return int(float(text))
    raise argparse.ArgumentTypeError(f"expected a whole number such as 2000000 or 2e6, got {text!r}")


class FlagParser(argparse.ArgumentParser):
    """argparse that takes flags only as written in full (--step is not taken for --steps), names the flag probably
    meant, and reports a mistake in one line instead of under the whole usage."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            meant = [close[0] for word in unknown if word.startswith("-") for close in
                     [difflib.get_close_matches(word.split("=")[0], self._option_string_actions, n=1)] if close]
            hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
            self.error(f"unrecognized arguments: {' '.join(unknown)}{hint}. Flags are taken only as written in full, "
                       f"without abbreviations")
        return namespace

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}. `python {self.prog} --help` lists every flag.\n")


def config_parser(cls, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of a config dataclass (Config, or toy_bandit's), with the field's help and its default
    (unless the help gives it as "(default: ...)", or it is empty), in groups named by the fields' `section`. Flags
    not given stay out of the parsed namespace, so presets can sit between defaults and flags. `epilog` is shown as
    written."""
    parser = FlagParser(description=description, epilog=epilog,
                        formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
    group = parser
    for f in dataclasses.fields(cls):
        meta, default = dict(f.metadata), getattr(cls(), f.name)
        text = meta.pop("help")
        if "section" in meta:
            group = parser.add_argument_group(meta.pop("section"))
        if "(default" not in text and default not in ("", []):
            text += f" (default: {default!r})"
        kwargs = dict(default=argparse.SUPPRESS, help=text)
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            item = meta.pop("type", str)
            kwargs.update(nargs="+", type=integer if item is int else item, **meta)
        else:
            kwargs.update(type=integer if type(default) is int else type(default), **meta)
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def help_epilog() -> str:
    """The end of --help: the presets per dataset family, the valid --env names, a few examples."""
    flags = lambda preset: " ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items())
    families = {}
    for env, preset in PRESETS.items():
        families.setdefault(family_of(env), {})[env[len(family_of(env)) + 1:-3]] = preset
    lines = ["presets, set by the --env name (a flag given overrides them):"]
    for family, levels in families.items():
        usual = max(levels.values(), key=list(levels.values()).count)
        lines.append(f"  {family + '-*':<16}{flags(usual)}" + "".join(
            f";  {level}: {flags({k: v for k, v in preset.items() if usual.get(k) != v})}"
            for level, preset in levels.items() if preset != usual))
    unset = [env for env in ENV_NAMES if env not in PRESETS]
    if unset:
        lines.append(f"  no preset (the defaults): {', '.join(unset)}")
    names = textwrap.fill(", ".join(ENV_NAMES), 100, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False)
    return "\n".join([*lines, "", "valid --env names:", names, "", "examples:",
                      "  python dac.py --env hopper-medium-v2 --dataset hopper_medium-v2.hdf5",
                      "  python dac.py --env hopper-medium-expert-v2 --dataset hopper_medium.hdf5 hopper_expert.hdf5",
                      "  python dac.py --env walker2d-medium-v2 --seeds 0 1 2 3 --steps 1e6",
                      "  python dac.py --resume --out runs/hopper-medium-v2/seed0   # after Ctrl-C: the run's own "
                      "configuration",
                      "  python dac.py --eval-only runs/hopper-medium-v2/seed0 --video hopper.gif   # and see an "
                      "episode"])


def resumed_config(given: dict) -> dict:
    """The configuration --resume continues, read from the run's checkpoint: in --out, else in the default folder
    (runs/<env>/seed<seed>); for --seeds, or an --out that holds seed<N> folders, that of the first seed. Flags given
    must agree with it, except run-only ones."""
    seeds, out = given.get("seeds") or [], given.get("out", "")
    if not seeds and out and not (Path(out) / "checkpoint.pt").exists():  # an --out of a --seeds run
        seeds = sorted(int(p.parent.name[4:]) for p in Path(out).glob("seed*/checkpoint.pt")
                       if p.parent.name[4:].isdigit())
    seed, base = (seeds or [given.get("seed", Config.seed)])[0], out or f"runs/{given.get('env', Config.env)}"
    path = Path(out if out and not seeds else f"{base}/seed{seed}") / "checkpoint.pt"
    check_checkpoint(path, resume=True)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    refuse_other_configuration(path, ckpt, {k: v for k, v in given.items() if not (seeds and k == "seed")})
    fields = {f.name for f in dataclasses.fields(Config)} - {"out", "resume", "seeds", "eval_only", "video"}
    return {**{k: v for k, v in ckpt["config"].items() if k in fields}, "seeds": seeds}


def parse_config(argv: list | None = None) -> tuple:
    """Command line generated from Config: presets for each --env name first (with --resume of one dataset, the run's
    own configuration), then every flag given overrides them. Returns (one config per --env name, names of the
    flags given)."""
    given = vars(config_parser(Config, __doc__.split("\n\n")[0], help_epilog()).parse_args(argv))
    names = set(given)
    if "dataset" in given:  # absolute, so that the run's config.json holds from any working folder
        given["dataset"] = [os.path.abspath(src) if is_file_source(src) else src for src in given["dataset"]]
    envs = list(dict.fromkeys(given.pop("env", [Config.env])))
    if len(envs) > 1 and given.get("dataset"):
        raise UserError(f"--dataset names the data of one --env, but {len(envs)} were given ({' '.join(envs)}). "
                        f"Launch each dataset with its own --dataset, or drop --dataset to use each name's default "
                        f"sources.")
    if given.get("resume") and len(envs) == 1:
        cfgs = [Config(**{**resumed_config({**given, "env": envs[0]} if "env" in names else given), **given})]
    else:
        cfgs = [Config(**{**PRESETS.get(env, {}), **given, "env": env}) for env in envs]
    for cfg in cfgs:
        check_config(cfg)
    return cfgs, names


def config_flags(cfg: Config, width: int = 110) -> str:
    """The configuration as the flags that set it, a few per line (each run's config.json holds it too)."""
    flags, lines = [], [""]
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name in ("resume", "eval_only", "report"):  # what to do, not how to train
            continue
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif value not in ("", []):
            flags.append(" ".join([flag, *map(shlex.quote, map(str, value if isinstance(value, list) else [value]))]))
    for flag in flags:
        if lines[-1] and len(lines[-1]) + len(flag) > width:
            lines.append("")
        lines[-1] += f"  {flag}"
    return "\n".join(lines)


def plan_runs(cfgs: list) -> tuple:
    """Every (dataset, seed) run of a launch, with its output folder, and the folder for the launch's report (None
    for a single run): --out or runs/<env>/seed<seed> for one run; <base>/seed<seed> for several seeds of one
    dataset (base: --out or runs/<env>); <base>/<env>/seed<seed> for several datasets (base: --out or runs)."""
    first = cfgs[0]
    seeds = first.seeds or [first.seed]
    if len(cfgs) == 1 and not first.seeds:
        return [dataclasses.replace(first, out=first.out or f"runs/{first.env}/seed{first.seed}")], None
    base = first.out or (f"runs/{first.env}" if len(cfgs) == 1 else "runs")
    video = Path(first.video)
    runs = [dataclasses.replace(cfg, seed=s, seeds=[], out=f"{base}/seed{s}" if len(cfgs) == 1
                                else f"{base}/{cfg.env}/seed{s}",
                                video=first.video and str(video.with_stem(f"{video.stem}_{cfg.env}_seed{s}")))
            for cfg in cfgs for s in seeds]
    return runs, base


def distributed_launch() -> tuple:
    """(rank, world size, local rank, store) under torchrun, else (0, 1, 0, None). The ranks share nothing while
    they train; at the end each puts its runs' records in torchrun's key-value store (`gather_records`). No process
    group: a gloo collective's worker thread can still hold Python tensors while the interpreter exits, which
    aborts the process (SIGABRT, about 1 launch in 20 on torch 2.13, CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, 0, None
    import datetime

    import torch.distributed as dist

    # torchrun's own store; rank 0 waits there for the slowest rank, hence the long timeout
    store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(days=30)))
    return rank, world, int(os.environ.get("LOCAL_RANK", 0)), store


def gather_records(store, rank: int, world: int, records: list) -> list:
    """Every rank's run records, in rank order, on rank 0 (which writes the launch's report); a rank's own elsewhere."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted launch does not read the last one's
    keys = [f"dac.py/attempt{attempt}/records/rank{r}" for r in range(world)]
    store.set(keys[rank], pickle.dumps(records))
    if rank != 0:
        return records
    store.wait(keys)
    return [record for key in keys for record in pickle.loads(store.get(key))]


CPU_STEPS_PER_SEC = {True: 8.6, False: 4.6}  # fast path / eager, paper sizes, 2 CPU cores (bench/results_cpu.json)


def check_writable(folder: Path, flag: str) -> None:
    """Refuse, before any data is loaded, a folder that cannot be written (read-only, not a folder, no permission):
    make it and a file in it, then remove what was made."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{flag} {folder} cannot be written ({e.strerror or e}). The outputs go there: expected a "
                        f"folder you can write to (made if missing). Give another {flag}, or make it writable."
                        ) from None
    finally:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()


def check_checkpoint(path: Path, resume: bool) -> None:
    """Before any data is loaded: --resume needs the run's checkpoint, and a new run must not overwrite one."""
    if resume and not path.exists():
        raise UserError(f"--resume: there is no checkpoint at {path}. Start without --resume, or point --out at the "
                        f"folder of the run to continue.")
    if not resume and path.exists():
        raise UserError(f"{path} already exists. Continue that run with --resume, or choose another --out (nothing "
                        f"was overwritten).")


def cpu_notice(cfg: Config, device: torch.device, seeds: list) -> None:
    """--device auto found no GPU: say so, with the expected training time, when that is over an hour."""
    steps = cfg.stop_at or cfg.steps
    seconds = steps * len(seeds) / CPU_STEPS_PER_SEC[cfg.fast]
    if cfg.device == "auto" and device.type == "cpu" and seconds > 3600:
        print(f"note: --device auto found no CUDA GPU, so this trains on the CPU: {steps:,} steps"
              f"{f' x {len(seeds)} seeds' if len(seeds) > 1 else ''} at about {CPU_STEPS_PER_SEC[cfg.fast]:.0f} "
              f"steps/s (the paper's sizes on 2 cores) take about {duration(seconds)}. Use a machine with a CUDA "
              f"GPU, or fewer --steps.", file=sys.stderr)


def main(argv: list | None = None) -> None:
    try:
        cfgs, given = parse_config(argv)
        if cfgs[0].report:
            return print(f"wrote {write_report(read_runs(cfgs[0].report), Path(cfgs[0].out or cfgs[0].report[0]))}")
        rank, world, local_rank, store = distributed_launch()
        cuda = torch.cuda.is_available() if cfgs[0].device == "auto" else cfgs[0].device == "cuda"
        device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        if cfgs[0].eval_only:
            return eval_only(cfgs[0], given, device)
        runs, report_dir = plan_runs(cfgs)
        mine = runs[rank::world]  # round-robin over the ranks
        print(f"config, as flags:\n{config_flags(mine[0] if mine else runs[0])}")
        print(f"{f'rank {rank}/{world}, ' if world > 1 else ''}device: {device}"
              f"{' (fast path: CUDA graph)' if cfgs[0].fast and device.type == 'cuda' else ''}; "
              f"{len(mine)} run(s), outputs in {', '.join(c.out for c in mine) or '-'}")
        for c in mine:
            check_writable(Path(c.out), "--out")
            check_checkpoint(Path(c.out) / "checkpoint.pt", c.resume)
            if c.video:
                check_video(Path(c.video), c.env)
        if mine:
            cpu_notice(mine[0], device, [c.seed for c in mine])
            train(mine, device)
        for c in mine:
            if c.video:
                print(video_line(record_video(load_agent(Path(c.out) / "checkpoint.pt", device)[0], c.env,
                                              Path(c.video))))
        results = [run_record(Path(c.out)) for c in mine]
        if world > 1:
            results = gather_records(store, rank, world, results)
        if rank == 0 and report_dir is not None:
            print(f"wrote {write_report(results, Path(report_dir))}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # MuJoCo checks MUJOCO_GL when first imported, even where nothing is rendered
        if "MUJOCO_GL" not in str(e):
            raise
        print(f"error: MuJoCo refused MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} ({e}). Evaluation renders nothing: "
              f"unset MUJOCO_GL, or set it to egl (GPU) or osmesa (CPU) for --video.", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before or after the training loop, which saves a checkpoint itself
        print("interrupted (outside the training loop: nothing was in progress to save)", file=sys.stderr)
        sys.exit(130)




# ======================================================================================================
# Appendix: the fast path. The same gradient_step and DAC.act, compiled with torch.compile and, on CUDA,
# captured once as CUDA graphs and replayed. Nothing of the method lives here.
# ======================================================================================================
def hide_profiler_warning(record: logging.LogRecord) -> bool:
    """torch.optim.Adam.step's profiler label cannot be compiled, and torch says so once per process in a warning
    ('Profiler record function ... will be ignored') that reads like an error; it changes nothing here."""
    return not str(record.msg).startswith("Profiler record function")


def fast_path_settings(device: torch.device) -> None:
    """Every global torch setting the fast path changes, in one place."""
    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(hide_profiler_warning)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one graph per seed
    # Every shape is fixed, so no dynamic-shape recompiles (on torch 2.11 one of them, of the frame that resumes in
    # DAC.optimise after loss.backward(), failed an assertion: "sources must not be empty for symbol").
    torch._dynamo.config.automatic_dynamic_shapes = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default for float32 matmuls on GPUs
        torch.backends.cuda.preferred_blas_library("cublaslt")  # faster kernels for these small products (+3%)
        if hasattr(torch._inductor.config, "combo_kernels"):  # independent small kernels launched as one (+5%)
            torch._inductor.config.combo_kernels = True
        # Inductor's loop reordering fails an assertion on some small networks' steps (torch 2.11: toy_bandit's);
        # without it the hopper step runs as fast.
        torch._inductor.config.loop_ordering_after_fusion = False


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
    those of the uncaptured policy. The returned tensors are overwritten by the next call."""

    def __init__(self, act):
        self.act, self.key, self.graph = act, None, None

    def __call__(self, states: torch.Tensor, gen: torch.Generator) -> tuple:
        if self.key != (states.shape, gen):
            self.capture(states, gen)
        self.states.copy_(states)
        self.graph.replay()
        return self.outputs

    def capture(self, states: torch.Tensor, gen: torch.Generator) -> None:
        """Capture for the batch size of `states` and for `gen`. Capturing draws nothing from `gen`: the first
        replay draws what the uncaptured policy's first call would."""
        self.states, scratch = states.clone(), torch.Generator(states.device).manual_seed(0)
        with side_stream():
            for _ in range(2):
                self.act(self.states, scratch)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph):
            self.outputs = self.act(self.states, gen)
        self.key = (states.shape, gen)


def make_policy(agent: DAC, fast: bool):
    """Policy extraction as used for acting and evaluation: DAC.act; on the fast path compiled, and on CUDA
    also captured as a CUDA graph."""
    if not fast:
        return agent.act
    act = torch.compile(agent.act)
    return CapturedPolicy(act) if next(agent.actor.parameters()).device.type == "cuda" else act


def make_fast_step(agents: list, datas: list, metric_sums: list, device: torch.device):
    """A function that makes one gradient_step of every agent (agent k on datas[k], adding to metric_sums[k]), each
    compiled with torch.compile. On CUDA each agent runs on its own stream, so several seeds share the GPU, and the
    whole call is captured as one CUDA graph and replayed."""
    fast_path_settings(device)
    steps = [torch.compile(functools.partial(gradient_step, agent, data, sums))
             for agent, data, sums in zip(agents, datas, metric_sums)]
    if device.type != "cuda":
        return lambda: [step() for step in steps]
    streams = [torch.cuda.Stream() for _ in agents] if len(agents) > 1 else None

    def step_all() -> None:
        if streams is None:
            return steps[0]()
        main = torch.cuda.current_stream()
        for step, stream in zip(steps, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                step()
        for stream in streams:
            main.wait_stream(stream)

    return CapturedStep(step_all, [agent.gen for agent in agents])


def evaluates_in_background(cfg: Config, device: torch.device) -> bool:
    """Whether train() evaluates with BackgroundEvaluation: on the fast path on CUDA, where the GPU can go on
    training while the host steps the evaluation's environments."""
    return cfg.fast and device.type == "cuda"


class PolicyCopy(nn.Module):
    """A copy of what DAC.act reads (actor, target critics, diffusion schedule, settings): the policy of one step,
    while the agent trains on. `copy_from` refreshes it in place, so a policy captured on it stays valid."""

    act, sched = DAC.act, DAC.sched

    def __init__(self, agent: DAC):
        super().__init__()
        self.cfg = agent.cfg
        self.actor, self.target_critic = copy.deepcopy(agent.actor), copy.deepcopy(agent.target_critic)
        for name in ("alphas", "betas", "abar"):
            self.register_buffer(name, getattr(agent, name).clone())

    def copy_from(self, agent: DAC) -> None:
        mine = self.state_dict().keys()
        self.load_state_dict({name: value for name, value in agent.state_dict().items() if name in mine})


def on_host(tree):
    """A copy of nested dicts and lists with every tensor copied to the host: their values at this moment."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: on_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_host(value) for value in tree)
    return tree


class BackgroundEvaluation:
    """Evaluation that does not stall training. At an evaluation step `start` takes each run's state of that step
    (its policy's weights into a PolicyCopy on the device, its checkpoint onto the host) and ends its metric window;
    then a thread evaluates the copies as Run.evaluate_and_save would (`evaluate`, the same seeds, so the same
    scores) and saves each run's row and checkpoint, while the training loop goes on. On CUDA the thread works on a
    stream of its own, and each policy is captured for its evaluation's generator before the thread starts: no
    other thread may use CUDA during a capture. `wait` waits for the thread and raises what it raised."""

    def __init__(self, runs: list, envs: dict, show, fast_step):
        self.runs, self.envs, self.show, self.fast_step = runs, envs, show, fast_step
        self.copies = [PolicyCopy(run.agent) for run in runs]
        self.policies = [make_policy(policy_copy, run.cfg.fast) for policy_copy, run in zip(self.copies, runs)]
        device = runs[0].agent.step.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread, self.error = None, None

    def start(self) -> None:
        self.wait()  # the previous evaluation is saved and its copies are free
        jobs = []
        try:
            for run, policy_copy, policy in zip(self.runs, self.copies, self.policies):
                run.check_finite()
                device, seed = run.agent.step.device, evaluation_seed(run.cfg, run.step)
                policy_copy.copy_from(run.agent)
                gen = torch.Generator(device).manual_seed(seed)
                if isinstance(policy, CapturedPolicy):
                    policy.capture(torch.zeros(self.envs[run.cfg.env].observation_space.shape, device=device), gen)
                window = run.end_window()  # before the checkpoint, as in Run.evaluate_and_save
                jobs.append((run, policy, seed, gen, run.step, window, on_host(run.checkpoint())))
        finally:  # a run that diverged stops the loop, after the runs before it
            if jobs:
                if self.stream is not None:
                    self.stream.wait_stream(torch.cuda.current_stream())  # after the copies
                self.thread = threading.Thread(target=self.evaluate_in_turn, args=(jobs,))
                self.thread.start()
                for run in self.runs:
                    run.saving = self.thread
        if isinstance(self.fast_step, CapturedStep) and self.fast_step.graph is None:
            self.wait()  # the training step is captured later: no other thread may use CUDA then

    def evaluate_in_turn(self, jobs: list) -> None:
        try:
            with torch.cuda.stream(self.stream):
                for run, policy, seed, gen, step, window, ckpt in jobs:
                    result = evaluate(policy, self.envs[run.cfg.env], seed, gen.device, run.cfg.gamma,
                                      run.data.reward_scale, gen)
                    self.show(run, run.save_evaluation(step, result, window, ckpt))
        except BaseException as e:  # raised in the training thread, by `wait`
            self.error = e

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


if __name__ == "__main__":
    main()
