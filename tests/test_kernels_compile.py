"""Every Triton kernel compiles to real GPU code (sm_90 PTX and cubin, float32 and bfloat16), without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels on CPU) executes kernels
as NumPy and accepts code that the GPU compiler rejects; this test runs the real compiler in a
subprocess with the interpreter off, and checks that the memory-bound kernels got 16-byte vector
loads (their bandwidth depends on it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smile_fast.kernels import has_triton

REPO_ROOT = Path(__file__).resolve().parents[1]

_COMPILE_SCRIPT = r"""
import json, re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from smile_fast.kernels import ema_update, feature_mixup_loss, mixup_batch, mixup_cross_entropy, mixup_normalize
from smile_fast.kernels import soft_mixup_cross_entropy as soft

def compile_kernel(kernel, signature, constexprs):
    names = list(signature) + list(constexprs)
    full = dict(signature, **{name: "constexpr" for name in constexprs})
    # What a real launch specializes on: 16-byte-aligned pointers, sample sizes divisible by 16.
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or name == "n_per_sample"
    }
    source = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", compiled.asm["ptx"]))
    return {"vector_loads": vector_loads, "cubin": len(compiled.asm["cubin"])}

def sig(text, dt):
    # "name:type" pairs; "T" stands for the tensor dtype under test.
    return dict(item.split(":") for item in text.replace("T", dt).split())

lam = "perm_ptr:*i64 lam_ptr:*fp32"
rows = {
    "mixup_batch": (
        mixup_batch._mixup_batch_fwd_kernel,
        f"x_ptr:*T {lam} out_ptr:*T n_per_sample:i32 batch:i32",
        2048,
    ),
    "mixup_batch_bwd": (
        mixup_batch._mixup_batch_bwd_kernel,
        "grad_ptr:*T perm_ptr:*i64 lam_ptr:*fp32 grad_x_ptr:*T n_per_sample:i32 batch:i32",
        {"BLOCK": 2048, "PERM_BLOCK": 256},
    ),
    "feature_fwd": (
        feature_mixup_loss._feature_mixup_loss_fwd_kernel,
        f"student_ptr:*T teacher_ptr:*T {lam} partial_ptr:*fp32 n_per_sample:i32 batch:i32 partial_scale:fp32",
        {"ROOT": True, "BLOCK": 2048},
    ),
    "feature_bwd": (
        feature_mixup_loss._feature_mixup_loss_bwd_kernel,
        f"student_ptr:*T teacher_ptr:*T {lam} grad_loss_ptr:*fp32 loss_ptr:*fp32 grad_ptr:*T n_per_sample:i32 "
        "batch:i32 coef_scale:fp32",
        {"OFFICIAL": True, "BLOCK": 2048},
    ),
    "mixup_normalize": (
        mixup_normalize._mixup_normalize_fwd_kernel,
        f"images_ptr:*u8 {lam} clean_ptr:*T mixed_ptr:*T n_per_sample:i32 batch:i32 "
        "scale0:fp32 scale1:fp32 scale2:fp32 shift0:fp32 shift1:fp32 shift2:fp32",
        {"MIX": True, "BLOCK": 2048},
    ),
    # normalize_uint8: the same kernel without the mix; the unused pointers are the clean batch's.
    "normalize": (
        mixup_normalize._mixup_normalize_fwd_kernel,
        "images_ptr:*u8 perm_ptr:*T lam_ptr:*T clean_ptr:*T mixed_ptr:*T n_per_sample:i32 batch:i32 "
        "scale0:fp32 scale1:fp32 scale2:fp32 shift0:fp32 shift1:fp32 shift2:fp32",
        {"MIX": False, "BLOCK": 2048},
    ),
    "mixup_cross_entropy_fwd": (
        mixup_cross_entropy._mixup_cross_entropy_fwd_kernel,
        f"logits_ptr:*T target_ptr:*i64 {lam} row_loss_ptr:*fp32 n_classes:i32 batch:i32 row_stride:i32",
        1024,
    ),
    "mixup_cross_entropy_bwd": (
        mixup_cross_entropy._mixup_cross_entropy_bwd_kernel,
        f"logits_ptr:*T target_ptr:*i64 {lam} grad_loss_ptr:*fp32 grad_logits_ptr:*T n_classes:i32 "
        "batch:i32 row_stride:i32 grad_row_stride:i32 inv_batch:fp32",
        1024,
    ),
}
soft_fwd = (
    f"student_ptr:*T teacher_ptr:*T {lam} row_loss_ptr:*fp32 n_classes:i32 batch:i32 "
    "student_stride:i32 teacher_stride:i32"
)
soft_bwd = (
    f"student_ptr:*T teacher_ptr:*T {lam} grad_loss_ptr:*fp32 grad_student_ptr:*T n_classes:i32 "
    "batch:i32 student_stride:i32 teacher_stride:i32 grad_stride:i32 inv_batch:fp32"
)
for name in ("soft_mixup_cross_entropy", "soft_mixup_mse"):
    rows[name + "_fwd"] = (getattr(soft, f"_{name}_fwd_kernel"), soft_fwd, 1024)
    rows[name + "_bwd"] = (getattr(soft, f"_{name}_bwd_kernel"), soft_bwd, 1024)
results = {}
for dt, tl_dt in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    for name, (kernel, signature, block) in rows.items():
        constexprs = block if isinstance(block, dict) else {"BLOCK": block}
        results[f"{name}/{dt}"] = compile_kernel(kernel, sig(signature, dt), constexprs)
    results[f"ema_update/{dt}"] = compile_kernel(
        ema_update._ema_update_fwd_kernel,
        sig("table_ptr:*i64 n_tensors:i32 decay_ptr:*fp32", dt),
        {"BLOCK": 4096, "STUDENT_DTYPE": tl_dt, "ALIGNED": True},
    )
print(json.dumps(results))
"""


def _ptxas_available() -> bool:
    """triton wheels for Linux x86-64 ship ptxas inside the NVIDIA backend; TRITON_PTXAS_PATH overrides it."""
    if not has_triton():
        return False
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or spec.origin is None:
        return False
    bundled = Path(spec.origin).parent / "bin" / "ptxas"
    return bundled.exists() or Path(os.environ.get("TRITON_PTXAS_PATH", "/nonexistent")).exists()


@pytest.fixture(scope="module")
def compiled_kernels() -> dict[str, dict[str, int]]:
    if not _ptxas_available():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600
    )
    assert process.returncode == 0, f"GPU compilation failed:\n{process.stderr[-4000:]}"
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_cubin(compiled_kernels: dict[str, dict[str, int]]) -> None:
    assert len(compiled_kernels) == 2 * 13, sorted(compiled_kernels)
    empty = [name for name, result in compiled_kernels.items() if result["cubin"] == 0]
    assert not empty, f"kernels without machine code: {empty}"


@pytest.mark.parametrize(
    "kernel",
    ["mixup_batch", "mixup_batch_bwd", "feature_fwd", "feature_bwd", "mixup_normalize", "normalize", "ema_update"],
)
def test_streaming_kernels_use_vector_loads(compiled_kernels: dict[str, dict[str, int]], kernel: str) -> None:
    for dtype in ("fp32", "bf16"):
        result = compiled_kernels[f"{kernel}/{dtype}"]
        assert result["vector_loads"] > 0, f"{kernel} ({dtype}) reads memory one scalar at a time on sm_90"
