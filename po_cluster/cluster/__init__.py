"""The Ray Train worker and the Ray Tune trial around the training loop.

po_cluster/train is the plain-torch library (the loop, its batches, BMA, precision, state, the
one entry `train.run.train`); this package is what runs it on Ray: the entry functions Ray calls
(`entry`), the sessions that report to Train or Tune (`session`), the sweep's shared inputs and
π_ref cache computed in Ray tasks (`shared`, `ref_cache`), and the Ray Data streams (`stream`).
"""
