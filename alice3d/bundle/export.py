"""``alice3d-export``: a fine-tuning run -> a MONAI bundle that runs with MONAI alone.

Bundle layout::

    BUNDLE/configs/metadata.json     MONAI metadata (versions, network_data_format, metrics)
    BUNDLE/configs/inference.json    MONAI-native preprocessing, sliding window, inversion, SaveImaged
    BUNDLE/configs/logging.conf
    BUNDLE/models/model.pt           state dict of configs/inference.json#network_def
    BUNDLE/models/model.ts           TorchScript (scripted, or traced at the task ROI)
    BUNDLE/docs/README.md            task, labels, preprocessing, data, per-organ results, how to run
    BUNDLE/docs/meta_schema.json     the schema verify_metadata checks against, offline
    BUNDLE/LICENSE
    BUNDLE/scripts/nnformer.py       nnFormer bundles only: the network, torch-only

The bundle is assembled in a temporary folder next to ``BUNDLE`` and moved into place at
the end, so a failed export leaves ``BUNDLE`` as it was.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.data import save_net_with_metadata

from alice3d.bundle.docs import license_text, readme
from alice3d.bundle.errors import ExportError
from alice3d.bundle.inference_config import check_mirrors_finetune, inference_config
from alice3d.bundle.metadata import SCHEMA_PATH, BundleInfo, bundle_metadata, validate_metadata
from alice3d.bundle.network import (
    NNFORMER_SOURCE,
    build_inference_network,
    inference_state_dict,
    needs_scripts,
    network_def,
    network_output,
    to_torchscript,
)
from alice3d.bundle.source import ExportSource, load_source
from alice3d.finetune.models import count_parameters
from alice3d.train.checkpoint import atomic_save

log = logging.getLogger("alice3d.bundle")

# What an export writes at the top of BUNDLE; --force replaces exactly these.
BUNDLE_ENTRIES = ("configs", "models", "docs", "scripts", "LICENSE")

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


@dataclass
class ExportResult:
    bundle: Path
    network: str
    torchscript: str  # "scripted" | "traced"
    metadata_validated: bool  # False when jsonschema is not installed
    files: list[str] = field(default_factory=list)


def check_output_dir(out: Path, run: Path, force: bool) -> None:
    """Refuse outputs that would overwrite something that is not ours to replace."""
    out_r, run_r = out.resolve(), run.resolve()
    if out_r == run_r or out_r in run_r.parents:
        raise ExportError(f"--out {out} would contain the run directory {run}; choose a folder outside the run")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty; choose a new folder, or pass --force to replace the bundle "
                          f"files in it ({', '.join(BUNDLE_ENTRIES)}; nothing else is touched)")


def _example_input(task) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, task.in_channels, *[int(r) for r in task.roi], generator=g)


def _check_close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    if got.shape != want.shape:
        raise ExportError(f"{name}: output shape {tuple(got.shape)} differs from the run network's {tuple(want.shape)}")
    err = float((got - want).abs().max())
    tol = rel * (1.0 + float(want.abs().max()))
    if not err <= tol:
        raise ExportError(f"{name}: output differs from the run network's by {err:.3g} (tolerance {tol:.3g})")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4) + "\n")


def _assemble(src: ExportSource, tmp: Path, info: BundleInfo) -> ExportResult:
    task, spec = src.loaded.task, src.loaded.spec
    sd = inference_state_dict(src.state_dict, spec)
    net = build_inference_network(spec, sd)
    x = _example_input(task)
    want = network_output(src.loaded.network, x)
    # The TorchScript is made from the bundle network (network_def + model.pt), so matching the
    # run's network checks both.
    ts, how = to_torchscript(net, x)
    _check_close(f"bundle network and its TorchScript ({how})", network_output(ts, x), want, 1e-4)
    log.info("network %s: TorchScript %s at input %s", spec["name"], how, list(x.shape))

    pretrained = str(src.loaded.metadata.get("pretrained") or "")
    meta = bundle_metadata(task, spec, info, run=src.run, step=src.step, results=src.results, config=src.config,
                           pretrained=pretrained, pretrained_method=src.pretrained_method, torchscript=how)
    validated = validate_metadata(meta)
    net_def = network_def(spec)
    config = inference_config(task, net_def, src.loaded.inference)

    _write_json(tmp / "configs" / "metadata.json", meta)
    _write_json(tmp / "configs" / "inference.json", config)
    (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF)
    atomic_save(sd, tmp / "models" / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.save: see to_torchscript
        save_net_with_metadata(ts, str(tmp / "models" / "model.ts"), include_config_vals=False, meta_values=meta,
                               more_extra_files={"inference.json": json.dumps(config).encode()})
    (tmp / "docs").mkdir(parents=True, exist_ok=True)
    (tmp / "docs" / "README.md").write_text(readme(meta, task, src.loaded.inference, count_parameters(net),
                                                   net_def["_target_"]))
    shutil.copyfile(SCHEMA_PATH, tmp / "docs" / "meta_schema.json")
    (tmp / "LICENSE").write_text(license_text(info.copyright))
    if needs_scripts(spec):
        (tmp / "scripts").mkdir()
        (tmp / "scripts" / "__init__.py").write_text("")
        shutil.copyfile(NNFORMER_SOURCE, tmp / "scripts" / "nnformer.py")
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return ExportResult(bundle=tmp, network=spec["name"], torchscript=how, metadata_validated=validated, files=files)


def export_bundle(run: str | Path, out: str | Path, force: bool = False,
                  info: BundleInfo | None = None) -> ExportResult:
    """Write the MONAI bundle of fine-tuning run ``run`` into ``out`` (see the module docstring)."""
    run, out = Path(run), Path(out)
    info = info or BundleInfo()
    if not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", info.version):
        raise ExportError(f"--version {info.version!r}: expected MAJOR.MINOR.PATCH, e.g. 0.1.0")
    src = load_source(run)
    check_mirrors_finetune(src.loaded.task)
    check_output_dir(out, run, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = _assemble(src, tmp, info)
        out.mkdir(exist_ok=True)
        for entry in BUNDLE_ENTRIES:
            old = out / entry
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        for entry in tmp.iterdir():
            entry.replace(out / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.bundle = out
    log.info("bundle written to %s (%d files)", out, len(result.files))
    return result
