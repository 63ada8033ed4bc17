"""`profuser prepare`: JSONL / Parquet / datasets folders, chat messages, stable ids, bad rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profuser.engine import store
from profuser.engine.passes import prepare as P

REPO = Path(__file__).resolve().parents[3]
ROWS = [
    {"prompt": "Define 'cat'.", "response": "A small domesticated feline."},
    {"prompt": "Define 'dog'.", "response": "A domesticated canid.", "system": "Be brief."},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"},
                  {"role": "user", "content": "2"}, {"role": "assistant", "content": "two"}]},
    {"prompt": "Define 'eel'.", "response": "A long fish."},
]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def read_all(data_dir):
    m = store.PreparedManifest.load(data_dir)
    return m, pa.concat_tables([store.read_prepared_shard(data_dir, j, m) for j in range(m.n_shards)]).to_pylist()


def test_jsonl_records_and_messages(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    m = P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d"), shard_size=2), log=lambda s: None)
    assert (m.n_examples, m.n_shards, m.shard_size) == (6, 3, 2)  # the two-exchange chat gives two examples
    _, rows = read_all(tmp_path / "d")
    assert [r["prompt"] for r in rows] == ["Define 'cat'.", "Define 'dog'.", "Hi?", "1", "2", "Define 'eel'."]
    assert [r["response"] for r in rows] == ["A small domesticated feline.", "A domesticated canid.", "Hello!", "one",
                                             "two", "A long fish."]
    assert [r["system"] for r in rows] == [None, "Be brief.", "S", None, None, None]
    assert [r["history"] for r in rows] == [None, None, None, None, [{"role": "user", "content": "1"},
                                                                     {"role": "assistant", "content": "one"}], None]
    assert rows[0]["example_id"] == P.content_id("Define 'cat'.", "A small domesticated feline.", None)
    assert len({r["example_id"] for r in rows}) == 6
    # a system prompt changes the id (same prompt/response otherwise)
    assert P.content_id("p", "r", None) != P.content_id("p", "r", "")


def test_parquet_and_datasets_folder_give_same_set(tmp_path):
    rows = [r for r in ROWS if "prompt" in r]
    rows = [{**r, "system": r.get("system")} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    jl = write_jsonl(tmp_path / "in.jsonl", rows)
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    fps = []
    for name, inp in (("a", tmp_path / "in.parquet"), ("b", jl), ("c", tmp_path / "ds")):
        fps.append(P.prepare(P.PrepareConfig(inputs=[str(inp)], data_dir=str(tmp_path / name)),
                             log=lambda s: None).fingerprint)
    assert fps[0] == fps[1] == fps[2]


def test_custom_fields_and_id_field(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"uid": "x1", "instruction": "Q", "output": "A"},
                                              {"uid": "x2", "instruction": "Q2", "output": "A2"}])
    cfg = P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d"), prompt_field="instruction",
                          response_field="output", id_field="uid")
    P.prepare(cfg, log=lambda s: None)
    _, rows = read_all(tmp_path / "d")
    assert [r["example_id"] for r in rows] == ["x1", "x2"]
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"uid": "x1", "instruction": "Q", "output": "A"},
                                               {"uid": "x1", "instruction": "Q3", "output": "A3"}])
    cfg.inputs, cfg.data_dir = [str(dup)], str(tmp_path / "e")
    with pytest.raises(ValueError, match=r"dup.jsonl:2: duplicate 'uid' 'x1' \(first at .*dup.jsonl:1\)"):
        P.prepare(cfg, log=lambda s: None)


@pytest.mark.parametrize("line, message", [
    ("{not json\n", "invalid JSON"),
    (json.dumps({"prompt": "p"}) + "\n", "missing field 'response'"),
    (json.dumps({"prompt": "p", "response": 3}) + "\n", "field 'response' must be a string"),
    (json.dumps({"prompt": "p", "response": "  "}) + "\n", "empty response"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n",
     "field 'messages': messages must end with a user message"),
    (json.dumps([1, 2]) + "\n", "a record must be a JSON object"),
])
def test_bad_rows_named_or_skipped(tmp_path, line, message):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS[:2], extra_lines=[line])
    cfg = P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d"))
    with pytest.raises(ValueError, match=rf"in.jsonl:3: {message}"):
        P.prepare(cfg, log=lambda s: None)
    cfg.on_bad_row = "skip"
    m = P.prepare(cfg, log=lambda s: None)
    assert m.n_examples == 2 and m.sources[0]["skipped"] == 1


def test_multi_turn_policy_and_duplicates(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS + [ROWS[0]])
    m = P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d")), log=lambda s: None)
    assert m.n_examples == 6  # the exact duplicate is dropped; the two-exchange chat gives two
    last = P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "l"), multi_turn="last"),
                     log=lambda s: None)
    assert last.n_examples == 5 and last.fingerprint != m.fingerprint
    _, rows = read_all(tmp_path / "l")
    assert (rows[3]["prompt"], rows[3]["response"]) == ("2", "two")  # the last turn, its context kept
    assert rows[3]["history"] == [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"}]
    with pytest.raises(ValueError, match=r"in.jsonl:4: multi-turn"):
        P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "e"), multi_turn="error"),
                  log=lambda s: None)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define 'eel'."},
        {"role": "assistant", "content": "A long fish."}, {"role": "user", "content": "And 'emu'?"},
        {"role": "assistant", "content": "A big bird."}, {"role": "user", "content": "And 'elk'?"},
        {"role": "assistant", "content": "A large deer."}]


def test_every_assistant_turn_is_an_example_with_its_context(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "c1", "messages": CHAT}, {"messages": CHAT[:5]}])
    m = P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d")), log=lambda s: None)
    _, rows = read_all(tmp_path / "d")
    # c1's three turns; the id-less chat repeats c1's first two turns in content, but its ids are content hashes
    assert [r["example_id"] for r in rows[:3]] == ["c1#1", "c1#2", "c1#3"] and m.n_examples == 5
    assert [r["response"] for r in rows] == ["A long fish.", "A big bird.", "A large deer.", "A long fish.",
                                             "A big bird."]
    assert [len(r["history"] or []) for r in rows] == [0, 2, 4, 0, 2]
    assert {r["system"] for r in rows} == {"Be brief."}
    assert rows[2]["history"] == [{"role": m_["role"], "content": m_["content"]} for m_ in CHAT[1:5]]
    assert rows[4]["example_id"] == P.content_id("And 'emu'?", "A big bird.", "Be brief.", CHAT[1:3])
    assert rows[4]["example_id"] != P.content_id("And 'emu'?", "A big bird.", "Be brief.")  # the context counts
    # a pool conversation ends with the user's turn: its last prompt is generated for, the rest is context
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"messages": CHAT[:6]}])
    P.prepare(P.PrepareConfig(inputs=[str(pool)], data_dir=str(tmp_path / "p"), prompts_only=True),
              log=lambda s: None)
    _, rows = read_all(tmp_path / "p")
    assert [(r["prompt"], r["response"], len(r["history"])) for r in rows] == [("And 'elk'?", "", 4)]


@pytest.mark.parametrize("msgs, message", [
    (CHAT[:3] + CHAT[4:], r"message 3: role 'assistant' where 'user' was expected"),
    ([CHAT[1], {"role": "tool", "content": "x"}], r"message 1: role 'tool' where 'assistant' was expected"),
    (CHAT[:4], "messages must end with a user message followed by the assistant's response"),
    ([CHAT[1], {"role": "assistant", "content": 3}], "message 1 must be an object with string 'role' and 'content'"),
])
def test_malformed_conversations_are_named(tmp_path, msgs, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": msgs}])
    with pytest.raises(ValueError, match=rf"in.jsonl:1: field 'messages': {message}"):
        P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d")), log=lambda s: None)


def test_single_exchange_sets_keep_their_fingerprint_and_old_shards_read(tmp_path):
    """The history column changes nothing for single-exchange data: teacher stores built before it stay valid,
    and a prepared shard written without the column reads with an empty history."""
    rows = [r for r in ROWS if "prompt" in r]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    m = P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d")), log=lambda s: None)
    import hashlib

    fp = hashlib.sha256()
    for r in rows:
        eid = P.content_id(r["prompt"], r["response"], r.get("system"))
        fp.update(json.dumps([eid, r["prompt"], r["response"], r.get("system")], ensure_ascii=False).encode() + b"\n")
    assert m.fingerprint == fp.hexdigest()  # the rule before multi-turn conversations
    assert store.prompt_fingerprint("p", "s") == store.prompt_fingerprint("p", "s", None) == \
        hashlib.sha256(json.dumps(["s", "p"]).encode()).hexdigest()[:16]
    assert store.prompt_fingerprint("p", "s", [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                  "content": "b"}]) != \
        store.prompt_fingerprint("p", "s")
    shard = store.prepared_dir(tmp_path / "d") / store.shard_name(0)
    pq.write_table(pq.read_table(shard).drop_columns(["history"]), shard)  # as an older profuser wrote it
    m.shards[0] = {**m.shards[0], "sha256": store.files.file_sha256(shard)}
    m.save(tmp_path / "d")
    assert store.read_prepared_shard(tmp_path / "d", 0)["history"].to_pylist() == [None] * len(rows)


def test_rerun_is_idempotent_and_refuses_another_set(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    cfg = P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d"))
    a = P.prepare(cfg, log=lambda s: None)
    assert P.prepare(cfg, log=lambda s: None).fingerprint == a.fingerprint
    write_jsonl(src, ROWS[:3])
    with pytest.raises(store.StoreError, match="a different prepared set is already there"):
        P.prepare(cfg, log=lambda s: None)
    cfg.overwrite = True
    assert P.prepare(cfg, log=lambda s: None).n_examples == 3
    assert store.PreparedManifest.load(tmp_path / "d").n_shards == 1
    assert not list((tmp_path / "d" / "prepared").glob("part-00001*"))


def test_unknown_format_and_missing_input(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv: unknown format"):
        P.prepare(P.PrepareConfig(inputs=[str(tmp_path / "x.csv")], data_dir=str(tmp_path / "d")))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        P.prepare(P.PrepareConfig(inputs=[str(tmp_path / "nope.jsonl")], data_dir=str(tmp_path / "d")))


def test_shipped_corpus_cli(tmp_path):
    """The default input is the shipped WordNet corpus: 3000 unique pairs, ids from the file."""
    out = subprocess.run([sys.executable, "-m", "profuser.engine.cli", "prepare", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m, rows = read_all(tmp_path)
    assert m.n_examples == 3000 and m.n_shards == 3
    assert rows[0]["example_id"].startswith("wn-") and len({r["example_id"] for r in rows}) == 3000
    assert all(r["prompt"] and r["response"] for r in rows)


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="wordnet-base not installed")
def test_build_corpus_reproduces_shipped_file(tmp_path):
    out = tmp_path / "wn.jsonl"
    subprocess.run([sys.executable, str(REPO / "data" / "build_corpus.py"), "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    assert out.read_bytes() == (REPO / "data" / "wordnet_instruct.jsonl").read_bytes()


def test_a_prompts_only_pool_never_stores_an_answer_and_gold_readers_refuse_it(tmp_path):
    """Inference mode's pool: prompts without gold answers. prepare --prompts-only drops the responses even when
    the records have them; teach (teacher forcing on the gold) and the similarity scorer refuse the set by name."""
    from profuser.engine.passes import score as S
    from profuser.engine.passes import teach as T
    from profuser.engine.passes.options import PassConfig

    src = write_jsonl(tmp_path / "in.jsonl", ROWS + [{"messages": [{"role": "user", "content": "Open?"}]}])
    with pytest.raises(ValueError, match="in.jsonl:6: field 'messages': messages must end with a user message "
                                         "followed by"):
        P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "gold")), log=lambda s: None)
    m = P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path / "d"), prompts_only=True),
                  log=lambda s: None)
    _, rows = read_all(tmp_path / "d")
    assert m.prompts_only and [r["prompt"] for r in rows] == ["Define 'cat'.", "Define 'dog'.", "Hi?", "2",
                                                             "Define 'eel'.", "Open?"]
    assert {r["response"] for r in rows} == {""}  # not one gold answer reached the store
    assert not any(b"feline" in p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file())
    manifest = f"{store.prepared_dir(tmp_path / 'd') / 'manifest.json'}"
    with pytest.raises(store.StoreError, match=f"^{manifest}: a pool of prompts without gold answers.*teach"):
        T.teach(PassConfig(data_dir=str(tmp_path / "d"), sources=["no-such-model-is-loaded"]))
    with pytest.raises(store.StoreError, match=f"^{manifest}: a pool .*the similarity scorer"):
        S.score(S.ScoreConfig(data_dir=str(tmp_path / "d"), sources=["a", "b"], scorers=["similarity"]))
    # the CLI flag, and a gold set of the same prompts is another set (its fingerprint differs)
    r = subprocess.run([sys.executable, "-m", "profuser.engine.cli", "prepare", "--input", str(src), "--data-dir",
                        str(tmp_path / "cli"), "--prompts-only"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "6 prompts (no gold answers)" in r.stdout + r.stderr
    assert store.PreparedManifest.load(tmp_path / "cli").fingerprint == m.fingerprint


def test_a_hub_dataset_id_prepares_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """prepare --input owner/name: the dataset's snapshot in the Hugging Face cache (hub layout, offline), its
    split read by the `datasets` loader; the same rows as the JSONL itself; a missing id is one line naming it."""
    rows = [r for r in ROWS if "prompt" in r]
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "datasets--acme--defs"
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    write_jsonl(repo / "snapshots" / commit / "data" / "train.jsonl", rows)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    monkeypatch.chdir(tmp_path)
    hub = P.prepare(P.PrepareConfig(inputs=["acme/defs"], data_dir=str(tmp_path / "h"), split="train"),
                    log=lambda s: None)
    local = P.prepare(P.PrepareConfig(inputs=[str(write_jsonl(tmp_path / "in.jsonl", rows))],
                                      data_dir=str(tmp_path / "l")), log=lambda s: None)
    assert hub.n_examples == len(rows) and hub.fingerprint == local.fingerprint
    with pytest.raises(ValueError, match=r"input dataset 'acme/nope': hub id acme/nope is not in .*HF_HUB_OFFLINE=1"):
        P.prepare(P.PrepareConfig(inputs=["acme/nope"], data_dir=str(tmp_path / "n")), log=lambda s: None)
