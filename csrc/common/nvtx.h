// NVTX ranges in the "longctx" domain around each launcher, so Nsight timelines name our work.
// NVTX v3 is header-only; CPU-only builds get a no-op range.
#pragma once

#if defined(LONGCTX_WITH_CUDA)
#include <nvtx3/nvToolsExt.h>

namespace longctx {
struct NvtxDomainTag {
  static constexpr const char* name = "longctx";
};

class NvtxRange {
 public:
  explicit NvtxRange(const char* message) {
    nvtxEventAttributes_t attr = {};
    attr.version = NVTX_VERSION;
    attr.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    attr.messageType = NVTX_MESSAGE_TYPE_ASCII;
    attr.message.ascii = message;
    nvtxDomainRangePushEx(domain(), &attr);
  }
  ~NvtxRange() { nvtxDomainRangePop(domain()); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  static nvtxDomainHandle_t domain() {
    static nvtxDomainHandle_t d = nvtxDomainCreateA(NvtxDomainTag::name);
    return d;
  }
};
}  // namespace longctx
#else
namespace longctx {
class NvtxRange {
 public:
  explicit NvtxRange(const char*) {}
};
}  // namespace longctx
#endif
