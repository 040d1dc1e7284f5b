// Speculative-decoding verification on raw pointers: the CPU backend of
// sk.ops.speculative_verify. The rules (greedy match; exact rejection sampling of Leviathan
// et al. 2023 / Chen et al. 2023 with temperature and top-k/top-p thresholds; the layout
// of the counter-based random numbers) are those of
// python/sentinel_kernels/reference/spec_verify.py, and the random numbers are bit-identical
// with it and with Triton's tl.randint (Philox4x32-10).
//
// Work: sampling computes the softmax normaliser of every draft position i < k (one pass
// over its row, positions spread over the thread pool), then per batch row the accept scan
// and the exponential race of the one position whose token is drawn (a second pass over
// that row only). Greedy is one argmax pass per position. fp32 math; float sums in a
// fixed order, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "quantize.h"  // DType

namespace sentinel {

// Element strides of a [B, P, V] tensor (b, position, vocabulary).
struct Strides3V {
  int64_t b = 0, p = 0, v = 0;
};

struct SpecVerifyArgs {
  // target logits [B, K + 1, V] of target_dtype
  const void* target = nullptr;
  DType target_dtype = DType::kFloat32;
  Strides3V target_strides;
  int64_t B = 0, K = 0, V = 0;
  // draft tokens [B, K], int64 (or int32 when draft_int32)
  const void* draft = nullptr;
  bool draft_int32 = false;
  int64_t draft_stride_b = 0, draft_stride_k = 0;
  // sampling only: exactly one of draft_probs / draft_logits, [B, K, V] of q_dtype
  const void* draft_probs = nullptr;
  const void* draft_logits = nullptr;
  DType q_dtype = DType::kFloat32;
  Strides3V q_strides;
  // optional contiguous fp32 filter thresholds: thr [B, K + 1] for the target, thr_q
  // [B, K] for draft_logits (kept iff scaled logit >= threshold); nullptr = no filter
  const float* thr = nullptr;
  const float* thr_q = nullptr;
  bool greedy = true;
  float inv_t = 1.0f;  // float32(1 / temperature), sampling only
  // sampling: int64 [2] = (seed, offset); rng[1] += B * (K + V) when advance_rng
  int64_t* rng = nullptr;
  bool advance_rng = true;
  // outputs: num_accepted [B] int64 (contiguous), tokens [B, K + 1] int64 rows at
  // tokens + b * tokens_stride_b (contiguous within a row)
  int64_t* num_accepted = nullptr;
  int64_t* tokens = nullptr;
  int64_t tokens_stride_b = 0;
  int num_threads = 1;
};

// Runs the verification. Throws std::invalid_argument naming the bad argument: B, K >= 0,
// V >= 1, strides >= 0, tokens_stride_b >= K + 1, num_threads >= 1, non-null pointers
// where needed (B > 0), sampling: exactly one of draft_probs / draft_logits when K > 0, a
// finite inv_t > 0, rng given; thr_q only with draft_logits.
void speculative_verify(const SpecVerifyArgs& args);

// out[i] = first word of Philox4x32-10(key = seed, counter = offset + i), i < count: the
// random numbers of the verification (and of tl.randint), exposed for tests.
void philox_fill(int64_t seed, int64_t offset, int64_t count, int64_t* out);

Strides3V spec_strides3(const std::vector<int64_t>& v, const char* name);

}  // namespace sentinel
