"""Diffusion Actor-Critic on a 2-D bandit: soft and hard Q-guidance against diffusion BC, with a verdict.

Figure 2 of Fang et al., "Diffusion Actor-Critic: Formulating Constrained Policy Iteration as Diffusion Noise
Regression for Offline Reinforcement Learning", arXiv:2405.20555 (official script: bandits.py in
https://github.com/Fang-Lin93/DAC), with the paper's settings and its 20,000 steps per agent:

    python toy_bandit.py --out /tmp/bandit                  # bc, soft, hard on 4 datasets: ~4.5 min on 2 CPU cores
    python toy_bandit.py --methods bc soft hard denoised    # + denoised guidance (opt-in: ~15 min more, est.)

It writes bandit.png and bandit_summary.json and prints a verdict per dataset: soft guidance raises the mean reward
over diffusion BC, keeps >= 75% of its samples inside the behaviour support (within 3 sigma of a centre), and hard
guidance, without soft guidance's sqrt(1 - abar_t) factor, keeps at least 30 points fewer inside. docs/bandit.md
has the measurements behind these choices.

How it is built. The method (schedule, sampler, networks, losses, Adam with clipping, cosine decay) is dac.py's.
All (dataset, method) agents train at once, in one compiled step (--no-fast: eagerly): the networks of one method
on the D datasets are D independent networks held as one, with a leading dimension of D (dac.VectorizedLinear, as
dac.py's critic ensemble), and dac.py's per-agent losses are mapped over it with torch.vmap. Every transition of a
bandit ends its episode, so the critic's target is the reward alone: the critic depends on the data, not on the
actor, and one critic ensemble per dataset serves all methods. All methods of a dataset see the same batches and
noise. Denoised guidance back-propagates through all 50 denoising steps (38 ms a step on 2 cores, against 10 ms
for the other three methods together), hence opt-in.

Differences from the official script: every agent's learning rate decays to 0 over the run (the official script
does that only for its BC model; its DAC learners keep a 2,000,000-step horizon); moons and circles centres are
made with numpy in scikit-learn's make_moons/make_circles layout; diffusion-BC samples are plotted too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import dac
from dac import arg


# ======================================================================================================
# Config
# ======================================================================================================
METHODS = ("bc", "soft", "hard", "denoised")


@dataclass
class BanditConfig:
    steps: int = arg(20_000, "gradient steps per agent (the paper's length)")
    datasets: list = arg([0, 1, 2, 3], "behaviour datasets: 0 two Gaussians, 1 three Gaussians, 2 moons, 3 circles",
                         type=int, choices=[0, 1, 2, 3])
    methods: list = arg(["bc", "soft", "hard"], "bc: diffusion behaviour cloning; soft/hard/denoised: DAC's "
                                                "Q-guidance (denoised back-propagates through the whole chain: slow)",
                        choices=list(METHODS))
    seed: int = arg(0, "random seed (behaviour data, networks, batches, samples)")
    out: str = arg("runs/bandit", "folder for bandit.png and bandit_summary.json")
    fast: bool = arg(True, "compile the training step with torch.compile (--no-fast: plain eager PyTorch)")


# The paper's bandit settings (its Figure 2 experiment), as dac.Config fields. Diffusion BC keeps eta fixed.
PAPER_SETTINGS = dict(T=50, hidden_dim=64, actor_lr=1e-3, critic_lr=1e-3, batch_size=128, num_qs=5, rho=1.0,
                      eta=1.0, eta_lr=0.01, bc_threshold=1.3, clip_sample=True)
NUM_SAMPLES = 100  # actions drawn per trained agent for the figure and the summary
GRID = 100  # the learned Q is drawn on a GRID x GRID mesh over [-1.5, 1.5]^2
PROGRESS_EVERY_SECONDS = 30.0  # output not a terminal: a plain progress line this often


# ======================================================================================================
# Data: four 2-D behaviour datasets and a noisy distance reward
# ======================================================================================================
REWARD_CENTRE = (0.4, -0.4)
REWARD_NOISE = 0.5


def moons(n: int = 40) -> np.ndarray:
    """Centres on two interleaved half circles (scikit-learn's make_moons layout, no noise). (n, 2)"""
    outer = np.linspace(0, np.pi, n // 2)
    inner = np.linspace(0, np.pi, n - n // 2)
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                           np.stack([1 - np.cos(inner), 0.5 - np.sin(inner)], 1)])


def circles(n: int = 40, factor: float = 0.8) -> np.ndarray:
    """Centres on two concentric circles (scikit-learn's make_circles layout, no noise). (n, 2)"""
    outer = np.linspace(0, 2 * np.pi, n // 2, endpoint=False)
    inner = np.linspace(0, 2 * np.pi, n - n // 2, endpoint=False)
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                           factor * np.stack([np.cos(inner), np.sin(inner)], 1)])


def fit_box(centres: np.ndarray) -> np.ndarray:
    """Rescale each axis to [0, 1.1] and shift by (-0.8, -0.2), as the paper does for moons and circles."""
    lo, hi = centres.min(0), centres.max(0)
    return (centres - lo) / (hi - lo) * 1.1 + np.array([-0.8, -0.2])


# name, centres (C, 2), noise std sigma, points per centre
DATASETS = {
    0: ("two Gaussians", np.array([[-0.6, 0.6], [0.4, 0.2]]), 0.1, 400),
    1: ("three Gaussians", np.array([[-0.6, 0.6], [0.4, 0.4], [-0.4, -0.4]]), 0.1, 400),
    2: ("moons", fit_box(moons()), 0.05, 10),
    3: ("circles", fit_box(circles()), 0.05, 10),
}


def behaviour_actions(idx: int, seed: int) -> np.ndarray:
    """Gaussian blobs around the dataset's centres, clipped to [-1, 1]. (N, 2) float32"""
    _, centres, sigma, per_centre = DATASETS[idx]
    rng = np.random.default_rng([seed, idx])
    points = centres[:, None, :] + sigma * rng.standard_normal((len(centres), per_centre, 2))  # (C, n, 2)
    return points.reshape(-1, 2).clip(-1, 1).astype(np.float32)


def true_reward(a):
    """r(a) = -||a - (0.4, -0.4)|| without the noise. a (..., 2) numpy or torch -> (...)"""
    d = a - (torch.tensor(REWARD_CENTRE) if torch.is_tensor(a) else np.array(REWARD_CENTRE))
    return -(d**2).sum(-1) ** 0.5


# ======================================================================================================
# Networks of D agents held as one: a leading dimension of D, one slice per dataset
# ======================================================================================================
class StackedNoiseMLP(nn.Module):
    """D independent copies of dac.NoiseMLP's network, evaluated as one: every nn.Linear becomes a
    dac.VectorizedLinear with D members. Inputs (M, .) are shared by all members, (D, M, .) are per member."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, members: int, time_dim: int = 16):
        super().__init__()
        self.act_dim, self.members = act_dim, members
        linear = functools.partial(dac.VectorizedLinear, ensemble=members)
        self.time_mlp = nn.Sequential(linear(time_dim, 32), dac.Mish(), linear(32, 32))
        self.net = nn.Sequential(linear(obs_dim + act_dim + 32, hidden), dac.Mish(),
                                 linear(hidden, hidden), dac.Mish(),
                                 linear(hidden, hidden), dac.Mish(),
                                 linear(hidden, act_dim))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t (T,) the steps 1..T for every member -> (T, D, 1, 32): row t - 1 is step t, as dac.ddpm_sample reads."""
        return self.time_mlp(dac.timestep_features(t)).transpose(0, 1).unsqueeze(2)

    def predict(self, s: torch.Tensor, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """s (M, S) or (D, M, S), x (M, A) or (D, M, A), temb (D, M or 1, 32) -> (D, M, A)."""
        shape = (self.members, x.shape[-2])
        return self.net(torch.cat([s.expand(*shape, -1), x.expand(*shape, -1), temb.expand(*shape, -1)], -1))

    def forward(self, s: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (D, M, A), t (D, M) integer steps -> eps_theta (D, M, A)."""
        return self.predict(s, x, self.time_mlp(dac.timestep_features(t)))


class DatasetCritics(nn.Module):
    """H Q-networks for each of D datasets: one dac.EnsembleCritic with D * H members, dataset-major.
    a (D, M, A), or (M, A) shared by all datasets; s (M, S) -> Q (H, D, M)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, datasets: int, num_qs: int):
        super().__init__()
        self.datasets, self.num_qs = datasets, num_qs
        self.ensemble = dac.EnsembleCritic(obs_dim, act_dim, hidden, datasets * num_qs)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if a.dim() == 3:
            a = a.repeat_interleave(self.num_qs, dim=0)  # (D*H, M, A): each dataset's actions for its H critics
            s = s.expand(a.shape[0], *s.shape)
        q = self.ensemble(s, a)  # (D*H, M)
        return q.view(self.datasets, self.num_qs, -1).transpose(0, 1)  # (H, D, M)


def clip_grad_norm_per_agent_(params: list, max_norm: float, agents: int) -> None:
    """nn.utils.clip_grad_norm_ applied to each agent's slice of stacked parameters (dim 0 is agent-major): every
    agent's gradients are scaled by min(1, max_norm / (its global norm + 1e-6)). A test checks it against
    clip_grad_norm_ on each agent alone."""
    grads = [p.grad.view(agents, -1) for p in params]  # views: scaling them scales p.grad
    norms = torch.stack([g.pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (agents,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)  # (agents, 1)
    for g in grads:
        g.mul_(scale)


# ======================================================================================================
# Training: DAC's update for every (dataset, method) agent in one step
# ======================================================================================================
class BanditAgents(nn.Module):
    """One critic ensemble per dataset and one stacked actor per method. `update` is one gradient step of
    dac.DAC.update for all of them, without what a bandit does not use: the critic target is the reward (every
    transition is terminal: no next actions, no target actor), and the figure samples the online actors."""

    def __init__(self, cfg: BanditConfig):
        super().__init__()
        self.hp = hp = dac.Config(**PAPER_SETTINGS, steps=cfg.steps, seed=cfg.seed)
        D = len(cfg.datasets)
        torch.manual_seed(cfg.seed)
        self.critic = DatasetCritics(1, 2, hp.hidden_dim, D, hp.num_qs)
        dac.flax_init_(self.critic)
        self.target_critic = DatasetCritics(1, 2, hp.hidden_dim, D, hp.num_qs).requires_grad_(False)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.actors = nn.ModuleDict()
        for method in cfg.methods:
            torch.manual_seed(cfg.seed)  # every method starts from the same actor
            self.actors[method] = StackedNoiseMLP(1, 2, hp.hidden_dim, D)
            dac.flax_init_(self.actors[method])
        for name, value in dac.vp_schedule(hp.T).items():
            self.register_buffer(name, value)
        self.register_buffer("eta", torch.full((len(cfg.methods), D), hp.eta))  # one per agent
        self.register_buffer("step", torch.tensor(0))
        # The behaviour actions, zero-padded to the largest dataset, and each dataset's size.
        data = [torch.as_tensor(behaviour_actions(i, cfg.seed)) for i in cfg.datasets]
        self.register_buffer("sizes", torch.tensor([len(d) for d in data]))
        self.register_buffer("data", nn.utils.rnn.pad_sequence(data, batch_first=True))  # (D, N_max, 2)
        self.register_buffer("state", torch.zeros(hp.batch_size, 1))  # a bandit has one, constant, state
        self.gen = torch.Generator().manual_seed(cfg.seed)
        adam = functools.partial(torch.optim.Adam, fused=True)
        self.critic_opt = adam(self.critic.parameters(), lr=torch.tensor(hp.critic_lr))
        self.actor_opts = {m: adam(a.parameters(), lr=torch.tensor(hp.actor_lr)) for m, a in self.actors.items()}

    @property
    def sched(self) -> dict:
        return {"alphas": self.alphas, "betas": self.betas, "abar": self.abar}

    def optimise(self, opt: torch.optim.Optimizer, losses: torch.Tensor, base_lr: float) -> None:
        """dac.DAC.optimise for D agents at once. losses (D,): their sum puts each agent's gradient in its own
        slice; Adam is elementwise, so one Adam over the stacked parameters is D independent ones."""
        params = opt.param_groups[0]["params"]
        opt.zero_grad()
        losses.sum().backward()
        clip_grad_norm_per_agent_(params, self.hp.grad_clip, len(losses))
        opt.param_groups[0]["lr"].copy_(dac.cosine_lr(base_lr, self.step, self.hp.steps))
        opt.step()

    def sample_actions(self) -> torch.Tensor:
        """B behaviour actions per dataset, drawn uniformly with replacement. (D, B, 2)"""
        D, B = self.data.shape[0], self.hp.batch_size
        idx = (torch.rand(D, B, generator=self.gen) * self.sizes.unsqueeze(1)).long()  # (D, B)
        return torch.gather(self.data, 1, idx.unsqueeze(-1).expand(D, B, 2))

    def update(self) -> None:
        hp, s = self.hp, self.state  # s (B, 1)
        a = self.sample_actions()  # (D, B, 2)
        r = true_reward(a) + REWARD_NOISE * torch.randn(a.shape[:2], generator=self.gen)  # (D, B)

        # --- critic: regression onto the reward (dac.critic_loss per dataset); Polyak averaging of the targets
        q = self.critic(s, a)  # (H, D, B)
        self.optimise(self.critic_opt, torch.vmap(dac.critic_loss, in_dims=(1, 0))(q, r), hp.critic_lr)
        dac.soft_update_(self.target_critic, self.critic, hp.tau)

        # --- actors: noise regression with each method's guidance, on the same noisy dataset actions
        t = torch.randint(1, hp.T + 1, a.shape[:2], generator=self.gen)  # (D, B)
        eps = torch.randn(a.shape, generator=self.gen)  # (D, B, 2)
        x_t = dac.noisy_action(a, t, eps, self.abar)  # (D, B, 2)
        noise_level = (1 - self.abar[t]).sqrt().unsqueeze(-1)  # (D, B, 1)
        with torch.no_grad():
            q_norm = self.target_critic(s, a).abs().mean((0, 2)).view(-1, 1, 1)  # (D, 1, 1)
        g = dac.q_gradient(self.target_critic, s, x_t, q_norm)  # (D, B, 2): each dataset's own critics
        for k, (method, actor) in enumerate(self.actors.items()):
            eps_pred = actor(s, x_t, t)  # (D, B, 2)
            loss_bc = torch.vmap(dac.bc_loss)(eps_pred, eps)  # (D,)
            if method == "soft":
                loss_guide = torch.vmap(dac.soft_guidance_loss)(eps_pred, g, noise_level)
            elif method == "hard":
                loss_guide = torch.vmap(dac.hard_guidance_loss)(eps_pred, g)
            elif method == "denoised":  # dac.denoised_guidance_loss per dataset, the chain clipped as in dac.py
                a0 = dac.ddpm_sample(actor, s, self.sched, self.gen, hp.clip_sample)  # (D, B, 2), with gradients
                loss_guide = -self.target_critic(s, a0).mean((0, 2)) / (q_norm.view(-1) + 1e-6)
            else:
                loss_guide = torch.zeros_like(loss_bc)
            self.optimise(self.actor_opts[method], self.eta[k] * loss_bc + loss_guide, hp.actor_lr)
            if method != "bc":  # diffusion BC keeps eta = 1: its loss is plain noise regression
                with torch.no_grad():
                    self.eta[k] = dac.dual_ascent_eta(self.eta[k], loss_bc, hp.bc_threshold, hp.eta_lr)
        with torch.no_grad():
            self.step += 1

    @torch.no_grad()
    def samples(self, n: int) -> dict:
        """n actions per agent from its reverse chain, unclipped as in the paper: {method: (D, n, 2) numpy}."""
        gen = torch.Generator().manual_seed(self.hp.seed + 1)
        state = torch.zeros(n, 1)
        return {m: dac.ddpm_sample(actor, state, self.sched, gen, clip_x0=False).numpy()
                for m, actor in self.actors.items()}

    @torch.no_grad()
    def q_grid(self) -> np.ndarray:
        """Each dataset's ensemble-mean Q on the plotting grid. (D, GRID, GRID)"""
        axis = torch.linspace(-1.5, 1.5, GRID)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).view(-1, 2)  # (GRID^2, 2)
        q = self.critic(torch.zeros(len(grid), 1), grid).mean(0)  # (D, GRID^2)
        return q.view(-1, GRID, GRID).numpy()


def train(cfg: BanditConfig) -> BanditAgents:
    """cfg.steps gradient steps of every agent, with a progress bar on a terminal and a plain line every
    PROGRESS_EVERY_SECONDS otherwise."""
    from tqdm import tqdm

    agents = BanditAgents(cfg)
    if cfg.fast:
        dac.fast_path_settings(torch.device("cpu"))
    step = torch.compile(agents.update) if cfg.fast else agents.update
    agents_count = len(cfg.datasets) * len(cfg.methods)
    bar = tqdm(total=cfg.steps, unit="step", desc=f"{agents_count} agents", disable=None)
    last_time, last_n = time.perf_counter(), 0
    for n in range(1, cfg.steps + 1):
        step()
        if n % 100 == 0 or n == cfg.steps:
            bar.update(n - bar.n)
            now = time.perf_counter()
            if bar.disable and (n == 100 or now - last_time >= PROGRESS_EVERY_SECONDS):
                rate = (n - last_n) / (now - last_time)
                if n == 100:
                    line = (f"step 100/{cfg.steps}: the first 100 steps took {now - last_time:.0f} s"
                            + (" (compiling included)" if cfg.fast else ""))
                else:
                    left = dac.duration((cfg.steps - n) / rate)
                    line = f"step {n}/{cfg.steps}, {rate:.0f} steps/s, about {left} left"
                print(line, flush=True)
                last_time, last_n = now, n
    bar.close()
    return agents


# ======================================================================================================
# Evaluation: reward, support and modes of the samples; the verdict; the figure
# ======================================================================================================
SUPPORT_BAR = 0.75  # soft guidance keeps at least this fraction of its samples inside the support
HARD_GAP = 0.30  # ... and hard guidance at least this much less


def score(samples: np.ndarray, idx: int) -> dict:
    """Mean true reward; fraction within 3 sigma of a centre; centres that are the nearest centre of at least one
    in-support sample. samples (N, 2)."""
    _, centres, sigma, _ = DATASETS[idx]
    dist = np.linalg.norm(samples[:, None, :] - centres[None, :, :], axis=-1)  # (N, C)
    inside = dist.min(1) <= 3 * sigma  # (N,)
    return {"mean_reward": float(true_reward(samples).mean()), "in_support": float(inside.mean()),
            "modes": int(len(np.unique(dist[inside].argmin(1)))), "centres": len(centres)}


def verdict(scores: dict) -> dict:
    """The paper's picture on one dataset, each part checked: soft guidance's mean reward above diffusion BC's;
    at least SUPPORT_BAR of soft samples inside the support; hard guidance at least HARD_GAP below soft there.
    Returns {"holds": bool, "checks": [[text, bool], ...]}; a check whose methods were not trained is left out."""
    checks = []
    soft, bc, hard = scores.get("soft"), scores.get("bc"), scores.get("hard")
    if soft and bc:
        checks.append([f"soft reward above BC ({soft['mean_reward']:.2f} vs {bc['mean_reward']:.2f})",
                       soft["mean_reward"] > bc["mean_reward"]])
    if soft:
        checks.append([f"soft >= {SUPPORT_BAR:.0%} in support ({soft['in_support']:.0%})",
                       soft["in_support"] >= SUPPORT_BAR])
    if soft and hard:
        checks.append([f"hard >= {HARD_GAP * 100:.0f} points below soft in support ({hard['in_support']:.0%})",
                       hard["in_support"] <= soft["in_support"] - HARD_GAP])
    return {"holds": bool(checks) and all(ok for _, ok in checks), "checks": checks}


def verdict_line(v: dict, steps: int) -> str:
    """The verdict in words; after fewer than the paper's steps it says so, as the checks are set for them."""
    if not v["checks"]:
        return "no verdict (needs soft guidance)"
    head = "the paper's picture holds" if v["holds"] else "NOT SHOWN"
    paper = BanditConfig.steps
    after = f" (after {steps:,} steps: the checks are meant for the paper's {paper:,})" if steps < paper else ""
    return f"{head}{after}: " + "; ".join(f"{text} {'yes' if ok else 'NO'}" for text, ok in v["checks"])


# method -> scatter style of the paper's figure (BC is not in the paper's figure)
STYLE = {"bc": dict(marker="+", c="black", s=25, linewidths=0.8, label="Diffusion BC"),
         "denoised": dict(marker="x", c="orange", s=30, label="Denoised guidance"),
         "hard": dict(marker="x", c="blue", s=30, label="Hard Q-guidance"),
         "soft": dict(marker="^", c="magenta", s=30, label="Soft Q-guidance")}


def plot(cfg: BanditConfig, samples: dict, q: np.ndarray, path: Path) -> None:
    """One panel per dataset: behaviour points coloured by true reward, dashed level curves of the learned Q
    (ensemble mean), NUM_SAMPLES samples per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cfg.datasets)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1, 4.8), squeeze=False)
    axis = np.linspace(-1.5, 1.5, GRID)
    for d, (ax, idx) in enumerate(zip(axes[0], cfg.datasets)):
        name, _, sigma, _ = DATASETS[idx]
        data = behaviour_actions(idx, cfg.seed)
        levels = ax.contour(axis, axis, q[d], levels=8, linestyles="--", cmap="binary")
        ax.clabel(levels, fmt=lambda v: f"{v:.2f}", fontsize=7)
        points = ax.scatter(data[:, 0], data[:, 1], c=true_reward(data), marker=".", s=6, vmin=-2.3, vmax=0,
                            cmap="viridis", label="Behaviour data")
        for method in ("bc", "denoised", "hard", "soft"):
            if method in cfg.methods:
                ax.scatter(*samples[method][d].clip(-1.45, 1.45).T, **STYLE[method])
        ax.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal", title=f"({idx}) {name}, sigma {sigma}")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.colorbar(points, ax=axes[0].tolist(), shrink=0.9, pad=0.01, label="reward (noise-free)")
    fig.suptitle(f"DAC on 2-D bandits: {cfg.steps} steps, seed {cfg.seed}; dashed: learned Q "
                 f"(ensemble mean); samples clipped to the frame")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ======================================================================================================
# Main
# ======================================================================================================
def parse_config(argv: list | None = None) -> BanditConfig:
    """Command line generated from BanditConfig; --out is made and checked for writing before any training."""
    parser = dac.config_parser(BanditConfig, __doc__.split("\n\n")[0])
    cfg = BanditConfig(**vars(parser.parse_args(argv)))
    if cfg.steps < 1:
        parser.error(f"--steps must be >= 1, got {cfg.steps}")
    cfg.datasets, cfg.methods = sorted(set(cfg.datasets)), [m for m in METHODS if m in cfg.methods]
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out).close()
    except OSError as e:
        parser.error(f"--out {cfg.out!r} cannot be written ({e.strerror}); the figure and the summary go there. "
                     f"Give a folder you can write to, e.g. --out /tmp/bandit")
    return cfg


def run(cfg: BanditConfig) -> dict:
    """Train, score, plot, write bandit_summary.json; returns the summary."""
    tic = time.perf_counter()
    agents = train(cfg)
    train_seconds = time.perf_counter() - tic
    samples, q = agents.samples(NUM_SAMPLES), agents.q_grid()
    summary = {"config": dataclasses.asdict(cfg), "train_seconds": round(train_seconds, 1), "datasets": {}}
    for d, idx in enumerate(cfg.datasets):
        scores = {m: {**score(samples[m][d], idx), "eta": float(agents.eta[k, d])}
                  for k, m in enumerate(cfg.methods)}
        summary["datasets"][DATASETS[idx][0]] = {"sigma": DATASETS[idx][2], "methods": scores,
                                                 "verdict": verdict(scores)}
    out = Path(cfg.out)
    plot(cfg, samples, q, out / "bandit.png")
    summary["wall_seconds"] = round(time.perf_counter() - tic, 1)
    (out / "bandit_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict) -> None:
    print(f"{'dataset':<16}{'method':<10}{'mean reward':>12}{'in support':>12}{'modes hit':>11}{'eta':>8}")
    for name, d in summary["datasets"].items():
        for method, s in d["methods"].items():
            print(f"{name:<16}{method:<10}{s['mean_reward']:>12.3f}{s['in_support']:>12.0%}"
                  f"{s['modes']:>7}/{s['centres']:<3}{s['eta']:>8.3f}")
    for name, d in summary["datasets"].items():
        print(f"{name}: {verdict_line(d['verdict'], summary['config']['steps'])}")


def main(argv: list | None = None) -> None:
    try:
        cfg = parse_config(argv)
        summary = run(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written (the run has no checkpoints; start it again)", file=sys.stderr)
        sys.exit(130)
    print_summary(summary)
    print(f"wrote {Path(cfg.out) / 'bandit.png'} and {Path(cfg.out) / 'bandit_summary.json'} "
          f"in {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
