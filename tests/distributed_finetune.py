"""Run by test_distributed.py, alone or under torchrun: a short QLoRA fine-tune, its losses printed as JSON by
rank 0. DIE_RANK / DIE_STEP make that process exit abruptly at that step (a crashed worker)."""
import json
import os
import sys
from pathlib import Path

from lowbit.app import finetune
from lowbit.data import default_text

src, out, parallel = sys.argv[1], sys.argv[2], sys.argv[3]
if os.environ.get("DIE_RANK") == os.environ.get("RANK", "0"):
    real = finetune.batch_at

    def batch_at(train, step, cfg):
        if step == int(os.environ["DIE_STEP"]):
            os._exit(9)
        return real(train, step, cfg)

    finetune.batch_at = batch_at
cfg = finetune.FinetuneConfig(method="nf4", rank=4, steps=int(os.environ.get("STEPS", "20")), batch=4, seq=32,
                              eval_tokens=256, save_every=10, parallel=parallel, lr=1e-3)
summary = finetune.run(src, default_text()[:20000], Path(out), cfg, progress=False)
if os.environ.get("RANK", "0") == "0":
    print(json.dumps({k: summary[k] for k in ("losses", "process_memory", "processes")}))
