// Argument checks shared by every launcher and CPU twin. Each error names the op and the argument
// so a user can tell which of their tensors is wrong.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <initializer_list>
#include <string>

namespace longctx {

// TORCH_CHECK with the "longctx.<op>: <arg> ..." prefix every message carries.
#define LONGCTX_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK(cond, "longctx.", op, ": ", arg, " ", __VA_ARGS__)

std::string dtype_list(std::initializer_list<at::ScalarType> allowed);

void check_dtype(const at::Tensor& t, const char* op, const char* arg,
                 std::initializer_list<at::ScalarType> allowed);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* arg, const char* ref_arg);
void check_dim(const at::Tensor& t, const char* op, const char* arg,
               std::initializer_list<int64_t> dims);
void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* arg);
// At least 64-bit aligned writes into t must not alias: no internal overlap, no overlap with other.
void check_writable(const at::Tensor& t, const char* op, const char* arg);

}  // namespace longctx
