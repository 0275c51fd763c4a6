"""PNG figures for the evaluation JSON results (matplotlib, headless)."""
from __future__ import annotations

import os
from typing import Mapping

__all__ = ["plot_knn", "plot_linear"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_knn(result: Mapping, path: str | os.PathLike, title: str = "") -> None:
    """Top-1 and top-5 accuracy against k (log axis) from ``KnnResult.to_json()``."""
    plt = pyplot()
    rows = result["results"]
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(ks, [r["top1"] for r in rows], "o-", label="top-1")
    ax.plot(ks, [r["top5"] for r in rows], "s--", label="top-5")
    for r in rows:
        ax.annotate(f"{r['top1']:.1f}", (r["k"], r["top1"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(("k-NN: " + title) if title else f"k-NN (T = {result.get('temperature', 0.07)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_linear(result: Mapping, path: str | os.PathLike, title: str = "") -> None:
    """Validation (and test) top-1 against the learning rate, one line per feature choice, from
    the ``heads`` list of a linear-probe result; the chosen head is circled."""
    plt = pyplot()
    heads = result["heads"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for feat in sorted({h["feature"] for h in heads}):
        hs = sorted((h for h in heads if h["feature"] == feat), key=lambda h: h["lr"])
        lrs = [h["lr"] for h in hs]
        line, = ax.plot(lrs, [h["val_top1"] for h in hs], "o-", label=f"{feat}: validation")
        if all(h.get("test_top1") is not None for h in hs):
            ax.plot(lrs, [h["test_top1"] for h in hs], "x:", color=line.get_color(), label=f"{feat}: test")
    best = result.get("best")
    if best:
        ax.plot([best["lr"]], [best["val_top1"]], "o", ms=12, mfc="none", mec="k", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(("linear probe: " + title) if title else "linear probe", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
