#include "common/checks.h"
#include <ATen/MemoryOverlap.h>
#include <sstream>

namespace longctx {

std::string dtype_list(std::initializer_list<at::ScalarType> allowed) {
  std::ostringstream os;
  bool first = true;
  for (auto s : allowed) {
    os << (first ? "" : ", ") << c10::toString(s);
    first = false;
  }
  return os.str();
}

void check_dtype(const at::Tensor& t, const char* op, const char* arg,
                 std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto s : allowed) ok = ok || t.scalar_type() == s;
  LONGCTX_CHECK_ARG(ok, op, arg, "must have dtype ", dtype_list(allowed), ", got ",
                    t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* arg, const char* ref_arg) {
  LONGCTX_CHECK_ARG(t.device() == ref.device(), op, arg, "must be on the same device as ", ref_arg,
                    " (", ref.device(), "), got ", t.device());
}

void check_dim(const at::Tensor& t, const char* op, const char* arg,
               std::initializer_list<int64_t> dims) {
  bool ok = false;
  std::ostringstream os;
  bool first = true;
  for (auto d : dims) {
    ok = ok || t.dim() == d;
    os << (first ? "" : " or ") << d;
    first = false;
  }
  LONGCTX_CHECK_ARG(ok, op, arg, "must have ", os.str(), " dimensions, got shape ", t.sizes());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  LONGCTX_CHECK_ARG(t.size(-1) <= 1 || t.stride(-1) == 1, op, arg,
                    "must be contiguous in its last dimension, got strides ", t.strides());
}

void check_writable(const at::Tensor& t, const char* op, const char* arg) {
  LONGCTX_CHECK_ARG(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, arg,
                    "is written in place and must not have overlapping elements (an expanded or "
                    "broadcast view); pass a contiguous tensor");
}

}  // namespace longctx
