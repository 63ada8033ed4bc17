// pybind11 bindings of profuser._C: the boundary where every input is validated before any indexing.
//
// Arrays arrive as numpy arrays (no torch dependency: the data loader calls these per example, so the
// per-call overhead must stay in the microseconds). Shapes, dtypes and value ranges are checked here or
// in check_* (align.cpp); failures raise ValueError naming the sequence index. The heavy loops run with
// the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "align.h"

namespace py = pybind11;
using namespace profuser;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

[[noreturn]] void fail(int64_t seq, const std::string& what) {
  throw py::value_error("sequence " + std::to_string(seq) + ": " + what);
}

const int32_t* offsets_ptr(const Arr<int32_t>& a, const char* name, int64_t seq, int64_t* n) {
  if (a.ndim() != 2 || a.shape(1) != 2)
    fail(seq, std::string(name) + " offsets must have shape [n, 2], got ndim " + std::to_string(a.ndim()));
  *n = a.shape(0);
  check_offsets(a.data(), *n, name, seq);
  return a.data();
}

py::array_t<int32_t> align_offsets_one(const Arr<int32_t>& student, const Arr<int32_t>& teacher,
                                       int64_t seq) {
  int64_t n = 0, m = 0;
  const int32_t* s = offsets_ptr(student, "student", seq, &n);
  const int32_t* t = offsets_ptr(teacher, "teacher", seq, &m);
  py::array_t<int32_t> out(n);
  int32_t* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    offsets_align(s, n, t, m, o);
  }
  return out;
}

template <typename T>
Strings<T> strings(const Arr<T>& flat, const Arr<int64_t>& off, const char* name, int64_t seq) {
  if (flat.ndim() != 1 || off.ndim() != 1) fail(seq, std::string(name) + " strings must be 1-d arrays");
  if (off.shape(0) < 1) fail(seq, std::string(name) + " string offsets are empty");
  Strings<T> s{flat.data(), off.data(), off.shape(0) - 1};
  check_strings(s, flat.shape(0), name, seq);
  return s;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ProFuser alignment kernels (token offsets, MinED DTW, vocabulary nearest-string maps)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const AlignError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("align_offsets", &align_offsets_one, py::arg("student"), py::arg("teacher"), py::arg("seq_index") = 0,
        "int32 [S, 2], int32 [R, 2] -> int32 [S]: teacher row per student predicted token, -1 = none");

  m.def(
      "align_offsets_batch",
      [](const py::list& students, const py::list& teachers) {
        if (students.size() != teachers.size())
          throw py::value_error("batch sizes differ: " + std::to_string(students.size()) + " student vs " +
                                std::to_string(teachers.size()) + " teacher");
        py::list out(students.size());
        for (size_t b = 0; b < students.size(); ++b)
          out[b] = align_offsets_one(students[b].cast<Arr<int32_t>>(), teachers[b].cast<Arr<int32_t>>(),
                                     static_cast<int64_t>(b));
        return out;
      },
      py::arg("students"), py::arg("teachers"), "list of [S_b, 2], list of [R_b, 2] -> list of int32 [S_b]");

  m.def(
      "align_mined",
      [](const Arr<int32_t>& sf, const Arr<int64_t>& so, const Arr<int32_t>& tf, const Arr<int64_t>& to,
         int64_t band, int64_t seq) {
        const Strings<int32_t> s = strings(sf, so, "student", seq);
        const Strings<int32_t> t = strings(tf, to, "teacher", seq);
        py::array_t<int32_t> out(s.count);
        int32_t* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          mined_align(s, t, band, seq, o);
        }
        return out;
      },
      py::arg("student_flat"), py::arg("student_offsets"), py::arg("teacher_flat"),
      py::arg("teacher_offsets"),
      py::arg("band") = -1, py::arg("seq_index") = 0,
      "code points + offsets of student and teacher token strings -> int32 [S] (MinED DTW; band < 0 = full)");

  m.def(
      "nearest",
      [](const Arr<uint8_t>& qf, const Arr<int64_t>& qo, const Arr<uint8_t>& cf, const Arr<int64_t>& co,
         const Arr<int32_t>& max_dist, const Arr<uint8_t>& cand_ok, int n_threads) {
        const Strings<uint8_t> q = strings(qf, qo, "query", 0);
        const Strings<uint8_t> c = strings(cf, co, "candidate", 0);
        if (max_dist.ndim() != 1 || max_dist.shape(0) != q.count)
          throw py::value_error("max_dist must have one entry per query");
        if (cand_ok.ndim() != 1 || cand_ok.shape(0) != c.count)
          throw py::value_error("cand_ok must have one entry per candidate");
        py::array_t<int32_t> ids(q.count), dists(q.count);
        int32_t* pi = ids.mutable_data();
        int32_t* pd = dists.mutable_data();
        {
          py::gil_scoped_release nogil;
          nearest(q, c, max_dist.data(), cand_ok.data(), n_threads, pi, pd);
        }
        return py::make_tuple(ids, dists);
      },
      py::arg("query_flat"), py::arg("query_offsets"), py::arg("cand_flat"), py::arg("cand_offsets"),
      py::arg("max_dist"), py::arg("cand_ok"), py::arg("n_threads") = 0,
      "nearest candidate by Levenshtein distance <= max_dist (ties: smallest index) -> "
      "(ids, dists) int32 [Q]");

  m.def(
      "lev_pairs",
      [](const Arr<uint8_t>& af, const Arr<int64_t>& ao, const Arr<uint8_t>& bf, const Arr<int64_t>& bo,
         const Arr<int64_t>& ia, const Arr<int64_t>& ib) {
        const Strings<uint8_t> a = strings(af, ao, "a", 0);
        const Strings<uint8_t> b = strings(bf, bo, "b", 0);
        if (ia.ndim() != 1 || ib.ndim() != 1 || ia.shape(0) != ib.shape(0))
          throw py::value_error("pair index arrays must be 1-d and of equal length");
        const int64_t P = ia.shape(0);
        for (int64_t p = 0; p < P; ++p)
          if (ia.data()[p] < 0 || ia.data()[p] >= a.count || ib.data()[p] < 0 || ib.data()[p] >= b.count)
            throw py::value_error("pair " + std::to_string(p) + " indexes outside the string lists");
        py::array_t<int32_t> out(P);
        int32_t* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = ia.data()[p], j = ib.data()[p];
            o[p] = static_cast<int32_t>(lev(a.at(i), a.len(i), b.at(j), b.len(j)));
          }
        }
        return out;
      },
      py::arg("a_flat"), py::arg("a_offsets"), py::arg("b_flat"), py::arg("b_offsets"), py::arg("ia"),
      py::arg("ib"), "int32 [P]: Levenshtein distance of each (a[ia[p]], b[ib[p]]) pair");
}
