"""`python -m export CKPT --out DIR`: ONNX + checks + variants + card (+ BentoML model store)."""

import argparse
import logging
import sys

from export.checks import CheckFailed
from export.exporter import ExportOptions, export_checkpoint
from training.data import DataNotFoundError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a NiN checkpoint to ONNX, check it, write its card.")
    p.add_argument("checkpoint", help="a .pt checkpoint written by `python -m training`")
    p.add_argument("--out", required=True, help="destination folder (replaced only if every check passes)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: search as training does)")
    p.add_argument("--limit", type=int, default=None, help="test images for parity/accuracy (default: all 10,000)")
    p.add_argument("--calibration-images", type=int, default=512, help="training images for int8 calibration (default: 512)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 variant")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 variant")
    p.add_argument("--no-register", action="store_true", help="do not add the model to BentoML's model store")
    p.add_argument("--no-timing", action="store_true", help="skip the CPU speed measurements")
    p.add_argument("--hardware", default=None,
                   help="where the checkpoint was trained, for checkpoints that do not record it")
    p.add_argument("--name", default="nin-fashion-mnist", help="BentoML model name (default: nin-fashion-mnist)")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = get_args_parser().parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        print(f"error: --limit must be positive, got {args.limit}", file=sys.stderr)
        return 2
    opts = ExportOptions(data_dir=args.data_dir, limit=args.limit, int8=not args.no_int8, fp16=not args.no_fp16,
                         calibration_images=args.calibration_images, register=not args.no_register,
                         name=args.name, timing=not args.no_timing, hardware=args.hardware)
    try:
        card = export_checkpoint(args.checkpoint, args.out, opts)
    except CheckFailed as e:
        print(f"error: check failed, nothing written to {args.out}: {e}", file=sys.stderr)
        return 1
    except (DataNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: test accuracy {card['test_accuracy']:.4f} on {card['test_images']:,} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
