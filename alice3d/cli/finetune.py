"""``alice3d-finetune``: fine-tune a segmentation/classification network, or predict with one.

    alice3d-finetune --task btcv [--data-root DIR] [--model unetr|swin_unetr|nnformer]
                     [--pretrained RUN/encoder.pt] --out RUN [--resume] [key=value ...]
    alice3d-finetune predict --run RUN --image CT.nii.gz --out SEG.nii.gz
    alice3d-finetune evaluate --run RUN --data DATASET.json [--split test]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from alice3d.cli.common import add_config_args, prepare_run_dir, resolve_config, run_main, setup_logging
from alice3d.core.dist import is_main_process
from alice3d.data.io import DataError
from alice3d.finetune.config import FinetuneConfig
from alice3d.finetune.held_out import evaluate_run
from alice3d.finetune.predict import predict
from alice3d.finetune.train import run_finetune


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alice3d-finetune",
        description="Fine-tune UNETR / Swin UNETR / nnFormer (or an encoder classifier) on a task, optionally "
                    "from a pretrained encoder.pt. Without --data-root the btcv task runs on the embedded "
                    "phantom cohort with CPU-sized settings; on real data the task geometry (task.spacing, "
                    "task.roi) defaults to a CPU-sized one when training on the CPU and to the GPU recipe's on "
                    "CUDA. Subcommands: 'alice3d-finetune predict --help', 'alice3d-finetune evaluate --help'.",
    )
    p.add_argument("--task", default=None,
                   help="btcv | flare22 | classification | custom (task.name); custom: organ names from "
                        "task.labels=[a,b,...] or the datalist's Decathlon 'labels' field, right/left pairs from "
                        "the names or task.lateral_pairs=[[R,L],...]")
    p.add_argument("--data-root", default=None,
                   help="folder holding dataset_0.json (BTCV layout), a datalist JSON, or a plain folder with "
                        "imagesTr/ + labelsTr/ (last 20%% of the cases validate) (data.data)")
    p.add_argument("--model", default=None,
                   help="unetr | swin_unetr | nnformer (classification: vit | swin | nnformer) (model.name); "
                        "default: what the --pretrained encoder fits, else unetr / vit")
    p.add_argument("--pretrained", default=None, help="encoder.pt of a pretraining run (model.pretrained)")
    p.add_argument("--kfold", type=int, default=None, help="cross-validate over K folds (data.kfold)")
    p.add_argument("--fold", type=int, default=None, help="with --kfold: run only this fold (data.fold)")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="fine-tune on this fraction of the training cases (data.label_fraction)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_args(p, FinetuneConfig)
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alice3d-finetune predict",
        description="Segment one image (NIfTI/.mha/.nrrd file or DICOM series folder) with a fine-tuning run's "
                    "best.pt; the output has the input's shape and affine (any orientation/spacing) and the task's "
                    "label ids.",
    )
    p.add_argument("--run", type=Path, required=True, help="fine-tuning run directory (holding best.pt)")
    p.add_argument("--image", type=Path, required=True,
                   help="CT image: a NIfTI (.nii/.nii.gz), .mha or .nrrd file, or a DICOM series folder "
                        "(the folder holding one series' slice files)")
    p.add_argument("--out", type=Path, required=True, help="segmentation file to write (e.g. SEG.nii.gz)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alice3d-finetune evaluate",
        description="Score a finished fine-tuning run's best.pt on a held-out split of a datalist (default: its "
                    "'test' cases, which fine-tuning never sees): per-organ Dice/NSD with the run's task, "
                    "preprocessing and partial-label rules, written to RUN/<split>_results.json and .md.",
    )
    p.add_argument("--run", type=Path, required=True, help="fine-tuning run directory (holding best.pt)")
    p.add_argument("--data", type=Path, required=True, help="datalist JSON holding the split (labels required)")
    p.add_argument("--split", default="test", choices=["test", "validation", "training"], help="default: test")
    p.add_argument("--max-cases", type=int, default=0, help="> 0: only the first N cases of the split")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--on-bad-data", default="skip", choices=["skip", "fail"])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def evaluate_main(argv: Sequence[str]) -> int:
    args = _evaluate_parser().parse_args(argv)
    setup_logging(args.verbose)
    res = evaluate_run(args.run, args.data, split=args.split, max_cases=args.max_cases, device=args.device,
                       on_bad_data=args.on_bad_data)
    print(f"{args.split}: mean Dice {res['metrics'].get('mean_dice')} over {res['n_cases']} cases; "
          f"{args.run / (args.split + '_results.json')}")
    return 0


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    mapping = {"task": "task.name", "data_root": "data.data", "model": "model.name", "pretrained": "model.pretrained",
               "kfold": "data.kfold", "fold": "data.fold", "label_fraction": "data.label_fraction"}
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def train_main(argv: Sequence[str]) -> int:
    args = _train_parser().parse_intermixed_args(argv)
    setup_logging(args.verbose)
    cfg = resolve_config(FinetuneConfig, args, _flag_overrides(args))
    out = prepare_run_dir(args.out, args.resume, marker="config.yaml")

    results = run_finetune(cfg, out, resume=args.resume)
    if not is_main_process():
        return 0
    if results is None:
        print(f"stopped early; continue with the same command plus --resume (run in {out})", file=sys.stderr)
        return 3
    print(f"results: {out / 'results.json'} and {out / 'results.md'}")
    return 0


def predict_main(argv: Sequence[str]) -> int:
    args = _predict_parser().parse_args(argv)
    setup_logging(args.verbose)

    predict(args.run, args.image, args.out, device=args.device)  # it logs where it wrote: no second line here
    return 0


def _reporting_data_errors(fn, argv: Sequence[str]) -> int:
    try:
        return fn(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        run_main(lambda: _reporting_data_errors(predict_main, argv[1:]))
    elif argv and argv[0] == "evaluate":
        run_main(lambda: _reporting_data_errors(evaluate_main, argv[1:]))
    else:
        run_main(lambda: _reporting_data_errors(train_main, argv))


if __name__ == "__main__":
    main()
