"""sweep.png: every configuration's eval-loss curve over training tokens (mean over seeds, with a
band of one standard deviation) beside bars of the final eval loss and tokens/s (mean, with the
seeds' standard deviation as the error bar)."""
from __future__ import annotations

import math

from trainer.sweeps.collect import Configuration
from trainer.sweeps.curves import TAG, Curve
from trainer.sweeps.stats import mean_sd


def write_plot(configs: list[Configuration], curves: list[Curve | None], path: str) -> bool:
    """Draw sweep.png at `path`; returns False (and writes nothing) without matplotlib."""
    try:  # imported here: matplotlib is slow to import and only this picture needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [c.label for c in configs]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.45 * len(configs) + 3.5),
                             gridspec_kw={"width_ratios": [1.4, 1, 1]})
    ax = axes[0]
    for curve in curves:
        if curve is None:
            continue
        line, = ax.plot(curve.tokens, curve.mean, marker=".", label=f"{curve.label} (n={curve.n})")
        if curve.n > 1:
            low = [m - s for m, s in zip(curve.mean, curve.sd)]
            high = [m + s for m, s in zip(curve.mean, curve.sd)]
            ax.fill_between(curve.tokens, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"{TAG} (mean over seeds, band: ±1 sd)")
    if any(c is not None for c in curves):
        ax.legend(fontsize="small")
    for ax, key in zip(axes[1:], (TAG, "tokens_per_sec")):
        means, sds = [], []
        for c in configs:
            mean, sd = mean_sd(c.values(key))
            means.append(0.0 if math.isnan(mean) else mean)
            sds.append(0.0 if math.isnan(sd) else sd)
        ax.barh(labels, means, xerr=sds, capsize=3)
        ax.set_xlabel(f"final {key} (mean ± sd over seeds)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
