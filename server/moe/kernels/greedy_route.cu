// greedy_balanced for bf16/fp16 scores, E % k == 0: one CTA per round of NT = NE / NK tokens.
// Compiled by NVRTC at first use (server/moe/kernels/greedy_route_cuda.py sets NE, NK, NT, NP, SMEM_BYTES).
//
// Prework (NP warps, one token each at a time): the token's experts in descending
// (score, -expert id) order, as far as scores lie within WINDOW codes of its best, by a stable
// counting sort over exact bf16/fp16 codes; the last tokens (<= 32 experts left for them) only
// store their codes, since they rank among what is left. Chain (one warp): token j takes the
// first NK untaken experts of its list, 32 list positions per ballot; exact max-reductions if the
// list runs out; once <= 32 experts are left, ranks among those, whose masks prework warps
// compute in parallel.
// Keys everywhere: (16-bit ordered code << 8) | (255 - expert) -- the torch path's order.

#define FULL 0xFFFFFFFFu
#define WINDOW 255                                  // bins 0..254: exact codes below the best
#define SMALL_FROM (NE <= 32 ? 0 : (NE - 32 + NK - 1) / NK)  // first token with <= 32 experts left
#define FAST_END (SMALL_FROM < NT ? SMALL_FROM : NT)
static_assert(NT <= 2 * NP, "prework warps take at most two tokens each");

struct Smem {
  __align__(16) unsigned short code[NT * NE];    // [T, E] ordered score codes, higher = better
  unsigned char ranked[NT * NE];   // [T, E] per token: expert ids, best first (first `listed`)
  __align__(16) unsigned short count[NP][256];   // per prework warp: bin counts, then bin starts
  __align__(16) unsigned int peers[NP][256];     // per prework warp: lanes that hit a bin in this chunk
  __align__(16) unsigned short window[NP][256];  // per prework warp: (bin << 8) | expert, in-window experts in id order
  int listed[NT];                  // per token: length of its ranked prefix
  unsigned char taken[NE];         // expert already taken in this round
  unsigned char picked[NT * NK];   // [T, k] the round's picks, written out at the end
  unsigned char alive[32];         // the <= 32 experts left (small-set phase)
  int left;                        // how many
  unsigned int greater[NT][32];    // small-set phase: per token, lanes it scores higher
};
static_assert(sizeof(Smem) <= SMEM_BYTES, "launcher's shared-memory size is too small for struct Smem");

__device__ __forceinline__ void bar_sync(int id, int threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ unsigned int full_key(unsigned int code, int e) { return ((code << 8) | (255u - e)) + 1u; }
// Two bf16/fp16 bit patterns -> two order-preserving codes (negative: all bits flipped; else sign set).
__device__ __forceinline__ unsigned int order_codes(unsigned int w) {
  return w ^ (0x80008000u | (((w >> 15) & 0x00010001u) * 0x7FFFu));
}

// One lane's 16-byte slice of a row (E % 8 == 0, 16-byte aligned rows), loaded ahead of use.
__device__ __forceinline__ uint4 load_slice(const unsigned short* __restrict__ row, int lane) {
#ifdef VEC
  if (lane * 8 < NE) return *reinterpret_cast<const uint4*>(row + lane * 8);
#endif
  return make_uint4(0, 0, 0, 0);
}

// Stores the token's codes in s.code[j] and returns its best code.
__device__ __forceinline__ int load_codes(Smem& s, const unsigned short* __restrict__ row, uint4 v, int j, int lane) {
  unsigned int best = 0;  // best code + 1 among this lane's experts (0: none)
#ifdef VEC  // the slice was loaded by load_slice
  if (lane * 8 < NE) {
    v.x = order_codes(v.x); v.y = order_codes(v.y); v.z = order_codes(v.z); v.w = order_codes(v.w);
    *reinterpret_cast<uint4*>(s.code + j * NE + lane * 8) = v;
    const unsigned int m = __vmaxu2(__vmaxu2(v.x, v.y), __vmaxu2(v.z, v.w));
    best = max(m & 0xFFFFu, m >> 16) + 1u;
  }
#else
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = lane + 32 * i;
    if (e < NE) {
      const unsigned int c = order_codes(row[e]) & 0xFFFFu;
      s.code[j * NE + e] = (unsigned short)c;
      best = max(best, c + 1u);
    }
  }
#endif
  __syncwarp();
  return (int)__reduce_max_sync(FULL, best) - 1;
}

// Stable counting sort of one token's experts into s.ranked[j]. Once this token's row has
// arrived (its codes are reduced), loads `next_row` into `next` if given: the first half of the
// round's rows then has the memory bandwidth to itself, and the chain can start sooner.
__device__ void rank_token(Smem& s, const unsigned short* __restrict__ row, uint4 slice, int j, int warp, int lane,
                           const unsigned short* __restrict__ next_row = nullptr, uint4* next = nullptr) {
  unsigned short* count = s.count[warp];
  unsigned int* peers = s.peers[warp];
  unsigned short* window = s.window[warp];
  const unsigned int lower = (1u << lane) - 1u;
  const int top = load_codes(s, row, slice, j, lane);
  if (next_row != nullptr) *next = load_slice(next_row + (top >> 16), lane);  // (top >> 16 == 0: codes are 16-bit;
                                                                           // the dependence keeps the load here)
  reinterpret_cast<uint4*>(count)[lane] = make_uint4(0, 0, 0, 0);
  reinterpret_cast<uint4*>(peers)[2 * lane] = make_uint4(0, 0, 0, 0);
  reinterpret_cast<uint4*>(peers)[2 * lane + 1] = make_uint4(0, 0, 0, 0);
  // In-window experts, compacted in expert-id order: (bin << 8) | e, bin = codes below the best.
  int listed = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = lane + 32 * i;
    const int d = e < NE ? top - (int)s.code[j * NE + e] : WINDOW;
    const bool in = d < WINDOW;
    const unsigned int b = __ballot_sync(FULL, in);
    if (in) window[listed + __popc(b & lower)] = (unsigned short)((d << 8) | e);
    listed += __popc(b);
  }
  __syncwarp();
  // Chunks of 32 in id order: a lane's place among equal bins = earlier chunks' count plus
  // lower lanes of this chunk (the torch path's tie-break: lower expert id first).
  int place[8], entry[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    place[c] = -1;
    entry[c] = 0;
    if (32 * c < listed) {  // uniform
      const bool in = 32 * c + lane < listed;
      const int v = in ? window[32 * c + lane] : 0;
      const int b = v >> 8;
      if (in) atomicOr(&peers[b], 1u << lane);
      __syncwarp();
      const unsigned int m = in ? peers[b] : 0u;
      const unsigned int base = in ? count[b] : 0u;
      __syncwarp();
      if (in && (m & lower) == 0) {
        count[b] = (unsigned short)(base + __popc(m));
        peers[b] = 0;
      }
      __syncwarp();
      place[c] = in ? (int)(base + __popc(m & lower)) : -1;
      entry[c] = v;
    }
  }
  // exclusive scan of the 256 bin counts; lane scans bins 8*lane .. 8*lane+7
  unsigned int c8[8], sum = 0;
#pragma unroll
  for (int q = 0; q < 8; ++q) { c8[q] = count[lane * 8 + q]; sum += c8[q]; }
  unsigned int incl = sum;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned int v = __shfl_up_sync(FULL, incl, d);
    if (lane >= d) incl += v;
  }
  unsigned int run = incl - sum;
#pragma unroll
  for (int q = 0; q < 8; ++q) { count[lane * 8 + q] = (unsigned short)run; run += c8[q]; }
  __syncwarp();
  unsigned char* list = s.ranked + j * NE;
#pragma unroll
  for (int c = 0; c < 8; ++c)
    if (place[c] >= 0) list[count[entry[c] >> 8] + place[c]] = (unsigned char)(entry[c] & 255);
  if (lane == 0) s.listed[j] = listed;
}

// The token's list, or (last tokens, which rank among what is left instead) only its codes.
__device__ void prepare_token(Smem& s, const unsigned short* __restrict__ row, uint4 slice, int j, int warp, int lane,
                              const unsigned short* __restrict__ next_row = nullptr, uint4* next = nullptr) {
  if (j >= FAST_END) {
    const int top = load_codes(s, row, slice, j, lane);
    if (next_row != nullptr) *next = load_slice(next_row + (top >> 16), lane);
    return;
  }
  rank_token(s, row, slice, j, warp, lane, next_row, next);
}

// Token j's remaining picks (from `got`) as exact warp max-reductions over untaken experts.
__device__ void pick_by_reduction(Smem& s, int j, int got, int lane) {
  unsigned int key[(NE + 31) / 32];
#pragma unroll
  for (int i = 0; i < (NE + 31) / 32; ++i) {
    const int e = lane + 32 * i;
    key[i] = e < NE && !s.taken[e] ? full_key(s.code[j * NE + e], e) : 0u;
  }
  __syncwarp();
  for (; got < NK; ++got) {
    unsigned int m = 0;
#pragma unroll
    for (int i = 0; i < (NE + 31) / 32; ++i) m = max(m, key[i]);
    const unsigned int best = __reduce_max_sync(FULL, m);
#pragma unroll
    for (int i = 0; i < (NE + 31) / 32; ++i) key[i] = key[i] == best ? 0u : key[i];
    if (lane == 0) {
      const int e = 255 - (int)((best - 1u) & 255u);
      s.picked[j * NK + got] = (unsigned char)e;
      s.taken[e] = 1;
    }
  }
  __syncwarp();
}

// A token's picks past its first `from` list positions (`got` taken there): more positions, then
// exact max-reductions over all untaken experts if its list runs out.
__device__ void finish_token(Smem& s, int j, int from, int got, int lane) {
  const unsigned int lower = (1u << lane) - 1u;
  const int listed = s.listed[j];
  for (int c0 = from; c0 < listed && got < NK; c0 += 32) {
    const int p = c0 + lane;
    const int e = p < listed ? s.ranked[j * NE + p] : 0;
    const bool ok = p < listed && !s.taken[e];
    const unsigned int b = __ballot_sync(FULL, ok);
    const int r = got + __popc(b & lower);
    if (ok && r < NK) {
      s.picked[j * NK + r] = (unsigned char)e;
      s.taken[e] = 1;
    }
    got += __popc(b);
    __syncwarp();
  }
  if (got < NK) pick_by_reduction(s, j, got, lane);
}

// Tokens [j0, j1) while more than 32 experts are left: token j takes the first NK untaken
// experts of its list, one ballot over positions 0..31 (lane = position). Kept to a few
// instructions: this loop is the kernel's critical path, one warp, latency-bound.
__device__ void chain_lists(Smem& s, int j0, int j1, int lane) {
  const unsigned int lower = (1u << lane) - 1u;
  int e_next = s.ranked[j0 * NE + lane];
  bool valid_next = lane < s.listed[j0];
  for (int j = j0; j < j1; ++j) {
    const int e = e_next;
    const bool valid = valid_next;
    // load ahead (lists do not depend on the chain); past the last token this reads other
    // smem fields, never used
    e_next = s.ranked[(j + 1) * NE + lane];
    valid_next = lane < s.listed[j + 1];
    const bool ok = valid && !s.taken[e];
    const unsigned int b = __ballot_sync(FULL, ok);
    const int r = __popc(b & lower);
    if (ok && r < NK) {
      s.picked[j * NK + r] = (unsigned char)e;
      s.taken[e] = 1;
    }
    __syncwarp();
    const int got = __popc(b);
    if (got < NK) finish_token(s, j, 32, got, lane);
  }
}

// Once at most 32 experts are left: they go to s.alive, one per chain lane, their count to s.left.
__device__ void publish_alive(Smem& s, int lane) {
  const unsigned int lower = (1u << lane) - 1u;
  int left = 0;
  for (int c0 = 0; c0 < NE; c0 += 32) {
    const int e = c0 + lane;
    const bool ok = e < NE && !s.taken[e];
    const unsigned int b = __ballot_sync(FULL, ok);
    if (ok) s.alive[left + __popc(b & lower)] = (unsigned char)e;
    left += __popc(b);
  }
  if (lane == 0) s.left = left;
}

// Off the chain, by `helpers` prework warps done ranking (this one is `w`): for the last tokens
// [j0, n_round), one per helper at a time, the lanes of s.alive whose expert the token scores
// higher than this lane's (a 32-bit mask), 32 shuffles per token.
__device__ void tail_greater_masks(Smem& s, int j0, int n_round, int w, int helpers, int lane) {
  const int left = s.left;
  const int mine = lane < left ? s.alive[lane] : 0;
  for (int j = j0 + w; j < n_round; j += helpers) {
    const unsigned int key = lane < left ? full_key(s.code[j * NE + mine], mine) : 0u;
    unsigned int greater = 0;
#pragma unroll
    for (int m = 0; m < 32; ++m) greater |= (unsigned int)(__shfl_sync(FULL, key, m) > key) << m;
    s.greater[j][lane] = greater;
  }
}

// Tokens [j0, n_round) once at most 32 experts are left, one per lane (s.alive): a token's picks
// are the live lanes with fewer than k live higher-scoring lanes (s.greater), and their rank is
// the slot.
__device__ void chain_small_set(Smem& s, int j0, int n_round, int lane) {
  const int left = s.left;
  const int mine = lane < left ? s.alive[lane] : 0;
  unsigned int live = left == 32 ? FULL : (1u << left) - 1u;
  unsigned int greater_next = s.greater[j0][lane];
  for (int j = j0; j < n_round; ++j) {
    const unsigned int greater = greater_next;
    if (j + 1 < n_round) greater_next = s.greater[j + 1][lane];
    const int rank = __popc(greater & live);
    const bool pick = ((live >> lane) & 1u) && rank < NK;
    if (pick) s.picked[j * NK + rank] = (unsigned char)mine;
    live &= ~__ballot_sync(FULL, pick);
  }
}

extern "C" __global__ void __launch_bounds__(32 * (NP + 1), 2)
greedy_rounds(const unsigned short* __restrict__ scores, int* __restrict__ out, int n_tokens, int stride) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int threads = 32 * (NP + 1);
  const long long tok0 = (long long)blockIdx.x * NT;
  const int n_round = (int)min((long long)NT, (long long)n_tokens - tok0);  // tokens of this round
  for (int i = threadIdx.x; i < NE; i += blockDim.x) s.taken[i] = 0;
  __syncthreads();
  if (warp < NP) {  // token warp, then warp + NP; barrier 1 / 2 after each batch
    const unsigned short* row1 = scores + (tok0 + warp) * stride;
    const unsigned short* row2 = scores + (tok0 + warp + NP) * stride;
    const uint4 slice1 = warp < n_round ? load_slice(row1, lane) : make_uint4(0, 0, 0, 0);
    uint4 slice2 = make_uint4(0, 0, 0, 0);  // loaded once row1 is in (rank_token)
    const bool second = NT > NP && warp + NP < n_round;
    if (warp < n_round) prepare_token(s, row1, slice1, warp, warp, lane, second ? row2 : nullptr, &slice2);
    __syncwarp();
    bar_arrive(1, threads);
    if (NT > NP) {
      if (warp + NP < n_round) prepare_token(s, row2, slice2, warp + NP, warp, lane);
      __syncwarp();
      bar_arrive(2, threads);
    }
    // The last tokens' masks (barrier 3: the chain has published what is left; 4: masks ready).
    const int tail = n_round - min(FAST_END, n_round), helpers = min(NP, tail);
    if (warp < helpers) {
      bar_sync(3, 32 * (helpers + 1));
      tail_greater_masks(s, n_round - tail, n_round, warp, helpers, lane);
      __syncwarp();
      bar_arrive(4, 32 * (helpers + 1));
    }
    return;
  }
  const int fast_end = min(FAST_END, n_round);
  bar_sync(1, threads);
  if (fast_end > 0) chain_lists(s, 0, min(fast_end, NP), lane);
  if (NT > NP) {
    bar_sync(2, threads);
    if (fast_end > NP) chain_lists(s, NP, fast_end, lane);
  }
  if (n_round > fast_end) {
    const int helpers = min(NP, n_round - fast_end);
    publish_alive(s, lane);
    bar_arrive(3, 32 * (helpers + 1));
    bar_sync(4, 32 * (helpers + 1));
    chain_small_set(s, fast_end, n_round, lane);
  }
  __syncwarp();
  int* dst = out + tok0 * NK;
  for (int i = lane; i < n_round * NK; i += 32) dst[i] = s.picked[i];
}
