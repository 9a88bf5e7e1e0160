// qvit_gemv_ring.h -- the work assignment of the persistent cp.async-ring GEMV (gemv_ring_kernel), in one place.
//
// Warp w of W (grid-wide) owns weight rows w, w + W, w + 2W, ... < n; each row is `per_row` ring
// steps of 32 lanes, lane l of step j reading 16-byte vector l + 32 j (idle when >= vecs).  Steps are
// uniform across a warp's lanes, so the per-row warp reduction is convergent.  tests/test_mma_int4.py
// runs these with g++ and checks that every (row, vector) is read exactly once.  The kernel spells the
// same expressions inline (calling these helpers changed ptxas's allocation into a 4-byte spill on
// sm_90); the test checks that the kernel's source holds exactly these expressions.
// C++14, no CUDA dependency.
#ifndef QVIT_GEMV_RING_H
#define QVIT_GEMV_RING_H

#include "qvit_lowbit_format.h"

namespace qvit {

// Ring steps per weight row: 16-byte vectors per row over 32 lanes.
QVIT_HD inline int ring_steps_per_row(int vecs) { return (vecs + 31) / 32; }

// Rows owned by grid-wide warp `gwarp` of `nwarps` for an n-row layer.
QVIT_HD inline int ring_rows(int n, int gwarp, int nwarps) { return gwarp < n ? (n - 1 - gwarp) / nwarps + 1 : 0; }

// Step s of a warp's lane: the weight row and vector it reads; valid false when the lane idles this step.
struct RingPos {
  int row;
  int vec;
  bool valid;
};

// The weight row a warp's step s belongs to.
QVIT_HD inline int ring_row(int s, int per_row, int gwarp, int nwarps) { return gwarp + (s / per_row) * nwarps; }

// The 16-byte vector of the row a lane reads at step s.
QVIT_HD inline int ring_vec(int s, int per_row, int lane) { return lane + 32 * (s % per_row); }

QVIT_HD inline RingPos ring_step(int s, int steps, int per_row, int vecs, int gwarp, int nwarps, int lane) {
  const int vec = ring_vec(s, per_row, lane);
  return RingPos{ring_row(s, per_row, gwarp, nwarps), vec, s < steps && vec < vecs};
}

// The step that completes a row (the warp reduces and stores after it).
QVIT_HD inline bool ring_row_done(int s, int per_row) { return s % per_row == per_row - 1; }

}  // namespace qvit

#endif  // QVIT_GEMV_RING_H
