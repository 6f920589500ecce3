"""``duo-convert``: official checkpoints in (``official``) and out (``to-official``); see
docs/published-checkpoints.md."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from duo_plugin.errors import user_errors

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="duo-convert", description="Convert official Duo / MDLM / AR checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("official", help="official .ckpt or HF-export folder -> duo model folder")
    o.add_argument("src", help="Lightning .ckpt file or HF-export folder (config.json + model.safetensors)")
    o.add_argument("out", help="output duo model folder")
    o.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help=".ckpt: ema = ema.shadow_params (default, what the official evaluation uses), raw = state_dict")
    o.add_argument("--tokenizer", default=None,
                   help="local tokenizer (dir or file: tokenizer.json, vocab.json + merges.txt, vocab.txt); default: "
                        "the tokenizer stored in the .ckpt, if any")
    o.add_argument("--no-embedded-tokenizer", action="store_true", help="do not use the tokenizer stored in the .ckpt")
    o.add_argument("--kind", choices=("duo", "mdlm", "ar"), default=None,
                   help="override the kind read from the checkpoint's config")
    o.add_argument("--mask-id", type=int, default=None, help="override the MDLM/AR [MASK] id")
    o.add_argument("--max-seq-len", type=int, default=None, help="override the model length")
    o.add_argument("--n-heads", type=int, default=None, help="override the number of heads")
    o.add_argument("--time-conditioning", choices=("on", "off"), default=None,
                   help="override the time conditioning read from the config")
    t = sub.add_parser("to-official", help="duo DiT model folder -> official HF-export layout")
    t.add_argument("src", help="duo model folder")
    t.add_argument("out", help="output folder (config.json + model.safetensors)")
    t.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights of the folder to export")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    with user_errors("duo-convert"):
        from duo_plugin.convert.official import convert_official, to_official

        t0 = time.perf_counter()
        if args.cmd == "official":
            overrides = {k: v for k, v in (("mask_id", args.mask_id), ("max_seq_len", args.max_seq_len),
                                           ("n_heads", args.n_heads)) if v is not None}
            if args.time_conditioning is not None:
                overrides["time_conditioning"] = args.time_conditioning == "on"
            out = convert_official(args.src, args.out, weights=args.weights, tokenizer=args.tokenizer,
                                   kind=args.kind, overrides=overrides,
                                   embedded_tokenizer=not args.no_embedded_tokenizer)
        else:
            out = to_official(args.src, args.out, weights=args.weights)
        print(f"duo-convert: wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
