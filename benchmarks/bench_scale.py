"""Models larger than the memory they are given: streamed quantization, then a memory-mapped load and decode, each in
a child process under a memory cap well below the checkpoint's size.

It writes a random-weight Llama checkpoint (bf16, sharded like transformers does; default hidden 4096, 16 layers,
about 3.5B parameters, 7 GB), quantizes it by NF4 and by RTN int4 under --cap, loads each result with
``lowbit.load(..., mmap=True)`` and decodes a few tokens under the same cap; then GPTQ 4-bit on a smaller model
(hidden 2048, 36 layers, 4.1 GB) under --gptq-cap. The cap is a cgroup memory limit where this process may make one (root,
cgroup v1 or v2: page cache counts and is reclaimed), else an address-space limit (``ulimit -v``, which also counts
memory maps: the mapped load cannot run under it). Everything it writes is deleted at the end.

Usage: python benchmarks/bench_scale.py [--cap 3GB] [--hidden 4096 --layers 16] [--dir /tmp/lowbit-scale]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 49152  # SmolLM2's tokenizer: GPTQ calibrates on the bundled text


def write_random_llama(path: Path, hidden: int, layers: int, intermediate: int, shard: str = "2GB") -> int:
    """A transformers Llama folder of random bf16 weights, written one tensor at a time; its parameter count."""
    import transformers

    from lowbit.checkpoint import shard_limit
    from lowbit.shards import ShardWriter

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                      num_key_value_heads=hidden // 128 // 4 or 1, max_position_embeddings=4096,
                                      tie_word_embeddings=False, dtype="bfloat16")
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    kv = config.num_key_value_heads * 128
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)})
    writer = ShardWriter(path, "part", shard_limit(shard), {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:  # trained-like scale: std 1/sqrt(fan_in)
            t = (torch.randn(shape, generator=g) * shape[1] ** -0.5).to(torch.bfloat16)
        writer.add(name, t)
    shards = writer.finish(lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors")
    index = {"metadata": {"total_size": sum(s["bytes"] for s in shards)},
             "weight_map": {t: s["file"] for s in shards for t in s["tensors"]}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return sum(torch.Size(s).numel() for s in shapes.values())


class Cap:
    """Runs a child process under a memory limit: a cgroup where possible, else RLIMIT_AS."""

    def __init__(self, limit: int):
        self.limit, self.group, self.kind = limit, None, "address space (ulimit -v)"
        for root, limit_file, peak_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.max_usage_in_bytes"),
                                            ("/sys/fs/cgroup", "memory.max", "memory.peak")):
            group = Path(root) / f"lowbit-bench-{os.getpid()}"
            try:
                group.mkdir()
                (group / limit_file).write_text(str(limit))
                if root.endswith("memory"):  # v1: no swap to escape to
                    try:
                        (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
                    except OSError:
                        pass
                self.group, self.peak_file, self.kind = group, peak_file, f"cgroup ({limit_file})"
                break
            except OSError:
                if group.exists():
                    group.rmdir()

    def run(self, code: str, timeout: float = 3600) -> dict:
        """Run ``code`` (Python that prints one JSON line last) capped; its JSON, exit code and cgroup peak."""
        def enter():
            if self.group is not None:
                (self.group / "cgroup.procs").write_text(str(os.getpid()))
            else:
                resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))
        if self.group is not None and self.peak_file == "memory.max_usage_in_bytes":
            (self.group / self.peak_file).write_text("0")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], preexec_fn=enter, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
        out = {"rc": proc.returncode, "wall_s": time.perf_counter() - t}
        if proc.returncode == 0:
            out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            out["error"] = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:300]
        if self.group is not None:
            try:
                out["cgroup_peak_bytes"] = int((self.group / self.peak_file).read_text())
            except (OSError, ValueError):
                pass
        return out

    def close(self):
        if self.group is not None:
            self.group.rmdir()


QUANTIZE = """
import json, lowbit
from lowbit.stream import quantize_checkpoint
s = quantize_checkpoint({src!r}, {dst!r}, {config}, calibration={calibration}, progress=False)
print(json.dumps({{k: v for k, v in s.items() if isinstance(v, (int, float))}}))
"""
CALIBRATION = ("__import__('lowbit.calibrate', fromlist=['x']).calibration_batches("
               "__import__('transformers').AutoTokenizer.from_pretrained({tok!r}), "
               "__import__('lowbit.data', fromlist=['x']).default_text(), n_samples={n})")
DECODE = """
import json, time, torch, lowbit
from lowbit.eval.memory import peak_rss_bytes
torch.set_num_threads({threads})
t = time.perf_counter()
m = lowbit.load({dst!r}, mmap=True, verify=False)
load_s = time.perf_counter() - t
ids = torch.tensor([[1, 450, 4996, 17354]])
t = time.perf_counter()
out = lowbit.generate(m, ids, max_new_tokens={tokens})
s = time.perf_counter() - t
print(json.dumps({{"load_s": load_s, "decode_s": s, "tokens": out.shape[1] - ids.shape[1], "peak_rss_bytes": peak_rss_bytes()}}))
"""


def gb(x) -> str:
    return f"{x / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", default="3GB")
    ap.add_argument("--gptq-cap", default="2.5GB")
    ap.add_argument("--gptq-layers", type=int, default=36, help="layers of the hidden-2048 model GPTQ quantizes")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--methods", default="nf4,rtn4")
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16, help="GPTQ calibration sequences of 512 tokens")
    ap.add_argument("--skip-gptq", action="store_true")
    ap.add_argument("--dir", default="/tmp/lowbit-scale")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from lowbit.app.models import _converted_dir, load_default_model
    from lowbit.checkpoint import parse_size
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    load_default_model()  # the SmolLM2 tokenizer folder GPTQ's calibration uses
    tok = str(_converted_dir())
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    try:
        jobs = [("big", args.hidden, args.layers, args.intermediate, args.cap, args.methods.split(","))]
        if not args.skip_gptq:
            jobs.append(("small", 2048, args.gptq_layers, 5632, args.gptq_cap, ["gptq4"]))
        for tag, hidden, layers, inter, cap_text, methods in jobs:
            src = work / f"src-{tag}"
            t = time.perf_counter()
            params = write_random_llama(src, hidden, layers, inter)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            print(f"\n{tag}: hidden {hidden}, {layers} layers, {params / 1e9:.2f}B parameters, {gb(size)} GB bf16 "
                  f"(written in {time.perf_counter() - t:.0f} s); cap {cap_text}", flush=True)
            cap = Cap(parse_size(cap_text))
            print(f"cap by {cap.kind}")
            try:
                for method in methods:
                    dst = work / f"{tag}-{method}"
                    config = {"nf4": "lowbit.NF4Config()", "rtn4": "lowbit.IntConfig(bits=4, group_size=128)",
                              "gptq4": "lowbit.GPTQConfig(bits=4, group_size=128)"}[method]
                    calib = CALIBRATION.format(tok=tok, n=args.samples) if method.startswith("gptq") else "None"
                    q = cap.run(QUANTIZE.format(src=str(src), dst=str(dst), config=config, calibration=calib))
                    row = {"model": tag, "params": params, "source_bytes": size, "cap": cap_text, "method": method,
                           "cap_kind": cap.kind, "quantize": q}
                    print(f"{method}: quantize rc {q['rc']}, " + (
                        f"{q['seconds']:.0f} s, {gb(q['source_bytes'] / q['seconds'])} GB/s, peak RSS "
                        f"{gb(q['peak_rss_bytes'])} GB, cgroup peak {gb(q.get('cgroup_peak_bytes', 0))} GB, wrote "
                        f"{gb(q['written_bytes'])} GB" if q["rc"] == 0 else q["error"]), flush=True)
                    if q["rc"] == 0 and tag == "big":
                        d = cap.run(DECODE.format(dst=str(dst), tokens=args.decode_tokens, threads=args.threads))
                        row["decode"] = d
                        print(f"{method}: mmap load + decode rc {d['rc']}, " + (
                            f"load {d['load_s']:.1f} s, {d['tokens']} tokens in {d['decode_s']:.1f} s, peak RSS "
                            f"{gb(d['peak_rss_bytes'])} GB, cgroup peak {gb(d.get('cgroup_peak_bytes', 0))} GB"
                            if d["rc"] == 0 else d["error"]), flush=True)
                    rows.append(row)
                    shutil.rmtree(dst, ignore_errors=True)
            finally:
                cap.close()
                shutil.rmtree(src, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / "scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
