"""Training (resumable, bitwise), model folders (save/load) and sampling, on the 'tiny' preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from attribution.data import mnist
from attribution.model import PRESETS, ModelError, build_model, load_model, save_model, weights_sha256
from attribution.sample import sample
from attribution.train import TrainConfig, batch_rows, step_draws, train

CFG = TrainConfig(steps=12, batch_size=16, checkpoint_every=4, warmup=3)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return mnist(size=8, n=64).images


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The uninterrupted 12-step run (EMA model, its workdir)."""
    wd = tmp_path_factory.mktemp("full")
    return train(build_model("tiny", seed=0), data, CFG, workdir=wd, progress=False), wd


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- training


def test_draws_are_deterministic():
    rows = batch_rows(5, 64, CFG)
    assert torch.equal(rows, batch_rows(5, 64, CFG))
    assert len(rows) == 16
    # one epoch covers every row once
    assert sorted(torch.cat([batch_rows(s, 64, CFG) for s in range(4)]).tolist()) == list(range(64))
    t1, e1 = step_draws(3, 16, (1, 8, 8), 1000, CFG)
    t2, e2 = step_draws(3, 16, (1, 8, 8), 1000, CFG)
    assert torch.equal(t1, t2) and torch.equal(e1, e2)
    assert not torch.equal(e1, step_draws(4, 16, (1, 8, 8), 1000, CFG)[1])


def test_resume_is_bitwise_identical(data, trained, tmp_path):
    full, full_wd = trained
    wd = tmp_path / "interrupted"
    part = train(build_model("tiny", seed=0), data, CFG, workdir=wd, stop_after=5, progress=False)
    state = torch.load(wd / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5
    assert not _states_equal(part.unet, full.unet)
    # resume for three steps: the checkpoint must then say 8, so training really continued from 5
    train(build_model("tiny", seed=0), data, CFG, workdir=wd, stop_after=3, progress=False)
    assert torch.load(wd / "checkpoint.pt", weights_only=True)["step"] == 8
    resumed = train(build_model("tiny", seed=0), data, CFG, workdir=wd, progress=False)
    assert torch.load(wd / "checkpoint.pt", weights_only=True)["step"] == 12
    ref, got = full.unet.state_dict(), resumed.unet.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert weights_sha256(full.unet) == weights_sha256(resumed.unet)
    # the raw (non-EMA) weights of the checkpoints agree too
    a = torch.load(full_wd / "checkpoint.pt", weights_only=True)
    b = torch.load(wd / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])


def test_finished_workdir_is_not_trained_again(data, trained):
    full, wd = trained
    # another initialisation: the checkpoint's weights win
    again = train(build_model("tiny", seed=7), data, CFG, workdir=wd, progress=False)
    assert _states_equal(again.unet, full.unet)


def test_resume_with_other_config_is_refused(data, trained):
    _, wd = trained
    other = TrainConfig(steps=12, batch_size=16, checkpoint_every=4, warmup=3, lr=1e-3)
    with pytest.raises(ValueError, match="another training config"):
        train(build_model("tiny", seed=0), data, other, workdir=wd, progress=False)


def _eval_loss(unet: torch.nn.Module, images: torch.Tensor, acp: torch.Tensor) -> float:
    """Training loss with fixed timesteps and noise (4 draws per image)."""
    g = torch.Generator().manual_seed(123)
    x0 = images.repeat(4, 1, 1, 1)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = acp[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        return (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample - eps).pow(2).mean().item()


def test_loss_decreases(data):
    model = build_model("tiny", seed=1)
    acp = model.alphas_cumprod()
    before = _eval_loss(model.unet.eval(), data, acp)
    cfg = TrainConfig(steps=80, batch_size=32, lr=5e-3, warmup=5, ema_decay=0.9)
    ema = train(model, data, cfg, progress=False)
    after_raw = _eval_loss(model.unet, data, acp)  # `model.unet` was trained in place
    after_ema = _eval_loss(ema.unet, data, acp)
    assert after_raw < 0.6 * before, (before, after_raw)
    assert after_ema < 0.6 * before, (before, after_ema)
    assert not any(p.requires_grad for p in ema.unet.parameters())


# ----------------------------------------------------------------------------- model folders


def _out(model, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 500])).sample


def test_save_load_pipeline_folder(tmp_path: Path):
    model = build_model("tiny", seed=3)
    path = save_model(model, tmp_path / "pipe", extra={"note": "test"})
    assert (path / "unet" / "config.json").is_file()
    assert any((path / "unet").glob("*.safetensors"))
    assert not any(path.rglob("*.bin"))
    assert (path / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((path / "training.json").read_text()) == {"note": "test"}
    back = load_model(path)
    assert back.weights_sha256() == model.weights_sha256()
    assert back.channels == 1 and back.size == 8 and back.num_timesteps == 1000
    assert torch.equal(back.alphas_cumprod(), model.alphas_cumprod())
    model.unet.eval()
    assert torch.allclose(_out(back), _out(model))
    assert not back.unet.training
    # overwriting an existing folder replaces it and leaves no temporary folders
    other = build_model("tiny", seed=4)
    save_model(other, path)
    assert load_model(path).weights_sha256() == other.weights_sha256()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_load_bare_unet_folder_gets_default_scheduler(tmp_path: Path):
    model = build_model("tiny", seed=5)
    model.unet.save_pretrained(tmp_path / "bare", safe_serialization=True)
    back = load_model(tmp_path / "bare")
    assert back.weights_sha256() == model.weights_sha256()
    sched = back.scheduler
    assert isinstance(sched, DDPMScheduler)
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "linear"
    assert sched.config.prediction_type == "epsilon"
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    assert torch.allclose(back.alphas_cumprod(), expected, rtol=1e-5)


def test_bin_only_folder_is_refused(tmp_path: Path):
    unet = UNet2DModel(**PRESETS["tiny"])
    unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert any((tmp_path / "pickled").glob("*.bin"))
    assert not any((tmp_path / "pickled").glob("*.safetensors"))
    with pytest.raises(ModelError, match="safetensors"):
        load_model(tmp_path / "pickled")


def test_bad_model_folders(tmp_path: Path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelError, match="unknown preset"):
        build_model("no-such-preset")


def test_build_model_seeded():
    a, b, c = build_model("tiny", seed=0), build_model("tiny", seed=0), build_model("tiny", seed=1)
    assert a.weights_sha256() == b.weights_sha256() != c.weights_sha256()


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_shape_range_determinism(trained, sampler):
    model = trained[0]
    s = sample(model, 6, seed=7, sampler=sampler, steps=8, progress=False)
    assert s.images.shape == (6, 1, 8, 8)
    assert s.images.dtype == torch.float32
    assert s.images.min() >= -1 and s.images.max() <= 1
    assert s.states is None and s.timesteps is None
    again = sample(model, 6, seed=7, sampler=sampler, steps=8, progress=False)
    assert torch.equal(s.images, again.images)
    other = sample(model, 6, seed=8, sampler=sampler, steps=8, progress=False)
    assert not torch.allclose(s.images, other.images)
    # images within a batch differ
    assert not torch.allclose(s.images[0], s.images[1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_independent_of_batching(trained, sampler):
    model = trained[0]
    whole = sample(model, 6, seed=2, sampler=sampler, steps=8, batch_size=6, progress=False)
    split = sample(model, 6, seed=2, sampler=sampler, steps=8, batch_size=4, progress=False)
    single = sample(model, 6, seed=2, sampler=sampler, steps=8, batch_size=1, progress=False)
    prefix = sample(model, 3, seed=2, sampler=sampler, steps=8, progress=False)
    assert torch.allclose(whole.images, split.images, atol=1e-5)
    assert torch.allclose(whole.images, single.images, atol=1e-5)
    assert torch.allclose(whole.images[:3], prefix.images, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_trajectory(trained, sampler):
    model = trained[0]
    steps = 5
    s = sample(
        model, 5, seed=1, sampler=sampler, steps=steps, keep_trajectory=True, batch_size=2, progress=False
    )
    assert s.timesteps.shape == (steps,)
    assert s.states.shape == (steps, 5, 1, 8, 8)
    assert (s.timesteps[:-1] > s.timesteps[1:]).all()  # from noisy to clean
    assert 0 <= int(s.timesteps.min()) and int(s.timesteps.max()) < 1000
    # the first state is the initial noise of each sample, drawn from its own generator
    noise = torch.stack(
        [torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(1 * 1_000_003 + i)) for i in range(5)]
    )
    assert torch.equal(s.states[0], noise)
    # the trajectory does not change the images, nor does batching change the trajectory
    plain = sample(model, 5, seed=1, sampler=sampler, steps=steps, progress=False)
    assert torch.allclose(plain.images, s.images, atol=1e-5)
    one_batch = sample(model, 5, seed=1, sampler=sampler, steps=steps, keep_trajectory=True, progress=False)
    assert torch.allclose(one_batch.states, s.states, atol=1e-5)
    assert torch.equal(one_batch.timesteps, s.timesteps)


def test_unknown_sampler(trained):
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(trained[0], 1, sampler="euler", progress=False)
