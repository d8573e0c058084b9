"""Parity harness: dac.py's gradient step against the official JAX DAC code, number for number.

Purpose. Build the official DACLearner (JAX, CPU) at hopper shapes (S=11, A=3) with the official hopper-medium
settings, copy its initial weights into a dac.DAC, then run both for --steps gradient steps on the same batches
and the same random draws (the actor's t and eps, the target sampler's x_T and per-step noise, recorded from the
official run through jax.debug.callback and replayed into dac.py's torch.randn/randint). Per step it prints how
far the losses, eta and the Q statistics differ; at the end, how far every parameter tensor (actor, target actor,
critic, target critic), every Adam moment, the Adam step counts and the acting policy's actions differ. It exits
1 when anything exceeds the tolerance (1e-4 relative in float32, 1e-9 in float64), 2 on a usage or install
problem. --check-init instead compares dac.py's default initialisation (and init='torch', as a contrast) with the
official initial weights; --check-batches shows which rows the official Dataset.sample and dac.EpochBatches draw.

PATH is a checkout of https://github.com/Fang-Lin93/DAC (e.g. `git archive HEAD | tar -x -C /tmp/dac_official`).
JAX and friends are needed by this script only (not in requirements.txt); the versions it was checked with:
    pip install "jax==0.4.38" "jaxlib==0.4.38" "flax==0.10.2" "optax==0.2.4" "orbax-checkpoint==0.11.5"

"Relative difference": for a per-step scalar, |ours - official| / max(|official|, mean |official| over the steps so
far), so that the guidance loss, which crosses zero, is measured against its typical size, not a value near 0; for
a tensor, max|ours - official| / max|official|, the largest element-wise difference against the tensor's scale.

dac.py runs as it is: its eta, EMA gating, schedule and Adam already follow the official code, and a float64 run
only needs torch's default dtype set to float64 before the agent is built. The one patch (the dac_clip function
below, in this process only): torch.nn.utils.clip_grad_norm_ is wrapped to count how often the clip is active,
and in float64 computes optax's g / ||g|| * max instead of torch's g * max / (||g|| + 1e-6). See docs/parity.md.

Licence note: the official code is GPL-3.0. This script imports it at run time from the path given; it copies
none of it. The small stand-ins below (`datasets`, the `agents` package shell, and tensorflow-probability when it
is not installed) replace modules that the DAC learner does not need (they pull in gym/d4rl and every other agent).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dac  # noqa: E402

PIP_LINE = ('pip install "jax==0.4.38" "jaxlib==0.4.38" "flax==0.10.2" "optax==0.2.4" '
            '"orbax-checkpoint==0.11.5"')
TOL = {"float32": 1e-4, "float64": 1e-9}
FLOOR = 1e-12  # guards all-zero denominators only
OBS_DIM, ACT_DIM = 11, 3  # hopper
START = time.perf_counter()


# ======================================================================================================
# Everything that knows dac.py's internals. When dac.py changes, adapt these functions and nothing else.
# ======================================================================================================
def dac_actor_layers(actor) -> list:
    """The actor's nn.Linear layers in the order of the official DDPM's Dense layers: time MLP, then noise MLP."""
    return [m for m in (*actor.time_mlp, *actor.net) if isinstance(m, torch.nn.Linear)]


def dac_critic_layers(critic) -> list:
    """The critic's VectorizedLinear layers (weight (H, in, out), bias (H, 1, out)), input to output."""
    return [m for m in critic.net if isinstance(m, dac.VectorizedLinear)]


@torch.no_grad()
def dac_set_layer(layer, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Copy a Flax Dense kernel (in, out) / vmapped kernel (H, in, out) and its bias into a dac layer."""
    if isinstance(layer, torch.nn.Linear):
        layer.weight.copy_(torch.from_numpy(kernel.T.copy()))  # torch Linear keeps (out, in)
        layer.bias.copy_(torch.from_numpy(bias))
    else:
        layer.weight.copy_(torch.from_numpy(kernel))
        layer.bias.copy_(torch.from_numpy(bias[:, None, :]))


def to_dac_layout(layer, kernel: np.ndarray, bias: np.ndarray) -> tuple:
    """An official (kernel, bias) pair -- weights or Adam moments -- in the dac layer's layout."""
    if isinstance(layer, torch.nn.Linear):
        return kernel.T, bias
    return kernel, bias[:, None, :]


def dac_adam(opt, param: torch.Tensor) -> tuple:
    """(first moment, second moment) of one parameter in a torch.optim.Adam."""
    st = opt.state[param]
    return st["exp_avg"], st["exp_avg_sq"]


def dac_adam_count(opt, param: torch.Tensor) -> float:
    return float(opt.state[param]["step"])


def dac_optimisers(agent) -> dict:
    return {"actor": agent.actor_opt, "critic": agent.critic_opt}


def dac_metrics(out) -> dict:
    """agent.update's dac.Metrics (a NamedTuple of 0-d tensors) as a dict of floats."""
    return {k: float(v) for k, v in out._asdict().items()}


@contextlib.contextmanager
def dac_replayed_draws(draws: dict):
    """Inside agent.update, torch.randint / torch.randn return the official draws, picked by shape:
    t (B,) int, eps (B, A), and the sampler's (T, M, A) block (x_T = [0], the noise added at step t = [T-t+1])."""
    real_randn, real_randint = torch.randn, torch.randint
    used = set()

    def size_of(args, kwargs):
        size = kwargs.get("size", args)
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = size[0]
        return tuple(int(s) for s in size)

    def take(kind, shape, dtype):
        key = (kind, shape)
        if key not in draws:
            raise RuntimeError(f"dac.py drew torch.{kind} of shape {shape}, which the official step has no draw "
                               f"for (recorded: {sorted(draws)}); update dac_replayed_draws for the new draw layout")
        if key in used:
            raise RuntimeError(f"dac.py drew torch.{kind} {shape} twice in one step; the replay assumes once")
        used.add(key)
        return draws[key].to(dtype) if dtype is not None else draws[key]

    def randn(*args, **kwargs):
        return take("randn", size_of(args, kwargs), kwargs.get("dtype") or torch.get_default_dtype())

    def randint(*args, **kwargs):
        size = kwargs.get("size", args[-1])
        low, high = (args[0], args[1]) if len(args) >= 3 else (0, args[0])
        t = take("randint", tuple(size), kwargs.get("dtype") or torch.long)
        assert low <= int(t.min()) and int(t.max()) < high, "replayed t outside dac.py's range"
        return t

    torch.randn, torch.randint = randn, randint
    try:
        yield
    finally:
        torch.randn, torch.randint = real_randn, real_randint
    missing = set(draws) - used
    if missing:
        raise RuntimeError(f"dac.py did not use the official draws {sorted(missing)}")


@contextlib.contextmanager
def dac_clip(official: bool):
    """Wraps torch.nn.utils.clip_grad_norm_ (called by dac.DAC.optimise) in this process: counts its calls and how
    often the clip is active. official=True computes it as optax.clip_by_global_norm does, g / ||g|| * max when
    ||g|| >= max; torch scales by max / (||g|| + 1e-6), ~1e-6 relative apart whenever the clip is active."""
    real, calls = torch.nn.utils.clip_grad_norm_, {"n": 0, "clipped": 0}

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        params = [p for p in ([parameters] if torch.is_tensor(parameters) else parameters) if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        calls["n"], calls["clipped"] = calls["n"] + 1, calls["clipped"] + int(norm >= max_norm)
        if not official:
            return real(params, max_norm, *args, **kwargs)
        if norm >= max_norm:
            for p in params:
                p.grad.div_(norm).mul_(max_norm)
        return norm

    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    try:
        yield calls
    finally:
        torch.nn.utils.clip_grad_norm_ = real


# ======================================================================================================
# The official side: import, build, record its draws
# ======================================================================================================
def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def tfp_stand_in() -> types.ModuleType:
    """tensorflow_probability, as far as the official code's imports reach: networks/critics.py imports
    `tensorflow_probability.substrates.jax` for critics DAC does not use. Any use of the stand-in raises."""

    class Unavailable(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError(f"tensorflow-probability is not installed, and the official code used "
                               f"{self.__name__}.{name}; the DAC learner should not: install tensorflow-probability")

    tfp = types.ModuleType("tensorflow_probability")
    tfp.substrates = types.ModuleType("tensorflow_probability.substrates")
    tfp.substrates.jax = types.ModuleType("tensorflow_probability.substrates.jax")
    tfp.substrates.jax.distributions = Unavailable("tfp.distributions")
    tfp.substrates.jax.bijectors = Unavailable("tfp.bijectors")
    return tfp


def import_official(path: str, x64: bool, cpu: bool = True):
    """Import the official agents/dac.py from `path`, with stand-ins for the modules it does not need. cpu: run
    JAX on the CPU (the parity harness); else on JAX's default device."""
    root = Path(path).expanduser().resolve()
    if not (root / "agents" / "dac.py").exists():
        fail(f"--official {path}: no agents/dac.py there. Give the root of a checkout of the official DAC code, "
             f"e.g. `git clone https://github.com/Fang-Lin93/DAC /tmp/dac_official` (or `git archive` a mirror).")
    try:
        import jax
        for name in ("flax", "optax", "orbax.checkpoint"):
            importlib.import_module(name)
    except ImportError as e:
        fail(f"the official JAX code needs jax, flax, optax and orbax-checkpoint, which only the bench scripts use "
             f"(they are not in requirements.txt); importing them failed ({e}). Install the CPU versions the parity "
             f"harness was checked with: {PIP_LINE}   then run the same command again.")
    try:
        importlib.import_module("tensorflow_probability.substrates.jax")
    except ImportError:
        tfp = tfp_stand_in()
        sys.modules.update({"tensorflow_probability": tfp, "tensorflow_probability.substrates": tfp.substrates,
                            "tensorflow_probability.substrates.jax": tfp.substrates.jax})
    if cpu:
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", x64)
    saved = {k: sys.modules.get(k) for k in ("datasets", "agents")}
    sys.path.insert(0, str(root))
    try:
        types_mod = importlib.import_module("networks.types")
        datasets = types.ModuleType("datasets")  # the real one imports gym and d4rl; only Batch is used
        datasets.Batch = types_mod.Batch
        agents = types.ModuleType("agents")  # the real __init__ imports every agent (IQL, SAC, CQL, ...)
        agents.__path__ = [str(root / "agents")]
        sys.modules.update(datasets=datasets, agents=agents)
        module = importlib.import_module("agents.dac")
    except Exception as e:
        fail(f"importing the official code from {root} failed: {type(e).__name__}: {e}. With other versions of "
             f"jax/flax/optax the official code may not import; install the ones this "
             f"harness was checked with: {PIP_LINE}")
    finally:
        sys.path.remove(str(root))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module, types_mod.Batch


def import_official_dataset(root: Path):
    """The official datasets/dataset.py alone (its package __init__ imports gym and d4rl), with a stand-in for
    utils.sample_n_k (utils imports ray and gym; sample_n_k serves random batches only, not the scanning ones)."""
    import importlib.util

    sys.modules.setdefault("utils", types.ModuleType("utils")).sample_n_k = None
    spec = importlib.util.spec_from_file_location("official_dataset", root / "datasets" / "dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))  # for networks.types
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    return module


def official_learner(od, args, x64: bool):
    """The official DACLearner as main.py builds it, with runs.sh's hopper-medium settings."""
    import jax
    import jax.numpy as jnp

    dt = np.float64 if x64 else np.float32
    learner = od.DACLearner(np.zeros((1, OBS_DIM), dt), np.zeros((1, ACT_DIM), dt), seed=args.seed,
                            lr_decay_steps=args.steps, eta=1.0, eta_lr=1e-3, bc_threshold=1.0, rho=1.5,
                            q_tar="lcb", num_qs=10, T=5, num_q_samples=10, num_action_samples=10, ema_tau=0.005,
                            update_ema_every=5, step_start_ema=args.ema_start, actor_lr=3e-4, critic_lr=3e-4,
                            clip_grad_norm=1.0, hidden_dims=(256, 256, 256), Q_guidance="soft", discount=0.99,
                            clip_sampler=True, sampler="ddpm", maxQ=False)
    if x64:  # Flax creates float32 parameters even under x64; make every model (and its Adam state) float64
        for name in ("actor", "actor_tar", "critic", "critic_tar"):
            model = getattr(learner, name)
            params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), model.params)
            opt_state = model.optimizer.init(params) if model.optimizer is not None else None
            setattr(learner, name, model.replace(params=params, opt_state=opt_state))
    return learner


@contextlib.contextmanager
def record_official_draws(log: list):
    """jax.random.normal / randint, as the official code calls them, also hand their values to the host (an
    ordered debug callback keeps jit and the program order)."""
    import jax

    real_normal, real_randint = jax.random.normal, jax.random.randint

    def keep(kind):
        return lambda v: log.append((kind, np.array(v)))

    def normal(key, shape=(), dtype=float, *a, **k):
        x = real_normal(key, shape, dtype, *a, **k)
        jax.debug.callback(keep("normal"), x, ordered=True)
        return x

    def randint(key, shape, minval, maxval, *a, **k):
        x = real_randint(key, shape, minval, maxval, *a, **k)
        jax.debug.callback(keep("randint"), x, ordered=True)
        return x

    jax.random.normal, jax.random.randint = normal, randint
    try:
        yield
    finally:
        jax.random.normal, jax.random.randint = real_normal, real_randint


def draws_for_dac(log: list, T: int, B: int, M: int) -> dict:
    """One official step's draws, in its order: the critic's prior x_T (M, A); T sampler noises (M, A) for
    t = T..1 (the one at t = 1 is multiplied by 0); the actor's t (B,) and eps (B, A). -> dac.py's shapes."""
    kinds = [(k, v.shape) for k, v in log]
    want = [("normal", (M, ACT_DIM))] * (T + 1) + [("randint", (B,)), ("normal", (B, ACT_DIM))]
    if kinds != want:
        raise RuntimeError(f"the official step drew {kinds}, expected {want}: its draw layout changed")
    noise = np.stack([log[0][1]] + [log[1 + k][1] for k in range(T - 1)])  # (T, M, A): [0] x_T, [T-t+1] step t
    return {("randn", noise.shape): torch.from_numpy(noise),
            ("randint", (B,)): torch.from_numpy(log[T + 1][1].astype(np.int64)),
            ("randn", (B, ACT_DIM)): torch.from_numpy(log[T + 2][1])}


def official_layers(params: dict, critic: bool) -> list:
    """(path, kernel, bias) of the Dense layers in order: actor MLP_0 (time) then MLP_1 (noise); critic one MLP."""
    p = params["params"]
    mlps = [p["VmapQNet_0"]["MLP_0"]] if critic else [p["MLP_0"], p["MLP_1"]]
    out = []
    for mi, mlp in enumerate(mlps):
        for name in sorted(mlp, key=lambda n: int(n.split("_")[1])):
            out.append((f"MLP_{mi}/{name}", np.array(mlp[name]["kernel"]), np.array(mlp[name]["bias"])))
    return out


def official_adam(model):
    """(count, mu, nu) of the Adam state inside optax.chain(clip_by_global_norm, adam(schedule))."""
    stack = [model.opt_state]
    while stack:
        s = stack.pop()
        if hasattr(s, "mu") and hasattr(s, "nu"):
            return int(s.count), s.mu, s.nu
        if isinstance(s, (tuple, list)):
            stack.extend(s)
    raise RuntimeError("no Adam state (mu, nu) found in the official optimiser state")


# ======================================================================================================
# Data: the same batches for both sides
# ======================================================================================================
def make_data(args, dtype) -> dict:
    """A D4RL-layout file through dac.py's loader (--dataset), else a synthetic hopper-shaped dataset."""
    if args.dataset:
        cfg = dataclasses.replace(dac.Config(), dataset=[args.dataset])
        d = dac.load_dataset(cfg, OBS_DIM, ACT_DIM)
    else:
        rng = np.random.default_rng(args.seed + 12345)
        n = 20_000
        obs = rng.normal(size=(n, OBS_DIM))
        d = {"observations": obs, "next_observations": obs + 0.1 * rng.normal(size=(n, OBS_DIM)),
             "actions": np.clip(rng.normal(scale=0.5, size=(n, ACT_DIM)), -1 + 1e-5, 1 - 1e-5),
             "rewards": args.reward_scale * rng.normal(loc=0.3, size=n), "terminals": (rng.random(n) < 0.01)}
    keys = ("observations", "actions", "rewards", "next_observations", "terminals")  # not dac's reward_scale
    return {k: np.asarray(d[k], dtype) for k in keys}


def batches(d: dict, batch_size: int, seed: int):
    """Shuffled epochs without replacement, as the official Dataset.sample does by default (scanning)."""
    rng = np.random.default_rng(seed)
    n = len(d["rewards"])
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield {k: v[order[i:i + batch_size]] for k, v in d.items()}


# ======================================================================================================
# Comparisons
# ======================================================================================================
def rel_scalar(ours: float, ref: float, scale: float = 0.0) -> tuple:
    """(abs, rel) difference; rel against max(|ref|, scale), scale being the quantity's typical size."""
    d = abs(ours - ref)
    return d, d / max(abs(ref), scale, FLOOR)


def rel_tensor(ours, ref) -> tuple:
    ours = np.asarray(ours.detach().cpu() if isinstance(ours, torch.Tensor) else ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    d = float(np.abs(ours - ref).max())
    return d, d / max(float(np.abs(ref).max()), FLOOR)


def compare_state(agent, learner) -> list:
    """Rows (what, abs diff, rel diff) for every parameter, Adam moment and Adam count."""
    rows = []
    nets = [("actor", agent.actor, learner.actor, False), ("target_actor", agent.target_actor, learner.actor_tar,
                                                             False),
            ("critic", agent.critic, learner.critic, True), ("target_critic", agent.target_critic,
                                                             learner.critic_tar, True)]
    opts = dac_optimisers(agent)
    for name, net, model, critic in nets:
        layers = dac_critic_layers(net) if critic else dac_actor_layers(net)
        ref = official_layers(model.params, critic)
        adam = None
        if name in opts:
            count, mu, nu = official_adam(model)
            adam = (official_layers(mu, critic), official_layers(nu, critic))
        for i, (layer, (path, k, b)) in enumerate(zip(layers, ref)):
            pairs = zip(("weight", "bias"), (layer.weight, layer.bias), to_dac_layout(layer, k, b))
            for pname, ours, theirs in pairs:
                rows.append((f"{name}.{path}.{pname}", *rel_tensor(ours, theirs)))
            if adam is None:
                continue
            for mname, moments, j in (("m", adam[0], 0), ("v", adam[1], 1)):
                _, mk, mb = moments[i]
                for pname, p, theirs in zip(("weight", "bias"), (layer.weight, layer.bias),
                                            to_dac_layout(layer, mk, mb)):
                    rows.append((f"{name}.adam_{mname}.{path}.{pname}", *rel_tensor(dac_adam(opts[name], p)[j],
                                                                                       theirs)))
        if adam is not None:
            ours = dac_adam_count(opts[name], layers[0].weight)
            rows.append((f"{name}.adam_count ({int(ours)} vs {count})", *rel_scalar(ours, count)))
    return rows


def compare_policy(agent, learner, states: np.ndarray, log: list, T: int, N: int) -> tuple:
    """Policy extraction (acting): official sample_actions (N actions per state from the online actor, argmax
    of the ensemble-mean target Q; the caller clips to [-1, 1], as eval.py does) against dac.DAC.act on the
    same states and draws. Returns (abs, rel) difference of the chosen actions."""
    import jax

    log.clear()
    with record_official_draws(log):
        ref = np.clip(np.asarray(learner.sample_actions(states, batch_act=True)), -1, 1)  # (B, A)
        jax.effects_barrier()
    M = len(states) * N
    if [(k, v.shape) for k, v in log] != [("normal", (M, ACT_DIM))] * (T + 1):
        raise RuntimeError(f"official sample_actions drew {[(k, v.shape) for k, v in log]}, expected {T + 1} "
                           f"normals of shape {(M, ACT_DIM)}")
    noise = np.stack([log[0][1]] + [log[1 + k][1] for k in range(T - 1)])  # (T, M, A), as in draws_for_dac
    with dac_replayed_draws({("randn", noise.shape): torch.from_numpy(noise)}):
        ours, _ = agent.act(torch.from_numpy(states), torch.Generator())  # actions (B, A), their Q
    return rel_tensor(ours, ref)


# ======================================================================================================
# --check-init: the official initial weights' distribution against dac.py's two initialisations
# ======================================================================================================
def compare_init(agent, learner) -> tuple:
    """Per layer of the actor and the critic: std of dac's weights / std of the official ones, max|w| against the
    official Xavier-uniform bound sqrt(6 / (fan_in + fan_out)), and max|bias| (official: 0). Returns (whether every
    layer matches: std ratio within 5 standard errors of 1, max|w| <= bound, zero biases; the std ratios)."""
    print(f"{'layer':34s} {'shape':>14s} {'std off':>9s} {'std ours':>9s} {'ratio':>6s} {'bound':>7s} "
          f"{'max|w| off/b':>12s} {'ours/b':>7s} {'max|b| ours':>11s}  ok")
    all_ok, ratios = True, []
    for name, net, model, critic in (("actor", agent.actor, learner.actor, False),
                                     ("critic", agent.critic, learner.critic, True)):
        layers = dac_critic_layers(net) if critic else dac_actor_layers(net)
        for layer, (path, k, b) in zip(layers, official_layers(model.params, critic)):
            w = layer.weight.detach().double().cpu().numpy()
            fan_in, fan_out = k.shape[-2], k.shape[-1]
            bound = math.sqrt(6 / (fan_in + fan_out))
            ratio = w.std() / k.std()
            se = 0.45 / math.sqrt(k.size) * math.sqrt(2)  # s.e. of a uniform sample's std ratio (both sampled)
            bmax = float(layer.bias.detach().abs().max())
            ok = abs(ratio - 1) <= 5 * se and np.abs(w).max() <= bound * (1 + 1e-6) and bmax == 0.0
            all_ok &= ok
            ratios.append(ratio)
            print(f"{name + '.' + path:34s} {str(tuple(k.shape)):>14s} {k.std():9.5f} {w.std():9.5f} {ratio:6.3f} "
                  f"{bound:7.4f} {np.abs(k).max() / bound:12.4f} {np.abs(w).max() / bound:7.4f} {bmax:11.4g}  "
                  f"{'yes' if ok else 'NO'}")
    return all_ok, ratios


def check_init(args) -> int:
    """dac.py's default initialisation (Config.init, 'flax') against the official initial parameters; 'torch'
    (PyTorch's nn.Linear default) as the contrast. Exit 0 when the default matches."""
    od, _ = import_official(args.official, x64=False)
    learner = official_learner(od, args, x64=False)
    print("official: Flax xavier_uniform kernels, zero biases (networks/mlp.py, networks/initialization.py)")
    default, ok = dac.Config().init, {}
    for init in (default, *(i for i in ("flax", "torch") if i != default)):
        torch.manual_seed(args.seed)
        agent = dac.DAC(dataclasses.replace(dac_config(args), init=init), OBS_DIM, ACT_DIM, torch.device("cpu"))
        print(f"\ndac.DAC(dac.Config(init={init!r})){'  <- the default' if init == default else '  (contrast)'}")
        ok[init], ratios = compare_init(agent, learner)
        print(f"init={init!r}: std ratios {min(ratios):.3f}-{max(ratios):.3f}; "
              + ("MATCHES the official distribution" if ok[init] else "DIFFERS (rows marked NO)"))
    return 0 if ok[default] else 1


def check_batches(args) -> int:
    """Which transitions the official Dataset.sample (scanning=True: main.py's default, `scanning=not rand_batch`)
    and dac.EpochBatches draw, on a toy dataset whose observation is the row index. Prints each pass's batch sizes
    and how many distinct rows it covers. Needs no JAX: datasets/dataset.py is loaded alone (its package
    __init__ imports gym and d4rl), with a stand-in for utils.sample_n_k (random batches only)."""
    official = import_official_dataset(Path(args.official).expanduser().resolve())
    B = 256
    for n in (1000, 1024):
        np.random.seed(args.seed)
        rows = np.arange(n)
        ds = official.Dataset(rows[:, None], rows[:, None], rows * 1.0, rows, rows, rows[:, None], n, scanning=True)
        k, kd = -(-n // B), n // B  # batches per pass: official (the short one included), dac (full ones only)
        theirs = [ds.sample(B).observations[:, 0] for _ in range(4 * k)]
        data = dac.DeviceData({"observations": rows[:, None], "actions": rows[:, None], "rewards": rows,
                               "next_observations": rows[:, None], "terminals": rows}, torch.device("cpu"))
        epochs, ours = dac.EpochBatches(data, B, args.seed), []
        for _ in range(3 * kd):
            ours.append(epochs.sample(B, None).obs[:, 0].numpy())
            epochs.next_step()
        passes = {"official, its passes (batch_idx back to 0)": [theirs[i * k:(i + 1) * k] for i in range(3)],
                  "official, shifted by one batch": [theirs[k - 1 + i * k:k - 1 + (i + 1) * k] for i in range(3)],
                  "dac.EpochBatches": [ours[i * kd:(i + 1) * kd] for i in range(3)]}
        print(f"\n{n} transitions, batch {B}: batch sizes of each of three passes -> distinct rows drawn")
        for what, ps in passes.items():
            print(f"  {what:44s} " + "; ".join(f"{[len(b) for b in p]} -> {len(np.unique(np.concatenate(p)))}"
                                                for p in ps))
    return 0


# ======================================================================================================
# The run
# ======================================================================================================
def dac_config(args):
    return dataclasses.replace(dac.Config(), **dac.PRESETS["hopper-medium-v2"], env="hopper-medium-v2", eta=1.0,
                               eta_lr=1e-3, num_qs=10, T=5, batch_size=256, num_next_actions=10, actor_lr=3e-4,
                               critic_lr=3e-4, steps=args.steps, grad_clip=1.0, actor_ema_tau=0.005,
                               actor_ema_every=5, actor_ema_start=args.ema_start, tau=0.005, gamma=0.99,
                               guidance="soft", clip_sample=True, q_target="lcb", fast=False, seed=args.seed)


def run(args) -> int:
    x64 = args.dtype == "float64"
    tol = TOL[args.dtype]
    od, Batch = import_official(args.official, x64)
    import jax

    tdt = torch.float64 if x64 else torch.float32
    torch.set_default_dtype(tdt)  # dac.py builds everything (schedule, eta, EMA rate, lr, time features) in it
    learner = official_learner(od, args, x64)
    cfg = dac_config(args)
    agent = dac.DAC(cfg, OBS_DIM, ACT_DIM, torch.device("cpu"))
    wrong = {str(t.dtype) for t in (*agent.parameters(), *agent.buffers()) if t.is_floating_point()} - {str(tdt)}
    if wrong:
        raise RuntimeError(f"dac.DAC built under default dtype {tdt} holds {wrong} tensors")
    for net, model, critic in ((agent.actor, learner.actor, False), (agent.target_actor, learner.actor_tar, False),
                               (agent.critic, learner.critic, True),
                               (agent.target_critic, learner.critic_tar, True)):
        layers = dac_critic_layers(net) if critic else dac_actor_layers(net)
        ref = official_layers(model.params, critic)
        assert len(layers) == len(ref), f"{len(layers)} dac layers vs {len(ref)} official"
        for layer, (_, k, b) in zip(layers, ref):
            dac_set_layer(layer, k, b)
    if args.perturb:
        with torch.no_grad():
            dac_critic_layers(agent.critic)[0].weight.mul_(1 + args.perturb)
        print(f"--perturb: dac's critic first-layer weights scaled by 1 + {args.perturb} (should FAIL)")

    sched = {"alphas": learner.alphas, "betas": learner.betas, "abar": learner.alpha_hats}
    print(f"schedule: agent.alphas/betas/abar ({agent.abar.dtype}) vs official, max rel diff "
          + ", ".join(f"{k} {rel_tensor(agent.sched[k], np.asarray(v))[1]:.1e}" for k, v in sched.items()))
    official_clip = x64 and not args.dac_clip
    patches = [("torch.nn.utils.clip_grad_norm_", dac_clip(official_clip))]
    print("dac.py runs unpatched (the official initial weights copied in, the official random draws replayed), "
          "except:\n  torch.nn.utils.clip_grad_norm_ is wrapped in this process to count active clips, "
          + ("and computed as optax does\n  (g / ||g|| * max; torch's g * max / (||g|| + 1e-6) is ~1e-6 relative "
             "off whenever the clip is active)" if official_clip else "with torch's own formula"))
    print(f"settings: hopper (S={OBS_DIM}, A={ACT_DIM}), B=256, H=10, N=10, T=5, rho 1.5, b 1, eta 1, eta_lr 1e-3, "
          f"lr 3e-4 cosine over {args.steps}, clip 1, tau 0.005, target-actor EMA every 5 steps after step "
          f"{args.ema_start}, {args.dtype}, tolerance {tol:g} relative")

    data = make_data(args, np.float64 if x64 else np.float32)
    stream = batches(data, 256, args.seed)
    names = {"critic_loss": "critic_loss", "bc_loss": "bc_loss", "guidance_loss": "guidance_loss", "eta": None,
             "q_mean": "qs", "q_ensemble_std": "qs_std"}
    worst, typical = {k: (0.0, 0.0, -1) for k in names}, dict.fromkeys(names, 0.0)
    t_off = t_dac = c_off = c_dac = 0.0
    log = []
    print(f"{'step':>5s} " + " ".join(f"{k + ' abs/rel':>22s}" for k in names))
    with contextlib.ExitStack() as stack:
        stack.enter_context(record_official_draws(log))
        counters = {name: stack.enter_context(cm) for name, cm in patches}
        for step in range(args.steps):
            b = next(stream)
            jb = Batch(observations=b["observations"], actions=b["actions"], rewards=b["rewards"],
                       masks=1 - b["terminals"], next_observations=b["next_observations"])
            tic, cpu = time.perf_counter(), time.process_time()
            log.clear()
            info = learner.update(jb)
            jax.block_until_ready((info, learner.actor.params, learner.critic.params, learner.eta))
            jax.effects_barrier()
            t_off, c_off = t_off + time.perf_counter() - tic, c_off + time.process_time() - cpu
            draws = draws_for_dac(log, cfg.T, 256, 256 * cfg.num_next_actions)
            batch = dac.Batch(*(torch.from_numpy(b[k]) for k in ("observations", "actions", "rewards",
                                                                 "next_observations", "terminals")))
            tic, cpu = time.perf_counter(), time.process_time()
            with dac_replayed_draws(draws):
                ours = dac_metrics(agent.update(batch))
            t_dac, c_dac = t_dac + time.perf_counter() - tic, c_dac + time.process_time() - cpu
            unused = [name for name, calls in counters.items() if calls["n"] == 0]
            if unused:  # dac.py changed so that a patch no longer reaches it: stop rather than compare silently
                raise RuntimeError(f"agent.update never called {', '.join(unused)}; adapt the matching dac_* patch "
                                   f"function at the top of this script to the new dac.py")
            cells = []
            for k, ok in names.items():
                ref = float(learner.eta) if ok is None else float(info[ok])
                typical[k] += abs(ref)  # the mean |official| so far: the scale of a quantity that may cross zero
                a, r = rel_scalar(ours[k], ref, typical[k] / (step + 1))
                if r > worst[k][1]:
                    worst[k] = (a, r, step)
                cells.append(f"{a:10.2e} / {r:9.2e}")
            if step % args.print_every == 0 or step == args.steps - 1:
                print(f"{step:5d} " + " ".join(f"{c:>22s}" for c in cells), flush=True)

    print(f"\nworst over {args.steps} steps ({args.dtype}; relative to max(|official|, mean |official| so far)):")
    failed = []
    for k, (a, r, s) in worst.items():
        bad = r > tol
        failed += [k] if bad else []
        print(f"  {k:16s} abs {a:9.2e}  rel {r:9.2e}  (step {s}){'  FAIL' if bad else ''}")
    rows = compare_state(agent, learner)
    rows.append(("policy extraction: act() on 64 dataset states", *compare_policy(
        agent, learner, data["observations"][:64], log, cfg.T, cfg.num_action_samples)))
    c = counters["torch.nn.utils.clip_grad_norm_"]
    print(f"\nthe gradient-norm clip was active in {c['clipped']} of {c['n']} calls (actor + critic), computed "
          f"{'as optax does' if official_clip else 'by dac.py'}")
    print(f"\nafter {args.steps} steps: parameters, Adam moments and counts (relative: max|diff| / max|official|):")
    groups = {}
    for what, a, r in rows:
        bad = r > tol
        failed += [what] if bad else []
        if args.verbose or bad:
            print(f"  {what:58s} abs {a:9.2e}  rel {r:9.2e}{'  FAIL' if bad else ''}")
        g = what.split(" ")[0] if "adam_count" in what or "policy" in what else \
            ".".join(what.split(".")[:2 if ".adam_" in what else 1])
        ga, gr, gn = groups.get(g, (0.0, 0.0, 0))
        groups[g] = (max(ga, a), max(gr, r), gn + 1)
    for g, (a, r, n) in groups.items():
        print(f"  {g:20s} {n:3d} tensors  max abs {a:9.2e}  max rel {r:9.2e}")
    print(f"\ntime for {args.steps} steps: official {t_off:.1f} s wall / {c_off:.1f} s CPU (jit compiles included), "
          f"dac.py {t_dac:.1f} s wall / {c_dac:.1f} s CPU; whole run {time.perf_counter() - START:.0f} s wall")
    if failed:
        print(f"PARITY FAILED ({args.dtype}, tolerance {tol:g}): {', '.join(failed[:8])}"
              f"{' ...' if len(failed) > 8 else ''}")
        return 1
    first_ema = (args.ema_start // 5 + 1) * 5  # official: step % 5 == 0 and step > step_start_ema
    print(f"PARITY OK ({args.dtype}): every loss, eta, Q statistic, parameter, Adam moment and count within "
          f"{tol:g} relative over {args.steps} steps (target-actor EMA "
          + (f"from step {first_ema})" if first_ema < args.steps else "not reached: raise --steps)"))
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="root of a checkout of the official DAC code")
    p.add_argument("--steps", type=int, default=200, help="gradient steps (also the cosine decay length)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--ema-start", type=int, default=50, help="target-actor EMA after this step (official: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="", help="D4RL-layout hdf5 file to draw batches from (default: synthetic)")
    p.add_argument("--print-every", type=int, default=1, help="print every this many steps")
    p.add_argument("--verbose", action="store_true", help="print every tensor's difference, not only failures")
    p.add_argument("--dac-clip", action="store_true", help="float64: keep dac.py's own clip formula (torch's "
                                                            "+1e-6); fails when the clip is active")
    p.add_argument("--reward-scale", type=float, default=1.0, help="multiply the synthetic rewards (10 makes the "
                                                                    "critic's gradient clip active)")
    p.add_argument("--perturb", type=float, default=0.0, help="scale dac's critic first layer by 1 + this after "
                                                              "the copy: a check that the harness can fail")
    p.add_argument("--check-init", action="store_true", help="instead: dac.py's initial weight distributions "
                                                              "(init flax, the default, and torch) vs the official")
    p.add_argument("--check-batches", action="store_true", help="instead: which rows the official Dataset.sample "
                                                                 "and dac.EpochBatches draw per pass")
    args = p.parse_args()
    if args.steps < 1 or args.ema_start < 0:
        fail("--steps must be >= 1 and --ema-start >= 0")
    sys.exit(check_init(args) if args.check_init else check_batches(args) if args.check_batches else run(args))


if __name__ == "__main__":
    main()
