// Sequence alignment kernels: offsets, Levenshtein, mined DTW (see align.h and engine/_align_py.py for the
// algorithms and their rules; the vocabulary map's nearest-string search is in nearest.cpp).
//
// mined_align stores the DTW matrix banded: row i keeps columns [lo_i, hi_i] only, so memory and time are
// O(m * band) with a band and O(m * n) without. Costs are integers, so the accumulated matrix is int32
// with a large sentinel for "unreachable"; comparisons in the backtrack match numpy's float inf exactly.
// Token strings repeat a lot (" the", "\n", digits), so distinct strings get small ids and a
// (teacher id x student id) table memoizes the Levenshtein costs when it fits in 64 MiB: filled lazily
// inside a band, a whole row at once for the full matrix (four student strings in lockstep).
#include "align.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <unordered_map>

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

  // One Myers column (Hyyro's global variant): text unit with match mask eq; updates the vertical delta
  // vectors (pv, mv) and the distance of the whole pattern to the text so far.
  static void column(uint64_t eq, uint64_t last, uint64_t& pv, uint64_t& mv, int64_t& score) {
    const uint64_t xv = eq | mv;
    const uint64_t xh = (((eq & pv) + pv) ^ pv) | eq;
    uint64_t ph = mv | ~(xh | pv);
    uint64_t mh = pv & xh;
    score += static_cast<int64_t>((ph & last) != 0) - static_cast<int64_t>((mh & last) != 0);
    ph = (ph << 1) | 1;
    mh <<= 1;
    pv = mh | ~(xv | ph);
    mv = ph & xv;
  }

  uint64_t ones() const { return n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1); }

  // Distances to four texts of the same length lb (n <= 64, n, lb > 0), in lockstep: the four dependency
  // chains are independent, so the CPU overlaps them (one chain is latency-bound at ~10 ops per column).
  void distance4(const int32_t* const b[4], int64_t lb, int32_t out[4]) const {
    const uint64_t last = uint64_t{1} << (n - 1);
    uint64_t pv[4] = {ones(), ones(), ones(), ones()}, mv[4] = {0, 0, 0, 0};
    int64_t score[4] = {n, n, n, n};
    for (int64_t j = 0; j < lb; ++j)
      for (int k = 0; k < 4; ++k) column(eq_of(b[k][j]), last, pv[k], mv[k], score[k]);
    for (int k = 0; k < 4; ++k) out[k] = static_cast<int32_t>(score[k]);
  }

  int64_t distance(const int32_t* b, int64_t lb) const {
    if (n == 0) return lb;
    if (lb == 0) return n;
    if (n > 64) return lev(p, n, b, lb);
    const uint64_t last = uint64_t{1} << (n - 1);
    uint64_t pv = ones(), mv = 0;
    int64_t score = n;
    for (int64_t j = 0; j < lb; ++j) column(eq_of(b[j]), last, pv, mv, score);
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

}  // namespace profuser
