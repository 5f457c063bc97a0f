"""The CPU emulation of the CUDA kernels (tests/cuda_emu.py, csrc/emu) tested itself: the source
rewrite, warp operations and conversions against their CUDA definitions, and every bug class it
must report, each by a kernel of csrc/emu/emu_selftest.cu that has that bug."""

from __future__ import annotations

import pytest
import torch

import cuda_emu

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(autouse=True)
def _first_to_last(cuda_emu_module):
    """These tests pick the thread order themselves (conftest alternates it for the op tests)."""
    cuda_emu_module.configure(132, False)


def run(emu, name, n=256, inp=None, out_n=None):
    """Case `name` of emu_selftest.cu with `n`; in[n] (random), out[out_n] (NaN), two int16 [n]."""
    inp = torch.randn(n) if inp is None else inp
    out = torch.full((6 * max(n, 64) if out_n is None else out_n,), float("nan"))
    a, b = (torch.zeros(n, dtype=torch.int16) for _ in range(2))
    emu.selftest(name, inp, out, a, b, n)
    return inp, out, a, b


# ---------------------------------------------------------------------------------------------
# The rewrite of .cu sources
# ---------------------------------------------------------------------------------------------
def test_rewrite_launch_and_shared_keep_line_numbers():
    src = ('// k<<<1, 2>>>(x) in a comment stays\n'
           '__global__ void k(float* x) {\n'
           '  __shared__ __align__(16) unsigned char raw[4 * N];\n'
           '  __shared__ float m_s[8], l_s[8][2],\n'
           '      z;\n'
           '  extern __shared__ float4 dyn[];\n'
           '}\n'
           'void f() { ns::k<T, 64><<<grid, 128, bytes,\n stream>>>(a, g(b,\n c)); }\n')
    out = cuda_emu.rewrite(src, "f.cu").split("\n", 1)[1]
    assert out.count("\n") == src.count("\n")
    assert "k<<<1, 2>>>(x) in a comment" in out
    assert "shared_var<unsigned char[4*N]>(pyfast_emu_slot_raw, \"raw\", 16)" in out
    assert "shared_var<float[8]>(pyfast_emu_slot_m_s" in out and "shared_var<float[8][2]>(pyfast_emu_slot_l_s" in out
    assert "shared_var<float>(pyfast_emu_slot_z" in out
    assert "float4* const dyn = static_cast<float4*>(::pyfast_emu::dynamic_shared());" in out
    assert ('::pyfast_emu::launch(::pyfast_emu::LaunchConfig(grid, 128, bytes,\n stream), "ns::k<T, 64>", '
            '[=] { ns::k<T, 64>(a, g(b,\n c)); })') in out
    assert "__shared__" not in out.split("\n", 1)[1]


# ---------------------------------------------------------------------------------------------
# What the emulation computes
# ---------------------------------------------------------------------------------------------
def test_warp_operations_follow_cuda(cuda_emu_module):
    _, out, _, _ = run(cuda_emu_module, "warp_ops", n=64)
    got = out.view(torch.int32)[: 64 * 6].view(64, 6)
    for t in range(64):
        lane, w0 = t % 32, t - t % 32
        v = lambda src: 100 * (w0 + src) + 7  # noqa: E731
        assert got[t, 0] == v(lane ^ 5)
        assert got[t, 1] == v(lane + 3 if lane + 3 < 32 else lane)
        assert got[t, 2] == v(lane - 2 if lane % 16 >= 2 else lane)
        assert got[t, 3] == v(lane - lane % 8 + 1)  # 9 % width 8 inside the lane's segment
        want_ballot = sum(1 << m for m in range(32) if m % 3 == 0 or w0 + m == 40)
        assert got[t, 4] == torch.tensor(want_ballot, dtype=torch.int64).to(torch.int32)
        assert got[t, 5] == (v(lane ^ 1) if lane < 16 else -1)


def test_barriers_and_shared_memory(cuda_emu_module):
    inp, out, _, _ = run(cuda_emu_module, "block_sum", n=200)
    torch.testing.assert_close(out[0], inp[:200].sum(), rtol=1e-5, atol=1e-5)


def test_conversions_round_like_the_device(cuda_emu_module):
    f32 = torch.finfo(torch.float32)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, float("inf"), float("-inf"),
                            2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11),
                            1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, f32.tiny, f32.max])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 30, (4000,), generator=g).float())
    inp = torch.cat([special, -special, rand])
    _, _, half_bits, bf16_bits = run(cuda_emu_module, "convert", n=inp.numel(), inp=inp)
    assert torch.equal(half_bits, inp.half().view(torch.int16))
    assert torch.equal(bf16_bits, inp.bfloat16().view(torch.int16))
    nan = torch.tensor([float("nan")] * 64)
    _, _, half_bits, bf16_bits = run(cuda_emu_module, "convert", n=64, inp=nan)
    assert (half_bits == 0x7FFF).all() and (bf16_bits == 0x7FFF).all()  # the device's canonical NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_tensor_core_mma_by_the_ptx_fragment_layouts(cuda_emu_module, dtype):
    """mma_m16n8k16 (csrc/common/cuda_mma.cuh): fragments built by the PTX ISA's layouts from
    row-major A, B, C give A @ B + C (operands rounded to fp16/bf16, fp32 accumulation)."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(*s, generator=g) for s in ((16, 16), (16, 8), (16, 8)))
    _, out, _, _ = run(cuda_emu_module, f"mma_{'f16' if dtype == torch.float16 else 'bf16'}", n=512,
                       inp=torch.cat([a.flatten(), b.flatten(), c.flatten()]))
    want = a.to(dtype).double() @ b.to(dtype).double() + c.double()
    torch.testing.assert_close(out[:128].view(16, 8).double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# What the emulation reports (each case is a kernel with that bug)
# ---------------------------------------------------------------------------------------------
BUGS = {
    "missing_barrier": "depend on uninitialised memory",
    "uninit_shared": "depend on uninitialised memory",
    "global_read_past_end": "illegal address .*past the end of a buffer of 128 bytes",
    "global_write_past_end": "out-of-bounds write next to a buffer of 1000 bytes",
    "shared_write_past_end": "out-of-bounds shared-memory write just past __shared__ s",
    "dynamic_read_past_end": "past the end of the dynamic shared memory",
    "deadlock": "deadlock: 32 of 64 live threads wait at __syncthreads",
    "exited_lane": "lane 5 in its mask, which has exited",
    "misaligned": "misaligned 16-byte load",
    "shared_limit": "shared memory over the limit: __shared__ big",
    "bad_launch": "invalid launch of block_sum_kernel: grid \\(1, 1, 1\\), block \\(2048, 1, 1\\)",
    "unchecked_launch_error": "a kernel error the host code did not report: invalid launch",
}


@pytest.mark.parametrize("case", list(BUGS))
def test_bug_is_reported(cuda_emu_module, case):
    n, out_n = {"global_read_past_end": (32, None), "dynamic_read_past_end": (32, None),
                "global_write_past_end": (250, 250)}.get(case, (256, None))
    with pytest.raises(RuntimeError, match=BUGS[case]):
        run(cuda_emu_module, case, n=n, out_n=out_n)


def test_thread_order_is_a_setting(cuda_emu_module):
    """Threads run first to last or last to first (the per-op tests alternate): a correct kernel
    gives the same result either way; this missing barrier shows only when readers run first."""
    try:
        for reverse in (False, True):
            cuda_emu_module.configure(132, reverse)
            inp, out, _, _ = run(cuda_emu_module, "block_sum", n=256)
            torch.testing.assert_close(out[0], inp.sum(), rtol=1e-5, atol=1e-5)
        run(cuda_emu_module, "missing_barrier", n=256)  # reversed: every write precedes its read
    finally:
        cuda_emu_module.configure(132, False)
    with pytest.raises(RuntimeError, match="uninitialised"):
        run(cuda_emu_module, "missing_barrier", n=256)


def test_unknown_case_and_the_module_state_after_errors(cuda_emu_module):
    with pytest.raises(RuntimeError, match="launch failed: invalid argument"):
        run(cuda_emu_module, "no such case")
    # After every report above, the next call is clean.
    inp, out, _, _ = run(cuda_emu_module, "block_sum", n=256)
    torch.testing.assert_close(out[0], inp.sum(), rtol=1e-5, atol=1e-5)
