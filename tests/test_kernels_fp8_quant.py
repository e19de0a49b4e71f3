"""kernels/fp8_quant.py: the one-pass e4m3 row quantization (quantize_rows_fp8) and the SwiGLU with its output
quantized in the same pass (swiglu_fp8), against their references and float64, and the sampler's FP8 modules that
call them (modeling/fp8.py: FP8Linear(input_kernel=True), FP8SwiGLUFFN) on the CPU (Triton interpreter, torch's
emulated _scaled_mm)."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import fp8_quant, ops, reference  # noqa: E402
from kernels.swiglu import swiglu_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


def _bits(q):
    return q.view(torch.uint8)


def _rows(shape, dtype, seed=0):
    """Rows of very different magnitudes (each row its own scale), one all-zero row, one with subnormal e4m3s."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(4 * torch.randn(*shape[:-1], 1, generator=g))
    flat = x.view(-1, shape[-1])
    flat[0] = 0.0
    if flat.shape[0] > 2:
        flat[2, 0] = 1e4 * flat[2].abs().max()  # one outlier: the rest of the row lands in e4m3's subnormals
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 17, 72), (37, 1152), (5, 3072), (3, 1, 16)])
def test_quantize_rows_bitwise_the_reference(shape, dtype):
    """Ragged row counts (37 is not a multiple of the tile's rows), head_dim 72, hidden 1152, SwiGLU 3072: the same
    bytes and scales as quantize_fp8 per row."""
    x = _rows(shape, dtype)
    q, s = ops.quantize_rows_fp8(x)
    qr, sr = fp8_quant.quantize_rows_fp8_reference(x)
    rows = x.numel() // shape[-1]
    assert q.dtype == E4M3 and q.shape == (rows, shape[-1]) and s.dtype == torch.float32 and s.shape == (rows, 1)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    assert kernels.describe()["ops"]["quantize_rows_fp8"] == "triton"
    # and it is a quantization: within half an e4m3 step of x (relative 2^-4; 2^-10 of the scale in subnormals)
    xd = x.double().reshape(rows, -1)
    err = (q.double() * s.double() - xd).abs()
    assert (err <= xd.abs() * 2 ** -4 + s.double() * 2 ** -10 + 1e-30).all()
    assert (q[0].float() == 0).all()  # the zero row stays zero (its scale is the 1e-12 floor)


def test_e4m3_rounding_every_value_and_tie():
    """Every finite e4m3 value, every midpoint between neighbours (ties to even) and the fp32 numbers either side
    of each midpoint, in a row whose amax is 448 (scale 1): the kernel's rounding equals torch's cast bit for bit
    (the interpreter's own fp8 cast does not: it rounds -126.7 to -64)."""
    vals = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    row = torch.cat([torch.tensor([448.0]), vals, mids, torch.nextafter(mids, torch.tensor(1e9)),
                     torch.nextafter(mids, torch.tensor(-1e9))]).to(DEV)
    q, s = ops.quantize_rows_fp8(row[None])
    assert float(s) == 1.0
    assert torch.equal(_bits(q[0]), _bits(row.to(E4M3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [72, 3072, 100])
def test_swiglu_fp8_against_float64_and_the_unfused_kernels(H, dtype):
    """silu(a)*b quantized per row: bit for bit what our SwiGLU kernel followed by quantize_fp8 gives, and within
    e4m3's rounding (+ the SwiGLU's own rounding to dtype) of the float64 SwiGLU."""
    g = torch.Generator().manual_seed(1)
    x12 = (torch.randn(2, 19, 2 * H, generator=g) * 3).to(dtype).to(DEV)
    q, s = ops.swiglu_fp8(x12)
    assert q.shape == (38, H) and s.shape == (38, 1)
    qu, su = fp8_quant.quantize_rows_fp8_reference(swiglu_triton(x12))
    assert torch.equal(_bits(q), _bits(qu)) and torch.equal(s, su)
    exact = reference.swiglu(x12.double()).reshape(38, H)
    rnd = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20
    err = (q.double() * s.double() - exact).abs()
    assert (err <= exact.abs() * (2 ** -4 + 2 * rnd) + s.double() * 2 ** -10 + 1e-12).all()
    # the reference (torch's SwiGLU in dtype, then the quantization) is the same function
    qr, sr = fp8_quant.swiglu_fp8_reference(x12)
    torch.testing.assert_close(q.double() * s.double(), qr.double() * sr.double(),
                               rtol=2 ** -3, atol=float(s.max()) * 2 ** -9)


@pytest.mark.parametrize("shape", [(2, 17, 72), (37, 1152), (5, 3072)])
def test_pow2_scales_bitwise_the_training_quantizer(shape):
    """pow2=True (the FP8 training recipe's scales): both kernels give the bytes and scales of
    kernels.fp8_linear.quantize_along(x, -1, pow2=True), the trainer's own quantizer, on ragged rows; the scales are
    powers of two >= amax / 448."""
    from kernels.fp8_linear import quantize_along
    x = _rows(shape, torch.bfloat16, seed=5)
    q, s = ops.quantize_rows_fp8(x, pow2=True)
    qt, st = quantize_along(x.reshape(-1, shape[-1]), -1, pow2=True)
    assert torch.equal(_bits(q), _bits(qt)) and torch.equal(s, st)
    amax = x.float().abs().reshape(-1, shape[-1]).amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
    assert torch.equal(torch.exp2(torch.log2(s).round()), s) and (s >= amax).all() and (s < 2 * amax).all()
    x12 = (_rows((*shape[:-1], 2 * shape[-1]), torch.bfloat16, seed=6) * 0.01)
    q, s = ops.swiglu_fp8(x12, pow2=True)
    qt, st = quantize_along(swiglu_triton(x12).reshape(-1, shape[-1]), -1, pow2=True)
    assert torch.equal(_bits(q), _bits(qt)) and torch.equal(s, st)
    qr, sr = fp8_quant.swiglu_fp8_reference(x12, pow2=True)  # torch's SwiGLU (its own rounding), then the same
    assert torch.equal(torch.exp2(torch.log2(sr).round()), sr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [72, 3072, 100])
def test_swiglu_fp8_colmax_is_swiglu_fp8_and_the_column_maxima(H, dtype):
    """swiglu_fp8_colmax: swiglu_fp8's bytes and scales, and each column's max |h| over the rows (ragged: 38 rows
    in tiles of 4), bit for bit the max of our SwiGLU kernel's output; the reference's the same of torch's SwiGLU."""
    x12 = (_rows((2, 19, 2 * H), dtype, seed=2) * 0.01)
    for pow2 in (False, True):
        q, s, col = ops.swiglu_fp8_colmax(x12, pow2=pow2)
        q1, s1 = ops.swiglu_fp8(x12, pow2=pow2)
        assert torch.equal(_bits(q), _bits(q1)) and torch.equal(s, s1)
        assert col.dtype == torch.float32 and col.shape == (H,)
        assert torch.equal(col, swiglu_triton(x12).reshape(38, H).float().abs().amax(dim=0))
    assert kernels.describe()["ops"]["swiglu_fp8_colmax"] == "triton"
    qr, sr, colr = fp8_quant.swiglu_fp8_colmax_reference(x12, pow2=True)
    assert torch.equal(colr, reference.swiglu(x12).reshape(38, H).float().abs().amax(dim=0))
    qr1, sr1 = fp8_quant.swiglu_fp8_reference(x12, pow2=True)
    assert torch.equal(_bits(qr), _bits(qr1)) and torch.equal(sr, sr1)
    q, s, col = ops.swiglu_fp8_colmax(torch.empty(0, 2 * H, device=DEV, dtype=dtype))
    assert q.shape == (0, H) and torch.equal(col, torch.zeros(H, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 77), (2, 17, 72), (130, 48), (3, 1152), (16, 16)])
def test_quantize_rows_cols_bitwise_the_trainers_quantizer(shape, dtype):
    """quantize_rows_cols_fp8 (a gradient as dgrad's and wgrad's operands): per row, the bytes and scales of the
    trainer's own quantize_along(g, -1, pow2); per column, those of quantize_along(pad_rows(g).t(), -1, pow2) -- the
    padding to 16 rows included (rows 37, 34, 130, 3, 16; tiles of 4 x 16 under the interpreter, ragged); the column
    sums within fp32 rounding of float64's. Rows and columns of very different magnitudes, a zero row, an outlier."""
    from kernels.fp8_linear import quantize_along
    g = _rows(shape, dtype, seed=4) * torch.exp(2 * torch.randn(shape[-1])).to(dtype).to(DEV)
    q, s, qt, st, col_sum = ops.quantize_rows_cols_fp8(g, pow2=True)
    assert kernels.describe()["ops"]["quantize_rows_cols_fp8"] == "triton"
    g2 = g.reshape(-1, shape[-1])
    M, N = g2.shape
    Mp = max(16, -(-M // 16) * 16)
    assert q.shape == (M, N) and s.shape == (M, 1) and qt.shape == (N, Mp) and st.shape == (N, 1)
    assert q.dtype == qt.dtype == E4M3 and s.dtype == st.dtype == col_sum.dtype == torch.float32
    qr, sr = quantize_along(g2, -1, pow2=True)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    qtr, str_ = quantize_along(fp8_quant.pad_rows(g2).t().contiguous(), -1, pow2=True)
    assert torch.equal(_bits(qt), _bits(qtr)) and torch.equal(st, str_)
    assert (qt[:, M:].float() == 0).all()  # the padding
    exact = g2.double().sum(dim=0)
    assert ((col_sum.double() - exact).abs() <= 1e-6 * g2.double().abs().sum(dim=0) + 1e-30).all()
    # the reference (plain ops) is the same function
    ref = fp8_quant.quantize_rows_cols_fp8_reference(g, pow2=True)
    for a, b in zip((q, s, qt, st), ref[:4]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a, b.view(torch.uint8) if b.dtype == E4M3 else b)
    torch.testing.assert_close(col_sum, ref[4], rtol=1e-5, atol=1e-5 * float(g2.float().abs().sum(0).max()))
    # and without pow2 (scales amax x fp32(1/448)), as quantize_fp8
    q, s, qt, st, _ = ops.quantize_rows_cols_fp8(g, pow2=False)
    qr, sr, qtr, str_, _ = fp8_quant.quantize_rows_cols_fp8_reference(g, pow2=False)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr) and torch.equal(_bits(qt), _bits(qtr))
    assert torch.equal(st, str_)


def test_quantize_rows_cols_no_rows():
    q, s, qt, st, col_sum = ops.quantize_rows_cols_fp8(torch.empty(0, 48, device=DEV, dtype=torch.bfloat16))
    assert q.shape == (0, 48) and s.shape == (0, 1) and qt.shape == (48, 16) and st.shape == (48, 1)
    assert (qt.float() == 0).all() and torch.equal(col_sum, torch.zeros(48, device=DEV))


def test_scale_is_the_product_with_the_reciprocal_as_torch_computes_it_on_cuda():
    """The recipe's scale is amax * fp32(1 / 448): what torch on CUDA computes for `amax / 448` (a * (1 / b) for a
    Python divisor), where the CPU divides. The H200 suite found the kernel (then dividing) an ulp off eager CUDA
    torch in some rows; the product is the same on the CPU, the GPU, under inductor and in our kernels."""
    from kernels.fp8_linear import quantize_along
    g = torch.Generator().manual_seed(3)
    amax = torch.rand(4096, 1, generator=g) * 100 + 1e-3
    cuda_way = amax * torch.tensor(1.0, dtype=torch.float32).div(448.0)  # fp32 reciprocal, then the product
    assert not torch.equal(cuda_way, amax / 448.0)  # the two differ somewhere: this test can fail
    x = torch.cat([amax, -amax / 3, amax / 7], dim=1)  # each row's amax is its first column
    for s in (fp8_quant.quantize_fp8(x, rowwise=True)[1], quantize_along(x, -1)[1]):
        assert torch.equal(s, cuda_way)
    # our kernel on the first 256 rows, 133 of them rows where the product and the quotient differ (the interpreter's
    # time is its programs, 4 rows each: all 4,096 rows took 25 s on the 2-core CI box for nothing more)
    n = 256
    assert not torch.equal(cuda_way[:n], amax[:n] / 448.0)
    assert torch.equal(ops.quantize_rows_fp8(x[:n].to(DEV))[1].cpu(), cuda_way[:n])


def test_pow2_ceil_exact_at_the_edges():
    """The smallest power of two >= s from the bits: s itself at a power of two, the next one up one ulp above
    (where exp2(ceil(log2(s))) in fp32 can round back down), the 1e-12 / 448 floor a normal float."""
    p = 2.0 ** torch.arange(-40, 20, dtype=torch.float32)
    up = torch.nextafter(p, torch.full_like(p, float("inf")))
    down = torch.nextafter(p, torch.zeros_like(p))
    assert torch.equal(fp8_quant.pow2_ceil(p), p) and torch.equal(fp8_quant.pow2_ceil(up), 2 * p)
    assert torch.equal(fp8_quant.pow2_ceil(down), p)
    floor = torch.tensor([1e-12 / 448], dtype=torch.float32)
    assert fp8_quant.pow2_ceil(floor) >= floor and fp8_quant.pow2_ceil(floor) < 2 * floor


def _same_or_both_nan(q, qr):
    """e4m3 bytes equal where the reference's are not NaN, NaN where they are (a NaN's sign bit is the device's:
    torch on the CPU writes inf * 0 as a negative NaN, the GPU's cvt and torch on CUDA as 0x7F)."""
    nan = qr.float().isnan()
    return torch.equal(q.float().isnan(), nan) and torch.equal(_bits(q)[~nan], _bits(qr)[~nan])


def _same_scales(s, sr):
    return torch.equal(s.isnan(), sr.isnan()) and torch.equal(s[~s.isnan()], sr[~sr.isnan()])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("pow2", [False, True])
def test_a_nan_or_inf_stays_non_finite_as_in_torch(pow2):
    """A NaN or an infinity in a row (or column) comes out of every FP8 kernel as torch's quantizer gives it: a NaN
    amax makes the row's scale NaN and its values NaN, an infinite one an infinite scale. Before, the kernels' max
    and clamp took the other operand of a NaN (the hardware's max.f32, which the interpreter follows): the amax
    skipped it and the clamp turned the NaN into -448, a finite value, so the step's non-finite guard could not see
    it; and pow2_ceil made a NaN scale -0.0. Rows with no NaN keep their bytes bit for bit."""
    def spoil(t):
        t = t.clone()
        flat = t.view(-1, t.shape[-1])
        flat[1, 5], flat[2, 7], flat[3, 9] = float("nan"), float("inf"), float("-inf")
        return t
    x = spoil(_rows((37, 1152), torch.float32))
    q, s = ops.quantize_rows_fp8(x, pow2=pow2)
    qr, sr = fp8_quant.quantize_rows_fp8_reference(x, pow2=pow2)
    assert _same_or_both_nan(q, qr) and _same_scales(s, sr)
    assert s[1].isnan() and q[1].float().isnan().all() and s[2].isinf() and s[3].isinf()
    x12 = spoil(torch.randn(6, 2 * 72, generator=torch.Generator().manual_seed(1)).to(DEV))
    q, s = ops.swiglu_fp8(x12, pow2=pow2)
    qr, sr = fp8_quant.quantize_rows_fp8_reference(swiglu_triton(x12), pow2=pow2)  # the unfused kernels' path
    assert _same_or_both_nan(q, qr) and _same_scales(s, sr) and s[1].isnan()
    q, s, colmax = ops.swiglu_fp8_colmax(x12, pow2=pow2)
    assert _same_or_both_nan(q, qr) and _same_scales(s, sr)
    assert colmax[5].isnan() and colmax[7].isinf() and colmax.isfinite().sum() == 72 - 3
    if pow2:  # the training recipe's: the gradient both ways, and its column sums
        g = spoil(_rows((37, 160), torch.float32))
        out = ops.quantize_rows_cols_fp8(g, pow2=True)
        ref = fp8_quant.quantize_rows_cols_fp8_reference(g, pow2=True)
        assert _same_or_both_nan(out[0], ref[0]) and _same_or_both_nan(out[2], ref[2])
        assert all(_same_scales(a, b) for a, b in zip(out[1::2], ref[1::2])) and out[3][5].isnan()
        assert torch.equal(out[4].isnan(), ref[4].isnan()) and out[4][5].isnan()
    else:  # the sampler's block norms: a NaN in the residual stream spoils its rows
        xn, y, w, shift, scale, gate = _norm_inputs((2, 64, 72), torch.float32)
        rows = ops.norm_modulate_fp8(spoil(xn), w, shift, scale, 1e-6, "rms")
        qu, su = fp8_quant.quantize_fp8(ops.norm_modulate(spoil(xn), w, shift, scale, 1e-6, "rms").reshape(-1, 72),
                                        rowwise=True)  # the unfused path: the norm kernel, then the quantization
        assert _same_or_both_nan(rows.values.reshape(-1, 72), qu) and _same_scales(rows.scale.reshape(-1, 1), su)
        assert rows.scale.reshape(-1)[1].isnan() and rows.scale.isfinite().sum() == 128 - 3


def test_pow2_ceil_keeps_nan():
    """pow2_ceil's next exponent up of a NaN's bits would be the sign bit: -0.0, a finite scale."""
    s = torch.tensor([float("nan"), float("inf"), 3.0, 0.25])
    assert torch.equal(fp8_quant.pow2_ceil(s)[1:], torch.tensor([float("inf"), 4.0, 0.25]))
    assert fp8_quant.pow2_ceil(s)[0].isnan()


def test_empty_inputs_and_bad_packing():
    q, s = ops.quantize_rows_fp8(torch.empty(0, 1152, device=DEV))
    assert q.shape == (0, 1152) and s.shape == (0, 1)
    q, s = ops.swiglu_fp8(torch.empty(2, 0, 64, device=DEV))
    assert q.shape == (0, 32) and s.shape == (0, 1)
    with pytest.raises(ValueError, match="even last dim"):
        ops.swiglu_fp8(torch.randn(3, 7, device=DEV))


@pytest.mark.parametrize("op", ["quantize_rows_fp8", "swiglu_fp8", "swiglu_fp8_colmax", "quantize_rows_cols_fp8"])
def test_opcheck(op):
    """The custom ops' schema, fake (meta) implementation and AOT dispatch agree with what they compute."""
    fn = {"quantize_rows_fp8": fp8_quant.quantize_rows_fp8_op, "swiglu_fp8": fp8_quant.swiglu_fp8_op,
          "swiglu_fp8_colmax": fp8_quant.swiglu_fp8_colmax_op,
          "quantize_rows_cols_fp8": fp8_quant.quantize_rows_cols_fp8_op}[op]
    x = torch.randn(2, 5, 64, device=DEV, dtype=torch.bfloat16)
    for args in ((x,), (x, True)):  # the sampler's scales, the training recipe's powers of two
        torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ------------------------------------------------------------------ the sampler's modules (modeling/fp8.py)

def _emulated(model):
    from modeling.fp8 import check_scaled_mm
    check_scaled_mm(DEV, allow_cpu=True)
    return model


def _tiny_model():
    from modeling.lightningdit import LightningDiT
    torch.manual_seed(0)
    return LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        num_classes=3, mlp_ratio=3.0).to(torch.bfloat16).to(DEV).eval()


def test_fp8_linear_with_the_row_kernel_and_the_fp8_swiglu_mlp():
    """FP8Linear(input_kernel=True) runs the same GEMM on the same quantized input as the plain-ops FP8Linear;
    FP8SwiGLUFFN equals w3's dequantized product of the kernels' swiglu_fp8, and the unfused FP8 MLP within one
    e4m3 step of w3's input."""
    from modeling.fp8 import FP8Linear, FP8SwiGLUFFN
    from modeling.lightningdit import SwiGLUFFN
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16).to(DEV)
    x = torch.randn(2, 7, 64, device=DEV, dtype=torch.bfloat16)
    plain, kern = FP8Linear(lin), FP8Linear(lin, input_kernel=True)
    with torch.no_grad():
        assert torch.equal(plain(x), kern(x))
    with pytest.raises(ValueError, match="rowwise"):
        FP8Linear(lin, rowwise=False, input_kernel=True)

    mlp = SwiGLUFFN(64, 96).to(torch.bfloat16).to(DEV)
    fused = FP8SwiGLUFFN(mlp)
    with torch.no_grad():
        y = fused(x)
        h12 = fused.w12(x)
        want = fused.w3.dequantized_matmul(*fp8_quant.swiglu_fp8_reference(h12)).reshape(2, 7, 64)
        unfused = FP8Linear(mlp.w3)(swiglu_triton(FP8Linear(mlp.w12)(x)))
    assert y.shape == (2, 7, 64) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)  # bf16 output of an fp32 accumulation
    torch.testing.assert_close(y.float(), unfused.float(), rtol=0.13, atol=0.05)
    assert kernels.describe()["ops"]["swiglu_fp8"] == "triton"


def test_apply_fp8_inference_ours_swaps_the_mlps_and_proj_and_keeps_the_keys():
    from modeling.fp8 import FP8Linear, FP8SwiGLUFFN, FP8Unavailable, apply_fp8_inference
    inline = apply_fp8_inference(_randomised_tiny_model(), "rowwise", allow_cpu=True, quant="inline")
    ours = apply_fp8_inference(_emulated(_randomised_tiny_model()), "rowwise", allow_cpu=True, quant="ours")
    assert list(inline.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a, b.view(torch.uint8) if b.dtype == E4M3
                           else b) for a, b in zip(inline.state_dict().values(), ours.state_dict().values()))
    assert sum(isinstance(m, FP8SwiGLUFFN) for m in ours.modules()) == 2
    assert [n for n, m in ours.named_modules() if isinstance(m, FP8Linear) and m.input_kernel] == \
        ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert not any(isinstance(m, FP8SwiGLUFFN) or getattr(m, "input_kernel", False) for m in inline.modules())
    x = torch.randn(2, 4, 4, 4, device=DEV, dtype=torch.bfloat16)
    t, y = torch.rand(2, device=DEV, dtype=torch.bfloat16), torch.tensor([0, 2], device=DEV)
    with torch.no_grad():
        a, b = inline(x, t, y).float(), ours(x, t, y).float()
    assert torch.isfinite(b).all() and a.abs().max() > 0.1 and (a - b).abs().max() <= 0.05 * a.abs().max()
    # a w3 kept in bf16 stays so: its MLP is not made an FP8SwiGLUFFN (whose w3 is FP8)
    kept = apply_fp8_inference(_tiny_model(), "rowwise", allow_cpu=True, quant="ours", skip=("mlp.w3",))
    assert not any(isinstance(m, FP8SwiGLUFFN) for m in kept.modules())
    assert type(kept.blocks[0].mlp.w3) is torch.nn.Linear and isinstance(kept.blocks[0].mlp.w12, FP8Linear)
    with pytest.raises(FP8Unavailable, match="per row"):
        apply_fp8_inference(_tiny_model(), "tensorwise", allow_cpu=True, quant="ours")
    with pytest.raises(FP8Unavailable, match="choose one of"):
        apply_fp8_inference(_tiny_model(), "rowwise", allow_cpu=True, quant="fused")


def test_sampler_fp8_quant_resolves_and_refuses(monkeypatch):
    """auto: our kernels where Triton runs (here the interpreter), else torch ops; 'ours' where Triton cannot run
    is a one-line refusal; 'ours' with tensorwise or torchao is refused by SamplingConfig, naming the field."""
    import modeling.sampling as sampling
    from modeling.fp8 import FP8SwiGLUFFN
    from modeling.sampling import Sampler, SamplerUnavailable, SamplingConfig, SamplingConfigError
    c = SamplingConfig(precision="fp8", steps=3)
    s = Sampler(_randomised_tiny_model(), c, fp8_emulation=True)  # random adaLN and output layers: a real output
    assert "quantize_rows_fp8" in s.describe()["fp8"] and any(isinstance(m, FP8SwiGLUFFN) for m in s.model.modules())
    assert "norm_modulate_fp8" in s.describe()["fp8"]
    z, y = torch.randn(2, 4, 4, 4, device=DEV), torch.tensor([0, 1], device=DEV)
    ours = s(z, y)  # through generate's Sampler: the norms hand qkv and w12 their e4m3 rows
    assert torch.isfinite(ours).all()
    assert kernels.describe()["ops"]["gated_residual_norm_modulate_fp8"] == "triton"
    s = Sampler(_randomised_tiny_model(), c.replace(fp8_quant="inline"), fp8_emulation=True)
    assert "torch ops" in s.describe()["fp8"] and not any(isinstance(m, FP8SwiGLUFFN) for m in s.model.modules())
    inline = s(z, y)
    # the same model within FP8's rounding (ours rounds SwiGLU and norms as our kernels do, inline as torch)
    assert torch.isfinite(inline).all() and (ours - z).abs().max() > 0.1
    assert (ours - inline).abs().max() <= 0.1 * (inline - z).abs().max()
    monkeypatch.setattr(sampling, "triton_status", lambda x: (False, "no Triton here"))
    s = Sampler(_tiny_model(), c, fp8_emulation=True)
    assert "torch ops" in s.describe()["fp8"]
    with pytest.raises(SamplerUnavailable, match="fp8_quant ours needs the Triton kernels: no Triton here"):
        Sampler(_tiny_model(), c.replace(fp8_quant="ours"), fp8_emulation=True)
    for bad in (dict(fp8_recipe="tensorwise"), dict(fp8_impl="torchao")):
        with pytest.raises(SamplingConfigError, match="fp8_quant 'ours' runs with") as e:
            c.replace(fp8_quant="ours", **bad)
        assert e.value.field == "fp8_quant"


def test_colmax_spans_hold_whole_tiles():
    """swiglu_fp8_colmax's programs take spans of rows that every autotuned BLOCK_M divides (no tile shared by two
    programs), at most COLMAX_PROGRAMS of them."""
    from kernels.fused_norm import _TILES
    for rows in (1, 38, 1000, 65536, 65536 + 7, 10 ** 6):
        span = fp8_quant._colmax_span(rows)
        assert all(span % m == 0 for m, _ in _TILES) and -(-rows // span) <= fp8_quant.COLMAX_PROGRAMS


def test_row_split_exact_where_the_width_is_two_powers_of_two():
    """The kernels hold a row as two power-of-two tiles: exact (no masked lane) for XL/1's widths, 1152 (attention's
    output) and 3072 (the SwiGLU's), and for head_dim 72; other widths mask only the second tile's rest."""
    assert [fp8_quant.row_split(c) for c in (1152, 3072, 72, 2048, 16, 100, 3, 1)] == \
        [(1024, 128), (2048, 1024), (64, 8), (1024, 1024), (8, 8), (64, 64), (2, 1), (1, 1)]


def test_scale_inverse_is_the_ieee_reciprocal_from_the_exponent_bits():
    """fp8_quant.scale_inverse: for power-of-two scales 2^-e from the bits of 2^e, bit for bit torch.reciprocal over
    every exponent a clamped amax can give (and the extremes of the normal range); a non-finite scale keeps the
    reciprocal; the same under torch.compile's tracing (no approximate division to lower)."""
    from kernels.fp8_quant import scale_inverse
    exps = torch.arange(-126, 127, dtype=torch.float32)
    scale = torch.exp2(exps).reshape(-1, 1)
    want = torch.reciprocal(scale)
    assert torch.equal(scale_inverse(scale, True).view(torch.int32), want.view(torch.int32))
    odd = torch.tensor([float("inf"), float("nan"), 3.0])
    assert torch.equal(scale_inverse(odd, True)[:2].isnan(), torch.tensor([False, True]))
    assert float(scale_inverse(odd, True)[0]) == 0.0 and float(scale_inverse(odd, False)[2]) == float(1 / torch.tensor(3.0))
    traced = torch.compile(scale_inverse, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(scale, True).view(torch.int32), want.view(torch.int32))


# ------------------------------------------------------------------ the block norms with their output in e4m3

_NORM_VARIANTS = {"gated rms": ("gated", "rms", True), "rms without shift": ("plain", "rms", False),
                  "gated layer": ("gated", "layer", True)}


def _norm_inputs(shape, dtype, seed=3):
    B, N, C = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    x, y, w, mod = r(B, N, C) * 3, r(B, N, C), r(C), r(B, 6 * C)
    return x, y, w, mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:3 * C]  # shift, scale, gate: strided, as the model's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 257, 1152), (2, 64, 72)], ids=["hidden1152-ragged", "head72-one-sample"])
@pytest.mark.parametrize("variant", list(_NORM_VARIANTS))
def test_norm_fp8_is_the_norm_kernel_then_the_row_quantization(variant, shape, dtype):
    """norm_modulate_fp8 / gated_residual_norm_modulate_fp8: h bit for bit the norm kernel's, the e4m3 rows and
    scales bit for bit quantize_fp8 of the norm kernel's output (what the unfused path hands its FP8 Linear), and
    within e4m3's rounding (+ the output's rounding to dtype) of the float64 norm of that h. Hidden 1152 as two tiles
    with 257 tokens (tiles straddle samples), head_dim 72 with 64 (ONE_SAMPLE)."""
    res, kind, with_shift = _NORM_VARIANTS[variant]
    x, y, w, shift, scale, gate = _norm_inputs(shape, dtype)
    w = w if kind == "rms" else None  # the block's LayerNorm has no affine
    shift = shift if with_shift else None
    C = shape[-1]
    if res == "gated":
        h, rows = ops.gated_residual_norm_modulate_fp8(x, gate, y, w, shift, scale, 1e-6, kind)
        hu, out = ops.gated_residual_norm_modulate(x, gate, y, w, shift, scale, 1e-6, kind)
        assert torch.equal(h, hu) and kernels.describe()["ops"]["gated_residual_norm_modulate_fp8"] == "triton"
    else:
        rows = ops.norm_modulate_fp8(x, w, shift, scale, 1e-6, kind)
        out, h = ops.norm_modulate(x, w, shift, scale, 1e-6, kind), x
        assert kernels.describe()["ops"]["norm_modulate_fp8"] == "triton"
    assert isinstance(rows, fp8_quant.FP8Rows) and rows.values.dtype == E4M3 and rows.values.shape == shape
    assert rows.scale.dtype == torch.float32 and rows.scale.shape == (*shape[:-1], 1)
    qu, su = fp8_quant.quantize_fp8(out.reshape(-1, C), rowwise=True)
    assert torch.equal(_bits(rows.values.reshape(-1, C)), _bits(qu)) and torch.equal(rows.scale.reshape(-1, 1), su)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    exact = reference.norm_modulate(d(h), d(w), d(shift), d(scale), 1e-6, kind).reshape(-1, C)
    deq = rows.values.double().reshape(-1, C) * rows.scale.double().reshape(-1, 1)
    rnd = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -20  # the output's rounding (the interpreter truncates)
    s = rows.scale.double().reshape(-1, 1)
    assert ((deq - exact).abs() <= exact.abs() * (2 ** -4 + 2 * rnd) + s * 2 ** -9 + 1e-9).all()


def test_norm_fp8_refusals_and_no_rows():
    x, y, w, shift, scale, gate = _norm_inputs((2, 3, 40), torch.bfloat16)
    with pytest.raises(ValueError, match="float8_e4m3fn rows; got out_dtype torch.bfloat16"):
        ops.norm_modulate_fp8(x, w, shift, scale, 1e-6, "rms", torch.bfloat16)
    with pytest.raises(ValueError, match="unknown norm kind"):
        ops.norm_modulate_fp8(x, w, shift, scale, 1e-6, "batch")
    with pytest.raises(ValueError, match="float8_e4m3fn rows"):
        fp8_quant.gated_residual_norm_modulate_fp8_reference(x, gate, y, w, shift, scale, 1e-6, "rms", torch.float32)
    h, rows = ops.gated_residual_norm_modulate_fp8(x[:, :0], gate, y[:, :0], w, shift, scale)
    assert h.shape == (2, 0, 40) and rows.values.shape == (2, 0, 40) and rows.scale.shape == (2, 0, 1)


def test_norm_fp8_opcheck():
    x, y, w, shift, scale, gate = _norm_inputs((2, 5, 64), torch.bfloat16)
    for args in ((x, gate, y, w, shift, scale, 1e-6, True), (x, None, None, w, None, scale, 1e-6, False)):
        torch.library.opcheck(fp8_quant.norm_fp8_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _randomised_tiny_model():
    """_tiny_model with every parameter random (the zero-initialised adaLN and output layers would hide the norms)."""
    m = _tiny_model()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def test_fp8_sampler_model_with_the_norms_quantizing_is_the_unfused_model_bit_for_bit(tmp_path, monkeypatch):
    """quant 'ours': qkv's and w12's FP8Linear declare e4m3 input, the blocks' norms hand them FP8Rows, and the
    model's output is bit for bit the same model with those Linears quantizing the norms' bf16 output themselves,
    eager and under torch.compile(fullgraph=True), where the fused kernel runs (spied: 2 norms a block)."""
    from modeling.fp8 import FP8Linear, FP8SwiGLUFFN, apply_fp8_inference
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fused = apply_fp8_inference(_emulated(_randomised_tiny_model()), "rowwise", allow_cpu=True, quant="ours")
    unfused = apply_fp8_inference(_randomised_tiny_model(), "rowwise", allow_cpu=True, quant="ours")
    assert sorted(n for n, m in fused.named_modules() if getattr(m, "input_dtype", None) == E4M3) == \
        [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "mlp", "mlp.w12")]
    for m in unfused.modules():
        if isinstance(m, (FP8Linear, FP8SwiGLUFFN)):
            m.input_dtype = None
    x = torch.randn(2, 4, 4, 4, device=DEV, dtype=torch.bfloat16)
    t, y = torch.rand(2, device=DEV, dtype=torch.bfloat16), torch.tensor([0, 2], device=DEV)
    launches = []

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    kernel = fp8_quant._norm_quant_kernel
    monkeypatch.setattr(fp8_quant, "_norm_quant_kernel", Spy())
    with torch.no_grad():
        want = unfused(x, t, y)
        assert not launches
        assert torch.equal(fused(x, t, y), want) and len(launches) == 4
        torch._dynamo.reset()
        compiled_want = torch.compile(unfused, fullgraph=True)(x, t, y)
        kernels.set_backend("triton")  # clears what ran: the trace below records its own
        got = torch.compile(fused, fullgraph=True)(x, t, y)
    assert torch.equal(got, compiled_want) and len(launches) == 8
    ran = kernels.describe()["ops"]
    assert ran["norm_modulate_fp8"] == ran["gated_residual_norm_modulate_fp8"] == "triton"


def test_fp8_norm_rows_through_the_unfused_attention_and_layernorm_blocks():
    """LayerNorm blocks (no affine) and the LayerNorm qk-norm, whose attention takes the unfused path (the qkv
    Linear, then reshape): the e4m3 rows reach qkv there too, bit for bit the unfused model (eager)."""
    from modeling.fp8 import FP8Linear, FP8SwiGLUFFN, apply_fp8_inference
    from modeling.lightningdit import LightningDiT

    def model():
        torch.manual_seed(1)
        m = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                         num_classes=3, mlp_ratio=3.0, use_qknorm=True, use_rmsnorm=False)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
        return apply_fp8_inference(_emulated(m.to(torch.bfloat16).to(DEV).eval()), "rowwise", allow_cpu=True,
                                   quant="ours")
    fused, unfused = model(), model()
    for m in unfused.modules():
        if isinstance(m, (FP8Linear, FP8SwiGLUFFN)):
            m.input_dtype = None
    x = torch.randn(2, 4, 4, 4, device=DEV, dtype=torch.bfloat16)
    t, y = torch.rand(2, device=DEV, dtype=torch.bfloat16), torch.tensor([0, 2], device=DEV)
    with torch.no_grad():
        want = unfused(x, t, y)
        assert torch.equal(fused(x, t, y), want) and want.abs().max() > 0.1
    assert kernels.describe()["ops"]["gated_residual_norm_modulate_fp8"] == "triton"
