// What this build compiled in, reported by longctx.build_info(). Every kernel family registers
// itself from the translation unit that holds it, so the report is the truth about the binary,
// not about the build switches.
#pragma once
#include <string>
#include <vector>

namespace longctx {

struct KernelEntry {
  std::string family;    // "rope", "flash_fwd", ...
  std::string device;    // "cpu" or "cuda"
  std::string dtypes;    // comma-separated
  std::string features;  // comma-separated: head dims, masks, ...
};

std::vector<KernelEntry>& kernel_registry();

struct KernelRegistration {
  KernelRegistration(const char* family, const char* device, const char* dtypes,
                     const char* features) {
    kernel_registry().push_back({family, device, dtypes, features});
  }
};

#define LONGCTX_CONCAT_INNER(a, b) a##b
#define LONGCTX_CONCAT(a, b) LONGCTX_CONCAT_INNER(a, b)
#define LONGCTX_REGISTER_KERNEL(family, device, dtypes, features)                     \
  static ::longctx::KernelRegistration LONGCTX_CONCAT(longctx_kernel_registration_, \
                                                      __COUNTER__)(family, device, dtypes, features)

}  // namespace longctx
