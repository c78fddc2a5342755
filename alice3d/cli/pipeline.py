"""The whole alice3d pipeline on the embedded default, as a new user would run it.

phantom cohort -> landmark training -> Alice pretraining -> BTCV-format fine-tuning with
the pretrained encoder -> MONAI bundle export -> bundle run on a held-out phantom.

Each stage is the public command a user would type (printed before it runs), so the
output directory doubles as a worked example. A stage whose output already exists is
skipped, so re-running after an interruption continues where it stopped.

    python -m alice3d.cli.pipeline --out runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from alice3d.data.datalists import BTCV_LABELS
from alice3d.data.phantom import held_out_phantom
from alice3d.finetune.metrics import dice_per_class


def run_stage(name: str, cmd: list[str], done_marker: Path, log: list[dict]) -> None:
    shown = " ".join(shlex.quote(c) for c in cmd)
    if done_marker.exists():
        print(f"\n== {name}: already done ({done_marker}), skipping", flush=True)
        log.append({"stage": name, "command": shown, "seconds": 0.0, "skipped": True})
        return
    print(f"\n== {name}\n$ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"error: stage '{name}' failed (exit code {proc.returncode}); command: {shown}")
    log.append({"stage": name, "command": shown, "seconds": round(time.perf_counter() - t0, 1), "skipped": False})


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    """``{organ name: Dice}`` of two label maps of one shape, scored by the fine-tuning metric
    (`alice3d.finetune.metrics.dice_per_class`, MONAI's ``compute_dice``): NaN for an organ
    absent from both, 0 for one present in only one of them."""
    ids = list(labels)
    return {labels[k]: float(v) for k, v in zip(ids, dice_per_class(pred, ref, ids))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alice3d-pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where every stage writes")
    # Step counts sized so the whole pipeline fits ~15 minutes on 2 CPU cores.
    parser.add_argument("--landmark-steps", type=int, default=100, help="landmark train.max_steps")
    parser.add_argument("--pretrain-steps", type=int, default=100, help="pretraining train.max_steps")
    parser.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning train.max_steps")
    parser.add_argument("--model", default="unetr", choices=["unetr"],
                        help="fine-tuning network (the pretrained encoder is a ViT, so UNETR)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    log: list[dict] = []
    t0 = time.perf_counter()

    def steps(value: int | None) -> list[str]:
        return [] if value is None else [f"train.max_steps={value}"]

    lm, pt, ft, bundle = out / "landmark", out / "pretrain", out / "finetune", out / "bundle"
    held = out / "heldout"
    run_stage("landmark training", [py, "-m", "alice3d.cli.landmark", "train", "--out", str(lm), *steps(args.landmark_steps)],
              lm / "landmark.pt", log)
    run_stage("Alice pretraining", [py, "-m", "alice3d.cli.pretrain", "--landmark", str(lm / "landmark.pt"),
                                    "--out", str(pt), *steps(args.pretrain_steps)], pt / "encoder.pt", log)
    run_stage("BTCV fine-tuning", [py, "-m", "alice3d.cli.finetune", "--task", "btcv", "--model", args.model,
                                   "--pretrained", str(pt / "encoder.pt"), "--out", str(ft),
                                   *steps(args.finetune_steps)], ft / "results.json", log)
    run_stage("bundle export", [py, "-m", "alice3d.cli.export", "--run", str(ft), "--out", str(bundle)],
              bundle / "configs" / "metadata.json", log)

    held.mkdir(exist_ok=True)
    image, label = held / "img_heldout.nii.gz", held / "label_heldout.nii.gz"
    if not image.exists():
        held_out_phantom(image, seed=12345, label_path=label)
    pred_dir = held / "bundle_output"
    run_stage("bundle run on a held-out phantom",
              [py, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--bundle_root", str(bundle), "--datalist", repr([str(image)]),
               "--output_dir", str(pred_dir), "--device", "cpu"],
              pred_dir / ".done", log)
    (pred_dir / ".done").touch()

    seg_files = sorted(pred_dir.rglob("*.nii.gz"))
    if not seg_files:
        raise SystemExit(f"error: the bundle wrote no segmentation under {pred_dir}")
    seg_img, ref_img = nib.load(str(seg_files[0])), nib.load(str(label))
    seg, ref = np.asarray(seg_img.dataobj), np.asarray(ref_img.dataobj)
    same_space = seg.shape == ref.shape and np.allclose(seg_img.affine, ref_img.affine, atol=1e-3)
    organs = {int(k): v for k, v in BTCV_LABELS.items() if int(k) > 0}
    held_dice = dice_per_label(seg, ref, organs) if seg.shape == ref.shape else {}
    results = json.loads((ft / "results.json").read_text())

    summary = {
        "outputs": {"landmark model": str(lm / "landmark.pt"), "pretrained encoder": str(pt / "encoder.pt"),
                    "fine-tuning run": str(ft), "bundle": str(bundle), "held-out segmentation": str(seg_files[0])},
        "validation": results,
        "held_out_dice": held_dice,
        "held_out_same_space_as_input": bool(same_space),
        "stages": log,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== Summary")
    for k, v in summary["outputs"].items():
        print(f"  {k:24s} {v}")
    metrics = results.get("metrics", {})
    per_organ = metrics.get("per_organ", {})
    if per_organ:
        print("\n  organ                  val Dice   held-out Dice (bundle)")
        for name, m in per_organ.items():
            d = m.get("dice", {}).get("mean", float("nan"))
            print(f"  {name:22s} {d:8.3f}   {held_dice.get(name, float('nan')):8.3f}")
    if "mean_dice" in metrics:
        print(f"\n  mean validation Dice: {metrics['mean_dice']:.3f} ({results.get('n_cases')} phantoms)")
    print(f"  bundle output in the input's space (shape and affine): {same_space}")
    print(f"  total time: {summary['total_seconds']:.0f} s; details in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
