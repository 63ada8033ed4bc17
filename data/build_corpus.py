"""Build the shipped instruction corpus data/wordnet_instruct.jsonl from Debian's WordNet 3.0.

    apt-get install -y wordnet-base
    python data/build_corpus.py                       # -> data/wordnet_instruct.jsonl (3000 pairs)
    python data/build_corpus.py --n 5000 --seed 1 --out /tmp/wn.jsonl

Each line of /usr/share/wordnet/data.{noun,verb,adj,adv} (lines starting with two spaces are the licence
header) is one synset:  `offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt ... | gloss`.
The gloss is "definition[; definition...][; "example"...]". One pair per sampled synset:

    prompt:   one of a few phrasings, e.g. "Define the noun 'disaster'."
    response: "An act that has disastrous consequences." [+ ' For example: "..."' when WordNet has one]

Filters (why): the first lemma only, lower-case ASCII letters, spaces and hyphens (proper nouns and odd
symbols make poor instructions); definitions of 12..220 characters; one synset per (lemma, part of
speech) so that a word is never defined twice with different answers. Sampling is deterministic given
--seed: candidates are sorted by (part of speech, offset) before a seeded shuffle, and the output is
byte-identical across runs. The WordNet licence requires its notice on all copies: data/LICENSE-WordNet.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
# share of each part of speech in the output (WordNet itself is ~70% nouns; keep verbs/adjectives visible)
POS = {"noun": ("n", 0.5), "verb": ("v", 0.22), "adj": ("a", 0.2), "adv": ("r", 0.08)}
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}

TEMPLATES = [
    "Define the {pos} '{word}'.",
    "What does the {pos} '{word}' mean?",
    "Give a short definition of the {pos} '{word}'.",
    "Explain the meaning of the word '{word}' (used as {a} {pos}).",
    "In one sentence, what is the meaning of the {pos} '{word}'?",
    "What is meant by '{word}' as {a} {pos}?",
]
_LEMMA_OK = re.compile(r"^[a-z][a-z \-]*[a-z]$")
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # adjective position markers, e.g. "beautiful(a)"


def parse_data_file(path: Path) -> list[dict]:
    """Synsets of one data.<pos> file: [{offset, pos, lemma, definition, example}]."""
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(f, 1):
            if line.startswith("  "):
                continue
            try:
                header, gloss = line.rstrip("\n").split(" | ", 1)
                fields = header.split()
                offset, ss_type = fields[0], fields[2]
                lemma = _ADJ_MARKER.sub("", fields[4]).replace("_", " ")
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{line_no}: malformed WordNet synset line ({exc})") from exc
            parts = [p.strip() for p in gloss.strip().split(";")]
            defs = [p for p in parts if p and not p.startswith('"')]
            examples = [p.strip('"').strip() for p in parts if p.startswith('"') and p.endswith('"')]
            if not defs:
                continue
            out.append({"offset": offset, "pos": ss_type, "lemma": lemma, "definition": defs[0],
                        "example": examples[0] if examples else None})
    return out


def make_pair(s: dict, rng: random.Random) -> dict:
    pos = POS_NAME[s["pos"]]
    prompt = rng.choice(TEMPLATES).format(pos=pos, word=s["lemma"], a="an" if pos[0] in "aeiou" else "a")
    d = s["definition"]
    response = d[0].upper() + d[1:] + ("" if d.endswith((".", "!", "?")) else ".")
    if s["example"] and rng.random() < 0.6:
        response += f' For example: "{s["example"]}".'
    pid = "wn-" + s["pos"] + "-" + s["offset"]
    return {"id": pid, "prompt": prompt, "response": response}


def build(wordnet_dir: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for fname, (_, share) in POS.items():
        path = wordnet_dir / f"data.{fname}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: apt-get install -y wordnet-base")
        seen, cands = set(), []
        for s in sorted(parse_data_file(path), key=lambda s: s["offset"]):
            key = (s["lemma"], POS_NAME[s["pos"]])
            if key in seen or not _LEMMA_OK.match(s["lemma"]) or not 12 <= len(s["definition"]) <= 220:
                continue
            seen.add(key)
            cands.append(s)
        rng.shuffle(cands)
        pairs += [make_pair(s, rng) for s in cands[: round(n * share)]]
    rng.shuffle(pairs)
    return pairs[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "wordnet_instruct.jsonl")
    args = ap.parse_args(argv)
    pairs = build(args.wordnet_dir, args.n, args.seed)
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(pairs)} pairs ({len(text.encode()) / 1e6:.2f} MB, sha256 "
          f"{hashlib.sha256(text.encode()).hexdigest()[:12]}) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
