"""Both codes' runs on one dataset side by side: normalised score and the critics' mean Q against gradient step,
one line per seed, one column per group of runs (e.g. dac.py on the 1M file, the official code on the 1M file, ...).

    python bench/compare_codes.py --title "walker2d-medium (local Walker2d-v5 data)" --out docs/walker2d_codes.png \
        "dac.py, 1M transitions=results/walker2d-medium-1m" \
        "official, 1M transitions=results/official/walker2d-medium-1m"

Each LABEL=FOLDER names a folder holding run folders (seed0/, seed1/, ...) with progress.csv, config.json and
summary.json, as dac.py and bench/official_train.py write them. Q is the training-batch mean of the critics (`q_mean`, training
reward scale), drawn on a log axis; values below 1 are drawn at 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dac  # noqa: E402


def read_group(folder: Path) -> list:
    """[(seed, progress rows)] of every run folder under `folder`, by seed (dac.read_runs: dac.py's and
    bench/official_train.py's run folders alike)."""
    try:
        return sorted((int(r["config"]["seed"]), r["history"]) for r in dac.read_runs([str(folder)]))
    except dac.UserError:
        sys.exit(f"error: no runs under {folder}: give folders that hold run folders (seed0/, ...), each with "
                 f"config.json, progress.csv and summary.json.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("groups", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True, help="the figure (.png)")
    p.add_argument("--behaviour", type=float, nargs="+", default=[],
                   help="the data's normalised score, drawn as a line: one value for all groups, or one per group")
    p.add_argument("--until", type=int, default=0, help="draw the steps up to this one only (0: all)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = []
    for item in args.groups:
        label, sep, folder = item.partition("=")
        if not sep:
            sys.exit(f"error: '{item}' is not LABEL=FOLDER")
        runs = [(seed, [r for r in rows if not args.until or r["step"] <= args.until])
                for seed, rows in read_group(Path(folder))]
        groups.append((label, runs))
    if len(args.behaviour) not in (0, 1, len(groups)):
        sys.exit(f"error: --behaviour takes one value or one per group ({len(groups)}), not {len(args.behaviour)}")
    behaviour = args.behaviour * len(groups) if len(args.behaviour) == 1 else args.behaviour or [None] * len(groups)
    last = max(row["step"] for _, runs in groups for _, rows in runs for row in rows)
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6), squeeze=False, sharey="row")
    for col, ((label, runs), level) in enumerate(zip(groups, behaviour)):
        top, bottom = axes[0, col], axes[1, col]
        for seed, rows in runs:
            steps = [r["step"] for r in rows]
            top.plot(steps, [r["normalized_score"] for r in rows], marker=".", lw=1, label=f"seed {seed}")
            bottom.plot(steps, np.maximum([r["q_mean"] for r in rows], 1.0), marker=".", lw=1)
        if level is not None:
            top.axhline(level, color="gray", ls="--", lw=1, label=f"data {level:.1f}")
        top.axhline(0, color="black", lw=0.5)
        top.set_title(label, fontsize=10)
        top.set_xlim(0, last)
        bottom.set_yscale("log")
        bottom.set_xlim(0, last)
        bottom.set_xlabel("gradient step")
        for ax in (top, bottom):
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        top.legend(fontsize=7)
    axes[0, 0].set_ylabel("normalised score")
    axes[1, 0].set_ylabel("critics' mean Q on training batches\n(training reward scale, log)")
    fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
