#include "common/build_registry.h"

namespace longctx {

std::vector<KernelEntry>& kernel_registry() {
  static std::vector<KernelEntry> entries;
  return entries;
}

}  // namespace longctx
