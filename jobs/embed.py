"""Batch-embed images with a release on Ray Data; resumable (finished shards are skipped).

    ray job submit --working-dir . -- python jobs/embed.py \
        --input s3://bucket/images/ --output s3://bucket/embeddings/ --store s3://bucket/artifacts --t 1

Same flags as `po-cluster embed` (po_cluster/cli/embed.py); connects to the cluster of $RAY_ADDRESS.
"""
import argparse
import sys

from po_cluster.cli.embed import add_arguments, config_from_args, print_shard


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    cfg = config_from_args(args)

    import ray

    from po_cluster.embed.job import run_embed

    ray.init(address=args.address)  # None: $RAY_ADDRESS, as set by `ray job submit`
    summary = run_embed(cfg, on_shard=print_shard)
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
