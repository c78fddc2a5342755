"""``docs/README.md`` and ``LICENSE`` of an exported bundle (plain text from the metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alice3d.bundle.metadata import NETWORK_TITLES, preprocessing_text
from alice3d.finetune.config import EvalConfig
from alice3d.finetune.tasks import TaskSpec

LICENSE_TEXT = Path(__file__).resolve().parents[1] / "resources" / "bundle" / "LICENSE-Apache-2.0.txt"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}"


def _results_table(metrics: dict[str, Any]) -> list[str]:
    dice, nsd = metrics.get("per_organ_dice", {}), metrics.get("per_organ_nsd", {})
    tol = metrics.get("nsd_tolerance_mm", {})
    rows = ["| organ | Dice (%) | NSD (%) | NSD tolerance (mm) |", "|---|---:|---:|---:|"]
    for organ in dice:
        rows.append(f"| {organ} | {_pct(dice[organ])} | {_pct(nsd.get(organ))} | {tol.get(organ, 'n/a')} |")
    rows.append(f"| **mean** | **{_pct(metrics.get('mean_dice'))}** | **{_pct(metrics.get('mean_nsd'))}** | |")
    return rows


def readme(meta: dict[str, Any], task: TaskSpec, inference: EvalConfig, n_params: int, meta_target: str) -> str:
    """The bundle's README: task, labels, model, preprocessing, data, results, how to run.
    ``meta_target``: the ``_target_`` of the bundle's network."""
    a = meta["alice3d"]
    ts_note = ("scripted" if a["torchscript"] == "scripted" else
               f"traced at input shape {a['torchscript_input_shape']}; a traced network only accepts that size, "
               "which is what the sliding-window inferer feeds it")
    metrics = meta.get("eval_metrics") or {}
    packages = ", ".join(f"`{p}`" for p in meta["required_packages_version"])
    lines = [
        f"# {meta['name']}",
        "",
        f"{meta['description']}",
        "",
        f"**Intended use.** {meta['intended_use']}",
        "",
        "## Task and labels",
        "",
        f"{meta['task']}.",
        "",
        "| label id | name |",
        "|---:|---|",
        *[f"| {k} | {v} |" for k, v in sorted(task.labels.items())],
        "",
        "## Model",
        "",
        f"- network: {NETWORK_TITLES[a['network']['name']]} (`{meta_target}`, {n_params / 1e6:.2f}M parameters), "
        "built by `network_def` in `configs/inference.json`",
        f"- weights: `models/model.pt` (a plain state dict of that network, best validation step {a['best_step']})",
        f"- TorchScript: `models/model.ts` ({ts_note}); `metadata.json` and `inference.json` are embedded in it",
        f"- initialisation: {'pretrained encoder ' + a['pretrained'] if a['pretrained'] else 'random'}",
        "",
        "## Preprocessing and inference",
        "",
        f"- input: one {task.modality} volume in Hounsfield units (NIfTI), any orientation and voxel spacing",
        f"- preprocessing: {preprocessing_text(task)}",
        f"- sliding-window inference with ROI {list(task.roi)} voxels, overlap {inference.sw_overlap}, "
        f"{inference.sw_mode} blending, {inference.sw_batch_size} windows per batch",
        "- post-processing: argmax over the channels, then every preprocessing step inverted (nearest neighbour), "
        "so the written label map has the input file's shape and affine",
        "- output: `<output_dir>/<input name>_seg.nii.gz`, "
        f"{meta['network_data_format']['post_processed_outputs']['pred']['dtype']} label ids",
        "",
        "## Training data",
        "",
        f"{meta['data_source']}.",
        "",
        "## Validation results",
        "",
    ]
    if metrics:
        lines += [f"{metrics.get('n_validation_cases')} validation case(s) of the fine-tuning run, "
                  "computed on the task grid:", "", *_results_table(metrics), ""]
    else:
        lines += ["The run directory had no results.json; no validation results recorded.", ""]
    lines += [
        "## How to run",
        "",
        f"Requirements: `torch`, `monai`, {packages} (versions in `configs/metadata.json`); alice3d is not "
        "needed. From the bundle folder:",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
        "    --dataset_dir /path/to/ct_folder --output_dir ./eval",
        "# one file instead of a folder:",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
        "    --datalist \"['/path/to/ct.nii.gz']\" --output_dir ./eval",
        "# check the metadata (offline, against the schema shipped in docs/) and the network's input/output:",
        "python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/meta_schema.json",
        "python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\",
        "    --config_file configs/inference.json",
        "```",
        "",
        "`--device cpu` forces the CPU. `verify_metadata` needs the `jsonschema` package. Run the commands from "
        "the bundle folder: nnFormer bundles import their network from `scripts/`.",
        "",
        "In Python, the TorchScript model needs only torch:",
        "",
        "```python",
        "import torch",
        "net = torch.jit.load('models/model.ts').eval()",
        f"logits = net(torch.rand(1, {task.in_channels}, {', '.join(str(r) for r in task.roi)}))"
        f"  # (1, {task.num_classes}, {', '.join(str(r) for r in task.roi)})",
        "```",
        "",
        "## References",
        "",
        *[f"- {r}" for r in meta["references"]],
        "",
        "## License",
        "",
        "Apache License 2.0 (see `LICENSE`). The weights were trained on the data named above; its own terms apply "
        "to any use of the model.",
        "",
    ]
    return "\n".join(lines)


def license_text(copyright_line: str) -> str:
    return (f"{copyright_line}\n\nThe files of this bundle (configs, weights, scripts, documentation) are licensed "
            "under the Apache License, Version 2.0, reproduced below.\n\n" + LICENSE_TEXT.read_text())
