"""`python -m po_cluster.cli`: the same as the `po-cluster` script."""
import sys

from po_cluster.cli import main

sys.exit(main())
