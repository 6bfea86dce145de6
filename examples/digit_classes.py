"""The conditional quickstart's classifier figure: how many samples look like the digit they were drawn as.

    python train.py --config=configs/quickstart_cond.py --workdir=out/quickstart_cond
    python sample.py --workdir=out/quickstart_cond --out=out/quickstart_cond/w1 --class_label=all \\
        --guidance=1 --num_samples=1000
    python examples/digit_classes.py out/quickstart_cond/w1/samples.npz

The judge is an SVM (RBF kernel, C = 10) trained on the 1,500 real training digits (pixels in
[0, 1]); its accuracy on the 297 held-out ones is printed beside the figure, which is the share
of the samples (``arr_0`` of sample.py's samples.npz) that it takes for their ``labels``.
"""

from __future__ import annotations

import argparse

import numpy as np

from diffusion_jax import input_pipeline


def digit_classifier():
    """The SVM fitted on the real training digits at the quickstart's 16x16, and its accuracy on the
    held-out ones."""
    from sklearn.svm import SVC

    train, test = (input_pipeline.load_examples("digits", split, image_size=16)
                   for split in ("train", "test"))
    classifier = SVC(C=10, gamma="scale")
    classifier.fit(train.images.reshape(len(train.images), -1) / 255.0, train.labels)
    return classifier, classifier.score(test.images.reshape(len(test.images), -1) / 255.0, test.labels)


def recognised(classifier, samples) -> float:
    """The share of the samples in the .npz ``samples`` that ``classifier`` takes for their labels."""
    with np.load(samples) as f:
        if "labels" not in f:
            raise SystemExit(f"error: {samples} has no labels: sample a class-conditional model with "
                             "sample.py --class_label=all (or =K)")
        images, labels = f["arr_0"], f["labels"]
    return float(np.mean(classifier.predict(images.reshape(len(images), -1) / 255.0) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="sample.py's samples.npz of the conditional quickstart")
    args = parser.parse_args()
    classifier, accuracy = digit_classifier()
    print(f"{recognised(classifier, args.samples):.1%} of the samples are recognised as the digit they were "
          f"drawn as (an SVM on the real training digits, {accuracy:.1%} right on the 297 held-out ones)")


if __name__ == "__main__":
    main()
