"""Pretrain the tiny base model on the typo-shapes world and write it with its card.

    python jobs/pretrain_base.py --out po_cluster/assets/typo_shapes_base [--steps N] [--seed S]
"""
import argparse

from po_cluster.config import ConfigError, parse_config
from po_cluster.model.base_model import write_base_model
from po_cluster.model.pretrain import PretrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="po_cluster/assets/typo_shapes_base")
    defaults = PretrainConfig()
    parser.add_argument("--steps", type=int, help=f"default {defaults.steps}")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    args = parser.parse_args()
    # Only the flags given override the defaults; the config validates them (bounds and all).
    flags = {key: getattr(args, key) for key in ("steps", "seed") if getattr(args, key) is not None}
    try:
        cfg = parse_config(flags, "command line", PretrainConfig)
    except ConfigError as error:
        parser.error(str(error))
    card = write_base_model(cfg, args.out)
    print({key: card[key] for key in ("sha256", "metrics")})


if __name__ == "__main__":
    main()
