"""Build lowbit's training corpus (English documentation prose from Debian packages) into a folder that
`lowbit train --data FOLDER` takes: python scripts/build_corpus.py [--out corpus] [--cache DIR] [--vocab 4096]

Packages come from `apt-get download` (no root, no internet beyond Debian's archive); each source's license is in
FOLDER/corpus.json. The text is never shipped with lowbit: this script builds it where it is used. A rerun with the
same settings returns at once.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lowbit.train.corpus import CorpusError, build
from lowbit.train.tokenizer import TokenizerError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("corpus"))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
                    / "corpus-packages", help="where the .deb files and their unpacked trees are kept")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the corpus")
    ap.add_argument("--heldout-every", type=int, default=50, help="one document in N is held out")
    args = ap.parse_args()
    try:
        meta = build(args.out, args.cache, args.vocab, args.heldout_every)
    except (CorpusError, TokenizerError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{'package':26s} {'license':40s} {'docs':>6s} {'train tokens':>13s} {'held-out':>10s}")
    for r in meta["sources"]:
        print(f"{r['package']:26s} {r['license'][:40]:40s} {r['documents']:6d} {r['train_tokens']:13,d} "
              f"{r['heldout_tokens']:10,d}")
    print(f"{'total':26s} {'':40s} {sum(r['documents'] for r in meta['sources']):6d} {meta['train_tokens']:13,d} "
          f"{meta['heldout_tokens']:10,d}\n{meta['chars']:,} characters, vocabulary {meta['vocab']}; "
          f"train with: lowbit train --data {args.out}")


if __name__ == "__main__":
    main()
