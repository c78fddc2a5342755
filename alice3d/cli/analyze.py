"""``alice3d-analyze``: evaluate frozen pretrained encoders.

    alice3d-analyze probe   --encoder RUN/encoder.pt --out EVAL     # linear + attentive probes -> EVAL/probe.json
    alice3d-analyze cka     --encoder RUN/encoder.pt --out EVAL     # occlusion invariance -> EVAL/cka.csv, EVAL/cka.png
    alice3d-analyze preview --run RUN --out EVAL                    # the method's reconstruction previews -> EVAL/*.png

The probe task asks which organ (spleen, kidneys, liver, stomach, or other tissue) lies at the
centre of a crop; crops come from labelled volumes (``--data``, default: the phantom cohort),
at the encoder's crop size, spacing and intensity window (read from encoder.pt), with train
and test crops from different subjects. 2D encoders get slice windows normal to ``--axis``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from alice3d.analysis.cka import DEFAULT_RATIOS, occlusion_invariance, plot_cka, write_cka_csv
from alice3d.analysis.probing import encoder_from_file, load_labeled_volumes, organ_center_task, run_probes
from alice3d.cli.common import run_main, setup_logging
from alice3d.config import load_config
from alice3d.methods import METHODS
from alice3d.pretrain.config import PretrainConfig
from alice3d.pretrain.run import build_dataset
from alice3d.train.checkpoint import load_checkpoint
from alice3d.viz.ortho import save_volume_panels

log = logging.getLogger("alice3d.analyze")


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _task_for(meta: dict[str, Any], args: argparse.Namespace):
    arch_args = meta.get("arch_args", {})
    size = meta.get("crop_size") or arch_args.get("img_size")
    if not size:
        raise SystemExit("error: the encoder file records no crop size (metadata crop_size / arch_args.img_size)")
    spacing = args.spacing or meta.get("spacing") or [3.0, 3.0, 3.0]
    if len(spacing) == 1:
        spacing = spacing * 3
    window = meta.get("hu_window") or [-125.0, 255.0]
    vols = load_labeled_volumes(args.data or "", spacing=spacing, hu_window=window,
                                phantom_n=args.phantom_n, phantom_seed=args.phantom_seed)
    task = organ_center_task(vols, size, per_class=args.per_class, axis=args.axis, seed=args.seed)
    log.info("probe task: %s", task.describe())
    return task


def cmd_probe(args: argparse.Namespace) -> int:
    encoder, meta = encoder_from_file(args.encoder)
    task = _task_for(meta, args)
    results = run_probes(encoder, task, kinds=args.kinds.split(","), seed=args.seed, steps=args.steps)
    out = {"encoder": str(args.encoder), "method": meta.get("method", ""), "task": task.describe(),
           "classes": task.class_names, **{k: r.as_dict() for k, r in results.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(out, indent=2))
    for k, r in results.items():
        log.info("%s probe: train acc %.3f, test acc %.3f", k, r.train_acc, r.test_acc)
    print(json.dumps({k: round(r.test_acc, 4) for k, r in results.items()}))
    return 0


def cmd_cka(args: argparse.Namespace) -> int:
    encoder, meta = encoder_from_file(args.encoder)
    task = _task_for(meta, args)
    images = task.images[: args.n]
    results = occlusion_invariance(encoder, images, ratios=args.ratios, mode=args.mode, pool=args.pool, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_cka_csv(results, args.out / "cka.csv", label=meta.get("method", ""))
    plot_cka(results, args.out / "cka.png", title=f"CKA masked vs full: {meta.get('method', 'encoder')}")
    mean_075 = results.get(0.75)
    if mean_075 is not None:
        log.info("CKA at mask ratio 0.75 (mean over blocks): %.3f", sum(mean_075) / len(mean_075))
    log.info("wrote %s and %s", args.out / "cka.csv", args.out / "cka.png")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    run = Path(args.run)
    cfg = load_config(PretrainConfig, run / "config.yaml")
    if cfg.method not in METHODS:
        raise SystemExit(f"error: {run / 'config.yaml'}: method {cfg.method!r} is not one of {sorted(METHODS)}")
    model = METHODS[cfg.method].method(cfg.method_config())
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt", expect_kind="alice3d-checkpoint")
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset, _ = build_dataset(cfg)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.n):
        samples = [dataset[k * 2 + j] for j in range(2)]
        batch = torch.utils.data.default_collate(samples)
        with torch.no_grad():
            panels = model.preview(batch)
        path = save_volume_panels(panels, args.out / f"preview_{k}.png")
        log.info("wrote %s", path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alice3d-analyze", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--encoder", type=Path, required=True, help="encoder.pt written by alice3d-pretrain")
        sp.add_argument("--data", default=None, help="labelled datalist JSON or folder (default: phantom cohort)")
        sp.add_argument("--out", type=Path, required=True, help="output folder")
        sp.add_argument("--spacing", type=_floats, default=None, help="mm, e.g. 3,3,3 (default: the encoder's)")
        sp.add_argument("--axis", type=int, default=2, help="slice normal for 2D encoders (RAS axis; 2 = axial)")
        sp.add_argument("--per-class", type=int, default=8, help="crops per class and volume")
        sp.add_argument("--phantom-n", type=int, default=16, help="subjects of the embedded cohort")
        sp.add_argument("--phantom-seed", type=int, default=0)
        sp.add_argument("--seed", type=int, default=0)

    probe = sub.add_parser("probe", help="linear and attentive probing on a frozen encoder")
    data_args(probe)
    probe.add_argument("--kinds", default="linear,attentive", help="comma-separated: linear, attentive")
    probe.add_argument("--steps", type=int, default=300, help="attentive probe training steps")
    probe.set_defaults(fn=cmd_probe)

    cka = sub.add_parser("cka", help="CKA between masked- and full-input features per block")
    data_args(cka)
    cka.add_argument("--ratios", type=_floats, default=list(DEFAULT_RATIOS), help="mask ratios, comma-separated")
    cka.add_argument("--mode", choices=["auto", "drop", "zero"], default="auto",
                     help="drop: remove masked tokens (ViT); zero: zero masked pixels; auto: drop for ViT")
    cka.add_argument("--pool", choices=["mean", "tokens"], default="mean")
    cka.add_argument("--n", type=int, default=256, help="images used")
    cka.set_defaults(fn=cmd_cka)

    prev = sub.add_parser("preview", help="reconstruction previews of a pretraining run")
    prev.add_argument("--run", type=Path, required=True, help="run folder of alice3d-pretrain")
    prev.add_argument("--out", type=Path, required=True, help="output folder")
    prev.add_argument("--n", type=int, default=2, help="number of previews")
    prev.add_argument("--seed", type=int, default=0)
    prev.set_defaults(fn=cmd_preview)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run_main(lambda: args.fn(args))


if __name__ == "__main__":
    main()
