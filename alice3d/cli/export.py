"""``alice3d-export``: write the MONAI bundle of a fine-tuning run.

    alice3d-export --run FINETUNE_RUN --out BUNDLE_DIR [--force] [--name N] [--version V]
                   [--authors A] [--copyright C]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from alice3d.bundle.export import export_bundle
from alice3d.bundle.metadata import BundleInfo
from alice3d.cli.common import run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    d = BundleInfo()
    p = argparse.ArgumentParser(
        prog="alice3d-export",
        description="Export a fine-tuning run (alice3d-finetune --out RUN) as a MONAI bundle that runs without "
                    "alice3d (torch, monai, fire, nibabel; UNETR/Swin UNETR also einops, as MONAI's networks need "
                    "it): configs/metadata.json, configs/inference.json, models/model.pt, models/model.ts, "
                    "docs/README.md, LICENSE (nnFormer: scripts/nnformer.py).",
    )
    p.add_argument("--run", type=Path, required=True, help="fine-tuning run directory (holding best.pt)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true",
                   help="replace the bundle files (configs, models, docs, scripts, LICENSE) of a non-empty --out")
    p.add_argument("--name", default=d.name, help="bundle name in metadata.json (default: from task and network)")
    p.add_argument("--version", default=d.version, help=f"bundle version, MAJOR.MINOR.PATCH (default {d.version})")
    p.add_argument("--authors", default=d.authors, help=f"metadata authors (default {d.authors!r})")
    p.add_argument("--copyright", default=d.copyright, help=f"metadata copyright (default {d.copyright!r})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def export_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    info = BundleInfo(name=args.name, version=args.version, authors=args.authors, copyright=args.copyright)
    result = export_bundle(args.run, args.out, force=args.force, info=info)  # ExportError: run_main prints it
    checked = "validated against docs/meta_schema.json" if result.metadata_validated else \
        "not validated (install jsonschema to check it)"
    print(f"bundle written to {result.bundle}: {result.network}, TorchScript {result.torchscript}, metadata {checked}")
    print(f"run it: cd {result.bundle} && python -m monai.bundle run --config_file configs/inference.json "
          "--bundle_root . --dataset_dir CT_FOLDER --output_dir OUT")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_main(lambda: export_main(argv))


if __name__ == "__main__":
    main()
