"""Pretrain the tiny base model on the typo-shapes world and write it with its card.

    python jobs/pretrain_base.py --out po_cluster/assets/typo_shapes_base [--steps N]
"""
import argparse

from po_cluster.model.base_model import write_base_model
from po_cluster.model.pretrain import PretrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="po_cluster/assets/typo_shapes_base")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    args = parser.parse_args()
    card = write_base_model(PretrainConfig(steps=args.steps, seed=args.seed), args.out)
    print({key: card[key] for key in ("sha256", "metrics")})


if __name__ == "__main__":
    main()
