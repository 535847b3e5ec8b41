// greedy_balanced for bf16/fp16 scores, E % k == 0: one CTA per round of NT = NE / NK tokens.
// Compiled by NVRTC at first use (server/moe/kernels/greedy_route_cuda.py sets NE, NK, NT, NP, SMEM_BYTES).
//
// Prework (NP warps, one token each at a time): the token's experts in descending
// (score, -expert id) order, as far as scores lie within WINDOW codes of its best, by a stable
// counting sort over exact bf16/fp16 codes. Chain (one warp): token j takes the first NK untaken
// experts of its list, 32 list positions per ballot; exact max-reductions if the list runs out;
// once <= 32 experts are left, ranks among those by shuffles.
// Keys everywhere: (16-bit ordered code << 8) | (255 - expert) -- the torch path's order.

#define FULL 0xFFFFFFFFu
#define WINDOW 255                                  // bins 0..254: exact codes below the best
#define SMALL_FROM (NE <= 32 ? 0 : (NE - 32 + NK - 1) / NK)  // first token with <= 32 experts left
#define FAST_END (SMALL_FROM < NT ? SMALL_FROM : NT)

struct Smem {
  unsigned short code[NT * NE];    // [T, E] ordered score codes, higher = better
  unsigned char ranked[NT * NE];   // [T, E] per token: expert ids, best first (first `listed`)
  unsigned short count[NP][256];   // per prework warp: bin counts, then bin starts
  unsigned int peers[NP][256];     // per prework warp: lanes that hit a bin in this slot round
  int listed[NT];                  // per token: length of its ranked prefix
  unsigned char taken[NE];         // expert already taken in this round
  unsigned char picked[NT * NK];   // [T, k] the round's picks, written out at the end
  unsigned char alive[32];         // the <= 32 experts left (small-set phase)
};
static_assert(sizeof(Smem) <= SMEM_BYTES, "launcher's shared-memory size is too small for struct Smem");

__device__ __forceinline__ void bar_sync(int id, int threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ unsigned int full_key(unsigned int code, int e) { return ((code << 8) | (255u - e)) + 1u; }

// Stable counting sort of one token's experts into s.ranked[j]; lane owns experts lane + 32*i.
__device__ void rank_token(Smem& s, const unsigned short* __restrict__ row, int j, int warp, int lane) {
  unsigned short* count = s.count[warp];
  unsigned int* peers = s.peers[warp];
  const unsigned int lower = (1u << lane) - 1u;
  int code[8];
  unsigned int best = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = lane + 32 * i;
    code[i] = -1;
    if (e < NE) {
      const unsigned int u = row[e];
      const unsigned int c = u ^ ((u & 0x8000u) ? 0xFFFFu : 0x8000u);  // order-preserving
      code[i] = (int)c;
      s.code[j * NE + e] = (unsigned short)c;
      best = max(best, c + 1u);
    }
  }
  const int top = (int)__reduce_max_sync(FULL, best) - 1;
#pragma unroll
  for (int b = lane; b < 256; b += 32) { count[b] = 0; peers[b] = 0; }
  __syncwarp();
  int bin[8], off[8];
  // Slot rounds in expert order (round i = experts 32i..32i+31, lanes in id order): equal
  // codes get consecutive places in expert-id order, the tie-break of the torch path.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    bin[i] = code[i] < 0 ? WINDOW : min(top - code[i], WINDOW);
    const bool in = bin[i] < WINDOW;
    const int b = in ? bin[i] : 0;
    if (in) atomicOr(&peers[b], 1u << lane);
    __syncwarp();
    const unsigned int m = in ? peers[b] : 0u;
    const unsigned int base = in ? count[b] : 0u;
    off[i] = (int)(base + __popc(m & lower));
    __syncwarp();
    if (in && (m & lower) == 0) {  // first lane of its bin this round
      count[b] = (unsigned short)(base + __popc(m));
      peers[b] = 0;
    }
    __syncwarp();
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
  for (int i = 0; i < 8; ++i)
    if (bin[i] < WINDOW) list[count[bin[i]] + off[i]] = (unsigned char)(lane + 32 * i);
  if (lane == 31) s.listed[j] = (int)incl;
}

// Token j's remaining picks (from `got`) as exact warp max-reductions over untaken experts.
__device__ void pick_by_reduction(Smem& s, int j, int got, int lane) {
  for (; got < NK; ++got) {
    unsigned int best = 0;
#pragma unroll
    for (int i = 0; i < (NE + 31) / 32; ++i) {
      const int e = lane + 32 * i;
      if (e < NE && !s.taken[e]) best = max(best, full_key(s.code[j * NE + e], e));
    }
    const int e = 255 - (int)((__reduce_max_sync(FULL, best) - 1u) & 255u);
    __syncwarp();
    if (lane == 0) {
      s.picked[j * NK + got] = (unsigned char)e;
      s.taken[e] = 1;
    }
    __syncwarp();
  }
}

// Tokens [j0, j1) while more than 32 experts are left: ballots over ranked lists.
__device__ void chain_lists(Smem& s, int j0, int j1, int lane) {
  const unsigned int lower = (1u << lane) - 1u;
  int e_next = s.ranked[j0 * NE + lane], listed_next = s.listed[j0];
  for (int j = j0; j < j1; ++j) {
    const int e = e_next, listed = listed_next;
    if (j + 1 < j1) {  // prefetch: lists do not depend on the chain
      e_next = s.ranked[(j + 1) * NE + lane];
      listed_next = s.listed[j + 1];
    }
    bool ok = lane < listed && !s.taken[e];
    unsigned int b = __ballot_sync(FULL, ok);
    int r = __popc(b & lower);
    if (ok && r < NK) {
      s.picked[j * NK + r] = (unsigned char)e;
      s.taken[e] = 1;
    }
    int got = __popc(b);
    __syncwarp();
    if (got < NK) {  // rare: more list positions, then the reductions
      for (int c0 = 32; c0 < listed && got < NK; c0 += 32) {
        const int p = c0 + lane;
        const int e2 = p < listed ? s.ranked[j * NE + p] : 0;
        ok = p < listed && !s.taken[e2];
        b = __ballot_sync(FULL, ok);
        r = got + __popc(b & lower);
        if (ok && r < NK) {
          s.picked[j * NK + r] = (unsigned char)e2;
          s.taken[e2] = 1;
        }
        got += __popc(b);
        __syncwarp();
      }
      if (got < NK) pick_by_reduction(s, j, got, lane);
    }
  }
}

// Tokens [j0, NT) once at most 32 experts are left: one per lane, picks = ranks by shuffles.
__device__ void chain_small_set(Smem& s, int j0, int n_round, int lane) {
  const unsigned int lower = (1u << lane) - 1u;
  int base = 0;
  for (int c0 = 0; c0 < NE; c0 += 32) {
    const int e = c0 + lane;
    const bool ok = e < NE && !s.taken[e];
    const unsigned int b = __ballot_sync(FULL, ok);
    if (ok) s.alive[base + __popc(b & lower)] = (unsigned char)e;
    base += __popc(b);
  }
  __syncwarp();
  bool live = lane < base;
  const int mine = live ? s.alive[lane] : 0;
  for (int j = j0; j < n_round; ++j) {
    const unsigned int key = live ? full_key(s.code[j * NE + mine], mine) : 0u;
    int rank = 0;
#pragma unroll
    for (int m = 0; m < 32; ++m) rank += __shfl_sync(FULL, key, m) > key;
    if (live && rank < NK) {
      s.picked[j * NK + rank] = (unsigned char)mine;
      live = false;
    }
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
    if (warp < n_round) rank_token(s, scores + (tok0 + warp) * stride, warp, warp, lane);
    __syncwarp();
    bar_arrive(1, threads);
    if (NT > NP) {
      if (warp + NP < n_round) rank_token(s, scores + (tok0 + warp + NP) * stride, warp + NP, warp, lane);
      __syncwarp();
      bar_arrive(2, threads);
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
  if (n_round > fast_end) chain_small_set(s, fast_end, n_round, lane);
  __syncwarp();
  int* dst = out + tok0 * NK;
  for (int i = lane; i < n_round * NK; i += 32) dst[i] = s.picked[i];
}
