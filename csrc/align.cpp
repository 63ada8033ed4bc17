// Alignment kernels (see align.h and engine/_align_py.py for the algorithms and their rules).
//
// mined_align stores the DTW matrix banded: row i keeps columns [lo_i, hi_i] only, so memory and time are
// O(m * band) with a band and O(m * n) without. Costs are integers, so the accumulated matrix is int32
// with a large sentinel for "unreachable"; comparisons in the backtrack match numpy's float inf exactly.
// Token strings repeat a lot (" the", "\n", digits), so distinct strings get small ids and a
// (teacher id x student id) table memoizes the Levenshtein costs when it fits in 64 MiB: filled lazily
// inside a band, a whole row at once for the full matrix (four student strings in lockstep).
//
// nearest scans candidate buckets by length |len_q - len_c| = 0, 1, 2, ... and stops once the distance
// can no longer beat the best found (d >= |len difference|). Each comparison is first filtered by a
// lower bound from 256-bit byte-set signatures (every byte value present in one string and absent from
// the other costs at least one edit), then computed with Myers' bit-parallel algorithm (Hyyro's global
// variant) for queries up to 64 bytes, exiting early once the remaining columns cannot bring the score
// under the threshold; longer queries use the plain O(la * lb) recurrence.
#include "align.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <unordered_map>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace profuser {

// ------------------------------------------------------------------------------------------------
// offsets
// ------------------------------------------------------------------------------------------------

void check_offsets(const int32_t* off, int64_t n, const char* name, int64_t seq) {
  if (n <= 0) throw AlignError("sequence " + std::to_string(seq) + ": " + name + " offsets are empty");
  for (int64_t r = 0; r < n; ++r) {
    const int32_t a = off[2 * r], b = off[2 * r + 1];
    if (a < 0 || b < a)
      throw AlignError("sequence " + std::to_string(seq) + ": " + name + " offsets row " + std::to_string(r) +
                       " is not a span: [" + std::to_string(a) + ", " + std::to_string(b) + "]");
    if (r > 0 && a < off[2 * (r - 1)])
      throw AlignError("sequence " + std::to_string(seq) + ": " + name + " offsets decrease at row " +
                       std::to_string(r) + ": start " + std::to_string(a) + " after " +
                       std::to_string(off[2 * (r - 1)]));
  }
}

static inline bool clean(const int32_t* o, int64_t i) {
  return i == 0 || (o[2 * i] != o[2 * (i - 1)] && o[2 * (i - 1) + 1] <= o[2 * i]);
}

void offsets_align(const int32_t* st, int64_t n, const int32_t* te, int64_t m, int32_t* out) {
  int64_t r = 0;  // teacher cursor: starts are non-decreasing on both sides, so one merge pass suffices
  for (int64_t s = 0; s < n; ++s) {
    out[s] = -1;
    const int32_t c = st[2 * s];
    while (r < m && te[2 * r] < c) ++r;
    if (r < m && te[2 * r] == c && clean(st, s) && clean(te, r)) out[s] = static_cast<int32_t>(r);
  }
}

// ------------------------------------------------------------------------------------------------
// Levenshtein
// ------------------------------------------------------------------------------------------------

template <typename T>
int64_t lev(const T* a, int64_t la, const T* b, int64_t lb) {
  if (la < lb) { std::swap(a, b); std::swap(la, lb); }
  if (lb == 0) return la;
  std::vector<int64_t> row(static_cast<size_t>(lb + 1));
  for (int64_t j = 0; j <= lb; ++j) row[j] = j;
  for (int64_t i = 1; i <= la; ++i) {
    int64_t diag = row[0];
    row[0] = i;
    for (int64_t j = 1; j <= lb; ++j) {
      const int64_t up = row[j];
      row[j] = std::min({up + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1] ? 1 : 0)});
      diag = up;
    }
  }
  return row[lb];
}
template int64_t lev<uint8_t>(const uint8_t*, int64_t, const uint8_t*, int64_t);
template int64_t lev<int32_t>(const int32_t*, int64_t, const int32_t*, int64_t);

template <typename T>
void check_strings(const Strings<T>& s, int64_t data_len, const char* name, int64_t seq) {
  if (s.count <= 0) throw AlignError("sequence " + std::to_string(seq) + ": " + name + " tokens are empty");
  if (s.off[0] != 0 || s.off[s.count] != data_len)
    throw AlignError("sequence " + std::to_string(seq) + ": " + name +
                     " string offsets do not span the data");
  for (int64_t i = 0; i < s.count; ++i)
    if (s.off[i + 1] < s.off[i])
      throw AlignError("sequence " + std::to_string(seq) + ": " + name + " string offsets decrease at " +
                       std::to_string(i));
}
template void check_strings<uint8_t>(const Strings<uint8_t>&, int64_t, const char*, int64_t);
template void check_strings<int32_t>(const Strings<int32_t>&, int64_t, const char*, int64_t);

// ------------------------------------------------------------------------------------------------
// mined DTW
// ------------------------------------------------------------------------------------------------

namespace {

// Distinct-string ids for a token list (hash of the code units); rep[id] = the first token with that string.
std::vector<int32_t> string_ids(const Strings<int32_t>& s, int32_t* n_distinct, std::vector<int64_t>* rep) {
  std::unordered_map<std::u32string, int32_t> ids;
  ids.reserve(static_cast<size_t>(s.count) * 2);
  std::vector<int32_t> out(static_cast<size_t>(s.count));
  for (int64_t i = 0; i < s.count; ++i) {
    std::u32string key(reinterpret_cast<const char32_t*>(s.at(i)), static_cast<size_t>(s.len(i)));
    auto [it, added] = ids.emplace(std::move(key), static_cast<int32_t>(ids.size()));
    if (added) rep->push_back(i);
    out[i] = it->second;
  }
  *n_distinct = static_cast<int32_t>(ids.size());
  return out;
}

}  // namespace

// One teacher string as a Myers pattern: match masks for code units < 256 in a table (token_strings gives
// one char per byte, so that is every unit in practice), others found by scanning the pattern.
struct CpPattern {
  uint64_t peq[256];
  const int32_t* p = nullptr;
  int64_t n = 0;

  void set(const int32_t* s, int64_t len) {
    p = s;
    n = len;
    std::memset(peq, 0, sizeof(peq));
    if (len > 64) return;
    for (int64_t x = 0; x < len; ++x)
      if (s[x] >= 0 && s[x] < 256) peq[s[x]] |= uint64_t{1} << x;
  }

  uint64_t eq_of(int32_t c) const {
    if (c >= 0 && c < 256) return peq[c];
    uint64_t eq = 0;
    for (int64_t x = 0; x < n; ++x) eq |= static_cast<uint64_t>(p[x] == c) << x;
    return eq;
  }

  // Distances to four texts of the same length lb (n <= 64, n, lb > 0), in lockstep: the four dependency
  // chains are independent, so the CPU overlaps them (one chain is latency-bound at ~10 ops per column).
  void distance4(const int32_t* const b[4], int64_t lb, int32_t out[4]) const {
    const uint64_t ones = n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1);
    const uint64_t last = uint64_t{1} << (n - 1);
    uint64_t pv[4] = {ones, ones, ones, ones}, mv[4] = {0, 0, 0, 0};
    int64_t score[4] = {n, n, n, n};
    for (int64_t j = 0; j < lb; ++j) {
      for (int k = 0; k < 4; ++k) {
        const uint64_t eq = eq_of(b[k][j]);
        const uint64_t xv = eq | mv[k];
        const uint64_t xh = (((eq & pv[k]) + pv[k]) ^ pv[k]) | eq;
        uint64_t ph = mv[k] | ~(xh | pv[k]);
        uint64_t mh = pv[k] & xh;
        score[k] += static_cast<int64_t>((ph & last) != 0) - static_cast<int64_t>((mh & last) != 0);
        ph = (ph << 1) | 1;
        mh <<= 1;
        pv[k] = mh | ~(xv | ph);
        mv[k] = ph & xv;
      }
    }
    for (int k = 0; k < 4; ++k) out[k] = static_cast<int32_t>(score[k]);
  }

  int64_t distance(const int32_t* b, int64_t lb) const {
    if (n == 0) return lb;
    if (lb == 0) return n;
    if (n > 64) return lev(p, n, b, lb);
    uint64_t pv = n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1), mv = 0;
    const uint64_t last = uint64_t{1} << (n - 1);
    int64_t score = n;
    for (int64_t j = 0; j < lb; ++j) {
      const uint64_t eq = eq_of(b[j]);
      const uint64_t xv = eq | mv;
      const uint64_t xh = (((eq & pv) + pv) ^ pv) | eq;
      uint64_t ph = mv | ~(xh | pv);
      uint64_t mh = pv & xh;
      if (ph & last) ++score;
      else if (mh & last) --score;
      ph = (ph << 1) | 1;
      mh <<= 1;
      pv = mh | ~(xv | ph);
      mv = ph & xv;
    }
    return score;
  }
};

void mined_align(const Strings<int32_t>& student, const Strings<int32_t>& teacher, int64_t band, int64_t seq,
                 int32_t* out) {
  const int64_t m = teacher.count, n = student.count;
  // The matrix is int32 (half the memory traffic of int64; a 2048 x 2048 pair is 16 MiB instead of 32):
  // costs are edit distances of short strings, so a path sum stays far below INF (checked below).
  constexpr int32_t INF = std::numeric_limits<int32_t>::max() / 4;
  // band limits, exactly as _align_py.band_limits
  std::vector<int64_t> lo(m), hi(m), base(m + 1);
  for (int64_t i = 0; i < m; ++i) {
    int64_t l = 0, h = n - 1;
    if (band >= 0) {
      l = (i * n) / m - band;
      h = ((i + 1) * n + m - 1) / m - 1 + band;
    }
    lo[i] = std::clamp<int64_t>(l, 0, n - 1);
    hi[i] = std::clamp<int64_t>(h, 0, n - 1);
  }
  base[0] = 0;
  for (int64_t i = 0; i < m; ++i) base[i + 1] = base[i] + (hi[i] - lo[i] + 1);
  std::vector<int32_t> D(static_cast<size_t>(base[m]));
  auto at = [&](int64_t i, int64_t j) -> int32_t {  // D(i, j) with out-of-band / border = INF
    if (i < 0 || j < 0 || j < lo[i] || j > hi[i]) return INF;
    return D[static_cast<size_t>(base[i] + j - lo[i])];
  };

  int32_t ut = 0, us = 0;
  std::vector<int64_t> trep, srep;
  const std::vector<int32_t> tid = string_ids(teacher, &ut, &trep);
  const std::vector<int32_t> sid = string_ids(student, &us, &srep);
  const bool memo = static_cast<int64_t>(ut) * us <= (int64_t{16} << 20);
  std::vector<int32_t> table(memo ? static_cast<size_t>(ut) * us : 0, -1);
  CpPattern pat;

  // Full matrix: every (teacher string, student string) pair is needed, so a memo row is filled in one go
  // when its teacher string first appears, over the distinct student strings grouped by length, four at a
  // time (CpPattern::distance4). With a band only the pairs inside it are computed, lazily.
  const bool eager = memo && band < 0;
  std::vector<std::pair<int64_t, std::vector<int32_t>>> groups;  // (length, distinct student ids)
  std::vector<char> filled(eager ? static_cast<size_t>(ut) : 0, 0);
  if (eager) {
    std::unordered_map<int64_t, size_t> where;
    for (int32_t d = 0; d < us; ++d) {
      const int64_t L = student.len(srep[d]);
      auto [it, added] = where.emplace(L, groups.size());
      if (added) groups.push_back({L, {}});
      groups[it->second].second.push_back(d);
    }
  }
  auto fill_row = [&](int32_t* row) {
    for (const auto& [L, ids] : groups) {
      size_t k = 0;
      if (pat.n > 0 && pat.n <= 64 && L > 0) {
        for (; k + 4 <= ids.size(); k += 4) {
          const int32_t* b[4] = {student.at(srep[ids[k]]), student.at(srep[ids[k + 1]]),
                                 student.at(srep[ids[k + 2]]), student.at(srep[ids[k + 3]])};
          int32_t d[4];
          pat.distance4(b, L, d);
          for (int q = 0; q < 4; ++q) row[ids[k + q]] = d[q];
        }
      }
      for (; k < ids.size(); ++k)
        row[ids[k]] = static_cast<int32_t>(std::min<int64_t>(pat.distance(student.at(srep[ids[k]]), L), INF));
    }
  };
  // Memo row of teacher row i (filled on first use in eager mode), or nullptr without a memo.
  auto memo_row_of = [&](int64_t i) -> int32_t* {
    if (!memo) return nullptr;
    int32_t* row = table.data() + static_cast<size_t>(tid[i]) * us;
    if (eager && !filled[tid[i]]) {
      pat.set(teacher.at(trep[tid[i]]), teacher.len(trep[tid[i]]));
      fill_row(row);
      filled[tid[i]] = 1;
    }
    return row;
  };

  // No path sum can reach INF when (m + n) * (longest string) stays below it: a cell's value is at most
  // the cost of some monotone path to it (<= m + n cells). Then the full matrix needs no per-cell checks.
  int64_t longest = 0;
  for (int64_t i = 0; i < m; ++i) longest = std::max(longest, teacher.len(i));
  for (int64_t j = 0; j < n; ++j) longest = std::max(longest, student.len(j));
  if (eager && (m + n) * (longest + 1) < INF) {
    for (int64_t i = 0; i < m; ++i) {
      const int32_t* mrow = memo_row_of(i);
      int32_t* cur = D.data() + base[i];
      if (i == 0) {
        int32_t left = 0;  // D(0, -1) acts as 0 only for the start cell
        for (int64_t j = 0; j < n; ++j) left = cur[j] = left + mrow[sid[j]];
        continue;
      }
      const int32_t* prev = D.data() + base[i - 1];
      int32_t left = cur[0] = prev[0] + mrow[sid[0]];
      for (int64_t j = 1; j < n; ++j) {
        const int32_t best = std::min(std::min(prev[j], prev[j - 1]), left);
        left = cur[j] = best + mrow[sid[j]];
      }
    }
  } else {
    // Row by row; the previous row and the running left value are kept in registers/pointers, so the
    // inner loop is a memo lookup, three comparisons and a store.
    for (int64_t i = 0; i < m; ++i) {
      int32_t* memo_row = memo_row_of(i);
      if (!eager) pat.set(teacher.at(i), teacher.len(i));
      int32_t* cur = D.data() + base[i];
      const int32_t* prev = i > 0 ? D.data() + base[i - 1] : nullptr;
      const int64_t plo = i > 0 ? lo[i - 1] : 0, phi = i > 0 ? hi[i - 1] : -1;
      int32_t left = INF;  // D(i, j - 1)
      for (int64_t j = lo[i]; j <= hi[i]; ++j) {
        int32_t c;
        if (memo) {
          int32_t& slot = memo_row[sid[j]];
          if (slot < 0)
            slot = static_cast<int32_t>(std::min<int64_t>(pat.distance(student.at(j), student.len(j)), INF));
          c = slot;
        } else {
          c = static_cast<int32_t>(std::min<int64_t>(pat.distance(student.at(j), student.len(j)), INF));
        }
        int32_t best;
        if (i == 0 && j == 0) {
          best = 0;
        } else {
          const int32_t up = (j >= plo && j <= phi) ? prev[j - plo] : INF;
          const int32_t dg = (j - 1 >= plo && j - 1 <= phi) ? prev[j - 1 - plo] : INF;
          best = std::min(std::min(up, left), dg);
        }
        // best < INF and c <= INF keep the sum below 2^31; a path cost reaching INF would be ambiguous
        const int32_t v = best >= INF ? INF : best + c;
        if (v >= INF && best < INF)
          throw AlignError("sequence " + std::to_string(seq) + ": DTW path cost overflows (sequence too long)");
        cur[j - lo[i]] = v;
        left = v;
      }
    }
  }
  if (at(m - 1, n - 1) >= INF)
    throw AlignError("sequence " + std::to_string(seq) + ": no DTW path inside band=" + std::to_string(band));

  // backtrack: ties to the diagonal, then up (teacher step), then left (student step)
  std::vector<int32_t> count(static_cast<size_t>(n), 0), row(static_cast<size_t>(n), -1);
  int64_t i = m - 1, j = n - 1;
  while (i > 0 || j > 0) {
    count[j] += 1;
    row[j] = static_cast<int32_t>(i);
    const int32_t diag = (i > 0 && j > 0) ? at(i - 1, j - 1) : INF;
    const int32_t up = i > 0 ? at(i - 1, j) : INF;
    const int32_t left = j > 0 ? at(i, j - 1) : INF;
    if (diag <= up && diag <= left) { --i; --j; }
    else if (up <= left) { --i; }
    else { --j; }
  }
  count[0] += 1;
  row[0] = 0;
  for (int64_t s = 0; s < n; ++s) {
    out[s] = -1;
    if (count[s] != 1) continue;
    const int64_t r = row[s];
    if (teacher.len(r) == student.len(s) &&
        std::equal(teacher.at(r), teacher.at(r) + teacher.len(r), student.at(s)))
      out[s] = static_cast<int32_t>(r);
  }
}

// ------------------------------------------------------------------------------------------------
// nearest string (vocabulary MinED map)
// ------------------------------------------------------------------------------------------------

namespace {

struct Sig {
  uint64_t w[4];
};

Sig signature(const uint8_t* s, int64_t n) {
  Sig g{{0, 0, 0, 0}};
  for (int64_t i = 0; i < n; ++i) g.w[s[i] >> 6] |= uint64_t{1} << (s[i] & 63);
  return g;
}

inline int64_t sig_bound(const Sig& a, const Sig& b) {
  int64_t x = 0, y = 0;
  for (int k = 0; k < 4; ++k) {
    x += __builtin_popcountll(a.w[k] & ~b.w[k]);
    y += __builtin_popcountll(b.w[k] & ~a.w[k]);
  }
  return std::max(x, y);
}

// Folded byte histograms (32 buckets, byte & 31) give a bag-distance lower bound:
//   lev(a, b) >= max(|a|, |b|) - sum_k min(ca[k], cb[k])
// (folding only merges buckets, which can only raise the sum, so the bound stays valid). It rejects most
// candidates in ~10 instructions, before any Myers column is computed.
struct Hist {
  alignas(16) uint8_t c[32];
  bool exact;  // false if some bucket overflowed 255: never filter with it
};

Hist histogram(const uint8_t* s, int64_t n) {
  Hist h;
  std::memset(h.c, 0, sizeof(h.c));
  h.exact = true;
  for (int64_t i = 0; i < n; ++i) {
    uint8_t& v = h.c[s[i] & 31];
    if (v == 255) h.exact = false;
    else ++v;
  }
  return h;
}

inline int64_t common_count(const Hist& a, const Hist& b) {
#if defined(__SSE2__)
  const __m128i z = _mm_setzero_si128();
  const __m128i m0 = _mm_min_epu8(_mm_load_si128(reinterpret_cast<const __m128i*>(a.c)),
                                  _mm_load_si128(reinterpret_cast<const __m128i*>(b.c)));
  const __m128i m1 = _mm_min_epu8(_mm_load_si128(reinterpret_cast<const __m128i*>(a.c + 16)),
                                  _mm_load_si128(reinterpret_cast<const __m128i*>(b.c + 16)));
  const __m128i s = _mm_add_epi64(_mm_sad_epu8(m0, z), _mm_sad_epu8(m1, z));
  return _mm_cvtsi128_si64(s) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(s, s));
#else
  int64_t t = 0;
  for (int k = 0; k < 32; ++k) t += std::min(a.c[k], b.c[k]);
  return t;
#endif
}

// Myers/Hyyro bit-parallel global edit distance for a pattern of la <= 64 bytes, one text column at a time.
struct MyersState {
  uint64_t pv, mv;
  int64_t score;
};

inline MyersState myers_step(const MyersState& s, uint64_t eq, uint64_t last) {
  const uint64_t xv = eq | s.mv;
  const uint64_t xh = (((eq & s.pv) + s.pv) ^ s.pv) | eq;
  uint64_t ph = s.mv | ~(xh | s.pv);
  uint64_t mh = s.pv & xh;
  int64_t score = s.score;
  if (ph & last) ++score;
  else if (mh & last) --score;
  ph = (ph << 1) | 1;
  mh <<= 1;
  return MyersState{mh | ~(xv | ph), ph & xv, score};
}

// One length bucket of candidates, sorted by their bytes, with the common-prefix length to the previous one:
// consecutive candidates share the Myers states of their common prefix (a trie walk without the trie).
struct Entry {
  Sig sig;
  Hist hist;
  int32_t id;   // candidate index
  int32_t lcp;  // common prefix with the previous entry of the bucket (0 for the first)
};
struct Bucket {
  std::vector<Entry> e;  // sorted by (bytes, index); filters read it sequentially (cache-friendly)
};

// Deletion-neighbourhood index (SymSpell): two strings within edit distance 2 always share a string
// obtained by deleting at most 2 units from each. Variants are stored as (64-bit hash, candidate) pairs,
// sorted by hash; a query looks up its own variants and verifies every hit with the exact distance, so
// hash collisions cost time, never correctness. It answers queries with max_dist <= 2 exactly without
// scanning the buckets.
constexpr int64_t kDelMax = 2;
constexpr int64_t kDelCap = 24;  // candidates longer than this are not indexed (queries near them scan)

inline uint64_t fnv_skip(const uint8_t* s, int64_t n, int64_t skip1, int64_t skip2) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t x = 0; x < n; ++x) {
    if (x == skip1 || x == skip2) continue;
    h = (h ^ s[x]) * 1099511628211ull;
  }
  return h ^ static_cast<uint64_t>(n - (skip1 >= 0) - (skip2 >= 0)) * 0x9E3779B97F4A7C15ull;
}

template <typename F>
inline void for_each_variant(const uint8_t* s, int64_t n, F&& f) {
  f(fnv_skip(s, n, -1, -1));
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0 && s[i] == s[i - 1]) continue;  // deleting either of two equal neighbours gives the same string
    f(fnv_skip(s, n, i, -1));
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) f(fnv_skip(s, n, i, j));
}

struct VariantIndex {
  std::vector<std::pair<uint64_t, int32_t>> v;

  void build(const Strings<uint8_t>& c, const uint8_t* ok) {
    for (int64_t k = 0; k < c.count; ++k) {
      if (!ok[k] || c.len(k) == 0 || c.len(k) > kDelCap) continue;
      for_each_variant(c.at(k), c.len(k), [&](uint64_t h) { v.emplace_back(h, static_cast<int32_t>(k)); });
    }
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
  }
};

}  // namespace

void nearest(const Strings<uint8_t>& q, const Strings<uint8_t>& c, const int32_t* max_dist,
             const uint8_t* cand_ok, int n_threads, int32_t* out_id, int32_t* out_dist) {
  int64_t max_len = 0;
  for (int64_t k = 0; k < c.count; ++k) max_len = std::max(max_len, c.len(k));
  std::vector<Bucket> bucket(static_cast<size_t>(max_len + 1));
  {
    std::vector<std::vector<int32_t>> ids(static_cast<size_t>(max_len + 1));
    for (int64_t k = 0; k < c.count; ++k)
      if (cand_ok[k] && c.len(k) > 0) ids[c.len(k)].push_back(static_cast<int32_t>(k));
    for (int64_t L = 1; L <= max_len; ++L) {
      std::vector<int32_t>& v = ids[L];
      std::sort(v.begin(), v.end(), [&](int32_t x, int32_t y) {
        const int r = std::memcmp(c.at(x), c.at(y), static_cast<size_t>(L));
        return r != 0 ? r < 0 : x < y;
      });
      Bucket& B = bucket[L];
      B.e.resize(v.size());
      for (size_t k = 0; k < v.size(); ++k) {
        Entry& en = B.e[k];
        en.id = v[k];
        en.sig = signature(c.at(v[k]), L);
        en.hist = histogram(c.at(v[k]), L);
        en.lcp = 0;
        if (k > 0) {
          const uint8_t *x = c.at(v[k - 1]), *y = c.at(v[k]);
          int32_t p = 0;
          while (p < L && x[p] == y[p]) ++p;
          en.lcp = p;
        }
      }
    }
  }

  VariantIndex index;
  index.build(c, cand_ok);

  std::atomic<int64_t> next{0};
  auto work = [&]() {
    uint64_t peq[256];
    std::vector<MyersState> st(static_cast<size_t>(max_len + 1));
    std::vector<int64_t> stamp(static_cast<size_t>(c.count), -1);
    for (;;) {
      const int64_t lo = next.fetch_add(16);
      if (lo >= q.count) return;
      const int64_t hi = std::min(q.count, lo + 16);
      for (int64_t qi = lo; qi < hi; ++qi) {
        out_id[qi] = -1;
        out_dist[qi] = -1;
        const uint8_t* a = q.at(qi);
        const int64_t la = q.len(qi), k = max_dist[qi];
        if (la == 0 || k < 0) continue;
        const Sig sa = signature(a, la);
        const Hist ha = histogram(a, la);
        const bool bitpar = la <= 64;
        uint64_t last = 0;
        if (bitpar) {
          std::memset(peq, 0, sizeof(peq));
          for (int64_t x = 0; x < la; ++x) peq[a[x]] |= uint64_t{1} << x;
          last = uint64_t{1} << (la - 1);
          st[0] = MyersState{la == 64 ? ~uint64_t{0} : ((uint64_t{1} << la) - 1), 0, la};
        }
        int64_t best_d = k + 1, best_id = -1;
        if (k <= kDelMax && la + k <= kDelCap) {
          // every candidate within distance k <= 2 is among the index hits (see VariantIndex)
          for_each_variant(a, la, [&](uint64_t h) {
            auto it = std::lower_bound(index.v.begin(), index.v.end(), std::make_pair(h, int32_t{-1}));
            for (; it != index.v.end() && it->first == h; ++it) {
              const int32_t ci = it->second;
              if (stamp[ci] == qi) continue;
              stamp[ci] = qi;
              const int64_t L = c.len(ci);
              const int64_t thr = ci < best_id ? best_d : best_d - 1;
              if (std::abs(L - la) > thr) continue;
              const int64_t d = lev(a, la, c.at(ci), L);
              if (d <= thr) { best_d = d; best_id = ci; }
            }
          });
          if (best_id >= 0) {
            out_id[qi] = static_cast<int32_t>(best_id);
            out_dist[qi] = static_cast<int32_t>(best_d);
          }
          continue;
        }
        for (int64_t delta = 0; delta <= k; ++delta) {
          if (delta > best_d) break;
          for (int side = 0; side < (delta == 0 ? 1 : 2); ++side) {
            const int64_t L = side == 0 ? la - delta : la + delta;
            if (L <= 0 || L > max_len) continue;
            const Bucket& B = bucket[L];
            const size_t nb = B.e.size();
            int64_t valid = 0;  // columns of st[] that hold the states of the current candidate's prefix
            size_t kk = 0;
            while (kk < nb) {
              const Entry& en = B.e[kk];
              valid = std::min<int64_t>(valid, en.lcp);
              const int32_t ci = en.id;
              // a tie only wins with a smaller index, so the acceptance threshold depends on the candidate
              const int64_t thr = ci < best_id ? best_d : best_d - 1;
              if (delta > best_d || sig_bound(sa, en.sig) > thr) { ++kk; continue; }
              if (ha.exact && en.hist.exact && std::max(la, L) - common_count(ha, en.hist) > thr) {
                ++kk;
                continue;
              }
              const uint8_t* b = c.at(ci);
              if (!bitpar) {
                const int64_t d = lev(a, la, b, L);
                if (d <= thr) { best_d = d; best_id = ci; }
                ++kk;
                continue;
              }
              int64_t j = valid;
              bool pruned = false;
              for (; j < L; ++j) {
                st[j + 1] = myers_step(st[j], peq[b[j]], last);
                // every later column lowers the score by at most 1: nothing sharing b[0..j] gets <= best_d
                if (st[j + 1].score - (L - j - 1) > best_d) { pruned = true; break; }
              }
              if (pruned) {
                valid = j + 1;
                const int64_t shared = j + 1;
                ++kk;
                while (kk < nb && B.e[kk].lcp >= shared) ++kk;  // the whole subtree under this prefix
                continue;
              }
              valid = L;
              const int64_t d = st[L].score;
              if (d <= thr) { best_d = d; best_id = ci; }
              ++kk;
            }
          }
        }
        if (best_id >= 0) {
          out_id[qi] = static_cast<int32_t>(best_id);
          out_dist[qi] = static_cast<int32_t>(best_d);
        }
      }
    }
  };
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads = static_cast<int>(std::min<int64_t>(n_threads, std::max<int64_t>(1, q.count / 16)));
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

}  // namespace profuser
