// NVTX ranges in the "longctx" domain around each launcher, so Nsight timelines name our work.
// NVTX v3 is header-only; CPU-only builds get a no-op range.
#pragma once
#include <string>

#if defined(LONGCTX_WITH_CUDA)
#include <nvtx3/nvToolsExt.h>

namespace longctx {
struct NvtxDomainTag {
  static constexpr const char* name = "longctx";
};

inline nvtxDomainHandle_t nvtx_domain() {
  static nvtxDomainHandle_t d = nvtxDomainCreateA(NvtxDomainTag::name);
  return d;
}

inline void nvtx_push(const std::string& message) {
  nvtxEventAttributes_t attr = {};
  attr.version = NVTX_VERSION;
  attr.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  attr.messageType = NVTX_MESSAGE_TYPE_ASCII;
  attr.message.ascii = message.c_str();
  nvtxDomainRangePushEx(nvtx_domain(), &attr);
}

inline void nvtx_pop() { nvtxDomainRangePop(nvtx_domain()); }

class NvtxRange {
 public:
  explicit NvtxRange(const char* message) { nvtx_push(message); }
  ~NvtxRange() { nvtx_pop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};
}  // namespace longctx
#else
namespace longctx {
inline void nvtx_push(const std::string&) {}
inline void nvtx_pop() {}
class NvtxRange {
 public:
  explicit NvtxRange(const char*) {}
};
}  // namespace longctx
#endif
