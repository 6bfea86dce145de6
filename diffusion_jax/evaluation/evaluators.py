"""What a training run measures while it runs, behind one protocol.

An evaluator has a period ``every`` (in steps; the last step of the run always counts) and
``run(params, rng)``, which returns ``{name: value}``: a number is a scalar (TensorBoard and
the console), a uint8 [H, W, C] array an image (TensorBoard, and a PNG under
``WORKDIR/samples``); ``line(values)`` is its console line. Evaluators take the functions they
need (``generate(params, num, rng, index)`` of ``sample_lib.Generator``, a likelihood
evaluator) rather than a config, so that they depend on neither the trainer nor the config.
The model of big_vision's evaluators: the loop knows only the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from diffusion_jax import image_io
from diffusion_jax.evaluation import likelihood
from diffusion_jax.evaluation.sliced_wasserstein import pixel_distance
from diffusion_jax.progress import Progress


class Evaluator(Protocol):
    every: int

    def run(self, params, rng) -> dict: ...

    def line(self, values: dict) -> str | None: ...


class SampleGrid:
    """A grid of ``num`` samples, as ``samples/step_STEP.png`` and the TensorBoard image ``samples``, in
    ``columns`` columns (None: a square); a class-conditional model's, one class per column."""

    def __init__(self, every: int, generate: Callable, num: int, columns: int | None = None):
        self.every, self.generate, self.num, self.columns = every, generate, num, columns

    def run(self, params, rng) -> dict:
        return {"samples": image_io.grid(self.generate(params, self.num, rng), columns=self.columns, scale=2)}

    def line(self, values: dict) -> None:
        return None


class FidIs:
    """FID and IS of ``num`` samples against the reference statistics of ``scorer``
    (``report.InceptionScorer``)."""

    def __init__(self, every: int, generate: Callable, scorer, num: int, batch_size: int):
        self.every, self.generate, self.scorer, self.num, self.batch_size = (every, generate, scorer, num,
                                                                             batch_size)

    def run(self, params, rng) -> dict:
        batches, progress = [], Progress("samples for FID")
        for i in range(-(-self.num // self.batch_size)):
            batches.append(self.generate(params, self.batch_size, rng, i))
            progress(min((i + 1) * self.batch_size, self.num), self.num)
        scores = self.scorer.fid_and_is(np.concatenate(batches)[:self.num])
        return {"eval/fid": scores["fid"], "eval/inception_score": scores["inception_score"]}

    def line(self, values: dict) -> str:
        return f"FID {values['eval/fid']:.4f}  IS {values['eval/inception_score']:.4f} ({self.num} samples)"


class Nll:
    """The NLL bound (bits/dim) of held-out ``images`` (uint8 NHWC) by a ``likelihood.Bound``."""

    def __init__(self, every: int, bound: likelihood.Bound, images: np.ndarray):
        self.every, self.bound, self.images = every, bound, images

    def run(self, params, rng) -> dict:
        return {"eval/nll_bpd": self.bound(params, self.images, rng).mean}

    def line(self, values: dict) -> str:
        return f"NLL {values['eval/nll_bpd']:.4f} bits/dim ({len(self.images)} held-out images)"


class SlicedWasserstein:
    """The quickstart's quality figure: the pixel-space sliced Wasserstein distance to ``num`` held-out
    images of the model's samples, against two references: training images (the floor) and the
    untrained network's samples (the ceiling); and a grid of the samples, ``samples/final.png``."""

    def __init__(self, every: int, generate: Callable, train_images: np.ndarray, heldout: np.ndarray,
                 num: int, initial_params: Callable):
        """``initial_params()``: the untrained network's parameters (called when the figure is made)."""
        self.every, self.generate, self.num, self.initial_params = every, generate, num, initial_params
        self.heldout = heldout[:num]
        self.floor_set = train_images[np.random.default_rng(0).choice(len(train_images), num, replace=False)]

    def run(self, params, rng) -> dict:
        samples = self.generate(params, self.num, rng)
        untrained = self.generate(self.initial_params(), self.num, rng)
        values = {f"swd/{name}": pixel_distance(x, self.heldout)
                  for name, x in (("real_vs_real", self.floor_set), ("ema_model", samples),
                                  ("untrained_model", untrained))}
        values["final"] = image_io.grid(samples[:64], scale=2)
        return values

    def line(self, values: dict) -> str:
        return (f"sliced Wasserstein distance to {self.num} held-out images (pixel space, lower is better): "
                f"real images {values['swd/real_vs_real']:.4f} (floor) | "
                f"trained model {values['swd/ema_model']:.4f} | "
                f"untrained model {values['swd/untrained_model']:.4f}")
