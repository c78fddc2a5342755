"""``alice3d-pretrain``: self-supervised pretraining (Alice and the MIM family).

    alice3d-pretrain --out runs/alice                      # embedded default: tiny Alice on phantoms, CPU
    alice3d-pretrain --config configs/pretrain/alice_vit_b.yaml --data my_ct/ --landmark lm/landmark.pt --out runs/a
    torchrun --nproc_per_node 8 -m alice3d.cli.pretrain --config ... --out runs/a

Writes RUN/config.yaml, RUN/metrics.jsonl, RUN/checkpoints/last.pt, RUN/encoder.pt, RUN/previews/*.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alice3d.cli.common import (
    add_config_args,
    prepare_run_dir,
    resolve_config,
    run_main,
    setup_logging,
    write_resolved_config,
)
from alice3d.pretrain.config import PretrainConfig
from alice3d.pretrain.run import pretrain

log = logging.getLogger("alice3d.pretrain")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alice3d-pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="datalist JSON or folder of volumes (default: phantom cohort)")
    p.add_argument("--landmark", default=None, help="landmark model (RUN/landmark.pt) for Alice's pairs")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_args(p, PretrainConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come before or after flags
    setup_logging(args.verbose)

    def body() -> int:
        cfg = resolve_config(PretrainConfig, args)
        if args.data is not None:
            cfg.data.data = str(args.data)
        if args.landmark is not None:
            cfg.landmark = str(args.landmark)
        out = prepare_run_dir(args.out, args.resume)
        if not args.resume:
            write_resolved_config(cfg, out)
        summary = pretrain(cfg, out, resume=args.resume)
        result = summary.result
        if result.interrupted:
            log.warning("stopped at step %d; continue with the same command plus --resume", result.step)
            return 3
        log.info("done: %d steps, final loss %.4f; outputs in %s", result.step,
                 result.last_metrics.get("loss", float("nan")), out)
        if summary.report.bad:
            log.warning("%d bad volume(s) were left out of this run (data.on_bad_data=skip):\n  %s",
                        len(summary.report.bad), "\n  ".join(f"{p}: {r}" for p, r in summary.report.bad))
        return 0

    run_main(body)


if __name__ == "__main__":
    main()
