"""Peak memory and time of quantizing SmolLM2-135M inside transformers' from_pretrained (each weight quantized as it
is read) against loading it in fp32 and then calling lowbit.quantize, each in a fresh process.

Usage: python benchmarks/bench_from_pretrained.py [--methods nf4,int8,int4]

Two sources: the fp32 folder (transformers memory-maps it, so neither path copies the fp32 weights into private
memory) and a bf16 copy loaded with dtype=torch.float32, as a CPU user loads most hub models: there the two-step path
converts the whole model to fp32 first.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys

_RUN = """
import json, sys, threading, time, torch
import lowbit

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def anon_mb():  # private memory: the mapped checkpoint file's pages are page cache, shared and reclaimable
    return status_mb("RssAnon")
peak = [anon_mb()]
def sample():
    while True:
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from lowbit.app.models import _converted_dir
from transformers import AutoModelForCausalLM
path, how, method = sys.argv[1], sys.argv[2], sys.argv[3]
from lowbit.config import config_from_name
config = config_from_name(method)
t = time.perf_counter()
if how == "from_pretrained":
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
else:
    model = lowbit.quantize(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config, progress=False)
seconds = time.perf_counter() - t
time.sleep(0.02)
ids = torch.arange(100, 164)[None]
with torch.no_grad():
    logits = model(ids).logits
torch.save(logits, sys.argv[4])
print(json.dumps({"seconds": seconds, "peak_rss_mb": status_mb("VmHWM"),  # ru_maxrss would carry the parent's over the fork
                  "peak_anon_mb": peak[0], "final_anon_mb": anon_mb()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="nf4,int8,int4")
    args = ap.parse_args()
    import tempfile

    import torch

    from lowbit.app.models import _converted_dir, load_default_model
    from lowbit.eval.speed import machine

    model, _ = load_default_model()  # the fp32 folder (made once)
    print(f"machine: {machine()}")
    print("| checkpoint | method | path | peak private MB (RssAnon) | private MB after | peak RSS MB (with the mapped file) | seconds | "
          "logits equal |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(f"{tmp}/bf16")
        del model
        sources = (("fp32", str(_converted_dir())), ("bf16", f"{tmp}/bf16"))
        for (source, path), method in itertools.product(sources, args.methods.split(",")):
            out = {}
            for how in ("from_pretrained", "load fp32, then lowbit.quantize"):
                f = f"{tmp}/{method}-{how[:4]}.pt"
                proc = subprocess.run([sys.executable, "-c", _RUN, path, how.split()[0], method, f],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr)
                out[how] = (json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(f))
            same = torch.equal(*(logits for _, logits in out.values()))
            for how, (r, _) in out.items():
                print(f"| {source} | {method} | {how} | {r['peak_anon_mb']:.0f} | {r['final_anon_mb']:.0f} | "
                      f"{r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
