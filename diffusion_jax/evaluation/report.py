"""The evaluation protocol in one place: FID and IS of a sample set against a reference, and the NLL's report.

FID: Inception pool features of pytorch-fid's network (the TF 2015-12-05
graph) for the samples and for every image of the reference split (CIFAR-10: all 50,000
training images), statistics in float64, the reference's cached as .npz. IS: 10 splits of
the samples' 1008-way softmax. The papers report both on 50,000 samples.
"""

from __future__ import annotations

import jax
import numpy as np

from diffusion_jax import image_io, storage
from diffusion_jax.evaluation import fid, inception, likelihood
from diffusion_jax.progress import Progress, console


def default_reference_path(dataset: str, split: str, image_size: int) -> str:
    """The statistics cache of a dataset's split, in the user's local cache (``inception.DEFAULT_DIR``)."""
    return str(storage.path(inception.DEFAULT_DIR) / "fid_stats" / f"{dataset}_{split}_{image_size}.npz")


class InceptionScorer:
    """FID and IS of samples: the Inception network and the reference statistics, loaded once."""

    def __init__(self, data, *, reference_stats: str | None = None, inception_weights: str | None = None):
        """``data``: a config's ``data`` section (name, train_split, image_size, data_dir) naming the
        reference."""
        self.extractor = inception.Extractor(inception.load_params(inception.weights_path(inception_weights)))
        path = reference_stats or default_reference_path(data.name, data.train_split, data.image_size)
        self.reference_path = path
        self._data = data
        self._reference = None

    @property
    def reference(self) -> fid.Statistics:
        if self._reference is None:
            d = self._data
            if not storage.path(self.reference_path).exists():
                console(f"computing the FID statistics of {d.name}/{d.train_split} once; cached at "
                        f"{self.reference_path}")
            self._reference = fid.reference_statistics(d.name, d.train_split, d.image_size, d.data_dir,
                                                       self.extractor, self.reference_path)
        return self._reference

    def fid_and_is(self, images: np.ndarray) -> dict:
        """FID against the reference and IS (mean, std over 10 splits) of uint8 NHWC ``images``."""
        fid.check_samples(images, "samples")
        pool, logits = self.extractor(images, Progress("Inception features of the samples"))
        ref = self.reference
        stats = fid.statistics(pool)
        is_mean, is_std = fid.inception_score(logits, splits=10)
        return {"fid": fid.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma),
                "inception_score": is_mean, "inception_score_std": is_std, "num_samples": int(len(images)),
                "reference": self.reference_path}


def write_json(path, values: dict) -> None:
    """``values`` as JSON at ``path`` (any filesystem of ``storage``), from process 0."""
    if jax.process_index() == 0:
        storage.write_json(storage.path(path), values)


def print_fid(values: dict, prefix: str = "") -> None:
    console(f"{prefix}FID {values['fid']:.3f}  IS {values['inception_score']:.3f} +- "
            f"{values['inception_score_std']:.3f}  ({values['num_samples']} samples; reference "
            f"{values['reference']})")


def print_nll(result: likelihood.Likelihood, split: str) -> None:
    console(f"NLL {result.mean:.4f} +- {result.stderr:.4f} bits/dim (bound, standard error) over "
            f"{len(result.bpd)} images of the {split} split; prior {result.prior:.2e}, decoder "
            f"{result.terms[0]:.4f} bits/dim")


def write_guidance_sweep(rows: list[dict], out, settings: dict) -> None:
    """The FID and IS of each guidance scale (``rows`` of ``guidance`` and
    :meth:`InceptionScorer.fid_and_is`'s values) as ``out/guidance_sweep.json``, a Markdown table
    ``.md`` and a plot ``.png``, from process 0."""
    if jax.process_index() != 0:
        return
    out = storage.path(out)
    storage.write_json(out / "guidance_sweep.json", dict(settings, rows=rows))
    lines = ["| guidance w | FID | IS | samples |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['guidance']:g} | {r['fid']:.3f} | {r['inception_score']:.3f} +- "
              f"{r['inception_score_std']:.3f} | {r['num_samples']} |" for r in rows]
    storage.write_bytes(out / "guidance_sweep.md", ("\n".join(lines) + "\n").encode())
    w, fid_, is_ = ([r[k] for r in rows] for k in ("guidance", "fid", "inception_score"))
    image_io.save_plots([image_io.Panel(w, fid_, "guidance scale w", "FID", marker="o"),
                         image_io.Panel(w, is_, "guidance scale w", "Inception score", marker="o"),
                         image_io.Panel(is_, fid_, "Inception score", "FID", marker="o")],
                        f"classifier-free guidance: FID and IS of {rows[0]['num_samples']} samples at each w",
                        out / "guidance_sweep.png")
