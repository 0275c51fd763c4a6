"""Linear probes: ``python -m eval.linear``.

Two modes:

``--mode grid`` (default, fast): DINOv2's way. Features are extracted once (cached, see
:mod:`eval.features`), then many linear heads are trained at once on them: every learning rate of a
grid x every feature choice (``pooled``: the final pooled feature; ``concat``: pooled outputs of all
stages concatenated). The heads of one feature choice are one (D, heads x classes) matrix, so a step
is one matmul. Each head follows DINO's recipe: weights N(0, 0.01), bias 0, SGD momentum 0.9, weight
decay 0, lr x global batch / 256, cosine annealing per epoch to 0, cross-entropy. The best head is
chosen on a validation split held out from the training split (``--holdout``); its top-1 / top-5 on
the evaluation split are reported with the chosen setting (and every head's numbers).

``--mode dino``: DINO's eval_linear protocol exactly: the frozen backbone in eval mode (BatchNorm
with running statistics) runs on every step; training images get RandomResizedCrop + horizontal flip,
evaluation images resize + center crop; one Linear layer on the pooled feature; lr 0.001 x batch / 256
(``--lrs`` to change); the best top-1 over the evaluations is reported, as DINO does.

Both run on several ranks (torchrun / srun): gradients are all-reduced (summed over each rank's part
of the global batch, so the step equals the single-process step on the global batch).
Outputs ``linear.json`` and ``linear.png`` (accuracy against learning rate) in ``--out`` (default:
next to the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_container.signals import stoppable
from ssl_container.data.workers import DataLoader
from ssl_container.data.labelled import AugmentedLabelledShards
from ssl_container.utils.features import amp_autocast, forward_features
from ssl_container.utils.progress import hms

log = logging.getLogger("eval.linear")

__all__ = [
    "DINOV2_LRS",
    "GridConfig",
    "LinearProtocolConfig",
    "holdout_split",
    "train_linear_grid",
    "train_linear_protocol",
    "main",
]

# DINOv2's learning-rate grid (before the batch / 256 scaling)
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cosine(epoch: int, epochs: int) -> float:
    """torch's CosineAnnealingLR (eta_min 0) factor for ``epoch`` (stepped once per epoch, as in DINO)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-k hits) per row of (..., N, C) logits, as int counts over the last-but-one dim."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top.eq(labels.view(*([1] * (logits.ndim - 2)), -1, 1))
    return hit[..., :1].any(-1).sum(-1), hit.any(-1).sum(-1)


def holdout_split(n: int, fraction: float, seed: int = 0, labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a seeded random ``fraction`` of ``n``, stratified by
    label when labels are given (every class keeps the same share)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        m = max(1, int(round(n * fraction)))
        return np.sort(perm[m:]), np.sort(perm[:m])
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        val.append(idx[: max(1, int(round(len(idx) * fraction)))] if len(idx) > 1 else idx[:0])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(n, bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


# ------------------------------------------------------------------------------------------------
# grid mode: many heads at once on cached features


@dataclass
class GridConfig:
    lrs: Sequence[float] = DINOV2_LRS  # base learning rates, x global batch / 256
    epochs: int = 100
    batch_size: int = 256  # global
    momentum: float = 0.9
    weight_decay: float = 0.0
    init_std: float = 0.01
    holdout: float = 0.1  # share of the training split held out for choosing the head
    seed: int = 0
    eval_batch_size: int = 4096
    scale_lr: bool = True  # lr x batch_size / 256, as DINO and DINOv2

    def effective_lrs(self) -> list[float]:
        return [lr * self.batch_size / 256.0 if self.scale_lr else lr for lr in self.lrs]


class _Heads:
    """len(lrs) linear heads on one feature choice: weight (D, H, C), bias (H, C), SGD momentum buffers."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], cfg: GridConfig, gen: torch.Generator):
        H = len(lrs)
        self.H, self.C, self.D = H, num_classes, dim
        self.W = torch.empty(dim, H, num_classes).normal_(0.0, cfg.init_std, generator=gen)
        self.b = torch.zeros(H, num_classes)
        self.lrs = torch.tensor(lrs, dtype=torch.float32)
        self.bufW = torch.zeros_like(self.W)
        self.bufb = torch.zeros_like(self.b)
        self.steps = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, H, C)."""
        return (x @ self.W.view(self.D, -1)).view(-1, self.H, self.C) + self.b

    def grads(self, x: torch.Tensor, y: torch.Tensor, denom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of every head's mean cross-entropy over the global batch (this rank's part,
        divided by the global batch size ``denom``): analytic softmax - one-hot. Also the loss sum."""
        z = self.logits(x)
        logp = torch.log_softmax(z, dim=-1)
        loss_sum = -logp.gather(-1, y.view(-1, 1, 1).expand(-1, self.H, 1)).sum(0).view(-1)  # (H,)
        g = logp.exp_()
        g[torch.arange(len(y)), :, y] -= 1.0
        g /= denom
        gW = x.t() @ g.view(len(y), -1)
        gb = g.sum(0)
        return gW.view_as(self.W), gb, loss_sum

    def step(self, gW: torch.Tensor, gb: torch.Tensor, lr_factor: float, cfg: GridConfig) -> None:
        """torch.optim.SGD (momentum, dampening 0, no nesterov) with a per-head learning rate."""
        if cfg.weight_decay:
            gW = gW + cfg.weight_decay * self.W
            gb = gb + cfg.weight_decay * self.b
        if self.steps == 0:
            self.bufW.copy_(gW)
            self.bufb.copy_(gb)
        else:
            self.bufW.mul_(cfg.momentum).add_(gW)
            self.bufb.mul_(cfg.momentum).add_(gb)
        lr = self.lrs * lr_factor
        self.W.sub_(self.bufW * lr.view(1, -1, 1))
        self.b.sub_(self.bufb * lr.view(-1, 1))
        self.steps += 1

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-head top-1 and top-5 (percent)."""
        t1 = torch.zeros(self.H, dtype=torch.int64)
        t5 = torch.zeros(self.H, dtype=torch.int64)
        for s in range(0, len(y), batch):
            z = self.logits(x[s:s + batch]).transpose(0, 1)  # (H, B, C)
            a, b = _topk_hits(z, y[s:s + batch])
            t1 += a
            t5 += b
        n = max(1, len(y))
        return (100.0 * t1.double() / n).numpy(), (100.0 * t5.double() / n).numpy()


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float().contiguous()
    a = np.asarray(x, dtype=np.float32)
    if not (a.flags.writeable and a.flags.c_contiguous):  # e.g. a read-only memory-mapped cache entry
        a = np.array(a, dtype=np.float32, order="C", copy=True)
    return torch.from_numpy(a)


def train_linear_grid(train: Mapping[str, np.ndarray | torch.Tensor], train_labels: np.ndarray | torch.Tensor,
                      test: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                      test_labels: np.ndarray | torch.Tensor | None = None, *, num_classes: int | None = None,
                      cfg: GridConfig | None = None, val: Mapping[str, np.ndarray] | None = None,
                      val_labels: np.ndarray | None = None, log_every: int = 0) -> dict:
    """Train ``len(cfg.lrs) x len(train)`` linear heads at once; choose the best on validation.

    ``train`` / ``test`` map a feature choice (e.g. ``pooled``, ``concat``) to (N, D) features of the
    same samples. Validation: ``val`` if given, else ``cfg.holdout`` of the training split (stratified).
    With a process group every rank must call this with the same arguments; each computes gradients
    on its share of every global batch and the gradients are summed over ranks.
    Returns a JSON-ready dict: ``best`` (feature, lr, val/test top-1/top-5), ``heads`` (all), config.
    """
    cfg = cfg or GridConfig()
    rank, world = _dist()
    y_all = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    if num_classes is None:
        num_classes = int(y_all.max()) + 1
    names = list(train)
    if val is None:
        tr_idx, va_idx = holdout_split(len(y_all), cfg.holdout, cfg.seed, y_all.numpy())
        xs_tr = {f: _as_tensor(np.asarray(train[f])[tr_idx]) for f in names}
        xs_va = {f: _as_tensor(np.asarray(train[f])[va_idx]) for f in names}
        y_tr, y_va = y_all[tr_idx], y_all[va_idx]
    else:
        xs_tr = {f: _as_tensor(train[f]) for f in names}
        xs_va = {f: _as_tensor(val[f]) for f in names}
        y_tr, y_va = y_all, torch.as_tensor(np.asarray(val_labels), dtype=torch.int64)
    n = len(y_tr)
    B = min(cfg.batch_size, n)
    if B % world:
        raise ValueError(f"global batch {B} must be divisible by the number of ranks {world}")
    steps_per_epoch = max(1, n // B)  # drop the last partial batch (every rank takes the same steps)
    lrs = cfg.effective_lrs()
    gen = torch.Generator().manual_seed(cfg.seed)  # same initial heads on every rank
    heads = {f: _Heads(xs_tr[f].shape[1], num_classes, lrs, cfg, gen) for f in names}
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        factor = _cosine(epoch, cfg.epochs)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        loss_epoch = {f: torch.zeros(len(lrs)) for f in names}
        used = perm[: steps_per_epoch * B]
        # one gather per epoch (contiguous batches after it), this rank's rows of every global batch
        mine = used.view(steps_per_epoch, B)[:, rank::world].reshape(-1)
        xe = {f: xs_tr[f][mine] for f in names}
        ye = y_tr[mine]
        b = B // world
        for s in range(steps_per_epoch):
            y = ye[s * b:(s + 1) * b]
            for f in names:
                gW, gb, loss = heads[f].grads(xe[f][s * b:(s + 1) * b], y, B)
                if world > 1:
                    flat = torch.cat([gW.view(-1), gb.view(-1), loss])
                    dist.all_reduce(flat)
                    gW = flat[:gW.numel()].view_as(gW)
                    gb = flat[gW.numel():gW.numel() + gb.numel()].view_as(gb)
                    loss = flat[gW.numel() + gb.numel():]
                heads[f].step(gW, gb, factor, cfg)
                loss_epoch[f] += loss
        if log_every and rank == 0 and ((epoch + 1) % log_every == 0 or epoch + 1 == cfg.epochs):
            best_loss = min(float((loss_epoch[f] / (steps_per_epoch * B)).min()) for f in names)
            took = time.perf_counter() - t0
            log.info("linear grid: epoch %d/%d, best head loss %.4f, elapsed %s, eta %s", epoch + 1, cfg.epochs,
                     best_loss, hms(took), hms(took / (epoch + 1) * (cfg.epochs - epoch - 1)))
    train_s = time.perf_counter() - t0
    rows = []
    yt = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64) if test_labels is not None else None
    for f in names:
        v1, v5 = heads[f].evaluate(xs_va[f], y_va, cfg.eval_batch_size)
        if test is not None and yt is not None:
            t1, t5 = heads[f].evaluate(_as_tensor(test[f]), yt, cfg.eval_batch_size)
        else:
            t1 = t5 = [None] * len(lrs)
        finite = (torch.isfinite(heads[f].W).all(dim=(0, 2)) & torch.isfinite(heads[f].b).all(dim=1)).tolist()
        for h, (base, lr) in enumerate(zip(cfg.lrs, lrs)):
            ok = finite[h]  # a diverged head (inf / nan weights) scores 0
            rows.append({"feature": f, "dim": heads[f].D, "base_lr": base, "lr": lr,
                         "val_top1": float(v1[h]) if ok else 0.0, "val_top5": float(v5[h]) if ok else 0.0,
                         "test_top1": None if t1[h] is None else (float(t1[h]) if ok else 0.0),
                         "test_top5": None if t5[h] is None else (float(t5[h]) if ok else 0.0),
                         **({} if ok else {"diverged": True})})
    # best on validation; ties: the smaller feature, then the smaller lr (deterministic)
    best = max(rows, key=lambda r: (r["val_top1"], r["val_top5"], -r["dim"], -r["lr"]))
    edge = None
    if len(lrs) > 1 and best["base_lr"] in (min(cfg.lrs), max(cfg.lrs)):
        side = "largest" if best["base_lr"] == max(cfg.lrs) else "smallest"
        edge = (f"the best head has the {side} learning rate of the grid ({best['base_lr']}): a rate beyond it may "
                f"do better; extend the grid with --lrs")
        log.warning("linear grid: %s", edge)
    return {
        "protocol": "linear heads on frozen features: SGD momentum 0.9, wd 0, cosine per epoch, N(0, 0.01) init; "
                    "best head on a validation split",
        "best": best,
        "heads": rows,
        "config": {**asdict(cfg), "lrs": list(cfg.lrs), "effective_lrs": lrs, "world_size": world,
                   "steps_per_epoch": steps_per_epoch},
        "num_train": n, "num_val": len(y_va), "num_test": None if yt is None else len(yt),
        "num_classes": num_classes, "seconds": round(train_s, 2), "grid_edge_warning": edge,
        "_heads": heads,  # removed before JSON
    }


# ------------------------------------------------------------------------------------------------
# DINO mode: frozen backbone on every step, augmented training images


@dataclass
class LinearProtocolConfig:
    epochs: int = 100
    batch_size: int = 256  # global
    lr: float = 0.001  # x batch / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_freq: int = 1
    crop: int = 224
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop (torchvision default, as DINO)
    seed: int = 0
    amp: str = "auto"


class LinearClassifier(nn.Module):
    """DINO's linear layer: weights N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def train_linear_protocol(model: nn.Module, train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                          steps_per_epoch: int, val_batches: Callable[[], Iterable], num_classes: int,
                          cfg: LinearProtocolConfig | None = None, device: str | torch.device = "cpu",
                          feature_dim: int | None = None) -> dict:
    """DINO's linear evaluation. ``train_batches(epoch)`` yields this rank's (images, labels) with the
    training augmentation (this rank's share of the global batch); exactly ``steps_per_epoch`` are
    taken per epoch on every rank. ``val_batches()`` yields (images, labels[, keys]) of this rank's
    part of the evaluation split. Returns per-epoch and best top-1 / top-5 (percent)."""

    cfg = cfg or LinearProtocolConfig()
    rank, world = _dist()
    device = torch.device(device)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if feature_dim is None:
        feature_dim = int(getattr(model, "num_features"))
    torch.manual_seed(cfg.seed)
    clf = LinearClassifier(feature_dim, num_classes).to(device)
    if world > 1:  # same start everywhere
        for p in clf.parameters():
            dist.broadcast(p.data, 0)
    lr = cfg.lr * cfg.batch_size / 256.0
    opt = torch.optim.SGD(clf.parameters(), lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=0)
    ctx, _ = amp_autocast(device, cfg.amp)
    history = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        clf.train()
        it = iter(train_batches(epoch))
        loss_sum = 0.0
        for _ in range(steps_per_epoch):
            images, labels = next(it)[:2]
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            with torch.no_grad(), ctx:
                feats = forward_features(model, images, ("pooled",))["pooled"]
            out = clf(feats.float())
            # mean over the global batch: local sum / global batch, gradients summed over ranks
            loss = F.cross_entropy(out, labels, reduction="sum") / cfg.batch_size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in clf.parameters():
                    dist.all_reduce(p.grad)
            opt.step()
            loss_sum += float(loss.detach())
        sched.step()
        if (epoch + 1) % cfg.val_freq == 0 or epoch + 1 == cfg.epochs:
            top1, top5 = _evaluate_protocol(model, clf, val_batches, device, ctx)
            history.append({"epoch": epoch + 1, "top1": top1, "top5": top5,
                            "train_loss": loss_sum / max(1, steps_per_epoch) * (world if world > 1 else 1)})
            if rank == 0:
                log.info("linear (DINO protocol): epoch %d/%d top1 %.2f top5 %.2f", epoch + 1, cfg.epochs, top1, top5)
    best = max(history, key=lambda h: h["top1"])
    return {"protocol": "DINO eval_linear: frozen backbone (eval mode), RandomResizedCrop + flip, SGD momentum 0.9, "
                        "wd 0, lr x batch/256, cosine per epoch; best top-1 over evaluations",
            "best": {"feature": "pooled", "lr": lr, "base_lr": cfg.lr, "epoch": best["epoch"],
                     "test_top1": best["top1"], "test_top5": best["top5"]},
            "history": history, "config": {**asdict(cfg), "world_size": world, "steps_per_epoch": steps_per_epoch},
            "num_classes": num_classes, "seconds": round(time.perf_counter() - t0, 2), "_classifier": clf}


@torch.no_grad()
def _evaluate_protocol(model, clf, val_batches, device, ctx) -> tuple[float, float]:

    clf.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    for batch in val_batches():
        images, labels = batch[0].to(device), batch[1].to(device)
        with ctx:
            feats = forward_features(model, images, ("pooled",))["pooled"]
        a, b = _topk_hits(clf(feats.float()), labels)
        stats += torch.tensor([float(a), float(b), len(labels)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    n = max(1.0, float(stats[2]))
    return float(100 * stats[0] / n), float(100 * stats[1] / n)


# ------------------------------------------------------------------------------------------------
# training data with DINO's linear augmentation


def _augmented_batches(urls, cfg: LinearProtocolConfig, rank: int, world: int, num_workers: int, mean, std,
                       num_samples: int) -> Callable[[int], Iterator]:
    per_rank = cfg.batch_size // world
    buffer = max(1, min(2000, num_samples // (world * max(1, num_workers))))

    def make(epoch: int):
        ds = AugmentedLabelledShards(urls, cfg.crop, cfg.scale, rank, world, num_workers, cfg.seed, epoch, mean, std,
                                     buffer)
        return iter(DataLoader(ds, batch_size=per_rank, num_workers=num_workers))

    return make


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from eval import features as eval_features

    p = argparse.ArgumentParser(prog="python -m eval.linear",
                                description="Linear probe (DINO protocol or a DINOv2-style grid on cached features); "
                                            "writes linear.json and linear.png.")
    eval_features.add_data_arguments(p, splits=("train", "val"))
    eval_features.add_model_arguments(p)
    eval_features.add_extraction_arguments(p)
    g = p.add_argument_group("linear probe")
    g.add_argument("--mode", choices=("grid", "dino"), default="grid",
                   help="grid: many heads on cached features (default); dino: DINO's protocol with the frozen backbone")
    g.add_argument("--features", nargs="+", default=["pooled", "concat"], choices=("pooled", "concat"),
                   help="grid: feature choices (default: pooled concat)")
    g.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="base learning rates (x batch/256); grid default: DINOv2's 13, dino default: 0.001")
    g.add_argument("--epochs", type=int, default=100, help="(default: %(default)s)")
    g.add_argument("--linear-batch-size", type=int, default=256,
                   help="global batch of the linear training (default: %(default)s)")
    g.add_argument("--holdout", type=float, default=0.1,
                   help="grid: share of train held out for choosing the head (default: %(default)s)")
    g.add_argument("--linear-seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--val-freq", type=int, default=1, help="dino: evaluate every n epochs (default: %(default)s)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0),
                   help="dino: RandomResizedCrop scale (default: 0.08 1.0)")
    return p


@stoppable("python -m eval.linear")
def main(argv: Sequence[str] | None = None) -> int:
    from eval import features as eval_features
    from eval import plots

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        eval_features.check_sources(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m eval.linear: {err}", file=sys.stderr)
        return 2
    ctx = eval_features.setup_from_args(args)
    try:
        if args.mode == "grid":
            res = _main_grid(args, ctx)
        else:
            res = _main_dino(args, ctx)
        if not ctx.is_main:
            return 0
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res = {k: v for k, v in res.items() if not k.startswith("_")}
        doc = {"eval": "linear", "mode": args.mode, **res, "source": ctx.describe()}
        (out / "linear.json").write_text(json.dumps(doc, indent=1))
        b = res["best"]
        if args.mode == "grid":
            plots.plot_linear(doc, out / "linear.png", title=ctx.title())
            print(f"best: feature {b['feature']} lr {b['lr']:g} (base {b['base_lr']:g}): val top1 {b['val_top1']:.2f}; "
                  f"test top1 {b['test_top1']:.2f} top5 {b['test_top5']:.2f}")
        else:
            _plot_history(doc, out / "linear.png", ctx.title())
            print(f"best (epoch {b['epoch']}): top1 {b['test_top1']:.2f} top5 {b['test_top5']:.2f}")
        print(f"wrote {out / 'linear.json'} and {out / 'linear.png'}")
        return 0
    finally:
        ctx.close()


def _main_grid(args, ctx) -> dict:
    from eval import features as eval_features

    kinds = tuple(args.features)
    train = eval_features.features_from_args(args, ctx, "train", kinds, gather="all")
    test = eval_features.features_from_args(args, ctx, "val", kinds, gather="all")
    kinds = tuple(k for k in train if k in test)  # precomputed features: one choice, named by their kind
    if not kinds:
        raise SystemExit(f"train and val features have no feature kind in common ({list(train)} vs {list(test)})")
    num_classes = ctx.num_classes or int(max(train[kinds[0]].labels.max(), test[kinds[0]].labels.max())) + 1
    for k in kinds[1:]:
        if not np.array_equal(train[k].labels, train[kinds[0]].labels):
            raise RuntimeError("feature kinds disagree on sample order")
    cfg = GridConfig(lrs=tuple(args.lrs) if args.lrs else DINOV2_LRS, epochs=args.epochs,
                     batch_size=args.linear_batch_size, holdout=args.holdout, seed=args.linear_seed)
    res = train_linear_grid({k: train[k].features for k in kinds}, train[kinds[0]].labels,
                            {k: test[k].features for k in kinds}, test[kinds[0]].labels, num_classes=num_classes,
                            cfg=cfg, log_every=10)
    res["features"] = {"train": train[kinds[0]].meta, "val": test[kinds[0]].meta}
    return res


def _main_dino(args, ctx) -> dict:
    from eval import features as eval_features
    from ssl_container.data.augment import IMAGENET_MEAN, IMAGENET_STD

    train_src = eval_features.split_source(args, "train")
    val_src = eval_features.split_source(args, "val")
    if train_src is None or val_src is None or train_src.urls is None:
        raise SystemExit("--mode dino needs WebDataset train and val splits (--data or --train-shards/--val-shards)")
    ctx.sources.update(train=train_src, val=val_src)
    cfg = LinearProtocolConfig(epochs=args.epochs, batch_size=args.linear_batch_size,
                               lr=(args.lrs[0] if args.lrs else 0.001), val_freq=args.val_freq, crop=args.crop,
                               resize=args.resize, scale=tuple(args.scale), seed=args.linear_seed, amp=args.amp)
    n_train = train_src.num_samples
    if not n_train:
        raise SystemExit("--mode dino needs the number of training samples (dataset.json)")
    if cfg.batch_size % ctx.world_size:
        raise SystemExit(f"--linear-batch-size {cfg.batch_size} must be divisible by {ctx.world_size} ranks")
    steps = max(1, n_train // cfg.batch_size)
    train_batches = _augmented_batches(train_src.urls, cfg, ctx.rank, ctx.world_size, args.num_workers,
                                       IMAGENET_MEAN, IMAGENET_STD, n_train)

    def val_batches():
        return eval_features.make_loader(val_src, ctx.transform(), args.batch_size, ctx.rank, ctx.world_size, args.num_workers)

    num_classes = ctx.num_classes or 1000
    model = ctx.model
    with torch.no_grad():
        dim = forward_dim_of(model, cfg.crop, ctx.device)
    res = train_linear_protocol(model, train_batches, steps, val_batches, num_classes, cfg, ctx.device, dim)
    res["heads"] = [{"feature": "pooled", "lr": res["best"]["lr"], "base_lr": cfg.lr,
                     "val_top1": res["best"]["test_top1"], "test_top1": res["best"]["test_top1"]}]
    return res


def forward_dim_of(model: nn.Module, size: int, device) -> int:

    model.eval().to(device)
    return int(forward_features(model, torch.zeros(1, 3, size, size, device=device))["pooled"].shape[1])


def _plot_history(doc: dict, path: Path, title: str) -> None:
    from eval.plots import pyplot

    plt = pyplot()
    h = doc["history"]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot([r["epoch"] for r in h], [r["top1"] for r in h], "o-", label="top-1")
    ax.plot([r["epoch"] for r in h], [r["top5"] for r in h], "s--", label="top-5")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"linear (DINO protocol, lr {doc['best']['lr']:g}): {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    # run the imported module's main, so that its classes are the ones the other modules import
    # (``python -m`` would otherwise define a second copy of them in ``__main__``)
    from eval.linear import main as _main

    raise SystemExit(_main())
