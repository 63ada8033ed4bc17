"""The prepared set and the teacher stores: Parquet shards, JSON manifests, atomic writes, integrity.

Layout (docs/contracts.md section 3, docs/store_format.md):

    <data_dir>/prepared/manifest.json, part-00000.parquet ...          example_id, prompt, response, system
    <data_dir>/teachers/<source>/<mode>/manifest.json, part-*.parquet   one row per example (TEACHER_SCHEMA)
    <data_dir>/scores/<scorer>.parquet, scores/votes.parquet

Shard j of every (source, mode) covers exactly the rows of prepared shard j, in the same order, so a
shard is the unit of work, of resumption and of distribution (rank r of W owns shards j % W == r).

Atomicity. A shard is written to `part-0000j.parquet.tmp-<pid>` and `os.replace`d into place when
complete; the manifest (a JSON index of completed shards) is rewritten with the same tmp+replace under a
file lock, because several ranks complete shards of the same store concurrently. A killed run leaves at
most a tmp file (deleted by the next holder of that shard's lock) and loses only the shard in progress. A
shard file that exists but is missing from the manifest (killed between the rename and the manifest
update) is re-checked and adopted rather than recomputed.

Integrity (docs/store_format.md, "Integrity"). Parquet page checksums, a sha256 per file in its manifest
(verified once per file and process), a checksum inside every JSON manifest, a prompt fingerprint per
teacher row, and value checks of every teacher row (store/shards.py); one writer per shard (fileio.WriterLock).

Files: files.py (paths, atomic writes, checksums and digests), locks.py (writer locks), manifests.py
(manifests, the prepared set, votes), shards.py (teacher shards: schema, validation, the one reader).

Bytes on disk. Per predicted token a record holds 2 offsets + 1 id + 1 log-prob + K ids + K log-probs:
8 + 4 + 2 + 6K bytes raw = 62 B at K=8. Parquet with zstd and BYTE_STREAM_SPLIT on the fixed-width list
values (splitting the bytes of int32/float16 into planes lets zstd see the near-constant high bytes of
ids and the shared exponents of log-probs) and no dictionary encoding on lists (ids rarely repeat within
a page) gets well under 40 B/token; measured figures are in the README
(section "Teacher passes and the store").
"""

from ..fileio import LockBusyError as StoreBusyError  # the store's name for it
from ..fileio import WriterLock
from .files import (
                    DiskFullError,
                    FileInfo,
                    StoreError,
                    WriteOptions,
                    canonical_checksum,
                    file_sha256,
                    owned_shards,
                    prepared_dir,
                    read_json,
                    read_table,
                    remove_stale_tmp,
                    scores_dir,
                    shard_name,
                    teacher_dir,
                    verify_digest,
                    write_json_atomic,
                    write_table_atomic,
)
from .manifests import (
                    DEFAULT_SHARD_SIZE,
                    PREPARED_SCHEMA,
                    SCHEMA_VERSION,
                    PreparedManifest,
                    TeacherManifest,
                    prompt_fingerprint,
                    read_prepared_shard,
                    read_votes,
                    require_stores,
                    update_manifest,
                    write_prepared_shard,
                    write_votes,
)
from .shards import LOGPROB_TOL, TEACHER_SCHEMA, TeacherShard, TeacherStore, read_teacher_shard

__all__ = ["canonical_checksum", "DEFAULT_SHARD_SIZE", "DiskFullError", "FileInfo", "LOGPROB_TOL", "PREPARED_SCHEMA",
           "PreparedManifest", "SCHEMA_VERSION", "StoreBusyError", "StoreError", "TEACHER_SCHEMA", "TeacherManifest",
           "TeacherShard",
           "TeacherStore", "WriteOptions", "WriterLock", "file_sha256", "owned_shards", "prepared_dir",
           "prompt_fingerprint", "read_json", "read_prepared_shard", "read_table", "read_teacher_shard",
           "read_votes", "remove_stale_tmp", "require_stores", "scores_dir", "shard_name", "teacher_dir",
           "update_manifest", "verify_digest", "write_json_atomic", "write_prepared_shard", "write_table_atomic",
           "write_votes"]
