// The NCCL ring communicator behind longctx.ring_flash_attn_func on GPUs (see nccl_ring.cpp).
#pragma once
#include <pybind11/pybind11.h>

namespace longctx {
namespace comm {

// Adds nccl_unique_id(), NcclRing and NcclRingWork to the extension module. Only compiled when
// the build found NCCL (LONGCTX_WITH_NCCL).
void register_nccl_ring(pybind11::module_& m);

}  // namespace comm
}  // namespace longctx
