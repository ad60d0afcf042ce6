"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

The interpreter (tests/test_kernels.py) checks what the kernels compute; this
checks that they also lower to PTX for sm_90 (an H100), where constructs the
interpreter accepts can still fail, and that aligned sizes get 128-bit memory
accesses. The lowering runs in a child process without TRITON_INTERPRET: the
test session sets it (tests/conftest.py, tests/test_kernels.py) before triton
is imported, which turns triton's own library functions (the combine function
of ``tl.sum``) into interpreter objects that real compilation cannot use.
Skipped when triton or its bundled NVIDIA toolchain is missing.

Run directly (``python tests/test_kernels_aot.py``) it prints the access counts as JSON.
"""
import json
import os
import re
import subprocess
import sys

import pytest

CASES = {
    # name: (kernel, storage pointer type, names holding multiples of 16, 64-bit sizes)
    "inner_fp32_aligned": ("_inner_kernel", "*fp32", "all", False),
    "inner_bf16_aligned": ("_inner_kernel", "*bf16", "all", False),
    "inner_fp32_unaligned": ("_inner_kernel", "*fp32", "none", False),
    "inner_fp32_int64": ("_inner_kernel", "*fp32", "none", True),
    "outer_bf16_aligned": ("_outer_kernel", "*bf16", "all", False),
    "outer_fp32_aligned": ("_outer_kernel", "*fp32", "all", False),
    "project_fp32_aligned": ("_project_kernel", "*fp32", "all", False),
}


def _signature(kernel, ptr, int64):
    size = "i64" if int64 else "i32"
    if kernel == "_inner_kernel":
        sig = {n: ptr for n in ["y_ptr", "v_ptr", "hg_ptr", "hr_ptr", "g_ptr", "y_out", "w_out", "hg_out", "hr_out"]}
        sig.update(part_ptr="*fp32", n=size, row_stride=size, beta="fp32", lam="fp32", keep_g="fp32",
                   keep_r="fp32", BLOCK="constexpr")
    elif kernel == "_outer_kernel":
        sig = {n: ptr for n in ["x_ptr", "hf_ptr", "g_ptr", "x_out", "hf_out"]}
        sig.update(n=size, row_stride=size, alpha="fp32", keep_f="fp32", BLOCK="constexpr")
    else:
        sig = {"w_ptr": ptr, "sq_ptr": "*fp32", "v_out": ptr, "n": size, "radius": "fp32", "BLOCK": "constexpr"}
    return sig


def lower_all() -> dict:
    """Compile every case for sm_90; {case: {"loads": {...}, "stores": {...}}} or {"skip": why}."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from torchbilevel.kernels import triton_update as T
    except ImportError as e:
        return {"skip": f"triton AOT API not importable: {e}"}
    if T.INTERPRETED:
        return {"error": "TRITON_INTERPRET is set: cannot lower for a GPU"}
    target = GPUTarget("cuda", 90, 32)
    out = {"BLOCK": T.BLOCK, "NUM_WARPS": T.NUM_WARPS}
    for name, (kernel, ptr, aligned, int64) in CASES.items():
        sig = _signature(kernel, ptr, int64)
        attrs = {}
        if aligned == "all":  # what the launcher infers for 16-byte pointers and sizes divisible by 16
            attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(sig.items())
                     if (ty.startswith("*") or ty.startswith("i")) and arg != "sq_ptr" and arg != "part_ptr"}
        constexprs = {"BLOCK": T.BLOCK}
        src = ASTSource(fn=getattr(T, kernel), signature=sig, constexprs=constexprs, attrs=attrs)
        try:
            ptx = triton.compile(src, target=target, options={"num_warps": T.NUM_WARPS}).asm["ptx"]
        except (FileNotFoundError, PermissionError) as e:  # no ptxas bundled
            return {"skip": f"no NVIDIA toolchain with triton: {e}"}
        count = lambda op: {  # noqa: E731
            "v4": len(re.findall(op + r"\.global\S*\.v4\.", ptx)),
            "scalar": len(re.findall(op + r"\.global(?:(?!\.v\d)\S)*\s", ptx)),
        }
        out[name] = {"loads": count("ld"), "stores": count("st")}
    return out


@pytest.fixture(scope="module")
def lowered():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert "error" not in out, out["error"]
    return out


@pytest.mark.parametrize("case,streams_in,ptr_bytes", [
    ("inner_fp32_aligned", 4 + 6, 4), ("inner_bf16_aligned", 4 + 6, 2),
])
def test_inner_kernel_uses_vector_accesses_when_aligned(lowered, case, streams_in, ptr_bytes):
    per_thread = lowered["BLOCK"] // (32 * lowered["NUM_WARPS"])  # elements of each stream per thread
    accesses = per_thread * ptr_bytes // 16  # 128-bit accesses per stream per thread
    c = lowered[case]
    assert c["loads"] == {"v4": streams_in * accesses, "scalar": 0}
    assert c["stores"] == {"v4": 4 * accesses, "scalar": 1}  # y, w, h_g, h_R; one partial Σw²


@pytest.mark.parametrize("case", ["outer_bf16_aligned", "outer_fp32_aligned"])
def test_outer_kernel_uses_vector_accesses_when_aligned(lowered, case):
    c = lowered[case]
    assert c["loads"]["scalar"] == 0 and c["loads"]["v4"] > 0
    assert c["stores"]["scalar"] == 0 and c["stores"]["v4"] > 0


def test_project_kernel_reads_the_norm_once(lowered):
    c = lowered["project_fp32_aligned"]
    assert c["loads"]["scalar"] == 1 and c["loads"]["v4"] > 0  # Σw² read from device memory
    assert c["stores"] == {"v4": c["loads"]["v4"], "scalar": 0}


def test_unaligned_and_64_bit_sizes_lower(lowered):
    """n not a multiple of 16 compiles to scalar accesses; 64-bit sizes compile."""
    c = lowered["inner_fp32_unaligned"]
    assert c["loads"]["v4"] == 0 and c["loads"]["scalar"] > 0
    assert lowered["inner_fp32_int64"]["loads"]["scalar"] > 0


if __name__ == "__main__":
    print(json.dumps(lower_all()))
