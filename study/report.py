"""A study's three outputs: ``study.json`` (every unit, the per-arm summary, the headline comparison),
``study.md`` (the table a person reads) and ``study.png`` (k-NN against steps and against training
time for every arm and seed, with the final and transfer figures and floors as bars beside them)."""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any, Sequence

from ssl_container.utils.files import atomic_write_json, atomic_write_text
from study.config import StudyConfig

__all__ = ["summarize", "headline", "write_report", "markdown_table"]


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.mean(vals), 2) if vals else None


def summarize(results: Sequence[dict[str, Any]], arm_order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per arm over its seeds: means, the per-seed k-NN and its spread (max - min)."""
    rows = []
    for arm in arm_order:
        rs = [r for r in results if r["arm"] == arm and r.get("complete")]
        if not rs:
            continue
        knn = [r["knn"] for r in rs]
        tr = [r["transfer"] for r in rs if r.get("transfer")]
        det = [r["detection"] for r in rs if r.get("detection")]
        rows.append({
            "arm": arm, "model": rs[0]["model"], "note": rs[0].get("note", ""), "arm_overrides": rs[0]["arm_overrides"],
            "params": rs[0]["params"], "gmacs": rs[0]["gmacs"], "seeds": [r["seed"] for r in rs],
            "steps": rs[0]["steps"], "train_seconds": _mean([r["train_seconds"] for r in rs]),
            "images_per_s": _mean([r["images_per_s"] for r in rs]),
            "knn_per_seed": knn, "knn": _mean(knn), "knn_spread": round(max(knn) - min(knn), 2),
            "knn_random": _mean([r["knn_random"] for r in rs]), "knn_pixels": rs[0]["knn_pixels"],
            "transfer_knn": _mean([t["knn"] for t in tr]), "transfer_random": _mean([t["knn_random"] for t in tr]),
            "transfer_pixels": tr[0]["knn_pixels"] if tr else None,
            "det_ap50": _mean([d["ap50"] for d in det]), "det_ap50_random": _mean([d["ap50_random"] for d in det]),
            "det_ap": _mean([d["ap"] for d in det]), "det_ap_random": _mean([d["ap_random"] for d in det]),
        })
    return rows


def headline(results: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Arm ``a`` against arm ``b``: the difference of mean k-NN, each arm's seed spread, and the
    differences seed by seed (same seed, same data order, same initial randomness elsewhere)."""
    by = {arm: {r["seed"]: r["knn"] for r in results if r["arm"] == arm and r.get("complete")} for arm in (a, b)}
    common = sorted(set(by[a]) & set(by[b]))
    if not common:
        return None
    paired = [round(by[a][s] - by[b][s], 2) for s in common]
    ka, kb = [by[a][s] for s in common], [by[b][s] for s in common]
    spread = max(max(ka) - min(ka), max(kb) - min(kb))
    margin = round(statistics.mean(ka) - statistics.mean(kb), 2)
    return {"a": a, "b": b, "seeds": common, "margin": margin, "paired": paired,
            "spread_a": round(max(ka) - min(ka), 2), "spread_b": round(max(kb) - min(kb), 2),
            "margin_exceeds_spread": len(common) > 1 and abs(margin) > spread,
            "same_sign_every_seed": all(p > 0 for p in paired) or all(p < 0 for p in paired)}


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], resolution: int) -> str:
    head = ("| arm | model | params | GMACs @" + str(resolution) + " | images/s | steps | train min | k-NN % per seed | "
            "k-NN mean (spread) | random init | raw pixels | transfer k-NN (random / pixels) | det. AP50 (random) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['model']} | {_f(r['params'])} | {_f(r['gmacs'], 4)} | {_f(r['images_per_s'], 1)} | "
            f"{_f(r['steps'])} | {_f(r['train_seconds'] / 60 if r['train_seconds'] else None, 1)} | "
            f"{' / '.join(_f(k) for k in r['knn_per_seed'])} | **{_f(r['knn'])}** ({_f(r['knn_spread'])}) | "
            f"{_f(r['knn_random'])} | {_f(r['knn_pixels'])} | "
            f"{_f(r['transfer_knn'])} ({_f(r['transfer_random'])} / {_f(r['transfer_pixels'])}) | "
            f"{_f(r['det_ap50'])} ({_f(r['det_ap50_random'])}) |")
    notes = [f"- **{r['arm']}**: {r['note'] or r['model']}"
             + (f" Arm overrides: `{' '.join(r['arm_overrides'])}`." if r["arm_overrides"] else "") for r in rows]
    return "\n".join(lines + [""] + notes)


def _verdict(h: dict[str, Any] | None) -> str:
    if h is None:
        return "The headline pair has no seed in common yet."
    lead = h["a"] if h["margin"] > 0 else h["b"]
    return (f"**{h['a']} against {h['b']}**: {h['margin']:+.2f} k-NN points (mean of seeds {h['seeds']}; "
            f"seed by seed {', '.join(f'{p:+.2f}' for p in h['paired'])}). Seed spread: {h['a']} {h['spread_a']:.2f}, "
            f"{h['b']} {h['spread_b']:.2f}. {lead} leads; the margin is "
            f"{'larger' if h['margin_exceeds_spread'] else 'not larger'} than the spread between seeds"
            + ("" if len(h["seeds"]) > 1 else " (one seed: no spread measured yet)") + ".")


def plot(cfg: StudyConfig, results: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    det = any(r["det_ap50"] is not None for r in rows)
    fig, axes = plt.subplots(1, 4 if det else 3, figsize=(19 if det else 15, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {a.name: colors[i % len(colors)] for i, a in enumerate(cfg.arms)}
    styles = ["-", "--", ":", "-."]
    for r in results:
        pts = r.get("curve") or []
        if not pts:
            continue
        style = styles[cfg.seeds.index(r["seed"]) % len(styles)] if r["seed"] in cfg.seeds else "-"
        label = f"{r['arm']} seed {r['seed']}"
        axes[0].plot([p["step"] for p in pts], [p["knn"] for p in pts], style, marker="o", ms=3,
                     color=color.get(r["arm"]), label=label)
        axes[1].plot([p["train_seconds"] / 60 for p in pts], [p["knn"] for p in pts], style, marker="o", ms=3,
                     color=color.get(r["arm"]), label=label)
    if rows and rows[0]["knn_pixels"] is not None:
        for ax in axes[:2]:
            ax.axhline(rows[0]["knn_pixels"], color="black", ls=":", lw=1, label="raw pixels")
    axes[0].set_xlabel("training steps")
    axes[1].set_xlabel("training time (minutes, this machine)")
    for ax in axes[:2]:
        ax.set_ylabel(f"k-NN top-1 (%), {Path(cfg.knn.path).name} {cfg.knn.held_out_split}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    x = range(len(rows))
    w = 0.38
    ax = axes[2]
    ax.bar([i - w / 2 for i in x], [r["knn"] for r in rows], w, color=[color.get(r["arm"]) for r in rows],
           label=f"{Path(cfg.knn.path).name} (pretraining data)")
    if any(r["transfer_knn"] is not None for r in rows):
        ax.bar([i + w / 2 for i in x], [r["transfer_knn"] or 0 for r in rows], w, color=[color.get(r["arm"]) for r in rows],
               alpha=0.45, hatch="//", label=f"{Path(cfg.transfer.path).name if cfg.transfer else ''} (transfer)")
        ax.scatter([i + w / 2 for i in x], [r["transfer_random"] or 0 for r in rows], marker="v", color="black", zorder=3)
    ax.scatter([i - w / 2 for i in x], [r["knn_random"] for r in rows], marker="v", color="black", zorder=3,
               label="random init (same arm)")
    for i, r in enumerate(rows):
        ax.scatter([i - w / 2] * len(r["knn_per_seed"]), r["knn_per_seed"], marker="_", s=120, color="black", zorder=4)
    if rows and rows[0]["knn_pixels"] is not None:
        ax.axhline(rows[0]["knn_pixels"], color="black", ls=":", lw=1, label="raw pixels")
    ax.set_xticks(list(x), [r["arm"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("final k-NN top-1 (%); dashes: each seed")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    if det:
        ax = axes[3]
        drows = [r for r in rows if r["det_ap50"] is not None]
        ax.bar([i - w / 2 for i in range(len(drows))], [r["det_ap50"] for r in drows], w,
               color=[color.get(r["arm"]) for r in drows], label="DINO-pretrained backbone")
        ax.bar([i + w / 2 for i in range(len(drows))], [r["det_ap50_random"] for r in drows], w, color="grey",
               label="random init, same backbone")
        ax.set_xticks(range(len(drows)), [r["arm"] for r in drows], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"detection AP50 (%), {Path(cfg.detection.data).name}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{cfg.name}: every arm with the same DINO recipe ({Path(cfg.recipe).name}), "
                 f"{rows[0]['steps'] if rows else '?'} steps, seeds {sorted({r['seed'] for r in results})}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(cfg: StudyConfig, results: Sequence[dict[str, Any]]) -> dict[str, Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, [a.name for a in cfg.arms])
    head = headline(results, *cfg.headline) if len(cfg.headline) == 2 else None
    doc = {"name": cfg.name, "config": dataclasses.asdict(cfg), "arms": list(results), "summary": rows, "headline": head}
    atomic_write_json(out / "study.json", doc)
    md = [f"# {cfg.name}", "",
          f"Every arm trains with `{cfg.recipe}`" + (f" + `{' '.join(cfg.overrides)}`" if cfg.overrides else "")
          + f" for the same {rows[0]['steps'] if rows else '?'} steps, seeds {sorted({r['seed'] for r in results})}. "
          f"k-NN (k=20, DINO's weighted vote) on every image of `{cfg.knn.path}` {cfg.knn.held_out_split} against "
          f"{cfg.knn.reference_split} at {cfg.knn.resolution} px"
          + (f"; transfer: `{cfg.transfer.path}` {cfg.transfer.held_out_split} against {cfg.transfer.reference_split} "
             f"at {cfg.transfer.resolution} px" + (f" (first {cfg.transfer.max_shards} shards of each split)"
                                                   if cfg.transfer.max_shards else "") if cfg.transfer else "")
          + ". Random init: the same arm's network before training (same seed); raw pixels: the flattened crop.", "",
          markdown_table(rows, cfg.knn.resolution), "", _verdict(head) if len(cfg.headline) == 2 else "", "",
          "![study](study.png)", ""]
    atomic_write_text(out / "study.md", "\n".join(md))
    png = plot(cfg, results, rows, out / "study.png")
    return {"json": out / "study.json", "md": out / "study.md", "png": png}
