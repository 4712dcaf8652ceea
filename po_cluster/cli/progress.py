"""A progress bar for training steps that shows the objective as it goes."""
from __future__ import annotations

from tqdm import tqdm


class StepBar:
    def __init__(self, total: int, name: str) -> None:
        self.total, self.name = total, name

    def __enter__(self) -> StepBar:
        self.bar = tqdm(total=self.total, desc=self.name, unit="step", dynamic_ncols=True, leave=True)
        return self

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(step - self.bar.n)
        if step % 5 == 0 or step == self.total:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "kl", "reward_accuracy")})

    def __exit__(self, *exc) -> None:
        self.bar.close()


class RunBars:
    """One StepBar per run, for a callback that trains several runs in turn (compare_losses's)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.bar: StepBar | None = None

    def __enter__(self) -> RunBars:
        return self

    def __call__(self, run, step: int, metrics: dict[str, float]) -> None:  # run: a RunConfig
        if self.bar is None or run.name != self.name:
            self.close()
            self.name, self.bar = run.name, StepBar(run.training.steps, run.name).__enter__()
        self.bar.update(step, metrics)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.name, self.bar = None, None

    def __exit__(self, *exc) -> None:
        self.close()
