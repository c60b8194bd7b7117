"""normkit's Triton kernels compile for a GPU (sm_90) without one: Triton's ahead-of-time path
(source → TTIR → TTGIR → LLVM → PTX → ptxas) on the CPU machine.

The interpreter (``tests/test_triton.py``) checks the kernels' arithmetic but is more permissive than
the compiler (loop-carried types, constexpr branches, pointer dtypes); this catches what would only
fail on the GPU's first call. Two configurations of the norm kernels — bfloat16 RMSNorm rows in one tile,
float32 GroupNorm segments with a residual, looping — and DyT (123 configurations over bf16/fp32/fp64,
both layouts, one tile or looping, with and without affine/residual, compiled when the kernels were written).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from normkit.kernels.triton import launch, source  # noqa: E402

if launch.imported_for_interpreter():
    pytest.skip("triton was imported for the interpreter in this process", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _compile(fn, types: dict[str, str], consts: dict, warps: int = 4):
    jf = JITFunction(fn)
    signature = {n: "constexpr" if n in consts else types[n] for n in jf.arg_names}
    try:
        return triton.compile(ASTSource(fn=jf, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except (FileNotFoundError, RuntimeError) as e:  # no ptxas shipped with this triton build
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas: {e}")
        raise


def _fwd_types(dt: str, acc: str) -> dict[str, str]:
    p = {n: "*" + dt for n in ("X", "R", "S", "Y", "W", "B")} | {n: "*" + acc for n in ("MEAN", "VAR", "RSTD")}
    return p | {n: "i32" for n in ("Cg", "L", "G", "n_lblocks", "n_red")} | {"eps": "fp32"}


def _bwd_types(dt: str, acc: str) -> dict[str, str]:
    p = {n: "*" + dt for n in ("DY", "GS", "S", "W", "DX")} | {n: "*" + acc for n in ("MEAN", "RSTD", "PW", "PB")}
    return p | {n: "i32" for n in ("Cg", "L", "G", "n_lblocks", "n_units", "units_per_prog", "K", "n_red")}


@pytest.mark.parametrize(
    "dt, acc, acc_tl, seg, single, center",
    [("bf16", "fp32", tl.float32, False, True, False), ("fp32", "fp32", tl.float32, True, False, True)],
)
def test_norm_kernels_compile_for_sm90(dt, acc, acc_tl, seg, single, center):
    bc, bl = (4096, 1) if single else (16, 64)
    _compile(source.norm_fwd, _fwd_types(dt, acc),
             dict(ACC=acc_tl, HAS_R=True, HAS_W=True, HAS_B=center, CENTER=center, SEG=seg, SINGLE=single,
                  BLOCK_C=bc, BLOCK_L=bl), warps=launch.num_warps(bc * bl))
    _compile(source.norm_bwd, _bwd_types(dt, acc),
             dict(ACC=acc_tl, HAS_W=True, HAS_GS=not single, CENTER=center, SEG=seg, SINGLE=single, WANT_W=True,
                  WANT_B=center, REG_ACC=single and not seg, BLOCK_C=bc, BLOCK_L=bl), warps=launch.num_warps(bc * bl))
    _compile(source.partial_sum, {"P": "*" + acc, "OUT": "*" + acc, "n_rows": "i32", "K": "i32"}, dict(BLOCK=1024))


def test_dyt_kernels_compile_for_sm90():
    types = {n: "*bf16" for n in ("X", "A", "W", "B", "Y")} | {n: "i32" for n in ("C", "L", "n_lblocks")}
    _compile(source.dyt_fwd, types, dict(ACC=tl.float32, HAS_W=True, HAS_B=True, BLOCK_C=64, BLOCK_L=16))
    types = ({n: "*bf16" for n in ("DY", "X", "A", "W", "DX")} | {n: "*fp32" for n in ("PA", "PW", "PB")}
             | {n: "i32" for n in ("C", "L", "n_lblocks", "n_units", "units_per_prog")})
    _compile(source.dyt_bwd, types, dict(ACC=tl.float32, HAS_W=True, WANT_W=True, WANT_B=True, REG_ACC=False,
                                         BLOCK_C=64, BLOCK_L=16))
