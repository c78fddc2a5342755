"""``alice3d-finetune``: resolve the task, build (and initialise) the network, train, evaluate.

One run directory per split; with ``data.kfold=K`` and ``data.fold=-1`` the folds run one
after the other in ``RUN/fold_k`` and ``RUN/results.json`` pools their validation cases
(every case is validated exactly once).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from alice3d.config import ConfigError, save_config
from alice3d.core.dist import is_main_process
from alice3d.core.schedules import cosine_warmup_factor
from alice3d.encoders.files import load_encoder
from alice3d.finetune import phantom_tasks
from alice3d.finetune.config import FinetuneConfig
from alice3d.finetune.data import (
    Prepared,
    Split,
    TrainSamples,
    case_store,
    load_lists,
    make_splits,
    prepare_cases,
    task_from_config,
)
from alice3d.finetune.evaluate import (
    evaluate_classification,
    evaluate_segmentation,
    flat_metrics,
    save_previews,
    write_results,
)
from alice3d.finetune.metrics import aggregate, roc_auc
from alice3d.finetune.models import build_network, count_parameters, encoder_module, network_spec
from alice3d.finetune.objectives import ClassificationTask, SegmentationTask
from alice3d.finetune.tasks import CLASSIFICATION, TaskSpec
from alice3d.finetune.transfer import TransferReport, transfer_encoder
from alice3d.train.checkpoint import load_checkpoint
from alice3d.train.optim import param_groups
from alice3d.train.trainer import Trainer

log = logging.getLogger("alice3d.finetune")


@dataclass
class Encoder:
    path: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


# ----------------------------------------------------------------------------- resolution


def resolve_task_config(cfg: FinetuneConfig) -> TaskSpec:
    """The task of ``cfg``; empty fields are filled in with what is used (see
    :func:`alice3d.finetune.data.task_from_config`: device-sized geometry, datalist labels)."""
    return task_from_config(cfg)


def load_pretrained(cfg: FinetuneConfig) -> Encoder | None:
    if not cfg.model.pretrained:
        return None

    sd, meta = load_encoder(cfg.model.pretrained)
    return Encoder(str(cfg.model.pretrained), sd, meta)


def data_root(cfg: FinetuneConfig, task: TaskSpec) -> str:
    if cfg.data.data:
        return cfg.data.data

    make = phantom_tasks.classification_cohort if task.kind == CLASSIFICATION else phantom_tasks.segmentation_cohort
    root = make(cfg.data.phantom_n, cfg.data.phantom_seed)
    log.info("no --data-root: using the embedded phantom cohort %s (CPU-sized geometry: spacing %s mm, roi %s)",
             root, list(task.spacing), list(task.roi))
    return str(root)


def model_name(spec: dict[str, Any]) -> str:
    return spec["args"]["encoder"] if spec["name"] == "classifier" else spec["name"]


def build_objective(cfg: FinetuneConfig, task: TaskSpec, encoder: Encoder | None) -> tuple[torch.nn.Module, TransferReport | None]:
    """Network (seeded init, pretrained encoder loaded) wrapped with its loss."""
    spec = network_spec(cfg.model, task, encoder.meta if encoder else None,
                        source=encoder.path if encoder else "encoder file")
    torch.manual_seed(cfg.train.seed)
    net = build_network(spec)
    report = None
    if encoder is not None and cfg.model.init == "pretrained":
        report = transfer_encoder(net, spec, encoder.state_dict, encoder.meta, encoder.path)
        if is_main_process():
            print(report.format(), flush=True)
    elif encoder is not None:
        log.info("model.init=random: architecture from %s, weights randomly initialised (seed %d)",
                 encoder.path, cfg.train.seed)
    cfg.model.name = model_name(spec)
    loaded = encoder is not None and cfg.model.init == "pretrained"
    extra = {"model_name": cfg.model.name, "pretrained": encoder.path if loaded else "",
             "transfer": report.to_dict() if report else None,
             "inference": {"sw_batch_size": cfg.eval.sw_batch_size, "sw_overlap": cfg.eval.sw_overlap,
                           "sw_mode": cfg.eval.sw_mode}}
    log.info("network %s: %.2fM parameters", spec["name"], count_parameters(net) / 1e6)
    if task.kind == CLASSIFICATION:
        return ClassificationTask(net, spec, task, extra), report
    return SegmentationTask(net, spec, task, cfg.model.ds_weights, extra), report


def poly_warmup_factor(step: int, warmup: int, total: int, power: float) -> float:
    """Linear warmup, then ``(1 - t) ** power`` with t the post-warmup progress (nnU-Net poly)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return (1.0 - t) ** power


def encoder_lr_scale(cfg: FinetuneConfig, model: torch.nn.Module) -> Callable[[str], float] | None:
    """Parameter name -> factor of ``train.lr`` for ``optim.encoder_lr_scale`` / ``optim.layer_decay``
    (None when both are 1). Decoder and head parameters keep factor 1. With layer decay a ViT of
    L blocks has patch embedding at depth 0, block i at i + 1 and its final norm at L + 1:
    factor ``encoder_lr_scale * layer_decay ** (L + 1 - depth)``."""
    o = cfg.optim
    if o.encoder_lr_scale == 1.0 and o.layer_decay == 1.0:
        return None
    network = getattr(model, "network", None)
    spec = getattr(model, "spec", None)
    if network is None or spec is None:
        raise ConfigError("optim.encoder_lr_scale/optim.layer_decay: this model has no encoder to scale")
    encoder, where = encoder_module(network, spec)
    prefix = next(n for n, m in model.named_modules() if m is encoder) + "."
    blocks = getattr(encoder, "blocks", None)
    if o.layer_decay != 1.0 and not isinstance(blocks, torch.nn.ModuleList):
        raise ConfigError(f"optim.layer_decay: applies to ViT encoders (blocks.<i>), {where} has none; "
                          "use optim.encoder_lr_scale alone")
    depth = len(blocks) if isinstance(blocks, torch.nn.ModuleList) else 0

    def scale(name: str) -> float:
        if not name.startswith(prefix):
            return 1.0
        rel = name[len(prefix):]
        block = re.match(r"blocks\.(\d+)\.", rel)
        if block:
            layer = int(block.group(1)) + 1
        elif rel.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer = 0
        else:
            layer = depth + 1
        return o.encoder_lr_scale * o.layer_decay ** (depth + 1 - layer)

    return scale


def build_optimization(cfg: FinetuneConfig, model: torch.nn.Module):
    """``(optimizer, scheduler)``, or ``(None, None)`` for the trainer's AdamW + warmup-cosine."""
    o, t = cfg.optim, cfg.train
    lr_scale = encoder_lr_scale(cfg, model)
    if t.optimizer == "adamw" and o.schedule == "cosine" and lr_scale is None:
        return None, None

    groups = param_groups(model, t.weight_decay, lr=t.lr, lr_scale=lr_scale)
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=o.nesterov and t.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))
    min_ratio = t.min_lr / t.lr if t.lr > 0 else 0.0
    if o.schedule == "poly":
        def factor(step: int) -> float:
            return poly_warmup_factor(step, t.warmup_steps, t.max_steps, o.poly_power)
    else:
        def factor(step: int) -> float:
            return cosine_warmup_factor(step, t.warmup_steps, t.max_steps, min_ratio)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- one split


def _evaluate(model: Any, cases: list[Prepared], task: TaskSpec, cfg: FinetuneConfig) -> dict[str, Any]:
    if task.kind == CLASSIFICATION:
        return evaluate_classification(model, cases, task)
    return evaluate_segmentation(model, cases, task, cfg.eval, keep_predictions=cfg.eval.n_previews)


def run_split(cfg: FinetuneConfig, task: TaskSpec, split: Split, run_dir: Path, resume: bool,
              encoder: Encoder | None) -> dict[str, Any] | None:
    """Train on ``split.train``, select on ``split.val``, write results; returns them (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    on_bad = cfg.data.on_bad_data
    train_ok, bad_train = prepare_cases(split.train, task, on_bad, "training")
    val_ok, bad_val = prepare_cases(split.val, task, on_bad, "validation")
    partial = {c.id: [task.labels[k] for k in range(task.num_classes) if not bool(c.known[k])]
               for c in train_ok + val_ok if c.partial}
    if partial:
        log.info("partial labels: %d of %d cases contour only some classes (the others are unknown there: left out "
                 "of their loss and of their Dice/NSD; see data_report.json 'not_contoured')",
                 len(partial), len(train_ok) + len(val_ok))
    if is_main_process():  # only now: a start that fails on its data leaves nothing behind
        save_config(cfg, run_dir / "config.yaml")
        report = {"bad_training_cases": bad_train, "bad_validation_cases": bad_val,
                  "training_cases": [c.id for c in train_ok], "validation_cases": [c.id for c in val_ok]}
        if partial:
            report["not_contoured"] = partial
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    cached = cfg.data.cache == "memory"
    store = case_store([c.source for c in train_ok], train_ok if cached else None, task)
    dataset = TrainSamples(len(train_ok), store, task, cfg.aug, cfg.train.seed)
    del train_ok  # the store holds what training needs (or re-reads it: data.cache=none)
    objective, report = build_objective(cfg, task, encoder)
    if cfg.model.channels_last and isinstance(objective, SegmentationTask):
        objective.use_channels_last()
    optimizer, scheduler = build_optimization(cfg, objective)
    monitor = val_ok[: cfg.eval.max_val_cases] if cfg.eval.max_val_cases > 0 else val_ok
    best_metric = "auc" if task.kind == CLASSIFICATION else "mean_dice"
    full_evals: dict[int, dict[str, Any]] = {}  # step -> evaluation on every validation case

    def evaluator(model: torch.nn.Module, step: int) -> dict[str, float]:
        ev = _evaluate(model, monitor, task, cfg)
        flat = flat_metrics(ev)
        if len(monitor) == len(val_ok):
            ev["score"] = flat.get(best_metric, float("-inf"))
            full_evals[step] = ev
            # Predicted label maps are kept for the best evaluation only (the trainer's choice:
            # the first step with the highest value).
            best = max(full_evals, key=lambda s: (full_evals[s]["score"], -s))
            for s, e in full_evals.items():
                if s != best:
                    e.pop("predictions", None)
        return flat

    trainer = Trainer(objective, cfg.train, run_dir, full_config=cfg, optimizer=optimizer, scheduler=scheduler,
                      evaluator=evaluator, best_metric=best_metric, best_mode="max")
    result = trainer.fit(dataset, resume=resume)
    if result.interrupted or not trainer.dist.is_main:
        return None

    best = run_dir / "best.pt"
    best_step = None
    if best.exists():
        ckpt = load_checkpoint(best, map_location=trainer.device, expect_kind="alice3d-best")
        objective.load_state_dict(ckpt["state_dict"])
        best_step = int(ckpt["step"])
    else:
        log.warning("no best.pt was written (the validation metric was never finite); evaluating the last weights")
    # The best step's validation was already computed with these very weights during fit.
    ev = full_evals.get(best_step) if best_step is not None else None
    if ev is None:
        ev = _evaluate(objective, val_ok, task, cfg)
    if task.kind != CLASSIFICATION and cfg.eval.n_previews > 0:
        save_previews(objective, val_ok[: cfg.eval.n_previews], task, cfg.eval, run_dir / "previews",
                      ev.get("predictions"))
    results = {
        "kind": task.kind, "task": task.name, "model": cfg.model.name, "fold": split.fold,
        "checkpoint": "best.pt" if best_step is not None else "last", "best_step": best_step,
        "train_steps": result.step, "n_train_cases": len(split.train) - len(bad_train),
        "train_cases": [c.id for c in split.train if c.id not in bad_train],
        "val_cases": list(ev["cases"]), "n_cases": len(ev["cases"]),
        "bad_cases": bad_val, "bad_train_cases": bad_train,
        "labels": {str(k): v for k, v in task.labels.items()}, "spacing": list(task.spacing), "roi": list(task.roi),
        "nsd_tolerance_mm": task.nsd_tolerance_mm,
        "pretrained": encoder.path if encoder and cfg.model.init == "pretrained" else None,
        "init": cfg.model.init if encoder else "random",
        "transfer": report.to_dict() if report else None,
        "metrics": ev["metrics"], "cases": ev["cases"],
    }
    write_results(run_dir, results)
    _log_summary(results)
    return results


def _log_summary(results: dict[str, Any]) -> None:
    bad = {**results.get("bad_train_cases", {}), **results.get("bad_cases", {})}
    if bad:
        log.warning("%d bad case(s) were left out of this run (data.on_bad_data=skip; see data_report.json):\n  %s",
                    len(bad), "\n  ".join(f"{k}: {v}" for k, v in bad.items()))
    m = results["metrics"]
    if results["kind"] == CLASSIFICATION:
        log.info("validation AUC %s, accuracy %s", m.get("auc"), m.get("accuracy"))
        return
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    log.info("validation (%d cases): mean Dice %s%%, mean NSD %s%%", results["n_cases"], fmt(m["mean_dice"]), fmt(m["mean_nsd"]))


# ----------------------------------------------------------------------------- whole run


def pooled_results(task: TaskSpec, folds: list[dict[str, Any]], kfold: int) -> dict[str, Any]:
    """One results dict over all folds' validation cases (each case once)."""
    cases: dict[str, Any] = {}
    bad: dict[str, str] = {}
    for r in folds:
        cases.update(r["cases"])
        bad.update(r["bad_cases"])
    if task.kind == CLASSIFICATION:
        metrics = {"auc": roc_auc([c["prob"] for c in cases.values()], [c["label"] for c in cases.values()]),
                   "accuracy": sum(c["pred"] == c["label"] for c in cases.values()) / max(1, len(cases))}
    else:
        metrics = aggregate(cases, list(task.foreground.values()))
    first = folds[0]
    return {**{k: first[k] for k in ("kind", "task", "model", "labels", "spacing", "roi", "nsd_tolerance_mm",
                                      "pretrained")},
            "kfold": kfold, "n_cases": len(cases), "bad_cases": bad,
            "folds": {str(r["fold"]): {"metrics": {k: v for k, v in r["metrics"].items() if k != "per_organ"},
                                       "val_cases": r["val_cases"]} for r in folds},
            "metrics": metrics, "cases": cases}


def run_finetune(cfg: FinetuneConfig, out: str | Path, resume: bool = False) -> dict[str, Any] | None:
    """The whole command: returns the results (rank 0; None elsewhere or when interrupted)."""
    out = Path(out)
    task = resolve_task_config(cfg)
    encoder = load_pretrained(cfg)
    # Fails before touching any data when the encoder cannot fit; records the model chosen.
    spec = network_spec(cfg.model, task, encoder.meta if encoder else None,
                        source=encoder.path if encoder else "encoder file")
    cfg.model.name = model_name(spec)
    root = data_root(cfg, task)
    lists, source = load_lists(root, task)
    splits = make_splits(lists, cfg.data, source)
    if len(splits) == 1 and (not cfg.data.kfold or cfg.data.fold >= 0):
        return run_split(cfg, task, splits[0], out, resume, encoder)
    if is_main_process():
        save_config(cfg, out / "config.yaml")
    results = []
    for split in splits:
        fold_dir = out / f"fold_{split.fold}"
        done = fold_dir / "results.json"
        if done.exists():
            log.info("fold %d already finished (%s)", split.fold, done)
            results.append(json.loads(done.read_text()))
            continue
        has_ckpt = (fold_dir / "checkpoints" / "last.pt").exists()
        log.info("fold %d/%d: %d training, %d validation cases", split.fold + 1, len(splits), len(split.train), len(split.val))
        r = run_split(cfg, task, split, fold_dir, resume and has_ckpt, encoder)
        if r is None:
            return None
        results.append(r)
    if not is_main_process():
        return None
    pooled = pooled_results(task, results, cfg.data.kfold)
    write_results(out, pooled)
    _log_summary(pooled)
    return pooled

