"""Every path the CPU's features choose can be forced, and no build assumes the CPU that compiled it."""
from __future__ import annotations

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import cpu, cpu_ext, matmul
from lowbit.nn import Linear4bit

NO_AVX512 = frozenset({"sse2", "avx2", "fma", "f16c"})


@pytest.mark.parametrize("variant", [v for v in cpu_ext.variants() if cpu_ext.supported(v)])
def test_every_supported_build_loads_and_is_what_it_says(variant):
    module = cpu_ext.load(variant)
    assert module is not None and module.compiled_isa() == variant


def test_build_does_not_depend_on_the_compiling_cpu(monkeypatch):
    # The build's name (its cache key) comes from sources and flags only; a CPU that cannot run a build
    # never loads it, and picks the portable one.
    names = {v: cpu_ext._build_name(v) for v in cpu_ext.variants()}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_AVX512)
    assert names == {v: cpu_ext._build_name(v) for v in cpu_ext.variants()}
    assert cpu_ext.best_variant() == "scalar"
    assert not cpu_ext.supported("avx512_vnni")
    with pytest.raises(RuntimeError, match="cannot run"), kernels.force(kernels="avx512_vnni"):
        kernels.fast()
    with pytest.raises(RuntimeError, match="need CPU features"):
        cpu_ext.load.__wrapped__("avx512")


def test_gemm_dtype_follows_the_cpu_and_can_be_forced(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_AVX512)
    assert matmul.gemm_dtype(torch.bfloat16) == torch.float32  # emulated bf16 is slower than fp32
    monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_AVX512 | {"amx_bf16"})
    assert matmul.gemm_dtype(torch.bfloat16) == torch.bfloat16
    with kernels.force(gemm="fp32"):
        assert matmul.gemm_dtype(torch.bfloat16) == torch.float32
    monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_AVX512)
    with kernels.force(gemm="bf16"):
        assert matmul.gemm_dtype(torch.bfloat16) == torch.bfloat16
        assert matmul.gemm_dtype(torch.float32) == torch.float32  # fp32 compute stays fp32
    monkeypatch.setenv("LOWBIT_GEMM", "bf16")
    assert matmul.gemm_dtype(torch.bfloat16) == torch.bfloat16


def test_environment_variables_choose_and_reject(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    assert kernels.fast() is None and kernels.kernel_path() == "reference"
    monkeypatch.setenv("LOWBIT_KERNELS", "scalar")
    assert kernels.kernel_path() == "scalar"
    with kernels.force(kernels="auto"):  # the context manager wins over the environment
        assert kernels.kernel_path() == cpu_ext.best_variant()
    monkeypatch.setenv("LOWBIT_KERNELS", "avx9000")
    with pytest.raises(ValueError, match="LOWBIT_KERNELS='avx9000': expected one of"):
        kernels.fast()
    monkeypatch.setenv("LOWBIT_GEMM", "fp16")
    with pytest.raises(ValueError, match="LOWBIT_GEMM"):
        kernels.gemm_path()
    with pytest.raises(ValueError, match="gemm="):
        with kernels.force(gemm="int8"):
            pass


@pytest.mark.parametrize("gemm", ["fp32", "bf16"])
def test_forced_gemm_dtype_is_the_one_prefill_runs(monkeypatch, gemm):
    seen = []
    real = matmul.tiled_matmul
    monkeypatch.setattr(matmul, "tiled_matmul", lambda x, n, fill, k, dtype: seen.append(dtype) or real(x, n, fill, k, dtype))
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 64), "nf4", 64, True, compute_dtype=torch.bfloat16)
    x = torch.randn(32, 128)
    with torch.no_grad(), kernels.force(gemm=gemm):
        y = layer(x)
    with torch.no_grad(), kernels.reference_only():
        ref = layer(x)
    if kernels.fast() is not None:
        assert seen == [torch.bfloat16 if gemm == "bf16" else torch.float32]
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_describe_names_the_cpu_and_its_deciding_features():
    line = cpu.describe()
    assert cpu.cpu_model() in line
    for feature in cpu.DECIDING:
        assert (feature in line.split()) == (feature in cpu.cpu_flags())


def test_kernels_come_from_the_install_and_using_lowbit_never_compiles(tmp_path):
    # An empty cache: a layer call runs the installed build, and nothing is compiled into the cache.
    import os
    import subprocess
    import sys

    script = """
import torch, lowbit
from lowbit.kernels import fast
layer = lowbit.nn.Linear4bit.from_linear(torch.nn.Linear(256, 128))
with torch.no_grad():
    layer(torch.randn(1, 256))
print(fast().__name__)
"""
    env = {**os.environ, "LOWBIT_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"lowbit.kernels._cpu_{cpu_ext.best_variant()}"]
    assert not (tmp_path / "ext").exists()
    for variant in cpu_ext.variants():
        if cpu_ext.supported(variant):
            assert cpu_ext.status(variant) == "installed", variant


def test_without_an_installed_build_one_warning_and_the_reference_path(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_ext, "installed", lambda variant: (None, "not installed (no compiler)"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no compiled scalar kernels.*reference path"):
        assert cpu_ext.load.__wrapped__("scalar") is None
    assert not (tmp_path / "ext").exists()  # nothing compiled behind the user's back


def test_a_build_from_other_sources_is_not_used(monkeypatch):
    monkeypatch.setattr(cpu_ext, "digest", lambda variant: "000000000000")
    module, why = cpu_ext.installed("scalar")
    assert module is None and "other sources" in why
