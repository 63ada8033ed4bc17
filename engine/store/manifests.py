"""Manifests, the prepared set, votes: the JSON indexes of a store and the small artefacts around it.

    prepared/manifest.json                 PreparedManifest: fingerprint, counts, per-shard {rows, bytes, sha256}
    teachers/<source>/<mode>/manifest.json TeacherManifest: source identity, tokenizer, k, completed shards
                                           {file, rows, tokens, bytes, sha256, counters}
    scores/votes.parquet                   example_id, winner, votes json, scores json
    scores/votes.json                      its digest, and the identity of every store it voted on

Schema 2 (this version) adds the digests, the manifests' own checksums, the source identity and the
teacher rows' prompt fingerprints; schema-1 stores are still read (their value checks run, the checks that
need the new fields are skipped, and a warning says so once per store).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from ..fileio import WriterLock
from ..models import model_fingerprint, same_model
from .files import (
    StoreError,
    prepared_dir,
    read_json,
    read_table,
    scores_dir,
    shard_name,
    teacher_dir,
    verify_digest,
    write_json_atomic,
    write_table_atomic,
)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_SHARD_SIZE = 1024

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
PREPARED_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("system", pa.string()),
    # the earlier turns of a multi-turn conversation (user, assistant, ...; null for a single exchange)
    ("history", pa.list_(TURN)),
])


def prompt_fingerprint(prompt: str, system: str | None, history: list | None = None) -> str:
    """What a teacher row records of the conversation it saw (besides the response): 16 hex digits of
    sha256 over (system, prompt[, earlier turns]). A prepared prompt, system prompt or earlier turn edited in
    place no longer matches. A single exchange (no history) hashes as it always did: older stores stay valid."""
    key = [system, prompt] + ([[[m["role"], m["content"]] for m in history]] if history else [])
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


def _check_version(obj: dict, path: Path) -> int:
    version = obj.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path}: schema_version {version!r} is not one of {READABLE_VERSIONS} (written by "
                         "another version of profuser)")
    if version >= 2 and "checksum" not in obj:
        raise StoreError(f"{path}: schema-{version} manifest without its checksum (edited by hand?)")
    if version < SCHEMA_VERSION and str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(f"{path}: schema {version} store (no digests, checksums or prompt fingerprints): its "
                      "values are checked, its integrity cannot be; re-run the pass to upgrade it", stacklevel=3)
    return version


_WARNED: set = set()


def _load(cls, path: Path, what: str, required: tuple):
    obj = read_json(path, what=what)
    _check_version(obj, path)
    missing = [k for k in required if k not in obj]
    if missing:
        raise StoreError(f"{path}: {what} lacks keys {missing}")
    try:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
    except TypeError as exc:
        raise StoreError(f"{path}: {what} is incomplete ({exc})") from exc


# ---------------------------------------------------------------------------------------------------------
# the prepared set


@dataclass
class PreparedManifest:
    fingerprint: str
    n_examples: int
    shard_size: int
    n_shards: int
    sources: list = field(default_factory=list)  # input files: [{path, sha256, rows, skipped}]
    shards: list = field(default_factory=list)  # per shard {rows, bytes, sha256} (schema 2)
    schema_version: int = SCHEMA_VERSION
    prompts_only: bool = False  # a pool without gold answers (prepare --prompts-only): inference mode only

    def require_gold(self, data_dir, what: str) -> None:
        """StoreError naming the manifest when this set has no gold answers and `what` needs them."""
        if self.prompts_only:
            raise StoreError(f"{prepared_dir(data_dir) / 'manifest.json'}: a pool of prompts without gold answers "
                             f"(prepare --prompts-only); {what} needs the gold responses")

    def shard_rows(self, j: int) -> int:
        if not 0 <= j < self.n_shards:
            raise IndexError(f"shard {j} out of range [0, {self.n_shards})")
        return min(self.shard_size, self.n_examples - j * self.shard_size)

    @classmethod
    def load(cls, data_dir) -> "PreparedManifest":
        path = prepared_dir(data_dir) / "manifest.json"
        m = _load(cls, path, "prepared manifest", ("fingerprint", "n_examples", "shard_size", "n_shards"))
        if m.n_shards != -(-m.n_examples // m.shard_size) or (m.shards and len(m.shards) != m.n_shards):
            raise StoreError(f"{path}: n_shards={m.n_shards} does not match n_examples={m.n_examples} / "
                             f"shard_size={m.shard_size} and its {len(m.shards)} shard digests")
        return m

    def save(self, data_dir) -> None:
        write_json_atomic(prepared_dir(data_dir) / "manifest.json", asdict(self))


def write_prepared_shard(data_dir, j: int, table: pa.Table) -> dict:
    """Prepared shard j; returns its manifest entry {rows, bytes, sha256}."""
    info = write_table_atomic(table.cast(PREPARED_SCHEMA), prepared_dir(data_dir) / shard_name(j))
    return {"rows": table.num_rows, "bytes": info.bytes, "sha256": info.sha256}


def read_prepared_shard(data_dir, j: int, manifest: PreparedManifest | None = None) -> pa.Table:
    """Prepared shard j, verified against the manifest's digest (once per process) and row count."""
    manifest = manifest or PreparedManifest.load(data_dir)
    path = prepared_dir(data_dir) / shard_name(j)
    if not path.is_file():
        raise StoreError(f"{path}: prepared shard file is missing")
    verify_digest(path, manifest.shards[j]["sha256"] if manifest.shards else None, what="prepared shard")
    t = read_table(path, what="prepared shard")
    if t.num_rows != manifest.shard_rows(j):
        raise StoreError(f"{path}: {t.num_rows} rows, the prepared manifest says {manifest.shard_rows(j)}")
    if "history" not in t.column_names:  # written before multi-turn conversations: every row a single exchange
        t = t.append_column("history", pa.nulls(t.num_rows, pa.list_(TURN)))
    return t


# ---------------------------------------------------------------------------------------------------------
# teacher stores


@dataclass
class TeacherManifest:
    source: str
    model: str  # the spec as given (alias, or the resolved absolute path of a local folder)
    mode: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    prepared_fingerprint: str
    shard_size: int
    n_shards: int
    completed: dict = field(default_factory=dict)  # "j" -> {file, rows, tokens, bytes, sha256, counters}
    generation: dict | None = None  # inference mode: the decoding settings
    model_fingerprint: str | None = None  # models.model_fingerprint: the same model from any folder (schema 2)
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def path(data_dir, source: str, mode: str) -> Path:
        return teacher_dir(data_dir, source, mode) / "manifest.json"

    @classmethod
    def load(cls, data_dir, source: str, mode: str) -> "TeacherManifest":
        return _load(cls, cls.path(data_dir, source, mode), "teacher manifest",
                     ("source", "model", "mode", "tokenizer_hash", "vocab_size", "k", "prepared_fingerprint"))

    def save(self, data_dir) -> None:
        write_json_atomic(self.path(data_dir, self.source, self.mode), asdict(self))

    def check(self, path, *, prepared: PreparedManifest | None = None, tokenizer_hash: str | None = None,
              vocab_size: int | None = None, k: int | None = None, model_fingerprint: str | None = None) -> None:
        """Raise StoreError naming `path` when the manifest does not match what the caller expects."""
        wanted = {}
        if prepared is not None:
            wanted.update(prepared_fingerprint=prepared.fingerprint, shard_size=prepared.shard_size,
                          n_shards=prepared.n_shards)
        for key, val in (("tokenizer_hash", tokenizer_hash), ("vocab_size", vocab_size), ("k", k),
                         ("model_fingerprint", model_fingerprint)):
            if val is not None:
                wanted[key] = val
        for key, val in wanted.items():
            if getattr(self, key) != val:
                what = "prepared set" if key in ("prepared_fingerprint", "shard_size", "n_shards") else "model"
                raise StoreError(f"{path}: {key} is {getattr(self, key)!r} but expected {val!r} "
                                 f"(store of another {what}; delete the folder or pass --overwrite)")

    def is_model(self, spec) -> bool:
        """Whether this store was written by the model `spec`: the same alias or folder, or (a store or a
        model folder that moved) the same model fingerprint."""
        if same_model(self.model, spec):
            return True
        try:
            return self.model_fingerprint is not None and self.model_fingerprint == model_fingerprint(spec)
        except ValueError:  # spec names no alias and no existing folder
            return False

    def identity(self) -> dict:
        """What makes this store this store: the model (fingerprint; its spec for messages), the tokenizer
        and the content (every completed shard's sha256). Recorded by the vote and by checkpoints."""
        shards = sorted((int(j), v.get("sha256")) for j, v in self.completed.items())
        content = hashlib.sha256(json.dumps([self.source, self.mode, shards]).encode()).hexdigest()
        return {"model": self.model, "model_fingerprint": self.model_fingerprint,
                "tokenizer_hash": self.tokenizer_hash, "content": content}

    @property
    def tokens(self) -> int:
        return sum(int(v["tokens"]) for v in self.completed.values())

    @property
    def counters(self) -> dict:
        """Per-shard counters summed (each shard counted once, however often it was rewritten)."""
        out: dict = {}
        for v in self.completed.values():
            for key, n in (v.get("counters") or {}).items():
                out[key] = out.get(key, 0) + n
        return out


def update_manifest(data_dir, source: str, mode: str, j: int, info: dict) -> TeacherManifest:
    """Record shard j as complete in the (shared) manifest: read-modify-write under a file lock (ranks of one
    run complete shards of the same store concurrently)."""
    path = TeacherManifest.path(data_dir, source, mode)
    with WriterLock(Path(str(path) + ".lock"), what=f"the manifest {path}", wait=True, poll_s=0.02):
        m = TeacherManifest.load(data_dir, source, mode)
        m.completed[str(j)] = info
        m.save(data_dir)
    return m


def require_stores(data_dir, sources: list[str], mode: str, *, what: str = "data.data_dir",
                   k: int | None = None) -> None:
    """Fail in seconds, before any model loads, when the prepared set or a source's store of `mode` is
    missing, was built for another prepared set, or holds fewer than `k` top-k entries (training's data.k;
    None: any). `what` names the config key in the message."""
    root = Path(data_dir)
    prepared = prepared_dir(root) / "manifest.json"
    if not prepared.is_file():
        raise FileNotFoundError(f"{what}={root}: no prepared set ({prepared} is missing); run `profuser prepare` "
                                "first")
    fingerprint = read_json(prepared, what="prepared manifest").get("fingerprint")
    for source in sources:
        manifest = TeacherManifest.path(root, source, mode)
        if not manifest.is_file():
            step = "teach" if mode == "train" else "generate"
            raise FileNotFoundError(f"data.sources: no {mode}-mode store for source {source!r} ({manifest} is "
                                    f"missing); run `profuser {step}` first")
        meta = read_json(manifest, what="teacher manifest")
        got = meta.get("prepared_fingerprint")
        if k is not None and isinstance(meta.get("k"), int) and meta["k"] < k:
            raise StoreError(f"{manifest}: stores k={meta['k']} top-k entries but data.k={k}; set data.k={meta['k']} "
                             f"(or data.k=null: the smallest stored k) or rebuild the store with --k {k}")
        if got != fingerprint:
            raise StoreError(f"{manifest}: built for another prepared set (prepared_fingerprint {got!r} != "
                             f"{fingerprint!r} in {prepared}); re-run teach/generate on this prepared set")


# ---------------------------------------------------------------------------------------------------------
# votes


# what of a store's identity must match between the vote and the store read for training (the model spec
# may change legitimately: `profuser repoint` after a model folder moved)
IDENTITY_KEYS = ("model_fingerprint", "tokenizer_hash", "content")


def write_votes(data_dir, example_ids: list[str], winners: list[str], votes: list[dict], scores: list[dict],
                sources: list[str] | None = None) -> Path:
    """scores/votes.parquet: example_id, winner (a source name), votes json {source: n}, scores json
    {scorer: {source: score or null}}; its digest and the identity of every voted-on source's inference-mode
    store (TeacherManifest.identity) go into scores/votes.json. Returns the path."""
    path = scores_dir(data_dir) / "votes.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if sources is None:
        sources = sorted(set(winners) | {s for v in votes for s in v})
    identities = {s: TeacherManifest.load(data_dir, s, "infer").identity() for s in sources
                  if TeacherManifest.path(data_dir, s, "infer").is_file()}
    info = write_table_atomic(pa.table({"example_id": list(example_ids), "winner": list(winners),
                                        "votes": [json.dumps(v) for v in votes],
                                        "scores": [json.dumps(s) for s in scores]}), path)
    write_json_atomic(path.with_suffix(".json"), {"schema_version": SCHEMA_VERSION, "file": path.name,
                                                  "rows": len(example_ids), "bytes": info.bytes,
                                                  "sha256": info.sha256, "stores": identities})
    return path


def check_vote_identities(data_dir, meta: dict, index: Path, sources: list[str]) -> None:
    """StoreError when a source's inference-mode store is not the one the vote scored (rebuilt, swapped or
    replaced after `profuser score`): the winners would pick answers nobody voted for."""
    for s in sources:
        voted = (meta.get("stores") or {}).get(s)
        if voted is None or not TeacherManifest.path(data_dir, s, "infer").is_file():
            continue  # a vote written before identities were recorded; or no store (require_stores names it)
        now = TeacherManifest.load(data_dir, s, "infer").identity()
        changed = [k for k in IDENTITY_KEYS if voted.get(k) != now.get(k)]
        if changed:
            raise StoreError(f"{index}: the vote scored source {s!r}'s answers from another store than "
                             f"{TeacherManifest.path(data_dir, s, 'infer')} holds now ({', '.join(changed)} differ: "
                             f"voted {voted.get('model')!r}, now {now.get('model')!r}; rebuilt, swapped or replaced "
                             "after `profuser score`): run `profuser score` again")


def read_votes(data_dir, sources: list[str] | None = None) -> dict[str, str]:
    """The one reader of scores/votes.parquet: {example_id: winning source name}; with `sources`, a winner
    that is not one of them is a StoreError naming the file and row."""
    path = scores_dir(data_dir) / "votes.parquet"
    index = path.with_suffix(".json")
    if index.is_file() or path.is_file():
        meta = read_json(index, what="votes index") if index.is_file() else {}
        if meta:
            _check_version(meta, index)
        elif path.is_file():
            _check_version({"schema_version": 1}, index)  # written before schema 2: no digest to check
        if path.is_file():
            verify_digest(path, meta.get("sha256"), what="votes table")
    table = read_table(path, ("example_id", "winner"), what="votes table")
    ids, winners = table["example_id"].to_pylist(), table["winner"].to_pylist()
    if meta and meta.get("rows") != len(ids):
        raise StoreError(f"{path}: {len(ids)} rows but {index} records {meta.get('rows')}")
    if sources is not None:
        check_vote_identities(data_dir, meta, index, sources)
        for row, (eid, winner) in enumerate(zip(ids, winners)):
            if winner not in sources:
                raise StoreError(f"{path}: row {row}: winner {winner!r} of example {eid!r} is not one of the "
                                 f"configured sources {list(sources)}")
    return dict(zip(ids, winners))
