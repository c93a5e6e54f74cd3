"""A training corpus of English technical prose from Debian documentation packages, built on demand.

Nothing here ships text: ``build`` fetches the packages with ``apt-get download`` (no root needed), unpacks them
with ``dpkg-deb -x`` into a cache folder, extracts plain text (Sphinx sources, reStructuredText, Markdown, POD,
Info, and HTML through the standard library's parser), trains a byte-level BPE on a sample, and writes the token
ids as uint16 files. Documents, not lines, are split between training and held out (one in ``heldout_every``, by a
hash of the document's path, so the split never moves), so the held-out part comes from nearly every source and
shares no document with training.

Memory: text is extracted one source at a time and tokenized in batches of documents; the token files are
appended as they go, so peak memory is one source's text plus its ids (under 1 GB for the largest, linux-doc).
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import html.parser
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

CORPUS_VERSION = 1


@dataclass(frozen=True)
class Source:
    """One Debian package: the files whose text enters the corpus, and the license that text is under."""
    package: str
    license: str
    include: tuple[str, ...]  # fnmatch patterns on the path inside the package
    exclude: tuple[str, ...] = ()


# Bookworm's documentation packages with the most English prose (licenses from each package's copyright file).
SOURCES = (
    Source("linux-doc-6.1", "GPL-2.0", ("*/Documentation/*.rst.gz", "*/Documentation/*.txt.gz"),
           ("*/translations/*", "*/ABI/*")),
    Source("python3.11-doc", "PSF-2.0", ("*/html/_sources/*.txt",)),
    Source("rust-doc", "MIT OR Apache-2.0",
           tuple(f"*/html/{book}/*.html" for book in ("book", "reference", "nomicon", "rust-by-example",
                                                      "edition-guide", "embedded-book", "rustc", "rustdoc")),
           ("*/print.html", "*/toc.html")),  # mdBook's print.html repeats the whole book
    Source("postgresql-doc-15", "PostgreSQL", ("*/html/*.html",)),
    Source("perl-doc", "GPL-1.0-or-later OR Artistic-1.0-Perl", ("*.pod", "*.pod.gz")),
    Source("python-django-doc", "BSD-3-Clause", ("*/html/*.html",),
           ("*/genindex*", "*/py-modindex*", "*/search*", "*/_modules/*")),
    Source("python-pandas-doc", "BSD-3-Clause", ("*/html/_sources/*.txt",), ("*/reference/api/*",)),
    Source("python-scipy-doc", "BSD-3-Clause", ("*/html/tutorial/*.html", "*/html/dev/*.html")),
    Source("gimp-help-en", "GFDL-1.2-or-later", ("*/help/en/*.html",)),
    Source("nodejs-doc", "MIT", ("*/api/*.md.gz",)),
    Source("sphinx-doc", "BSD-2-Clause", ("*/_sources/*.txt",)),
    Source("git-doc", "GPL-2.0", ("*/git-doc/*.txt",)),
    Source("vim-doc", "Vim", ("*/html/*.html",)),
    Source("zsh-doc", "GPL-2.0-or-later OR MIT-like (zsh)", ("*/html/*.html",)),
    Source("apache2-doc", "Apache-2.0", ("*/manual/en/*.html",)),
    Source("libreoffice-help-en-us", "MPL-2.0", ("*/en-US/text/*.html",)),
    Source("openjdk-17-doc", "GPL-2.0 WITH Classpath-exception-2.0", ("*/api/*.html",),
           ("*/class-use/*", "*-tree.html", "*/package-*.html", "*/index-files/*", "*/search*", "*/allclasses*",
            "*/serialized-form.html")),
    Source("erlang-doc", "Apache-2.0", ("*/erlang-doc/*.html",)),
    Source("racket-doc", "MIT OR Apache-2.0", ("*/doc/racket/*.html",), ("*/search/*",)),
    Source("llvm-15-doc", "Apache-2.0 WITH LLVM-exception", ("*/_sources/*.txt",)),
    Source("clang-15-doc", "Apache-2.0 WITH LLVM-exception", ("*/_sources/*.txt",)),
    Source("cmake-doc", "BSD-3-Clause", ("*/_sources/*.txt",)),
    Source("ffmpeg-doc", "LGPL-2.1-or-later", ("*/doc/ffmpeg/*.html",), ("*/api/*",)),
    Source("gnucash-docs", "GFDL-1.1-or-later", ("*/gnucash-guide-en/*.html", "*/gnucash-help-en/*.html")),
    Source("debian-reference-en", "GPL-2.0-or-later", ("*/debian-reference/*.en.html",)),
    Source("debian-handbook", "GPL-2.0-or-later OR CC-BY-SA-3.0", ("*/html/en-US/*.html",)),
    Source("debian-policy", "GPL-2.0-or-later", ("*/_sources/*.txt",)),
)


class CorpusError(RuntimeError):
    """A package that cannot be fetched or unpacked, or a corpus folder that is not one."""


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML page: block elements start lines, script/style/navigation are skipped."""
    SKIP = {"script", "style", "nav", "head", "noscript", "svg"}
    BLOCK = {"p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "dt", "dd", "table",
             "section", "blockquote", "ul", "ol", "dl", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0  # depth inside SKIP elements
        self.divs = 0  # div nesting, and the depth of a navigation div being skipped (0: none)
        self.nav_div = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        if tag == "div":
            self.divs += 1
            classes = " ".join(v or "" for k, v in attrs if k == "class")
            if not self.nav_div and any(w in classes for w in ("sidebar", "related", "navigation", "toc")):
                self.nav_div = self.divs
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag == "div" and self.divs:
            if self.nav_div == self.divs:
                self.nav_div = 0
            self.divs -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping and not self.nav_div:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(page: str) -> str:
    """Plain text of an HTML page (no markup, navigation or scripts), blank lines collapsed."""
    parser = _HTMLText()
    parser.feed(page)
    text = "".join(parser.parts)
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_document(path: Path) -> str:
    """The text of one file: gunzipped if .gz, HTML reduced to its visible text."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    name = path.name.removesuffix(".gz")
    if name.endswith((".html", ".htm", ".html.en")):
        text = html_text(text)
    return text.replace("\r\n", "\n").strip()


def unpack(source: Source, cache: Path, run: Callable = subprocess.run) -> Path:
    """The folder holding ``source``'s package unpacked (fetched and unpacked into ``cache`` the first time)."""
    root = cache / "packages" / source.package
    if (root / ".unpacked").is_file():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{source.package}_*.deb"))
    if not found:
        if shutil.which("apt-get") is None:
            raise CorpusError(f"{source.package}: apt-get is not on this machine (the corpus needs Debian's packages)")
        done = run(["apt-get", "download", source.package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{source.package}_*.deb"))
        if done.returncode != 0 or not found:
            raise CorpusError(f"{source.package}: apt-get download failed: {(done.stderr or '').strip()[-300:]}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    done = run(["dpkg-deb", "-x", str(found[-1]), str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        raise CorpusError(f"{source.package}: dpkg-deb -x failed: {(done.stderr or '').strip()[-300:]}")
    (root / ".unpacked").write_text(found[-1].name)
    return root


def documents(source: Source, root: Path) -> Iterator[tuple[str, str]]:
    """(path inside the package, text) of each of ``source``'s files under ``root``, in sorted path order."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):  # links may leave the tree
        rel = "/" + path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in source.include) and \
                not any(fnmatch.fnmatch(rel, pat) for pat in source.exclude):
            text = read_document(path)
            if len(text) >= 200:  # redirects, stubs and empty index pages carry no prose
                yield rel, text


def is_heldout(rel: str, every: int) -> bool:
    """Whether a document is held out: a stable hash of its path, so the split does not move as sources change."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % every == 0


def _append(path: Path, ids: list[int]) -> None:
    with open(path, "ab") as f:
        f.write(np.asarray(ids, dtype=np.uint16).tobytes())


def build(out: str | Path, cache: str | Path, vocab: int = 4096, heldout_every: int = 50,
          sources: tuple[Source, ...] = SOURCES, tokenizer_chars: int = 30_000_000, progress: bool = True,
          run: Callable = subprocess.run) -> dict:
    """Build the corpus into ``out`` (text/, tokenizer/, train.bin, heldout.bin, corpus.json); returns corpus.json's
    content. Packages are fetched into ``cache``. A finished build with the same settings is returned as it is."""
    from tqdm import tqdm

    from lowbit.train.tokenizer import EOS, train_tokenizer

    out, cache = Path(out), Path(cache)
    settings = {"version": CORPUS_VERSION, "vocab": vocab, "heldout_every": heldout_every,
                "sources": [s.package for s in sources], "tokenizer_chars": tokenizer_chars}
    meta_path = out / "corpus.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            return meta
    if not 257 <= vocab <= 65536:
        raise CorpusError(f"vocab must be in 257..65536 (256 bytes and end-of-text; uint16 ids), got {vocab}")
    if heldout_every < 2:
        raise CorpusError(f"heldout_every must be >= 2 (one document in N held out), got {heldout_every}")
    # corpus.json marks a finished build: gone before anything is rewritten, so an interrupted rebuild is never read
    meta_path.unlink(missing_ok=True)
    for split in ("train", "heldout"):
        (out / f"{split}.bin").unlink(missing_ok=True)
    (out / "text").mkdir(parents=True, exist_ok=True)
    rows = []
    # 1. Text: each source's documents, training and held-out apart, documents separated by the end-of-text token.
    for source in tqdm(sources, desc="extracting", disable=None if progress else True):
        root = unpack(source, cache, run)
        row = {"package": source.package, "deb": (root / ".unpacked").read_text(), "license": source.license,
               "documents": 0, "heldout_documents": 0, "chars": 0}
        with open(out / "text" / f"{source.package}.train.txt", "w", encoding="utf-8") as tr, \
                open(out / "text" / f"{source.package}.heldout.txt", "w", encoding="utf-8") as ho:
            for rel, text in documents(source, root):
                held = is_heldout(f"{source.package}:{rel}", heldout_every)
                (ho if held else tr).write(text + EOS)
                row["documents"] += 1
                row["heldout_documents"] += held
                row["chars"] += len(text)
        if row["documents"] == 0:
            raise CorpusError(f"{source.package}: no documents matched {source.include} (has the package changed?)")
        rows.append(row)
    # 2. The tokenizer, on an equal share of every source's training text (so no one source sets the vocabulary).
    share = tokenizer_chars // len(rows)
    sample = "".join((out / "text" / f"{r['package']}.train.txt").read_text(encoding="utf-8")[:share] for r in rows)
    tok = train_tokenizer(sample.replace(EOS, "\n\n"), vocab)
    del sample
    tok.save_pretrained(out / "tokenizer")
    eos = tok.eos_token_id
    # 3. Token ids, appended source by source; a document's ids end with the end-of-text id.
    for split in ("train", "heldout"):
        (out / f"{split}.bin").touch()  # a split no document fell into is an empty file, not a missing one
    for row in tqdm(rows, desc="tokenizing", disable=None if progress else True):
        for split in ("train", "heldout"):
            docs = (out / "text" / f"{row['package']}.{split}.txt").read_text(encoding="utf-8").split(EOS)[:-1]
            n = 0
            for i in range(0, len(docs), 256):
                ids = [t for enc in tok(docs[i:i + 256], verbose=False).input_ids for t in enc + [eos]]
                _append(out / f"{split}.bin", ids)
                n += len(ids)
            row[f"{split}_tokens"] = n
    meta = {"settings": settings, "vocab": len(tok), "sources": rows,
            "train_tokens": sum(r["train_tokens"] for r in rows),
            "heldout_tokens": sum(r["heldout_tokens"] for r in rows), "chars": sum(r["chars"] for r in rows)}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(meta_path)  # corpus.json last, in one rename: a folder with it is a finished corpus
    return meta


def is_corpus(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``build`` finished."""
    return (Path(path) / "corpus.json").is_file()


def load(path: str | Path):
    """(tokenizer, training ids, held-out ids) of a built corpus; the ids are uint16 tensors over memory maps."""
    import torch
    from transformers import AutoTokenizer

    path = Path(path)
    if not is_corpus(path):
        raise CorpusError(f"{path} is not a built corpus (no corpus.json): build it with scripts/build_corpus.py")
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    ids = []
    for split in ("train", "heldout"):
        f = path / f"{split}.bin"
        if not f.is_file() or f.stat().st_size % 2:
            raise CorpusError(f"{f} is missing or not a uint16 token file: rebuild the corpus")
        ids.append(torch.from_numpy(np.memmap(f, dtype=np.uint16, mode="c")))  # copy-on-write: never written
    return tok, ids[0], ids[1]
