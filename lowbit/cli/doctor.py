"""lowbit doctor: this CPU, the features that choose lowbit's paths, and the paths that run."""
from __future__ import annotations

import os

import typer

from lowbit.cli.common import app, friendly, console, setup


@app.command()
@friendly
def doctor(
    build: bool = typer.Option(False, "--build", help="compile into the cache (about a minute each) every kernel build "
                               "this CPU runs that pip install did not"),
) -> None:
    """Show this machine's CPU, the features that choose lowbit's paths, and the paths that will run.

    Example: lowbit doctor      (paste its output into a bug report or beside a benchmark)
    """
    setup()
    import platform

    import torch
    from rich.table import Table

    from lowbit import kernels
    from lowbit.kernels import cpu, cpu_ext
    from lowbit.version import __version__

    console.print(f"lowbit {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                  f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default: spin)')}")
    console.print(f"CPU: {cpu.cpu_model()} ({platform.machine()})")
    decides = {"avx512f": "kernel build avx512*", "avx512bw": "kernel build avx512*",
               "avx512_vnni": "kernel build avx512_vnni (int8/ternary dot products)",
               "avx512_bf16": "kernel build avx512_bf16 (bf16-dot 4-bit GEMV); bf16 prefill GEMMs; "
                              "bitsandbytes' fused 4-bit kernel",
               "amx_bf16": "bf16 prefill GEMMs (torch's AMX GEMM)", "amx_int8": "torch's int8 GEMMs (AMX)",
               "amx_tile": "AMX", "avx2": "", "fma": "", "f16c": "", "avx512vl": "", "avx512dq": ""}
    table = Table("feature", "present", "decides")
    for f in cpu.DECIDING:
        table.add_row(f, "yes" if f in cpu.cpu_flags() else "no", decides.get(f, ""))
    console.print(table)
    builds = Table("kernel build", "this CPU runs it", "build", "selected")
    for v in cpu_ext.variants():
        ok = cpu_ext.supported(v)
        if build and ok and not cpu_ext.is_built(v):
            cpu_ext.load(v, build=True)
        builds.add_row(v, "yes" if ok else "no", cpu_ext.status(v), "<-" if kernels.kernel_path() == v else "")
    console.print(builds)
    console.print(f"paths now: {kernels.describe()} "
                  "(force with LOWBIT_KERNELS=avx512_bf16|avx512_vnni|avx512|scalar|reference, LOWBIT_GEMM=bf16|fp32)")
    try:
        import bitsandbytes as bnb

        fused = bnb.functional.has_avx512bf16()
        console.print(f"bitsandbytes {bnb.__version__}: eval-mode 4-bit layers run "
                      + ("its fused bf16 kernel (AVX512_BF16)" if fused else "dequantize + matmul (no AVX512_BF16)"))
    except ImportError:
        console.print("bitsandbytes: not installed")
