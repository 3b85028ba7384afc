"""fast_path.py: the same function as the plain (official) path of model.py, the same parameters, checkpoints
shared."""
import copy
import functools
import inspect
import pickle

import numpy as np
import pytest
import torch

import fast_path
from fast_path import compile_blocks, disable_fast_path, enable_fast_path, is_fast, set_recomputation
from model import Attention, PromptIR, TransformerBlock, build_model, load_weights
from test_model import parity_value, rel_err

# Tiny, but with several heads per level so the per-head algebra of the fast attention is exercised.
TINY_HEADS = {"heads": (1, 2, 2, 4)}


@pytest.fixture(scope="module")
def parity_state():
    """The fixture's deterministic float64 weights under our own names."""
    return {name: parity_value(name, tuple(t.shape)) for name, t in PromptIR().state_dict().items()}


def fixture_io(shared):
    x = torch.from_numpy(np.load(shared("fixtures", "promptir_parity", "input.npy")))
    return x, torch.from_numpy(np.load(shared("fixtures", "promptir_parity", "output.npy")))


def tiny_pair(seed=0, dtype=torch.float64):
    """A plain tiny model and a fast copy of it with the same weights."""
    torch.manual_seed(seed)
    plain = build_model("tiny", **TINY_HEADS).to(dtype)
    return plain, enable_fast_path(copy.deepcopy(plain))


@pytest.mark.parametrize("channels_last, bands", [(True, "one"), (False, "many")])  # each layout, each banding
def test_fast_path_matches_official_fixture_float64(shared, parity_state, monkeypatch, channels_last, bands):
    """In float64 the fast path reproduces the official output on the fixture to 1e-10, in either memory layout,
    with the CPU path's blocks in one band or in bands of 8 rows (several per image at every level but the last)."""
    monkeypatch.setattr(fast_path, "BAND_BYTES", 2**40 if bands == "one" else 1)
    model = enable_fast_path(PromptIR().double().eval(), channels_last=channels_last)
    model.load_state_dict(parity_state)
    x, ref = fixture_io(shared)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out, ref) <= 1e-10


def test_fast_path_float32_within_1e_5(shared, parity_state):
    """The same weights in float32 on the fast path stay within 1e-5 of the float64 reference."""
    model = enable_fast_path(PromptIR().eval())
    model.load_state_dict({k: v.float() for k, v in parity_state.items()})
    x, ref = fixture_io(shared)
    with torch.no_grad():
        assert rel_err(model(x.float()), ref) <= 1e-5


def test_parameters_and_state_dict_unchanged():
    """The fast path keeps every parameter name, shape, value and memory layout (fused AdamW needs a parameter and
    its optimizer state in one layout, so checkpoints must move between the paths unchanged)."""
    plain, fast = tiny_pair()
    assert list(fast.state_dict()) == list(plain.state_dict())
    for (name, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b), name


@pytest.mark.parametrize("size", [(32, 32), (21, 30)])
def test_gradients_match_plain_path(size):
    """Forward values and every parameter's and the input's gradient agree with the plain path (float64, batch 2,
    several heads, padded sizes too)."""
    plain, fast = tiny_pair(1)
    torch.manual_seed(2)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    target = torch.rand_like(x)
    grads = []
    for model in (plain, fast):
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        (out - target).abs().mean().backward()
        grads.append((out.detach(), inp.grad, [p.grad for p in model.parameters()]))
    (out0, gx0, gp0), (out1, gx1, gp1) = grads
    assert rel_err(out1, out0) <= 1e-12
    assert rel_err(gx1, gx0) <= 1e-10
    for (name, _), a, b in zip(plain.named_parameters(), gp0, gp1):
        assert b is not None and rel_err(b, a) <= 1e-9, name
        assert b.is_contiguous(), name  # DDP copies gradients into flat buckets: no strided copy on the fast path


def test_no_grad_path_equals_grad_path(monkeypatch):
    """Without autograd the fast path runs in bands of rows and adds residuals in place; the result equals the
    autograd-enabled fast path (batch 2, several bands per image)."""
    monkeypatch.setattr(fast_path, "BAND_BYTES", 1)
    _, fast = tiny_pair(3)
    x = torch.rand(2, 3, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        in_place = fast(x)
    assert torch.allclose(in_place, fast(x).detach(), rtol=0, atol=1e-13)
    with torch.inference_mode():
        assert torch.allclose(fast(x), in_place, rtol=0, atol=1e-13)


def _identity_attention(dim=48):
    """A one-head Attention whose q, k and v are its input: large, correlated q and k, as trained attention has."""
    att = Attention(dim, 1)
    with torch.no_grad():
        att.qkv.weight.zero_()
        att.qkv_dwconv.weight.zero_()
        att.qkv_dwconv.weight[:, :, 1, 1] = 1
        for i in range(dim):
            for part in range(3):
                att.qkv.weight[part * dim + i, i] = 1
    return att


@pytest.mark.parametrize("batch", [1, 2])  # one batched product, and one per image (the CPU's choice for batches)
def test_fast_attention_stays_finite_under_float16_autocast_at_256(batch):
    """Unnormalised q @ k^T over 256x256 pixels exceeds float16's 65,504: the fast path multiplies float16 q and k
    in float32, so under float16 autocast it stays finite and within float16 rounding of the plain path."""
    att = _identity_attention(8)  # few channels: the sums over the pixels are what overflows
    torch.manual_seed(0)
    x = 2 * torch.randn(batch, 8, 256, 256)  # each q_i . k_i about 4 x 65,536
    with torch.no_grad():
        reference = att(x)  # plain path, float32
    outputs = {}
    for fast in (False, True):
        if fast:
            enable_fast_path(att)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            outputs[fast] = att(x)
    assert torch.isfinite(outputs[True]).all()
    assert rel_err(outputs[True].double(), reference.double()) <= 1e-2
    assert rel_err(outputs[True].double(), outputs[False].double()) <= 1e-2


def test_fast_block_bands_stay_finite_under_float16_autocast(monkeypatch):
    """The CPU's banded no-grad block sums q @ k^T band by band: with float16 operands it multiplies in float32 too."""
    monkeypatch.setattr(fast_path, "BAND_BYTES", 2**20)  # bands of 48 rows at this width
    block = TransformerBlock(8, 1, 2.66)
    block.attn = _identity_attention(8)
    with torch.no_grad():
        block.norm1.body.weight.fill_(3.5)  # a band's sums (48 rows of 256 pixels) then pass 65,504 too
    torch.manual_seed(1)
    x = torch.randn(1, 8, 256, 256)
    with torch.no_grad():
        reference = block(x)
        enable_fast_path(block)
        assert is_fast(block) and is_fast(block.attn) and is_fast(block.ffn)
        with torch.autocast("cpu", dtype=torch.float16):
            out = block(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(out).all() and rel_err(out.double(), reference.double()) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_runs_a_model_cast_to_half_precision(dtype):
    """A model whose weights are bfloat16 or float16 (no autocast) runs on the fast path with and without autograd,
    close to the plain path in the same dtype."""
    plain, fast = tiny_pair(4, dtype)
    x = torch.rand(2, 3, 24, 16, dtype=dtype)
    with torch.no_grad():
        expected = plain(x)
        banded = fast(x)
    with_grad = fast(x)
    assert banded.dtype == with_grad.dtype == dtype
    assert rel_err(banded.double(), expected.double()) <= 2e-2
    assert rel_err(with_grad.detach().double(), expected.double()) <= 2e-2


def test_checkpoints_load_into_either_path(tmp_path):
    """Weights saved from the fast path load into a plain model and the other way round; outputs agree."""
    plain, fast = tiny_pair(4)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make the fast model's weights its own
    path = tmp_path / "fast.pth"
    torch.save({"model": fast.state_dict()}, path)
    other = load_weights(build_model("tiny", **TINY_HEADS).double(), path)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(other(x), fast(x)) <= 1e-12
    back = load_weights(enable_fast_path(build_model("tiny", **TINY_HEADS).double()), other.state_dict())
    with torch.no_grad():
        assert rel_err(back(x), other(x)) <= 1e-12


def test_disable_fast_path_restores_the_plain_path():
    """Switching the fast path off gives back the official classes and bit for bit the plain model's output."""
    plain, fast = tiny_pair(5)
    assert is_fast(fast) and is_fast(fast.refinement[0].attn)
    disable_fast_path(fast)
    assert not any(is_fast(m) for m in fast.modules())
    assert [type(m) for m in fast.modules()] == [type(m) for m in plain.modules()]
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_recomputed_stages_same_gradients_less_saved():
    """Recomputing stages leaves outputs and gradients unchanged and saves fewer activations for backward;
    unknown stage names are refused with the valid ones listed, and so is a model off the fast path."""
    plain, fast = tiny_pair(7)
    recomputed = enable_fast_path(copy.deepcopy(plain), recompute=("decoder_level1", "refinement"))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    saved, grads = [], []
    for model in (fast, recomputed):
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.square().mean().backward()
        saved.append(count[0])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert saved[1] < saved[0]
    assert rel_err(grads[1], grads[0]) <= 1e-12
    with pytest.raises(ValueError, match="cannot recompute decoder_level9.*are encoder_level1"):
        enable_fast_path(build_model("tiny"), recompute=["decoder_level9"])
    with pytest.raises(ValueError, match="part of the fast path"):
        set_recomputation(build_model("tiny"), ["refinement"])
    assert not hasattr(disable_fast_path(recomputed).refinement[0], "recompute")
    assert not enable_fast_path(recomputed).refinement[0].recompute


def test_compile_refuses_a_cpu_model():
    """Compiling is for CUDA: a CPU model is refused with a message saying what to do, before anything changes."""
    model = build_model("tiny")
    with pytest.raises(ValueError, match="move the model to the GPU"):
        enable_fast_path(model, compile=True)
    assert not any(is_fast(m) for m in model.modules())


def test_deepcopy_of_compiled_blocks_runs_its_own_weights():
    """A deep copy of a model with compiled blocks (an EMA copy, say) comes out uncompiled, so it runs its own
    weights, never the original's; names stay unprefixed. Nothing is compiled here: torch.compile is lazy."""
    model = build_model("tiny")
    compile_blocks(model, mode=None)
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    copied = copy.deepcopy(model)
    assert all(m._compiled_call_impl is None for m in copied.modules() if isinstance(m, TransformerBlock))
    assert list(copied.state_dict()) == list(build_model("tiny").state_dict())


SCOPED_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters
_torch_compile = torch.compile


def _compile_without_scope(model, *, fullgraph=False, dynamic=None, backend="eager", mode=None, options=None,
                           disable=False):
    """torch.compile as the PyTorch versions without a per-call ``recompile_limit`` (2.11, say) offer it."""
    return _torch_compile(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode, options=options,
                         disable=disable)


@pytest.mark.parametrize("scoped", [True, False], ids=["per-call limit", "no per-call limit"])
def test_compiled_blocks_scope_their_recompile_limit(monkeypatch, scoped):
    """compile_blocks lets the blocks' shared code keep one graph per block shape: with the process-wide recompile
    limit at 1, three shapes still give three graphs (Dynamo's eager backend: no Inductor code is generated). What
    holds for that limit depends on the version: where torch.compile takes a per-call ``recompile_limit``, the
    process-wide one is untouched (still 1); where it takes none (PyTorch 2.11, simulated on any version), the
    process-wide limit is raised to COMPILE_RECOMPILE_LIMIT on purpose, the one way to let the blocks compile."""
    if scoped and not SCOPED_LIMIT:
        pytest.skip(f"torch {torch.__version__}'s compile takes no per-call recompile_limit (the other case holds)")
    from torch._dynamo.utils import counters

    compile_ = functools.partial(torch.compile, backend="eager") if scoped else _compile_without_scope
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(fast_path, "COMPILE_RECOMPILE_LIMIT", 3)
    config = torch._dynamo.config
    # config.patch, not monkeypatch (whose undo deletes a config entry): both limits are restored afterwards
    with config.patch(recompile_limit=1, accumulated_recompile_limit=config.accumulated_recompile_limit):
        _compile_three_shapes(counters)
        assert config.recompile_limit == (1 if scoped else 3)
    assert config.recompile_limit != 1


def _compile_three_shapes(counters):
    torch._dynamo.reset()
    try:
        block = TransformerBlock(8, 2, 2.66)
        compile_blocks(block)
        before = counters["stats"]["unique_graphs"]
        for size in (8, 12, 16):
            block(torch.rand(1, 8, size, size))
        assert counters["stats"]["unique_graphs"] - before == 3
    finally:
        torch._dynamo.reset()


def test_deepcopy_and_pickle_keep_the_fast_path():
    """The trainer's EMA copy (copy.deepcopy) and a pickled model keep the fast classes and settings, their own
    weights and the same function; switching settings again changes only the settings."""
    _, fast = tiny_pair(8)
    enable_fast_path(fast, channels_last=False, recompute=["refinement"])
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert [type(m) for m in other.modules()] == [type(m) for m in fast.modules()]
        assert is_fast(other) and not other.channels_last and other.refinement[0].recompute
        assert other.output.weight is not fast.output.weight
        with torch.no_grad():
            assert torch.equal(other(x), fast(x))
    assert enable_fast_path(fast).channels_last and not fast.refinement[0].recompute


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.compile of the blocks is for GPUs)")
def test_compiled_blocks_keep_names_and_values():
    """With every block compiled the state_dict keys carry no _orig_mod prefix and outputs and gradients match."""
    torch.manual_seed(6)
    plain = build_model("tiny", **TINY_HEADS).cuda()
    fast = enable_fast_path(copy.deepcopy(plain), compile=True)
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 32, 32, device="cuda")
    ema = copy.deepcopy(fast)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    assert torch.equal(ema(x), x)  # the copy runs its own (zeroed) weights: output conv 0, residual input
    out0, out1 = plain(x), fast(x)
    out0.square().mean().backward()
    out1.square().mean().backward()
    assert rel_err(out1.double(), out0.detach().double()) <= 1e-4  # TF32 may be on for convolutions
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert rel_err(b.grad.double(), a.grad.double()) <= 1e-3, name


# ------------------------------------------------------------------------------ the scripts use the fast path
def test_trainer_uses_the_fast_path_and_plain_trains_the_same_weights(tmp_path):
    """trainer.py runs the fast path by default; --plain runs the official formulation; a short run on each ends
    with the same weights within float32 rounding, and --compile/--plain conflicts fail before any work."""
    import trainer
    from conftest import make_homework_set, tiny

    data = make_homework_set(tmp_path / "data", per_kind=4, size=16)
    fast = trainer.Trainer(tiny(data, tmp_path / "fast"))
    assert all(is_fast(m) for m in fast.model.modules() if isinstance(m, TransformerBlock))
    fast.fit()
    plain = trainer.Trainer(tiny(data, tmp_path / "plain", "--plain"))
    assert not any(is_fast(m) for m in plain.model.modules() if isinstance(m, TransformerBlock))
    plain.fit()
    a, b = fast.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    with pytest.raises(trainer.ConfigError, match="--compile"):
        trainer.Trainer(tiny(data, tmp_path / "x", "--plain", "--compile"))
    with pytest.raises(trainer.ConfigError, match="CUDA"):
        trainer.Trainer(tiny(data, tmp_path / "y", "--compile"))


def test_inference_uses_the_fast_path_and_plain_restores_the_same_images(tmp_path):
    """inference.load_model gives the fast path unless plain=True, and both restore an image alike (8-view TTA)."""
    import inference

    torch.manual_seed(0)
    net = build_model("tiny", **TINY_HEADS)
    torch.save({"model": net.state_dict(), "model_config": {"preset": "tiny", **TINY_HEADS}}, tmp_path / "w.pth")
    fast = inference.load_model(tmp_path / "w.pth")
    plain = inference.load_model(tmp_path / "w.pth", plain=True)
    assert all(is_fast(m) for m in fast.modules() if isinstance(m, TransformerBlock))
    assert not any(is_fast(m) for m in plain.modules() if isinstance(m, TransformerBlock))
    x = torch.rand(3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(inference.restore(fast, x), inference.restore(plain, x), atol=1e-5)
