"""The sign convention, on a case whose answer is known.

A model overfit to 16 training images: each image, as a query, must have itself as its top
proponent (largest positive τ) for at least 15 of the 16; the same images saved as PNG files and
read back (pixel duplicates, as a user would upload them) must behave the same.

Measured while choosing the settings: the draw counts and how far the model is overfit matter,
the damping (1e-8 … 1e-3) and the curvature's draws (4 or 16) do not. With 32 training / 64
query draws, 300 steps at lr 5e-3 gave 16, 15 and 14 of 16 for draw seeds 0, 1, 2 (losing the
near-duplicate pair of 1s, rows 11 and 12 at pixel distance 0.8 where every other pair is ≥ 1.5,
and a query to a training image with a large preconditioned gradient, a proponent of many
queries); at lr 1e-2 with 128 / 256 draws, both methods got 16 of 16 for seeds 0 … 5.
"""

from __future__ import annotations

import pytest
import torch

from attribution.data import image_folder, mnist, save_images
from attribution.influence import AttributionConfig, Attributor
from attribution.model import build_model
from attribution.train import TrainConfig, train

N = 16
DRAWS, QUERY_DRAWS = 128, 256
TRAIN = TrainConfig(
    steps=300, batch_size=N, lr=1e-2, warmup=20, ema_decay=0.9, seed=0, checkpoint_every=10**9
)


@pytest.fixture(scope="module")
def overfit():
    ds = mnist(size=8, n=N)
    model = train(build_model("tiny", seed=0), ds.images, TRAIN, progress=False)
    return model, ds


@pytest.fixture(scope="module")
def queries(overfit, tmp_path_factory):
    """Query features ψ of the training images and of their PNG round trips (method-independent)."""
    model, ds = overfit
    folder = tmp_path_factory.mktemp("queries")
    save_images(ds.images, folder)
    copies = image_folder(folder, channels=1, size=8).images
    assert torch.equal(copies, ds.images)  # pixel duplicates
    att = Attributor(
        model,
        ds,
        AttributionConfig(method="gradsim", dim=None, draws=DRAWS, query_draws=QUERY_DRAWS, importance=False),
        progress=False,
    )
    return att.query_features(ds.images), att.query_features(copies)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_training_images_are_their_own_top_proponents(overfit, queries, method):
    model, ds = overfit
    # importance=False: a shared ψ needs draws that do not depend on the method's density
    att = Attributor(
        model,
        ds,
        AttributionConfig(method=method, dim=None, draws=DRAWS, query_draws=QUERY_DRAWS, importance=False),
        progress=False,
    ).fit()
    phi = att.train_features()
    for label, psi in zip(("training images", "PNG copies"), queries):
        scores = psi @ phi.T  # what att.scores(images) computes, with ψ shared between methods
        top = scores.argmax(1)
        hits = (top == torch.arange(N)).sum().item()
        others = scores.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf")).max(1).values
        margin = ((scores.diag() - others) / scores.abs().max(1).values).min().item()
        print(
            f"{method}, {label}: {hits}/{N} own top proponent; "
            f"worst (self − best other) / max |τ| = {margin:+.3f}"
        )
        assert hits >= N - 1, f"{method}, {label}: top proponents {top.tolist()}"
        assert (scores.max(1).values[top == torch.arange(N)] > 0).all()  # proponent: τ > 0
    assert torch.equal(queries[0], queries[1])
    # the shared ψ is what the public path uses
    torch.testing.assert_close(att.scores(ds.images[:2], train_features=phi), queries[0][:2] @ phi.T)
