"""`profuser prepare`: instruction data -> the prepared set (docs/contracts.md section 3).

    profuser prepare --data-dir runs/wn                                  # the shipped WordNet corpus
    profuser prepare --data-dir runs/x --input a.jsonl b.parquet --prompt-field instruction \
        --response-field output --on-bad-row skip

Inputs: JSONL (one JSON object per line), Parquet, or a local `datasets` folder (save_to_disk; a
DatasetDict needs --split). A record is either {prompt, response[, system][, id]} (field names
configurable) or {messages: [{role, content}, ...]}: after an optional leading system message (the system
prompt), user and assistant messages alternate, ending with the assistant's. A multi-turn conversation is kept
whole: with --multi-turn every (the default) each assistant turn becomes an example whose history (the
`history` column) is the turns before it, so the loss covers every assistant turn and each source is
teacher-forced on every one, aligned per turn; --multi-turn last predicts only the final turn (the earlier
ones its history); --multi-turn error refuses them. Every model renders the history with its own chat
template; max_length cuts it from its oldest exchange, never the predicted turn's prompt (text/chat.py).
An example holds one predicted turn because a teacher record describes one response: a conversation of n
turns costs n forwards of its growing context (docs/store_format.md).

example_id: the record's id field when present (must be unique; `<id>#<n>` for the n-th assistant turn of a
multi-turn record under --multi-turn every), else the first 16 hex digits of sha256(system \\0 prompt \\0
response [\\0 history]): stable across runs, machines and input order; exact duplicates are dropped and
counted. The fingerprint is sha256 over every (example_id, prompt, response, system[, history]) in
output order: any change of content or order gives another fingerprint, which the teacher manifests
record, so a teacher store can never be silently joined with another prepared set.

Bad rows (unparsable JSON, missing or non-string fields, empty prompt or response) raise a ValueError
naming the file and line/row, or are skipped and counted with --on-bad-row skip.

A pool of prompts without gold answers (ProFuser's inference mode: the sources answer, the scorers vote):
`--prompts-only` reads the prompt (and system) of each record and never its response, even when the record has
one; the set's responses are empty and its manifest says `prompts_only`, so `teach` (which teacher-forces the
gold) and the `similarity` scorer (which compares with it) refuse it by name, and `generate` answers it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..config_cli import Flag, add_config_arguments, config_from_args
from ..store import (
    DEFAULT_SHARD_SIZE,
    PREPARED_SCHEMA,
    PreparedManifest,
    StoreError,
    WriterLock,
    prepared_dir,
    write_prepared_shard,
)
from ..text.chat import split_conversation, turn_id


def shipped_corpus() -> Path:
    """The shipped WordNet instruction corpus (3,000 pairs), installed with the package as profuser.data."""
    from importlib.resources import files

    return Path(str(files("profuser.data") / "wordnet_instruct.jsonl"))


@dataclass
class PrepareConfig:
    """Options of `prepare` (field names are those of the input records)."""

    # JSONL / Parquet files or datasets folders (default: the shipped WordNet corpus)
    # hub dataset ids (owner/name[@revision], from the Hugging Face cache) too
    inputs: list[str] = field(default_factory=lambda: [str(shipped_corpus())])
    data_dir: str = "runs/default"  # the store folder to write prepared/ into
    prompt_field: str = "prompt"  # input column of the prompt
    response_field: str = "response"  # input column of the gold response
    system_field: str = "system"  # input column of the system prompt
    messages_field: str = "messages"  # input column of chat messages (instead of prompt / response)
    id_field: str | None = "id"  # field holding a stable id (null or '': hash the content)
    split: str | None = None  # split of a DatasetDict folder
    on_bad_row: str = "error"  # an invalid input row: error naming file and row, or skip and count
    # a multi-turn conversation: one example per assistant turn, the turns before it its context (every); its
    # last assistant turn only, in the context of the earlier ones (last); or a bad row (error)
    multi_turn: str = "every"
    shard_size: int = DEFAULT_SHARD_SIZE  # examples per prepared shard
    limit: int | None = None  # keep only the first N examples
    overwrite: bool = False  # replace a different prepared set in data_dir
    wait: bool = False  # another `prepare` of the same folder is running: wait for it instead of failing
    # a pool of prompts without gold answers (inference mode only): responses are never read, stored empty
    prompts_only: bool = False

    def __post_init__(self):
        self.id_field = self.id_field or None
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.multi_turn not in ("every", "last", "error"):
            raise ValueError(f"multi_turn must be 'every', 'last' or 'error', got {self.multi_turn!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not self.inputs:
            raise ValueError("no input files given")


class BadRow(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------
# readers: (location, record dict) per row
# ---------------------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: unreadable Parquet file ({exc})") from exc
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield f"{path} row {row}", rec
            row += 1


def _iter_datasets(path: Path, split: str | None) -> Iterator[tuple[str, object]]:
    from datasets import DatasetDict, load_dataset, load_from_disk

    if not any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        # a folder of data files (a hub dataset's snapshot): the `datasets` loader picks the splits from names
        ds = load_dataset(str(path), split=split or "train")
        for row, rec in enumerate(ds):
            yield f"{path} ({split or 'train'}) row {row}", rec
        return
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split is None:
            raise ValueError(f"{path}: a DatasetDict with splits {list(ds)}; pass --split")
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    for row, rec in enumerate(ds):
        yield f"{path} row {row}", rec


DATA_FILES = ["*.jsonl", "*.json", "*.parquet", "*.csv", "**/*.jsonl", "**/*.json", "**/*.parquet", "**/*.csv"]


def resolve_input(spec: str | Path) -> Path:
    """A local file or folder, or a hub dataset id (owner/name[@revision]) resolved to its snapshot in the
    Hugging Face cache (offline with HF_HUB_OFFLINE=1: one line naming a missing id)."""
    from ..models.resolve import hub_id, hub_snapshot

    path = Path(spec)
    repo = None if path.exists() else hub_id(str(spec))
    if repo is None:
        return path
    return hub_snapshot(str(spec), repo, DATA_FILES, repo_type="dataset", what="input dataset")


def iter_records(path: Path, split: str | None = None) -> Iterator[tuple[str, object]]:
    path = resolve_input(path)
    if path.is_dir():
        return _iter_datasets(path, split)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return _iter_jsonl(path)
    if path.suffix in (".parquet", ".pq"):
        return _iter_parquet(path)
    raise ValueError(f"input {path}: unknown format (expected .jsonl, .parquet or a datasets folder)")


# ---------------------------------------------------------------------------------------------------------
# record -> (example_id, prompt, response, system)
# ---------------------------------------------------------------------------------------------------------


def _str_field(rec: dict, name: str, *, optional: bool = False) -> str | None:
    val = rec.get(name)
    if val is None:
        if optional:
            return None
        raise BadRow(f"missing field {name!r}")
    if not isinstance(val, str):
        raise BadRow(f"field {name!r} must be a string, got {type(val).__name__}")
    return val


def _from_messages(msgs, cfg: PrepareConfig) -> tuple[list[tuple[str, str, list | None]], str | None, bool]:
    """([(prompt, response, history)] the turns to predict, system, multi-turn?) of a chat-messages record:
    every assistant turn (multi_turn 'every'), the final one ('last'), or a BadRow for more than one ('error')."""
    try:
        system, turns = split_conversation(msgs, every=cfg.multi_turn == "every" and not cfg.prompts_only)
    except ValueError as exc:
        raise BadRow(f"field {cfg.messages_field!r}: {exc}") from None
    n = len(turns[-1][2] or []) // 2 + 1  # exchanges in the conversation
    if n > 1 and cfg.multi_turn == "error":
        raise BadRow(f"multi-turn conversation ({n} exchanges) and --multi-turn error")
    return turns, system, n > 1


def normalize(rec, cfg: PrepareConfig) -> tuple[str | None, list[tuple[str, str, list | None]], str | None, bool]:
    """(explicit id or None, [(prompt, response, history)], system, multi-turn?); raises BadRow."""
    if isinstance(rec, BadRow):
        raise rec
    if not isinstance(rec, dict):
        raise BadRow(f"a record must be a JSON object, got {type(rec).__name__}")
    rid = rec.get(cfg.id_field) if cfg.id_field else None
    if rid is not None and not isinstance(rid, (str, int)):
        raise BadRow(f"field {cfg.id_field!r} must be a string or integer")
    if rec.get(cfg.messages_field) is not None:
        msgs = rec[cfg.messages_field]
        if cfg.prompts_only and isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) \
                and msgs[-1].get("role") == "user":  # a pool conversation ends with the user's turn
            msgs = msgs + [{"role": "assistant", "content": "-"}]
        turns, system, multi = _from_messages(msgs, cfg)
    else:
        prompt = _str_field(rec, cfg.prompt_field)
        response = "" if cfg.prompts_only else _str_field(rec, cfg.response_field)
        system = _str_field(rec, cfg.system_field, optional=True)
        turns, multi = [(prompt, response, None)], False
    if cfg.prompts_only:  # never stored: no stage can read a pool's answer
        turns = [(p, "", h) for p, _, h in turns]
    for prompt, response, _ in turns:
        if not prompt.strip():
            raise BadRow("empty prompt")
        if not response.strip() and not cfg.prompts_only:
            raise BadRow("empty response")
    return (None if rid is None else str(rid)), turns, system, multi


def content_id(prompt: str, response: str, system: str | None, history: list | None = None) -> str:
    h = hashlib.sha256()
    h.update((system or "").encode() + b"\0" + (b"S" if system is not None else b"N") + b"\0")
    h.update(prompt.encode() + b"\0" + response.encode())
    if history:  # a single exchange hashes as it always did
        h.update(b"\0H" + json.dumps([[m["role"], m["content"]] for m in history], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def _row_key(eid: str, prompt: str, response: str, system: str | None, history: list | None) -> bytes:
    """One row's part of the prepared fingerprint (history only when present: older sets keep theirs)."""
    return json.dumps([eid, prompt, response, system] + ([history] if history else []), ensure_ascii=False).encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(p.name.encode())
                h.update(p.read_bytes())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, *, log=print) -> PreparedManifest:
    """Read every input, write the shards and the manifest; returns the manifest."""
    rows = {"example_id": [], "prompt": [], "response": [], "system": [], "history": []}
    seen: dict[str, str] = {}
    sources = []
    counts = {"bad": 0, "duplicate": 0, "multi_turn": 0, "multi_turn_examples": 0}
    for inp in cfg.inputs:
        path = resolve_input(inp)
        n_in = n_bad = 0
        for where, rec in iter_records(path, cfg.split):
            if cfg.limit is not None and len(rows["example_id"]) >= cfg.limit:
                break
            n_in += 1
            try:
                rid, turns, system, multi = normalize(rec, cfg)
            except BadRow as exc:
                if cfg.on_bad_row == "error":
                    raise ValueError(f"{where}: {exc} (use --on-bad-row skip to skip bad rows)") from None
                n_bad += 1
                continue
            counts["multi_turn"] += int(multi)
            for t, (prompt, response, history) in enumerate(turns):
                if cfg.limit is not None and len(rows["example_id"]) >= cfg.limit:
                    break
                if rid is None:
                    eid = content_id(prompt, response, system, history)
                else:  # one id per predicted turn: the record's id, with the turn's number when it has several
                    eid = turn_id(rid, t, len(turns))
                if eid in seen:
                    if rid is not None:
                        raise ValueError(f"{where}: duplicate {cfg.id_field!r} {eid!r} (first at {seen[eid]})")
                    counts["duplicate"] += 1
                    continue
                seen[eid] = where
                counts["multi_turn_examples"] += int(multi)
                for k, v in (("example_id", eid), ("prompt", prompt), ("response", response), ("system", system),
                             ("history", history)):
                    rows[k].append(v)
        counts["bad"] += n_bad
        sources.append({"path": str(path.resolve()), "sha256": _sha256_file(path), "rows": n_in,
                        "skipped": n_bad})
    n = len(rows["example_id"])
    if n == 0:
        raise ValueError(f"no usable rows in {cfg.inputs}")

    fp = hashlib.sha256()
    for i in range(n):
        fp.update(_row_key(*(rows[k][i] for k in ("example_id", "prompt", "response", "system", "history"))) + b"\n")
    manifest = PreparedManifest(fingerprint=fp.hexdigest(), n_examples=n, shard_size=cfg.shard_size,
                                n_shards=-(-n // cfg.shard_size), sources=sources, prompts_only=cfg.prompts_only)

    out = prepared_dir(cfg.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    with WriterLock(out / "prepare.lock", what="the prepared set", wait=cfg.wait):
        if (out / "manifest.json").exists():
            old = PreparedManifest.load(cfg.data_dir)
            if old.fingerprint == manifest.fingerprint and old.shard_size == manifest.shard_size and old.shards:
                log(f"prepare: {out} is already up to date ({n} examples, fingerprint {old.fingerprint[:12]})")
                return old
            if old.fingerprint != manifest.fingerprint or old.shard_size != manifest.shard_size:
                if not cfg.overwrite:
                    raise StoreError(f"{out / 'manifest.json'}: a different prepared set is already there "
                                     f"(fingerprint {old.fingerprint[:12]}, shard_size {old.shard_size} vs "
                                     f"{manifest.fingerprint[:12]}, {manifest.shard_size}); teacher stores built on "
                                     "it would no longer match. Use another --data-dir or pass --overwrite")
            (out / "manifest.json").unlink()
            for p in out.glob("part-*.parquet"):
                p.unlink()
        for j in range(manifest.n_shards):
            sl = slice(j * cfg.shard_size, (j + 1) * cfg.shard_size)
            table = pa.Table.from_pydict({k: v[sl] for k, v in rows.items()}, schema=PREPARED_SCHEMA)
            manifest.shards.append(write_prepared_shard(cfg.data_dir, j, table))
        manifest.save(cfg.data_dir)  # last: its presence means the set is complete
    what = "prompts (no gold answers)" if cfg.prompts_only else "examples"
    log(f"prepare: {n} {what} in {manifest.n_shards} shards -> {out} (fingerprint {manifest.fingerprint[:12]}; "
        f"skipped {counts['bad']} bad rows, {counts['duplicate']} exact duplicates; "
        f"{counts['multi_turn']} multi-turn conversations gave {counts['multi_turn_examples']} examples, "
        + ("one per assistant turn)" if cfg.multi_turn == "every" and not cfg.prompts_only
           else "their last turn predicted, the earlier ones its context)"))
    return manifest


def add_arguments(p) -> None:
    add_config_arguments(p, PrepareConfig, flags={"inputs": Flag("--input", nargs="+")})


def run_command(args) -> int:
    prepare(config_from_args(PrepareConfig, args))
    return 0
