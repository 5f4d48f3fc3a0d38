"""Build the shapes pipeline's tokenizer: OpenAI CLIP's byte-level BPE, vocabulary trimmed to this world.

The merges and byte alphabet are CLIP's own (open_clip ships them as ``bpe_simple_vocab_16e6.txt.gz``).
We keep the 512 byte tokens, every merge whose result appears while CLIP's BPE tokenizes a word of
the shapes world (``WORDS``), and the two special tokens. Any text still tokenizes (unknown words
fall back to shorter pieces); the words of the world tokenize exactly as in full CLIP, with other
ids. This keeps the text encoder's embedding table ~60x smaller than CLIP's 49,408 rows.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

WORDS = (
    "a an one two three four and with of the on image photo picture shape shapes object objects "
    "red green blue yellow purple orange black white pink circle circles square squares triangle triangles"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> set[str]:
    """All tokens created while CLIP's BPE merges ``word`` (with its end-of-word marker)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    created = set()
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        merged = parts[i] + parts[i + 1]
        created.add(merged)
        parts = parts[:i] + [merged] + parts[i + 2 :]
    return created


def build_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the trimmed CLIP BPE into ``out_dir``."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    ranks = {m: i for i, m in enumerate(merges)}
    created: set[str] = set()
    for word in WORDS:
        created |= _bpe_pieces(word, ranks)
    base = list(_bytes_to_unicode().values())
    kept = [m for m in merges if "".join(m) in created]
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in kept] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in kept) + "\n")
    return out
