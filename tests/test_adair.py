"""adair.py: the official AdaIR number for number (both fixture cases), its frequency split, frozen rate_conv,
presets, official checkpoints, and building it by name next to PromptIR."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import avg_checkpoints
import first_stage_ft
import inference
import second_stage_ft
import trainer
import utils
from adair import DEAD_MODULES, PRESETS, STAGE2_MODULES, AdaIR, FrequencyBlock
from augment import NUM_VIEWS, dihedral, dihedral_inverse
from fast_path import disable_fast_path, enable_fast_path
from model import (SECOND_STAGE, build_model, freeze_except, load_weights, model_config, model_from_checkpoint,
                   trainable_summary, weights_arch)
from test_model import assert_same_weights, conv2d_by_shifts, parity_value, rel_err
from conftest import assert_same_state, weights
from conftest import tiny as tiny_run
from utils import ConfigError

OFFICIAL_PARAMS = 28_766_086  # the released network's 28,784,824 minus its dead modules' 18,738
RATE_CONV_PARAMS = 24_360
FIXTURE = ("fixtures", "adair_parity")


def read_keys(shared):
    rows = shared(*FIXTURE, "keys.tsv").read_text().splitlines()
    return [(name, tuple(int(s) for s in shape.split(","))) for name, shape in (row.split("\t") for row in rows)]


def filled(model):
    """``model`` in float64, eval mode, every tensor set by the fixture's rule under our own names."""
    model = model.double().eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(parity_value(name, tuple(tensor.shape)))
    return model


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("tiny", arch="adair", **overrides)


# ------------------------------------------------------------------------------------------------ official network
def test_state_dict_is_official_minus_dead_modules(shared):
    """Our keys and shapes are keys.tsv (in its order) without the dead modules' nine tensors (18,738 parameters)."""
    official = read_keys(shared)
    assert len(official) == 587 and sum(math.prod(s) for _, s in official) == 28_784_824
    dead = [(k, s) for k, s in official if k.rsplit(".", 1)[0] in DEAD_MODULES]
    assert len(dead) == 9 and sum(math.prod(s) for _, s in dead) == 18_738
    ours = [(k, tuple(v.shape)) for k, v in AdaIR().state_dict().items()]
    assert ours == [(k, s) for k, s in official if (k, s) not in dead]


def test_official_parameter_count_and_frozen_rate_conv():
    """AdaIR() has 28,766,086 parameters; exactly rate_conv's 24,360 are frozen, and the rest train."""
    model = AdaIR()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"fre{i}.rate_conv.{j}.weight" for i in (1, 2, 3) for j in (0, 2)}
    assert sum(p.numel() for n, p in model.named_parameters() if n in frozen) == RATE_CONV_PARAMS


def test_parity_default_size_64(shared, monkeypatch):
    """In float64 the default network reproduces the official output on the 64x64 fixture (box empty) to 1e-10."""
    monkeypatch.setattr(F, "conv2d", conv2d_by_shifts)
    meta = json.loads(shared(*FIXTURE, "official_64.json").read_text())
    model = filled(AdaIR(**meta["constructor"]))
    x = torch.from_numpy(np.load(shared(*FIXTURE, "official_64_input.npy")))
    ref = torch.from_numpy(np.load(shared(*FIXTURE, "official_64_output.npy")))
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape == tuple(meta["input_shape"])
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.skipif(not os.environ.get("ADAIR_FULL_PARITY"), reason="about 90 s of CPU time in float64 (a 1024x768 "
                    "image): set ADAIR_FULL_PARITY=1 to run it; test_frequency_split_box_is_the_centred_slice covers "
                    "the box cheaply")
def test_parity_small_1024x768_frequency_box(shared, monkeypatch):
    """In float64 a small network on a 1024x768 image, where fre3's box is not empty, reproduces the official
    output (every 8th pixel, and the channel sums of all of it) to 1e-10; the box is indeed not empty there."""
    meta = json.loads(shared(*FIXTURE, "small_1024x768.json").read_text())
    model = filled(AdaIR(**meta["constructor"]))
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"] - 6_642  # its dead modules' share
    x = torch.from_numpy(np.random.default_rng(meta["input_seed"]).random(tuple(meta["input_shape"])))
    lows = []
    split = FrequencyBlock.split

    def recording_split(block, features):
        high, low = split(block, features)
        lows.append(low.abs().max().item())
        return high, low

    monkeypatch.setattr(FrequencyBlock, "split", recording_split)
    monkeypatch.setattr(F, "conv2d", conv2d_by_shifts)
    with torch.no_grad():
        out = model(x)
    assert max(lows) > 0  # the low-frequency path was taken
    every8 = torch.from_numpy(np.load(shared(*FIXTURE, "small_1024x768_output_every8.npy")))
    sums = torch.from_numpy(np.load(shared(*FIXTURE, "small_1024x768_output_channel_sums.npy")))
    assert rel_err(out[..., ::8, ::8], every8) <= 1e-10
    assert rel_err(out.sum(dim=(2, 3)), sums) <= 1e-10


# ------------------------------------------------------------------------------------------------ frequency split
def test_frequency_split_box_is_the_centred_slice():
    """The low part is the spectrum inside the centred box of half-sizes int((side // 128) * sigmoid(rate)), taken
    as a slice of the shifted spectrum (one more negative frequency than positive); the high part the rest; under
    128 pixels the box is empty (low zero, high the magnitude)."""
    torch.manual_seed(0)
    block = FrequencyBlock(16, 1).double()
    x = torch.randn(2, 16, 384, 260, dtype=torch.float64)
    high, low = block.split(x)
    rate = block.rate_conv(x.mean(dim=(-2, -1), keepdim=True)).sigmoid()
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    for i in range(2):
        hh, hw = int(3 * rate[i, 0].item()), int(2 * rate[i, 1].item())
        box = torch.zeros(384, 260, dtype=torch.bool)
        box[192 - hh:192 + hh, 130 - hw:130 + hw] = True
        for part, keep in ((low, box), (high, ~box)):
            expected = torch.fft.ifft2(torch.fft.ifftshift(spectrum[i] * keep, dim=(-2, -1))).abs()
            torch.testing.assert_close(part[i], expected, rtol=0, atol=1e-12)
    small = torch.randn(1, 16, 120, 300, dtype=torch.float64)
    high, low = block.split(small)
    assert torch.equal(low, torch.zeros_like(small)) and torch.equal(high, small.abs())


def test_tiny_trains_and_only_rate_conv_gets_no_gradient():
    """The frequency blocks start as identities (para1 zero, para2 one). Once para1 has moved, forward and backward
    at 64x64 give every trainable parameter a gradient (so DistributedDataParallel needs no find_unused_parameters)
    and rate_conv, frozen, none. The gradient is zero exactly for the query side of channel_cross_h, whose query is
    the low-frequency part, zero while the box is empty (as in the official training on 128x128 crops)."""
    model = tiny()
    assert all(torch.equal(b.para1, torch.zeros_like(b.para1)) and torch.equal(b.para2, torch.ones_like(b.para2))
               for b in (model.fre1, model.fre2, model.fre3))
    with torch.no_grad():
        for block in (model.fre1, model.fre2, model.fre3):
            block.para1.fill_(0.5)
    model(torch.rand(2, 3, 64, 64)).square().mean().backward()
    for name, p in model.named_parameters():
        if "rate_conv" in name:
            assert p.grad is None, name
        else:
            query_of_low = name.split(".", 1)[1].startswith(("channel_cross_h.q.", "channel_cross_h.q_dwconv.",
                                                             "channel_cross_h.temperature"))
            assert p.grad is not None and (p.grad.abs().sum() == 0) == query_of_low, name


def test_presets_sizes_and_shapes():
    """The three presets build with their parameter counts (small under a quarter of official); any size comes out
    at its own size; a one-image input works; too few channels for the frequency blocks are refused by name."""
    counts = {name: sum(p.numel() for p in build_model(name, arch="adair").parameters()) for name in PRESETS}
    assert counts == {"official": OFFICIAL_PARAMS, "small": 4_492_028, "tiny": 292_205}
    model = tiny().eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 37, 45)).shape == (1, 3, 37, 45)
        assert model(torch.rand(3, 20, 24)).shape == (3, 20, 24)
    with pytest.raises(ValueError, match="at least 16 channels"):
        AdaIR(dim=4)
    with pytest.raises(ValueError, match="decoder=False"):
        AdaIR(decoder=False)


# ------------------------------------------------------------------------------------------------ fast path
def test_fast_path_is_the_same_function(monkeypatch):
    """On the fast path (shared transformer blocks, channels-last) AdaIR computes the same output in float64 without
    autograd and, with recomputation, the same gradients; a frequency block with a non-empty box gives the same
    result on channels-last features; disabling the fast path gives back the official classes."""
    monkeypatch.setattr(F, "conv2d", conv2d_by_shifts)
    plain = tiny(1).double()
    fast = enable_fast_path(tiny(1).double(), recompute=["decoder_level1", "refinement"])
    assert type(fast).__name__ == "FastAdaIR"
    x = torch.rand(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fast(x), plain(x)) < 1e-12
        image, features = torch.rand(1, 3, 512, 512), torch.randn(1, 16, 256, 256)
        block = FrequencyBlock(16, 1)
        block.para1.fill_(0.5)
        block.rate_conv[2].weight.zero_()  # rates 0.5: half-sizes int(2 * 0.5) = 1
        assert block.split(features)[1].abs().sum() > 0
        channels_last = block(image.contiguous(memory_format=torch.channels_last),
                              features.contiguous(memory_format=torch.channels_last))
        assert rel_err(channels_last, block(image, features).double()) < 1e-6
    plain(x).square().mean().backward()
    fast(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert type(disable_fast_path(fast)) is AdaIR


# ------------------------------------------------------------------------------------------------ checkpoints
def test_official_lightning_checkpoint_loads_as_adair(tmp_path):
    """An official release layout (Lightning, "net." keys, the dead modules) is recognised as AdaIR by its weights,
    built at its size without --arch, and loads exactly; --arch promptir against it is refused by name."""
    source = tiny(1).state_dict()
    dead = {f"{name}.weight": torch.zeros(2, 2, 7, 7) for name in DEAD_MODULES}
    release = {"epoch": 150, "state_dict": {f"net.{k}": v for k, v in {**source, **dead}.items()}}
    assert weights_arch(release) == "adair"
    assert model_config(release, "tiny", source="adair.ckpt") == {"arch": "adair", "preset": "tiny"}
    model = model_from_checkpoint(release, preset="tiny", source="adair.ckpt")
    assert isinstance(model, AdaIR)
    assert_same_weights(model, source)
    path = tmp_path / "adair.ckpt"
    torch.save(release, path)
    assert_same_weights(load_weights(tiny(2), path), source)
    with pytest.raises(ConfigError, match="^adair.ckpt holds adair weights, not --arch promptir"):
        model_config(release, arch="promptir", source="adair.ckpt")


def test_model_config_records_and_checks_the_arch():
    """A new model's config names its network; a checkpoint's own arch wins and a contradicting --arch is refused as
    a contradicting --preset is; a config without arch (older checkpoints) is PromptIR's."""
    assert model_config(None, "tiny", arch="adair", source="-") == {"arch": "adair", "preset": "tiny"}
    assert model_config(None, source="-") == {"arch": "promptir", "preset": "official"}
    ours = {"model": tiny().state_dict(), "model_config": {"arch": "adair", "preset": "tiny"}}
    assert model_config(ours, arch="adair", source="a.pth") == {"arch": "adair", "preset": "tiny"}
    with pytest.raises(ConfigError) as err:
        model_config(ours, arch="promptir", source="run/last.pth")
    assert str(err.value) == ("run/last.pth holds a model of arch 'adair', not --arch promptir: drop --arch (the "
                              "checkpoint's is used) or start a new run")
    assert isinstance(model_from_checkpoint(ours), AdaIR)
    older = {"model": build_model("tiny").state_dict(), "model_config": {"preset": "tiny"}}
    assert model_config(older, source="b.pth") == {"arch": "promptir", "preset": "tiny"}
    with pytest.raises(ConfigError, match="arch 'promptir', not --arch adair"):
        model_config(older, arch="adair", source="b.pth")
    with pytest.raises(ValueError, match="unknown network 'unet'; choose one of promptir, adair"):
        build_model("tiny", arch="unet")


def test_second_stage_modules_and_rate_conv_stay_frozen(caplog):
    """SECOND_STAGE trains AdaIR's STAGE2_MODULES (logged by name), fre3's rate_conv stays frozen inside them, and
    the summary lists them; the same name on PromptIR gives PromptIR's list."""
    model = tiny()
    with caplog.at_level("INFO", logger="model"):
        freeze_except(model, [SECOND_STAGE])
    assert caplog.records[-1].getMessage() == ("AdaIR: the second stage trains refinement, output, decoder_level1, "
                                               "fre3, up2_1")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(STAGE2_MODULES)
    assert not any(p.requires_grad for p in model.fre3.rate_conv.parameters())
    assert "fre3" in trainable_summary(model)
    promptir = build_model("tiny")
    freeze_except(promptir, [SECOND_STAGE, "latent"])
    assert {n.split(".")[0] for n, p in promptir.named_parameters() if p.requires_grad} == \
        set(promptir.STAGE2_MODULES) | {"latent"}


# ------------------------------------------------------------------------------------------------ the scripts
# The scripts with --arch adair, on test_trainer's tiny runs (16x16 crops of 24x24 images, a few seconds each).
@pytest.fixture(scope="module")
def adair_run(data, tmp_path_factory):
    """A finished 2-epoch tiny AdaIR run with an EMA and two snapshots (its folder)."""
    run = tmp_path_factory.mktemp("adair") / "run"
    trainer.train(tiny_run(data, run, "--arch", "adair", "--ema", 0.9, "--keep_last", 2, "--warmup_epochs", 0))
    return run


def test_training_records_the_arch_and_resumes_exactly(data, tmp_path, adair_run):
    """--arch adair trains an AdaIR whose checkpoints record arch and preset; 1 epoch + resume 1 equals 2 straight
    (weights, EMA, optimizer state: torch.equal); a resume with --arch promptir is refused before any work."""
    saved = utils.load_checkpoint(adair_run / "last.pth")
    assert saved["model_config"] == {"arch": "adair", "preset": "tiny"}
    assert saved["args"]["arch"] == "adair"
    extra = ("--arch", "adair", "--ema", 0.9, "--warmup_epochs", 0)
    trainer.Trainer(tiny_run(data, tmp_path / "b", *extra)).fit(until_epoch=1)
    trainer.train(tiny_run(data, None, *extra, "--resume", tmp_path / "b"))
    resumed = utils.load_checkpoint(tmp_path / "b" / "last.pth")
    for key in ("model", "ema"):
        assert_same_state(resumed[key], saved[key])
    for sa, sb in zip(saved["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ConfigError, match="arch 'adair', not --arch promptir"):
        trainer.Trainer(tiny_run(data, None, "--resume", tmp_path / "b", "--arch", "promptir", "--epochs", 3))


def test_both_fine_tuning_stages_take_the_arch_from_the_checkpoint(data, tmp_path, adair_run, capsys):
    """Stage 1 from an AdaIR checkpoint (no --arch given) fine-tunes an AdaIR with every parameter but rate_conv
    trainable; stage 2 changes only AdaIR's STAGE2_MODULES (rate_conv excluded) and prints them; a contradicting
    --arch is refused."""
    utils.setup_logging()
    start = utils.load_checkpoint(adair_run / "best.pth")["ema"]
    first = trainer.Trainer(tiny_run(data, tmp_path / "ft1", "--checkpoint", adair_run / "best.pth", "--epochs", 1,
                                     "--warmup_epochs", 0, "--val_per_type", 0, script=first_stage_ft))
    assert isinstance(first.model, AdaIR) and first.model_config == {"arch": "adair", "preset": "tiny"}
    optimised = {id(p) for g in first.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in first.model.named_parameters() if "rate_conv" not in n}
    first.fit()
    second = trainer.Trainer(tiny_run(data, tmp_path / "ft2", "--checkpoint", tmp_path / "ft1" / "last.pth",
                                      "--epochs", 1, "--warmup_epochs", 0, "--val_per_type", 0,
                                      script=second_stage_ft))
    second.fit()
    assert "AdaIR: the second stage trains refinement, output, decoder_level1, fre3, up2_1" in capsys.readouterr().err
    before, after = weights(tmp_path / "ft1" / "last.pth"), weights(tmp_path / "ft2" / "last.pth")
    for name, value in after.items():
        moved = not torch.equal(value, before[name])
        assert moved == (name.split(".")[0] in STAGE2_MODULES and "rate_conv" not in name), name
    assert not torch.equal(before["encoder_level1.0.attn.temperature"], start["encoder_level1.0.attn.temperature"])
    with pytest.raises(ConfigError, match="arch 'adair', not --arch promptir"):
        trainer.Trainer(tiny_run(data, tmp_path / "ft3", "--checkpoint", adair_run / "best.pth", "--arch", "promptir",
                                 script=first_stage_ft))


def test_prediction_averaging_and_ensembles(tmp_path, adair_run):
    """inference.py restores with an AdaIR checkpoint (8-view TTA: the mean of the inverse-mapped views); the
    snapshots average into an AdaIR weights file that loads; an ensemble of an AdaIR and a PromptIR checkpoint is
    the mean of the two; averaging an AdaIR with a PromptIR checkpoint is refused."""
    model = inference.load_model(adair_run)
    assert isinstance(model, AdaIR)
    image = torch.rand(3, 20, 28)
    with torch.no_grad():
        views = [dihedral_inverse(model(dihedral(image, k)[None])[0], k) for k in range(NUM_VIEWS)]
    torch.testing.assert_close(inference.restore(model, image, tta=8), sum(views) / NUM_VIEWS, rtol=0, atol=1e-6)
    out = tmp_path / "avg.pth"
    avg_checkpoints.main([*map(str, avg_checkpoints.run_snapshots(adair_run)), "--out", str(out)])
    averaged = inference.load_model(out)
    assert isinstance(averaged, AdaIR) and utils.load_checkpoint(out)["model_config"]["arch"] == "adair"
    promptir = tmp_path / "promptir.pth"
    utils.save_checkpoint(promptir, {"model": build_model("tiny").state_dict(), "model_config": {"preset": "tiny"}})
    folder = tmp_path / "degraded"
    folder.mkdir()
    Image.fromarray(utils.to_uint8(image).permute(1, 2, 0).numpy()).save(folder / "0.png")
    scanned = inference.scan_inputs(folder)
    ensemble = inference.Ensemble([adair_run / "best.pth", promptir], inference.load_model, together=True)
    members = [inference.load_model(adair_run / "best.pth"), inference.load_model(promptir)]
    restored = dict(inference.restore_folder(ensemble, scanned, progress=False))["0.png"]
    expected = sum(inference.restore(m, scanned.image("0.png")) for m in members) / 2
    torch.testing.assert_close(restored, expected, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="another"):
        avg_checkpoints.average_checkpoints([adair_run / "best.pth", promptir])
