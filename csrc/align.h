// Token and vocabulary alignment kernels for profuser._C (C++17, no Python types in this header).
//
// Same algorithms and bit-identical results as engine/_align_py.py, which documents them:
//   offsets_align : clean-start character matching of predicted tokens (two-pointer merge, O(n + m))
//   mined_align   : FuseLLM MinED DTW, banded, rows = teacher tokens, ties to the diagonal
//   nearest       : length-restricted nearest string by Levenshtein distance (Myers bit-parallel), threads
//   lev           : Levenshtein distance between two code-unit sequences
// Errors are reported by throwing AlignError (mapped to Python ValueError by the bindings).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace profuser {

struct AlignError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Checked view of an offsets array: n rows of (start, end). Throws AlignError naming seq and row.
void check_offsets(const int32_t* off, int64_t n, const char* name, int64_t seq);

// out[s] = teacher row aligned to student predicted token s, or -1. Inputs must be checked first.
void offsets_align(const int32_t* st, int64_t n, const int32_t* te, int64_t m, int32_t* out);

// Strings are given as a flat array of code units plus offsets [count + 1].
template <typename T>
struct Strings {
  const T* data;
  const int64_t* off;
  int64_t count;
  int64_t len(int64_t i) const { return off[i + 1] - off[i]; }
  const T* at(int64_t i) const { return data + off[i]; }
};

// Validates a Strings (monotone offsets inside [0, data_len]). Throws AlignError naming seq.
template <typename T>
void check_strings(const Strings<T>& s, int64_t data_len, const char* name, int64_t seq);

// out[j] for each student token j; band < 0 means the full matrix. Throws when no path fits the band.
void mined_align(const Strings<int32_t>& student, const Strings<int32_t>& teacher, int64_t band, int64_t seq,
                 int32_t* out);

template <typename T>
int64_t lev(const T* a, int64_t la, const T* b, int64_t lb);

// For each query q: candidate with the smallest distance d <= max_dist[q] (ties: smallest index), else -1.
void nearest(const Strings<uint8_t>& queries, const Strings<uint8_t>& cands, const int32_t* max_dist,
             const uint8_t* cand_ok, int n_threads, int32_t* out_id, int32_t* out_dist);

}  // namespace profuser
