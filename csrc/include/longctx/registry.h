// The instantiation tables: which compiled kernel serves a (variant, dtype) key.
//
// Each generated instantiation file (csrc/generate_kernels.py writes them at build time) registers
// one function at static-initialization time: the flash forward and backward by (head_dim, dtype),
// the KV-cache decode by (cache format, dtype). A build restricted by the build switches leaves
// keys out, still links, and the launcher reports the missing key instead of failing to link.
// The table lives in a function-local static, so registration order across translation units
// does not matter. Framework-free: the standalone C++ tests link the same generated files.
#pragma once
#include <vector>

namespace longctx {

// 16-bit element types of the CUDA kernels (a table key; the CPU twins dispatch on at::ScalarType).
enum class DType : int { kFP16 = 0, kBF16 = 1 };

inline const char* dtype_name(DType d) { return d == DType::kBF16 ? "bf16" : "fp16"; }

// One table per Tag (a kernel family); Fn is the type of what a key maps to.
template <typename Tag, typename Fn>
class KernelTable {
 public:
  // nullptr (or Fn{}) when (variant, dtype) is not compiled into this binary.
  static Fn find(int variant, DType dtype) {
    for (const Entry& e : table())
      if (e.variant == variant && e.dtype == dtype) return e.fn;
    return Fn{};
  }

  // A static object of this type in an instantiation file adds its entry.
  struct Registration {
    Registration(int variant, DType dtype, Fn fn) { table().push_back(Entry{variant, dtype, fn}); }
  };

 private:
  struct Entry {
    int variant;
    DType dtype;
    Fn fn;
  };
  static std::vector<Entry>& table() {
    static std::vector<Entry> t;
    return t;
  }
};

}  // namespace longctx
