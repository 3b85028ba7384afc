"""model.py: the official PromptIR number for number, any image size, presets, the weight loader, the checkpoint
resolvers and freezing."""
import argparse
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import (DEAD_MODULES, MIN_SIZE, PRESETS, STAGE2_MODULES, PromptIR, build_model, checkpoint_weights,
                   extract_state_dict, freeze_except, load_weights, model_config, model_from_checkpoint,
                   trainable_summary)
from utils import CheckpointError, ConfigError

OFFICIAL_PARAMS = 35_376_967  # the released network's 35,592,263 minus its six dead modules
# Shapes of the dead modules in the released weights (checked against keys.tsv below).
OFFICIAL_DEAD = {"chnl_reduce1.weight": (64, 64, 1, 1), "chnl_reduce2.weight": (128, 128, 1, 1),
                 "chnl_reduce3.weight": (256, 320, 1, 1), "reduce_noise_channel_1.weight": (48, 112, 1, 1),
                 "reduce_noise_channel_2.weight": (96, 224, 1, 1), "reduce_noise_channel_3.weight": (192, 448, 1, 1)}


def parity_value(name, shape):
    """The fixture's deterministic tensor for ``name`` (fixtures/promptir_parity/README.md)."""
    n = math.prod(shape)
    phase = (zlib.crc32(name.encode("utf-8")) % 1000) / 1000 * 2 * math.pi
    if name.endswith("temperature"):
        base, amp = 1.0, 0.2
    elif name.endswith("prompt_param"):
        base, amp = 0.5, 0.5
    elif len(shape) == 1 and ".norm" in name and name.endswith("weight"):
        base, amp = 1.0, 0.1
    elif len(shape) == 1:
        base, amp = 0.0, 0.1
    else:
        base, amp = 0.0, 1 / math.sqrt(n / shape[0])
    k = np.arange(n, dtype=np.float64)
    return torch.from_numpy((base + amp * np.sin(0.9 * k + phase)).reshape(shape))


def read_keys(shared):
    rows = shared("fixtures", "promptir_parity", "keys.tsv").read_text().splitlines()
    return [(name, tuple(int(s) for s in shape.split(","))) for name, shape in (row.split("\t") for row in rows)]


def conv2d_by_shifts(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, conv2d=F.conv2d):
    """``F.conv2d`` for the stride-1 float64 convolutions of these networks, as sums of shifted matrix products.

    PyTorch's CPU float64 convolution falls back to a slow kernel (one call per channel for depthwise ones): minutes
    for the 1024x768 fixture case. The same sums in another order: results agree to about 1e-16.
    """
    out_c, per_group, kh, kw = weight.shape
    depthwise = groups == x.shape[1] == out_c and per_group == 1
    if x.dtype != torch.float64 or stride not in (1, (1, 1)) or dilation not in (1, (1, 1)) or not (
            depthwise or groups == 1):
        return conv2d(x, weight, bias, stride, padding, dilation, groups)
    b, c, h, w = x.shape
    p = padding if isinstance(padding, int) else padding[0]
    # The padded image flattened, one spare row below, so every shifted window of out_h rows of width wp is in range.
    flat = F.pad(x, (p, p, p, p + 1)).reshape(b, c, -1)
    wp, out_h, out_w = w + 2 * p, h + 2 * p - kh + 1, w + 2 * p - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            window = flat[:, :, i * wp + j:i * wp + j + out_h * wp]
            if depthwise:
                tap = weight[:, 0, i, j, None]
                out = window * tap if out is None else out.addcmul_(window, tap)
            else:
                term = weight[:, :, i, j] @ window
                out = term if out is None else out.add_(term)
    out = out.view(b, out_c, out_h, wp)[..., :out_w]
    return out.contiguous() if bias is None else out + bias[:, None, None]


@pytest.fixture(scope="module")
def parity_model():
    """The official-size model in float64, every tensor filled by the fixture's rule under our own names."""
    model = PromptIR().double().eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(parity_value(name, tuple(tensor.shape)))
    return model


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def tiny(seed):
    torch.manual_seed(seed)
    return build_model("tiny")


def assert_same_state(own, state):
    assert own.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def assert_same_weights(model, state):
    assert_same_state(model.state_dict(), state)


# ------------------------------------------------------------------------------------------------ official network
def test_state_dict_is_official_minus_dead_modules(shared):
    """Our keys and shapes are keys.tsv (in its order) without the six dead modules, whose shapes we know."""
    official = read_keys(shared)
    assert len(official) == 548 and sum(math.prod(s) for _, s in official) == 35_592_263
    dead = {k: s for k, s in official if k.split(".")[0] in DEAD_MODULES}
    assert dead == OFFICIAL_DEAD
    ours = [(k, tuple(v.shape)) for k, v in PromptIR().state_dict().items()]
    assert ours == [(k, s) for k, s in official if k not in dead]


def test_official_parameter_count():
    """PromptIR() has the official 35,376,967 parameters once the dead modules are gone, all of them trainable."""
    model = PromptIR()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == OFFICIAL_PARAMS
    assert not set(DEAD_MODULES) & {name for name, _ in model.named_children()}


def test_parity_float64(shared, parity_model, monkeypatch):
    """In float64 our forward reproduces the official output on the fixture's input to rounding error."""
    monkeypatch.setattr(F, "conv2d", conv2d_by_shifts)
    x = torch.from_numpy(np.load(shared("fixtures", "promptir_parity", "input.npy")))
    ref = torch.from_numpy(np.load(shared("fixtures", "promptir_parity", "output.npy")))
    with torch.no_grad():
        out = parity_model(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-10


def test_parity_float32(shared, parity_model):
    """The same weights in float32 stay within 1e-5 of the float64 reference."""
    model = PromptIR().eval()
    model.load_state_dict({k: v.float() for k, v in parity_model.state_dict().items()})
    x = torch.from_numpy(np.load(shared("fixtures", "promptir_parity", "input.npy"))).float()
    ref = torch.from_numpy(np.load(shared("fixtures", "promptir_parity", "output.npy")))
    with torch.no_grad():
        assert rel_err(model(x), ref) <= 1e-5


def test_widths_derive_from_dim_and_prompt_dims():
    """Off the official width, prompt linear layers read their level's channels and noise blocks add the prompt dims."""
    model = build_model("tiny", dim=12, prompt_dims=(6, 10, 14))
    assert [model.prompt1.linear_layer.in_features, model.prompt2.linear_layer.in_features,
            model.prompt3.linear_layer.in_features] == [24, 48, 96]
    assert [model.noise_level1.norm1.body.weight.numel(), model.noise_level2.norm1.body.weight.numel(),
            model.noise_level3.norm1.body.weight.numel()] == [24 + 6, 48 + 10, 96 + 14]
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_bad_sizes_fail_with_a_clear_message():
    """Heads that do not divide a width, or a wrong number of per-level values, are refused by name."""
    with pytest.raises(ValueError, match="heads do not divide"):
        build_model("tiny", heads=(1, 1, 3, 1))
    with pytest.raises(ValueError, match="num_blocks needs 4 values"):
        build_model("tiny", num_blocks=(1, 1, 1))


# ------------------------------------------------------------------------------------------------ presets, sizes
def test_presets_build_and_tiny_trains():
    """Every preset builds; tiny runs forward and backward on 64x64 and every parameter gets a gradient."""
    assert {"official", "small", "tiny"} <= set(PRESETS) and PRESETS["official"] == {}
    assert sum(p.numel() for p in build_model("small").parameters()) < OFFICIAL_PARAMS / 4
    model = tiny(0)
    model(torch.rand(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="tiny"):
        build_model("huge")


@pytest.mark.parametrize("size", [(255, 257), (37, 45), (MIN_SIZE, MIN_SIZE + 3)])
def test_any_size_is_reflect_padded_and_cropped(size):
    """Sizes off a multiple of 8 come out at their own size, equal to running the reflect-padded input and cropping."""
    model = tiny(0).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        pad_h, pad_w = -size[0] % 8, -size[1] % 8
        manual = model(F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"))[..., :size[0], :size[1]]
    assert out.shape == x.shape
    torch.testing.assert_close(out, manual)


def test_single_image_and_too_small_input():
    """A (C, H, W) image works; a side below the minimum is refused with the minimum in the message."""
    model = tiny(0).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 20, 24)).shape == (3, 20, 24)
        with pytest.raises(ValueError, match=f"at least {MIN_SIZE}x{MIN_SIZE}"):
            model(torch.rand(1, 3, MIN_SIZE - 1, 32))


def test_output_is_residual_and_not_clamped():
    """With the output convolution zeroed the network returns its input exactly, values outside [0, 1] included."""
    model = tiny(0).eval()
    torch.nn.init.zeros_(model.output.weight)
    x = torch.rand(1, 3, 21, 30) * 3 - 1
    with torch.no_grad():
        assert torch.equal(model(x), x)


# ------------------------------------------------------------------------------------------------ weight loading
def _dead_tiny():
    return {f"{name}.weight": torch.rand(4, 4, 1, 1) for name in DEAD_MODULES}


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


LAYOUTS = {
    "plain": lambda sd: sd,
    "ours_ema_first": lambda sd: {"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "optimizer": {"state": {}},
                                  "epoch": 3, "args": {"lr": 2e-4}},
    "ours_without_ema": lambda sd: {"model": sd, "ema": None, "optimizer": {"state": {}}, "epoch": 3},
    "state_dict": lambda sd: {"state_dict": sd},
    "params": lambda sd: {"params": sd},
    "params_ema_first": lambda sd: {"params": {k: v + 1 for k, v in sd.items()}, "params_ema": sd},
    "net_wrapper": lambda sd: {"net": sd},
    "homework_with_dead_modules": lambda sd: {**sd, **_dead_tiny()},
    "lightning": lambda sd: {"epoch": 1, "state_dict": _prefixed({**sd, **_dead_tiny()}, "net.")},
    "ddp": lambda sd: _prefixed(sd, "module."),
    "compiled": lambda sd: _prefixed(sd, "_orig_mod."),
    "ddp_compiled_in_wrapper": lambda sd: {"model": _prefixed(sd, "module._orig_mod.")},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_weights_from_each_layout(layout, tmp_path):
    """Each checkpoint layout saved to disk loads into a fresh model and gives back exactly the saved weights."""
    source = tiny(1).state_dict()
    path = tmp_path / "weights.pth"
    torch.save(LAYOUTS[layout](source), path)
    model = load_weights(tiny(2), path)
    assert_same_weights(model, source)


def test_load_official_lightning_checkpoint_full_size(tmp_path):
    """A full-size official release layout (Lightning, "net." keys, the six dead modules) loads into PromptIR()."""
    source = PromptIR().state_dict()
    dead = {k: torch.zeros(s) for k, s in OFFICIAL_DEAD.items()}
    path = tmp_path / "model.ckpt"
    torch.save({"epoch": 150, "global_step": 1, "pytorch-lightning_version": "2.0.2", "optimizer_states": [],
                "state_dict": _prefixed({**source, **dead}, "net.")}, path)
    assert_same_weights(load_weights(PromptIR(), path), source)


def test_loaded_object_and_module_sources():
    """An already-loaded checkpoint or a whole module can be passed instead of a path."""
    source = tiny(1)
    assert_same_weights(load_weights(tiny(2), {"params": source.state_dict()}), source.state_dict())
    assert_same_weights(load_weights(tiny(3), source), source.state_dict())


def test_prefixes_are_stripped_only_at_the_start():
    """Stacked prefixes go; the same words inside a key stay."""
    t = torch.zeros(1)
    assert list(extract_state_dict({"module._orig_mod.net.a.module.b.net.c": t})) == ["a.module.b.net.c"]


def test_mismatches_are_listed(tmp_path):
    """Missing, unexpected and wrongly shaped keys each fail, naming the keys; strict=False skips only the first two."""
    state = tiny(1).state_dict()
    missing = dict(state)
    del missing["output.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(1\):\n    output\.weight"):
        load_weights(tiny(2), missing)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\):\n    extra\.weight"):
        load_weights(tiny(2), {**state, "extra.weight": torch.zeros(1)})
    path = tmp_path / "small.pth"
    torch.save({"model": build_model("small").state_dict()}, path)
    with pytest.raises(CheckpointError, match=rf"(?s){path.name} does not fit.*patch_embed\.proj\.weight: checkpoint "
                                              r"\(24, 3, 3, 3\), model \(8, 3, 3, 3\)"):
        load_weights(tiny(2), path)
    model = load_weights(tiny(2), {**missing, "extra.weight": torch.zeros(1)}, strict=False)
    assert torch.equal(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])


def test_no_weights_found_names_the_wrappers():
    """A dict without weights fails with the keys it has and the wrappers it was searched for."""
    with pytest.raises(CheckpointError, match="params_ema.*its keys are epoch, optimizer"):
        load_weights(tiny(0), {"epoch": 1, "optimizer": {}})


def test_pickle_needing_file_needs_trusted(tmp_path):
    """A checkpoint holding an argparse.Namespace is refused with a hint at trusted=True, and loads with it."""
    source = tiny(1).state_dict()
    path = tmp_path / "old.pth"
    torch.save({"model": source, "args": argparse.Namespace(lr=2e-4)}, path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_weights(tiny(2), path)
    assert_same_weights(load_weights(tiny(2), path, trusted=True), source)


# ------------------------------------------------------------------------------------------------ checkpoint rules
def _shifted(state, amount):
    return {k: v + amount for k, v in state.items()}


def test_checkpoint_weights_prefers_ema_unless_told(caplog):
    """Our trainer's "ema" and BasicSR's "params_ema" win over the plain weights beside them, use_ema=False takes the
    plain ones, and the choice is logged once naming the source; without an EMA copy nothing is said."""
    plain = tiny(1).state_dict()
    ema = _shifted(plain, 1)
    for ours in ({"model": plain, "ema": ema, "epoch": 3}, {"params": plain, "params_ema": ema}):
        caplog.clear()
        with caplog.at_level("INFO", logger="model"):
            assert_same_state(checkpoint_weights(ours, source="run/best.pth"), ema)
        assert [r.getMessage() for r in caplog.records] == [
            "run/best.pth holds EMA weights: using them (--no_ema for the plain ones)"]
        caplog.clear()
        with caplog.at_level("INFO", logger="model"):
            assert_same_state(checkpoint_weights(ours, use_ema=False), plain)
        assert caplog.records[-1].getMessage() == ("the given weights holds EMA weights: using its plain weights "
                                                   "instead (--no_ema)")
    caplog.clear()
    with caplog.at_level("INFO", logger="model"):
        state = checkpoint_weights({"model": plain, "ema": None, "optimizer": {"state": {}}})
    assert not caplog.records and state.keys() == plain.keys()


def test_checkpoint_weights_of_foreign_layouts():
    """A layout other than ours goes through extract_state_dict: prefixes stripped, dead modules dropped; a dict
    without weights fails naming the source."""
    plain = tiny(1).state_dict()
    lightning = {"epoch": 1, "state_dict": _prefixed({**plain, **_dead_tiny()}, "net.")}
    assert_same_weights(load_weights(tiny(2), checkpoint_weights(lightning)), plain)
    assert_same_weights(load_weights(tiny(2), checkpoint_weights(_prefixed(plain, "module."))), plain)
    with pytest.raises(CheckpointError, match="^x.pth: found no weights"):
        checkpoint_weights({"epoch": 1}, source="x.pth")


def test_model_config_from_the_checkpoint_or_the_preset():
    """The checkpoint's own model_config wins and an agreeing --preset is fine; a conflicting one is refused with
    the message the scripts show; without a model_config the preset (official by default) is built."""
    saved = {"model": {}, "model_config": {"preset": "tiny", "heads": (1, 2, 2, 4)}}
    assert model_config(saved, source="a.pth") == model_config(saved, "tiny", source="a.pth") == {
        "arch": "promptir", **saved["model_config"]}
    with pytest.raises(ConfigError) as err:
        model_config(saved, "small", source="run/last.pth")
    assert str(err.value) == ("run/last.pth holds a model of preset 'tiny', not --preset small: drop --preset (the "
                              "checkpoint's is used) or start a new run")
    bare = tiny(0).state_dict()
    assert model_config(bare, source="b.pth") == {"arch": "promptir", "preset": "official"}
    assert model_config(bare, "tiny", source="b.pth") == {"arch": "promptir", "preset": "tiny"}
    assert model_config({"params": bare}, "small", source="b.pth") == {"arch": "promptir", "preset": "small"}


def test_model_from_checkpoint():
    """Our checkpoint gives a model of its saved size holding its EMA weights (plain ones with use_ema=False); a
    BasicSR file without a config is built from the preset; a conflict or a misfit names the source."""
    torch.manual_seed(3)
    net = build_model("tiny", heads=(1, 2, 2, 4))
    ema = _shifted(net.state_dict(), 0.5)
    ours = {"model": net.state_dict(), "ema": ema, "model_config": {"preset": "tiny", "heads": (1, 2, 2, 4)}}
    model = model_from_checkpoint(ours)
    assert type(model) is PromptIR and model.encoder_level2[0].attn.num_heads == 2
    assert_same_weights(model, ema)
    assert_same_weights(model_from_checkpoint(ours, use_ema=False, preset="tiny"), net.state_dict())
    with pytest.raises(ConfigError, match="^ours.pth holds a model of preset 'tiny', not --preset official"):
        model_from_checkpoint(ours, preset="official", source="ours.pth")
    basicsr = {"params": _shifted(tiny(1).state_dict(), 1), "params_ema": tiny(1).state_dict()}
    assert_same_weights(model_from_checkpoint(basicsr, preset="tiny"), tiny(1).state_dict())
    with pytest.raises(CheckpointError, match=r"(?s)^basicsr.pth does not fit this model:.*patch_embed\.proj"):
        model_from_checkpoint(basicsr, source="basicsr.pth")  # built at the official size


# ------------------------------------------------------------------------------------------------ freezing
def test_freeze_except_and_summary():
    """Only the named modules stay trainable; the summary reports them per module with the right totals."""
    model = tiny(0)
    freeze_except(model, STAGE2_MODULES)
    trainable = {name for name, child in model.named_children() if any(p.requires_grad for p in child.parameters())}
    assert trainable == set(STAGE2_MODULES)
    assert all(p.requires_grad for name in STAGE2_MODULES for p in getattr(model, name).parameters())
    table = trainable_summary(model)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if not line.startswith("-")}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["total"] == [f"{n_trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}"]
    assert rows["encoder_level1"][0] == "0" and rows["output"][0] == rows["output"][1] != "0"


def test_freeze_except_unknown_name_lists_valid_names():
    """An unknown module name fails and the message lists the valid top-level names."""
    with pytest.raises(ValueError, match="unknown module name.*decoder_level4.*valid top-level modules: patch_embed"):
        freeze_except(tiny(0), ["output", "decoder_level4"])
    with pytest.raises(ValueError, match="no module named to train"):
        freeze_except(tiny(0), [])
