// Nearest string by Levenshtein distance, for the vocabulary MinED map (see align.h and
// engine/vocab_map.py for what is mapped and why).
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
#include <cstring>
#include <thread>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace profuser {

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
