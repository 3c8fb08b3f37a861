"""Fine-tune :class:`~services.training.model.RetrievalNet` with N-pair, triplet or contrastive loss.

Data: every image file of ``images_dir`` (instance mode: each photo is its own class and two
strong augmentations of it form a positive pair) or the images listed in an ``image,label``
CSV (labelled mode: positives share a label, each image is lightly augmented).

One run (:func:`train`):

1. Split off ``val_fraction`` of the images (per class; whole images in instance mode) with a
   seed-derived generator. Held-out images are both queries and database; mAP uses
   revisitop's ``compute_map`` with the query itself as junk (a held-out image without a
   held-out positive is skipped). In instance mode the held-out set is each image plus two
   fixed strong views of it.
2. Fit PCA whitening on pooled descriptors of the training images and initialise the
   whitening layer from it (DIR / cirtorch), then measure the initial validation mAP.
3. Each epoch: for triplet/contrastive, re-mine hard negatives with the current model
   (:func:`~services.training.sampling.mine_hard_negatives`); run the steps (Adam); validate;
   write a checkpoint (model, optimizer, epoch, history, numpy and torch RNG states) to
   ``out_path + ".ckpt"``. ``resume`` continues from that checkpoint, bit-identically to an
   uninterrupted run on the same device.
4. Write the model file (:func:`~services.training.model.save_model`) to ``out_path``.

Batches are square crops of ``image_size``; descriptors for mining and validation are
computed on whole images resized to ``image_size`` on the longer side. Training images are
decoded from disk at each use (JPEG draft mode), so memory does not grow with the data set.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from services.eval.revisitop import compute_map
from services.extractor.backbone import NUM_FEATURES, load_backbone
from services.space.whitening import PCAWhitening
from services.training.augment import LIGHT, STRONG, augment, resize_max_side
from services.training.losses import (
    NEGATIVE,
    POSITIVE,
    QUERY,
    contrastive_loss,
    npair_loss,
    triplet_loss,
)
from services.training.labels import IMAGE_SUFFIXES, read_labels, resolve_image
from services.training.model import RetrievalNet, describe_images, images_to_batch, save_model
from services.training.sampling import (
    encode_labels,
    holdout_split,
    mine_hard_negatives,
    sample_npair,
    sample_positives,
)

LOSSES = ("npair", "triplet", "contrastive")
DEFAULT_MARGIN = {"triplet": 0.1, "contrastive": 0.7}
INSTANCE_VAL_VIEWS = 2
# Settings a resumed run must share with its checkpoint (epochs may grow).
_RESUME_KEYS = (
    "images_dir", "labels_csv", "loss", "batch", "steps_per_epoch", "image_size", "lr",
    "weight_decay", "margin", "l2_reg", "n_negatives", "pool_size", "train_blocks",
    "pooling", "gem_p", "whitening_dim", "val_fraction", "seed",
)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Attributes
    ----------
    images_dir : str
    labels_csv : str or None
        ``image,label`` CSV (image names relative to ``images_dir``); ``None``: instance mode.
    loss : {"npair", "triplet", "contrastive"}
    out_path : str
        Model file; the checkpoint is ``out_path + ".ckpt"``.
    epochs : int
    batch : int
        Pairs per step (N-pair: ``batch`` classes x 2 images) or tuples per step (triplet /
        contrastive: ``batch`` x (query, positive, ``n_negatives`` negatives)).
    steps_per_epoch : int or None
        ``None``: one pass over the training images (as queries, or two per class pair).
    image_size : int
        Side of the square training crops and longer side for mining / validation, pixels.
    lr : float
        Adam learning rate (the GeM exponent uses 10x, as cirtorch).
    weight_decay : float
    margin : float or None
        Triplet / contrastive margin; ``None`` for the loss's default (0.1 / 0.7).
    l2_reg : float
        N-pair embedding regulariser.
    n_negatives : int
        Hard negatives per tuple.
    pool_size : int or None
        Random training images mined for negatives each epoch; ``None``: all of them.
    train_blocks : int
        Last MBConv blocks trained (plus the head conv, GeM p and whitening).
    pooling : {"gem", "rmac"}
    gem_p : float
    whitening_dim : int or None
        Learned whitening output size (lowered to ``n_train - 1`` when fewer training images;
        the report gives the final value); ``None``: no whitening layer.
    val_fraction : float
        Held-out fraction, ``[0, 1)``; 0 disables validation.
    seed : int
    resume : bool
        Continue from ``out_path + ".ckpt"`` (which must exist and match these settings).
    device : str
        Torch device, or ``"auto"``: CUDA when available, else CPU.
    progress : bool
        Show a tqdm bar per epoch.
    """

    images_dir: str
    labels_csv: str | None
    loss: str
    out_path: str
    epochs: int = 10
    batch: int = 8
    steps_per_epoch: int | None = None
    image_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float | None = None
    l2_reg: float = 0.002
    n_negatives: int = 3
    pool_size: int | None = None
    train_blocks: int = 2
    pooling: str = "gem"
    gem_p: float = 3.0
    whitening_dim: int | None = 512
    val_fraction: float = 0.2
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        checks = [
            (self.loss in LOSSES, "loss", f"one of {LOSSES}"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch >= 2, "batch", ">= 2"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch", ">= 1"),
            (self.image_size >= 32, "image_size", ">= 32"),
            (self.lr > 0, "lr", "> 0"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.margin is None or self.margin > 0, "margin", "> 0"),
            (self.l2_reg >= 0, "l2_reg", ">= 0"),
            (self.n_negatives >= 1, "n_negatives", ">= 1"),
            (self.pool_size is None or self.pool_size >= 2, "pool_size", ">= 2"),
            (0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)"),
            (self.whitening_dim is None or 1 <= self.whitening_dim <= NUM_FEATURES,
             "whitening_dim", f"in 1..{NUM_FEATURES}"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"training setting {name}={getattr(self, name)!r} must be {rule}")
        if not Path(self.images_dir).is_dir():
            raise ValueError(f"training setting images_dir={self.images_dir!r} is not a directory")


@dataclass
class TrainReport:
    """What a run did and measured.

    Attributes
    ----------
    out_path, checkpoint_path : str
    loss : str
    device : str
    epochs : int
        Epochs completed, including those of a resumed checkpoint.
    steps : int
        Optimizer steps, likewise.
    train_images, val_images : int
        Images in each split (validation views included).
    dim : int
        Descriptor dimension.
    epoch_loss : list of float
        Mean training loss per epoch.
    val_map : list of float
        Held-out mAP in percent: entry 0 before training (whitening initialised), then one
        per epoch; empty without a validation set.
    images_per_s : float
        Training throughput (forward + backward + step, augmentation included) of this call.
    peak_rss_bytes : int
        Peak resident memory of the process.
    wall_s : float
        Duration of this call.
    """

    out_path: str
    checkpoint_path: str
    loss: str
    device: str
    epochs: int
    steps: int
    train_images: int
    val_images: int
    dim: int
    epoch_loss: list[float] = field(default_factory=list)
    val_map: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    peak_rss_bytes: int = 0
    wall_s: float = 0.0


@dataclass
class _Data:
    paths: list[Path]
    labels: np.ndarray  # (N,) class ids over all images
    train: np.ndarray  # (N_t,) indices into paths
    val_images: list[np.ndarray]  # eval-size held-out images (and views)
    val_labels: np.ndarray
    instance: bool


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_image(path: str | Path, max_side: int) -> np.ndarray:
    """Decode an image file as RGB (EXIF orientation applied) no larger than ``max_side``.

    Returns
    -------
    ndarray ``(H, W, 3)`` uint8 with ``max(H, W) <= max_side`` (smaller images are kept).
    """
    with Image.open(path) as im:
        im.draft("RGB", (max_side, max_side))
        img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return resize_max_side(img, max_side) if max(img.shape[:2]) > max_side else img


def _list_data(config: TrainConfig) -> tuple[list[Path], np.ndarray, bool]:
    root = Path(config.images_dir)
    if config.labels_csv is None:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return paths, np.arange(len(paths)), True
    names, labels = read_labels(config.labels_csv)
    try:
        paths = [resolve_image(root, n) for n in names]
    except FileNotFoundError as exc:
        raise ValueError(f"labels CSV {config.labels_csv!r}: {exc}") from None
    return paths, encode_labels(labels), False


def _prepare_data(config: TrainConfig) -> _Data:
    paths, labels, instance = _list_data(config)
    train, val = holdout_split(labels, config.val_fraction, np.random.default_rng([config.seed, 1]))
    if len(np.unique(labels[train])) < 2:
        raise ValueError(f"{config.images_dir!r}: need at least 2 training classes")
    val_images = [load_image(paths[i], config.image_size) for i in val]
    val_labels = labels[val]
    if instance and len(val):
        rng = np.random.default_rng([config.seed, 2])
        views = [
            augment(load_image(paths[i], 2 * config.image_size), config.image_size, rng, STRONG)
            for i in val
            for _ in range(INSTANCE_VAL_VIEWS)
        ]
        val_images += views
        val_labels = np.concatenate([val_labels, np.repeat(val_labels, INSTANCE_VAL_VIEWS)])
    return _Data(paths, labels, train, val_images, val_labels, instance)


def held_out_map(descriptors: np.ndarray, labels: np.ndarray) -> float:
    """mAP (percent) of every image queried against all others, positives = same label.

    Parameters
    ----------
    descriptors : ndarray ``(N, D)``
        L2-normalised.
    labels : ndarray ``(N,)`` int

    Returns
    -------
    float
        revisitop ``compute_map`` with the query itself as junk; NaN when no image has a
        positive.
    """
    ranks = np.argsort(-(descriptors @ descriptors.T), axis=1, kind="stable").T
    gnd = [
        {"ok": np.flatnonzero((labels == labels[q]) & (np.arange(len(labels)) != q)), "junk": [q]}
        for q in range(len(labels))
    ]
    return 100.0 * compute_map(ranks, gnd).map


def _build_model(config: TrainConfig, n_fit: int) -> RetrievalNet:
    dim = config.whitening_dim
    if dim is not None:
        dim = min(dim, n_fit - 1)
    return RetrievalNet(
        load_backbone(),
        pooling=config.pooling,
        gem_p=config.gem_p,
        whitening_dim=dim,
        train_blocks=config.train_blocks,
    )


def _optimizer(model: RetrievalNet, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for n, p in model.named_parameters() if p.requires_grad and n != "p"]
    groups: list[dict[str, Any]] = [{"params": params}]
    if model.p is not None:
        groups.append({"params": [model.p], "lr": 10 * config.lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def _step_images(
    config: TrainConfig, data: _Data, rng: np.random.Generator, tuples: np.ndarray | None
) -> list[int]:
    """Image indices of one step, in loss order: N-pair anchors then positives, or for each
    row ``(query, negatives...)`` of ``tuples`` the query, a positive and the negatives."""
    if tuples is None:
        pairs = sample_npair(data.labels[data.train], config.batch, rng)
        return data.train[pairs.T.reshape(-1)].tolist()
    positives = sample_positives(data.labels, tuples[:, 0], rng)
    return [int(i) for row, pos in zip(tuples, positives) for i in (row[0], pos, *row[1:])]


def _loss(config: TrainConfig, model: RetrievalNet, x: torch.Tensor) -> torch.Tensor:
    if config.loss == "npair":
        emb = model(x, normalize=False)
        anchors, positives = emb.chunk(2)
        return npair_loss(anchors, positives, config.l2_reg)
    margin = config.margin if config.margin is not None else DEFAULT_MARGIN[config.loss]
    size = 2 + config.n_negatives
    emb = model(x).reshape(-1, size, model.dim)
    if config.loss == "triplet":
        anchor = emb[:, :1].expand(-1, config.n_negatives, -1).reshape(-1, model.dim)
        positive = emb[:, 1:2].expand(-1, config.n_negatives, -1).reshape(-1, model.dim)
        return triplet_loss(anchor, positive, emb[:, 2:].reshape(-1, model.dim), margin)
    label = torch.tensor([QUERY, POSITIVE] + [NEGATIVE] * config.n_negatives, device=x.device)
    return contrastive_loss(emb.reshape(-1, model.dim), label.repeat(emb.shape[0]), margin)


def _mine(
    config: TrainConfig, data: _Data, model: RetrievalNet, device: torch.device,
    rng: np.random.Generator, n_queries: int,
) -> np.ndarray:
    """This epoch's queries and their hard negatives from fresh descriptors: ``(Q, 1 + n_neg)``
    image indices, one ``(query, negatives...)`` row per query."""
    queries = np.concatenate(
        [rng.permutation(data.train) for _ in range(math.ceil(n_queries / len(data.train)))]
    )[:n_queries]
    pool = data.train
    if config.pool_size is not None and config.pool_size < len(pool):
        pool = np.sort(rng.choice(pool, size=config.pool_size, replace=False))
    needed = np.union1d(queries, pool)
    images = [load_image(data.paths[i], config.image_size) for i in needed]
    desc = describe_images(model, images, device)
    where = {int(i): k for k, i in enumerate(needed)}
    q_desc = desc[[where[int(i)] for i in queries]]
    p_desc = desc[[where[int(i)] for i in pool]]
    neg = mine_hard_negatives(q_desc, data.labels[queries], p_desc, data.labels[pool], config.n_negatives)
    return np.column_stack([queries, pool[neg]])


def _validate(model: RetrievalNet, data: _Data, device: torch.device) -> list[float]:
    if not data.val_images:
        return []
    return [held_out_map(describe_images(model, data.val_images, device), data.val_labels)]


def _rng_state(rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], rng: np.random.Generator, device: torch.device) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k in _RESUME_KEYS}


def _check_classes(config: TrainConfig, data: _Data) -> None:
    n_classes = len(np.unique(data.labels[data.train]))
    if config.loss == "npair" and config.batch > n_classes:
        raise ValueError(f"training setting batch={config.batch} exceeds the {n_classes} training classes")
    if config.loss != "npair" and config.n_negatives >= n_classes:
        raise ValueError(
            f"training setting n_negatives={config.n_negatives} needs more than that many "
            f"training classes, there are {n_classes}"
        )


def _start(
    config: TrainConfig, data: _Data, model: RetrievalNet, optimizer: torch.optim.Optimizer,
    rng: np.random.Generator, device: torch.device, report: TrainReport, ckpt_path: Path,
) -> None:
    """Fresh run: whitening from PCA and the initial validation; resume: restore everything."""
    if not config.resume:
        if model.whiten is not None:
            fit_images = [load_image(data.paths[i], config.image_size) for i in data.train]
            pooled = describe_images(model, fit_images, device, whiten=False)
            model.init_whitening(PCAWhitening().fit(pooled, model.dim))
        report.val_map = _validate(model, data, device)
        return
    if not ckpt_path.is_file():
        raise ValueError(f"resume: no checkpoint at {str(ckpt_path)!r}")
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    if ckpt["config"] != _config_dict(config):
        diff = sorted(k for k, v in _config_dict(config).items() if ckpt["config"].get(k) != v)
        raise ValueError(f"resume: settings {diff} differ from the checkpoint's")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    report.epochs, report.steps = ckpt["epoch"], ckpt["steps"]
    report.epoch_loss, report.val_map = list(ckpt["epoch_loss"]), list(ckpt["val_map"])
    _restore_rng(ckpt["rng"], rng, device)


def _run_epoch(
    config: TrainConfig, data: _Data, model: RetrievalNet, optimizer: torch.optim.Optimizer,
    rng: np.random.Generator, device: torch.device, epoch: int, steps: int,
) -> tuple[float, int, float]:
    """One epoch of optimizer steps: ``(mean loss, images trained on, seconds in steps)``."""
    tuples = None if config.loss == "npair" else _mine(config, data, model, device, rng, steps * config.batch)
    recipe = STRONG if data.instance else LIGHT
    model.train()
    losses, n_images, seconds = [], 0, 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress)
    for step in bar:
        t0 = time.perf_counter()
        rows = None if tuples is None else tuples[step * config.batch : (step + 1) * config.batch]
        idx = _step_images(config, data, rng, rows)
        crops = [
            augment(load_image(data.paths[i], 2 * config.image_size), config.image_size, rng, recipe)
            for i in idx
        ]
        loss = _loss(config, model, images_to_batch(crops).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - t0
        n_images += len(idx)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{n_images / seconds:.1f}")
    model.eval()
    return float(np.mean(losses)), n_images, seconds


def train(config: TrainConfig) -> TrainReport:
    """Run (or resume) one training run; see the module docstring.

    Parameters
    ----------
    config : TrainConfig

    Returns
    -------
    TrainReport
    """
    config.validate()
    start = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 0])
    data = _prepare_data(config)
    _check_classes(config, data)
    ckpt_path = Path(config.out_path + ".ckpt")
    model = _build_model(config, len(data.train)).to(device)
    optimizer = _optimizer(model, config)
    report = TrainReport(
        out_path=config.out_path, checkpoint_path=str(ckpt_path), loss=config.loss,
        device=str(device), epochs=0, steps=0, train_images=len(data.train),
        val_images=len(data.val_images), dim=model.dim,
    )
    _start(config, data, model, optimizer, rng, device, report, ckpt_path)

    per_step = 2 * config.batch if config.loss == "npair" else config.batch
    steps = config.steps_per_epoch or max(1, len(data.train) // per_step)
    n_images, train_s = 0, 0.0
    for epoch in range(report.epochs, config.epochs):
        loss, n, seconds = _run_epoch(config, data, model, optimizer, rng, device, epoch, steps)
        n_images, train_s = n_images + n, train_s + seconds
        report.epochs, report.steps = epoch + 1, report.steps + steps
        report.epoch_loss.append(loss)
        report.val_map += _validate(model, data, device)
        _save_checkpoint(ckpt_path, {
            "config": _config_dict(config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": report.epochs, "steps": report.steps,
            "epoch_loss": report.epoch_loss, "val_map": report.val_map,
            "rng": _rng_state(rng, device),
        })

    save_model(config.out_path, model, {
        "training": {**_config_dict(config), "epochs": report.epochs, "val_map": report.val_map},
    })
    report.images_per_s = n_images / train_s if train_s else 0.0
    # ru_maxrss is in KiB on Linux.
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.wall_s = time.perf_counter() - start
    return report


def run_training(
    images_dir: str,
    labels_csv: str | None,
    loss: str,
    out_path: str,
    *,
    epochs: int,
    batch: int,
    image_size: int,
    seed: int,
    resume: bool,
    device: str,
    val_fraction: float,
    progress: bool = True,
    **overrides: Any,
) -> TrainReport:
    """CLI entry point (``loupe train``): :func:`train` with these settings.

    ``overrides`` sets any other :class:`TrainConfig` field (``lr``, ``train_blocks``, ...).
    """
    config = TrainConfig(
        images_dir=images_dir, labels_csv=labels_csv, loss=loss, out_path=out_path,
        epochs=epochs, batch=batch, image_size=image_size, seed=seed, resume=resume,
        device=device, val_fraction=val_fraction, progress=progress,
    )
    return train(replace(config, **overrides))
