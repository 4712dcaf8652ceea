"""MLflow experiment tracking of sweeps, averages and training runs.

- `client`: the tracker of one config (its URI, experiment and client), opened after a short
  reachability probe; tracking that cannot be reached is said once and switched off, never raised;
- `sweep`: the sweep's parent run, Ray Tune's MLflow logger for the trial runs (children of it),
  and what `average` and `report` add to the parent run (artifacts, the registered release);
- `training`: one run of `po-cluster train`.

mlflow is imported on first use: importing this package imports neither mlflow nor Ray.
"""
