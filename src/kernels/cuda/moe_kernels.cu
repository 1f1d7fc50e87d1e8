// The MoE layer's element-wise and routing kernels (f32), compiled at run time by NVRTC.
//
// Layout (src/model/cuda/moe.rs): S tokens, D = d_model, F = d_ff, E experts, K choices per
// token, C slots per expert. Assignment a = j * S + s is token s's choice j. The expert batch is
// padded: expert e owns rows e*C .. e*C + C, and a kept assignment sits at row e*C + loc, where loc
// is its place among expert e's assignments in (choice, token) order: the same order as the CPU
// layer's canonical batch, only with unused rows between experts, so that every expert product is
// one strided batched cuBLAS call. Padding rows hold zeros in every gradient, so they add nothing.
//
// No kernel uses a floating-point atomic: every sum is taken in an order fixed by the code, so a
// run gives the same bits on the same GPU every time.

#define NO_SLOT (-1)

// The sum of `v` over the block, returned to every thread. blockDim.x must be a power of two no
// larger than 1024; `red` is shared memory of blockDim.x floats.
__device__ float block_sum(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
        __syncthreads();
    }
    float total = red[0];
    __syncthreads();
    return total;
}

__device__ float gelu_value(float x, int tanh_form) {
    if (tanh_form) {
        float u = 0.7978845608f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    return 0.5f * x * (1.0f + erff(x * 0.7071067812f));
}

__device__ float gelu_slope(float x, int tanh_form) {
    if (tanh_form) {
        float u = 0.7978845608f * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        float du = 0.7978845608f * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    return 0.5f * (1.0f + erff(x * 0.7071067812f)) + x * 0.3989422804f * expf(-0.5f * x * x);
}

// Softmax of each token's logits and its top-K experts (ties to the lowest index, like the CPU
// layer and torch.argmax). One thread per token. A token with a non-finite logit lowers
// `*nonfinite` (initialised to S) to its index, and the host reports the first such token after the
// forward; meanwhile the token gets zero gates and experts 0..K-1, so that every later kernel
// stays within its buffers.
extern "C" __global__ void moe_gate_topk(const float* logits, int S, int E, int K, float* gates,
                                         float* lse, unsigned* expert, int* nonfinite) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    const float* l = logits + (size_t)s * E;
    float m = __int_as_float(0xff800000);
    bool bad = false;
    for (int e = 0; e < E; ++e) {
        float v = l[e];
        if (!isfinite(v)) bad = true;
        m = fmaxf(m, v);
    }
    float* g = gates + (size_t)s * E;
    if (bad) {
        atomicMin(nonfinite, s);
        for (int e = 0; e < E; ++e) g[e] = 0.0f;
        lse[s] = 0.0f;
        for (int j = 0; j < K; ++j) expert[(size_t)j * S + s] = (unsigned)j;
        return;
    }
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) {
        float p = expf(l[e] - m);
        g[e] = p;
        sum += p;
    }
    for (int e = 0; e < E; ++e) g[e] = g[e] / sum;
    lse[s] = m + logf(sum);
    for (int j = 0; j < K; ++j) {
        int best = -1;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int i = 0; i < j; ++i) taken = taken || expert[(size_t)i * S + s] == (unsigned)e;
            if (taken) continue;
            if (best < 0 || g[e] > g[best]) best = e;
        }
        expert[(size_t)j * S + s] = (unsigned)best;
    }
}

// Each assignment's place among its expert's assignments in (choice, token) order, by a block-wide
// prefix count: one block per expert, blockDim.x a power of two <= 1024, `blockDim.x` ints of
// shared memory. Also each expert's number of assignments (`counts`) and of first choices.
extern "C" __global__ void moe_route_positions(const unsigned* expert, int S, int K, int* loc,
                                               int* counts, int* first_counts) {
    extern __shared__ int scan[];
    unsigned e = blockIdx.x;
    int n = K * S;
    int base = 0;
    for (int start = 0; start < n; start += blockDim.x) {
        int a = start + threadIdx.x;
        int flag = (a < n && expert[a] == e) ? 1 : 0;
        scan[threadIdx.x] = flag;
        __syncthreads();
        for (unsigned off = 1; off < blockDim.x; off *= 2) {
            int v = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
            __syncthreads();
            scan[threadIdx.x] += v;
            __syncthreads();
        }
        if (flag) loc[a] = base + scan[threadIdx.x] - 1;
        if (a == S - 1) first_counts[e] = base + scan[threadIdx.x];
        base += scan[blockDim.x - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[e] = base;
}

// Slots and combine weights, one thread per token: an assignment is kept when its place is below
// C; its weight is its gate value, renormalised over the token's kept choices when asked (the
// denominator floored at `eps`), 0 when dropped.
extern "C" __global__ void moe_assign(const float* gates, const unsigned* expert, const int* loc,
                                      int S, int E, int K, int C, int normalize, float eps,
                                      float* weights, int* slot) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) {
        size_t a = (size_t)j * S + s;
        unsigned e = expert[a];
        bool keep = loc[a] < C;
        float w = keep ? gates[(size_t)s * E + e] : 0.0f;
        weights[a] = w;
        slot[a] = keep ? (int)(e * C + loc[a]) : NO_SLOT;
        sum += w;
    }
    if (K >= 2 && normalize) {
        float denom = fmaxf(sum, eps);
        for (int j = 0; j < K; ++j) {
            size_t a = (size_t)j * S + s;
            weights[a] = weights[a] / denom;
        }
    }
}

// The router losses in one block (blockDim.x a power of two, that many floats of shared memory):
// out[0] = l_aux = E * sum_e mean_s(gates[s][e]) * first_counts[e] / S; out[1] = z-loss =
// mean_s(lse[s]^2).
extern "C" __global__ void moe_router_losses(const float* gates, const float* lse,
                                             const int* first_counts, int S, int E, float* out) {
    extern __shared__ float red[];
    float inv_s = 1.0f / (float)S;
    float l_aux = 0.0f;
    for (int e = 0; e < E; ++e) {
        float acc = 0.0f;
        for (int s = threadIdx.x; s < S; s += blockDim.x) acc += gates[(size_t)s * E + e];
        float me = block_sum(acc, red);
        l_aux += me * inv_s * (float)first_counts[e] * inv_s;
    }
    float acc = 0.0f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) acc += lse[s] * lse[s];
    float z = block_sum(acc, red) * inv_s;
    if (threadIdx.x == 0) {
        out[0] = l_aux * (float)E;
        out[1] = z;
    }
}

// The dispatch: xe[slot[a]] = x[token of a], one block per assignment (dropped ones copy nothing;
// the padding rows were zeroed before).
extern "C" __global__ void moe_dispatch(const float* x, const int* slot, int S, int D, float* xe) {
    int a = blockIdx.x;
    int r = slot[a];
    if (r == NO_SLOT) return;
    int s = a % S;
    for (int d = threadIdx.x; d < D; d += blockDim.x) xe[(size_t)r * D + d] = x[(size_t)s * D + d];
}

// h += b1[expert of the row]; a = gelu(h), over `rows` x F (rows = E * C).
extern "C" __global__ void moe_bias_gelu_forward(float* h, float* act, const float* b1,
                                                 long long rows, int C, int F, int tanh_form) {
    long long n = rows * F;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / F;
        int f = (int)(i - row * F);
        int e = (int)(row / C);
        float v = h[i] + b1[(size_t)e * F + f];
        h[i] = v;
        act[i] = gelu_value(v, tanh_form);
    }
}

// m += bias[expert of the row], over `rows` x W.
extern "C" __global__ void moe_add_expert_bias(float* m, const float* bias, long long rows, int C,
                                               int W) {
    long long n = rows * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / W;
        int w = (int)(i - row * W);
        int e = (int)(row / C);
        m[i] += bias[(size_t)e * W + w];
    }
}

// y[s] = sum_j weight[j*S+s] * ye[slot[j*S+s]] (weight 1 when `weights` is null), choices in
// order, dropped ones skipped. One block per token. The combine, and (unweighted) the gradient of
// x from the expert inputs' gradients.
extern "C" __global__ void moe_combine(const float* ye, const float* weights, const int* slot,
                                       int S, int K, int D, float* y) {
    int s = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < K; ++j) {
            size_t a = (size_t)j * S + s;
            int r = slot[a];
            if (r == NO_SLOT) continue;
            float v = ye[(size_t)r * D + d];
            acc += weights ? weights[a] * v : v;
        }
        y[(size_t)s * D + d] = acc;
    }
}

// The combine's backward, one block per assignment (blockDim.x a power of two, that many floats of
// shared memory): gw[a] = <gy[s], ye[slot]>, gye[slot] = weight[a] * gy[s]; 0 for a dropped one.
extern "C" __global__ void moe_combine_backward(const float* gy, const float* ye,
                                                const float* weights, const int* slot, int S,
                                                int D, float* gw, float* gye) {
    extern __shared__ float red[];
    int a = blockIdx.x;
    int r = slot[a];
    if (r == NO_SLOT) {
        if (threadIdx.x == 0) gw[a] = 0.0f;
        return;
    }
    int s = a % S;
    float w = weights[a];
    float acc = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float g = gy[(size_t)s * D + d];
        acc += g * ye[(size_t)r * D + d];
        gye[(size_t)r * D + d] = w * g;
    }
    float dot = block_sum(acc, red);
    if (threadIdx.x == 0) gw[a] = dot;
}

// acc[e][w] += sum over expert e's C rows of m (rows in order), one thread per (e, w).
extern "C" __global__ void moe_expert_column_sums(const float* m, int E, int C, int W, float* acc) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)E * W) return;
    int e = (int)(i / W);
    int w = (int)(i - (long long)e * W);
    const float* col = m + (size_t)e * C * W + w;
    float sum = 0.0f;
    for (int r = 0; r < C; ++r) sum += col[(size_t)r * W];
    acc[i] += sum;
}

// g *= gelu'(h), over n elements.
extern "C" __global__ void moe_gelu_backward(const float* h, float* g, long long n, int tanh_form) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        g[i] = g[i] * gelu_slope(h[i], tanh_form);
}

// The gradient of the gate logits, one thread per token: the combine weights' gradient `gw` through
// the renormalisation, plus the auxiliary loss (aux_scale * first_counts[e] for every token), then
// the softmax backward, plus the z-loss term (z * lse[s] * gates[s][e]).
extern "C" __global__ void moe_gate_backward(const float* gates, const float* lse,
                                             const unsigned* expert, const int* slot,
                                             const float* gw, const int* first_counts, int S,
                                             int E, int K, int normalize, float eps,
                                             float aux_scale, float z, float* g_logits) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    const float* p = gates + (size_t)s * E;
    float* gl = g_logits + (size_t)s * E;
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) {
        size_t a = (size_t)j * S + s;
        if (slot[a] != NO_SLOT) sum += p[expert[a]];
    }
    bool renorm = K >= 2 && normalize;
    float dot_w = 0.0f;
    if (renorm && sum >= eps) {
        for (int j = 0; j < K; ++j) {
            size_t a = (size_t)j * S + s;
            if (slot[a] != NO_SLOT) dot_w += gw[a] * p[expert[a]] / sum;
        }
    }
    for (int e = 0; e < E; ++e) gl[e] = aux_scale * (float)first_counts[e];
    for (int j = 0; j < K; ++j) {
        size_t a = (size_t)j * S + s;
        if (slot[a] == NO_SLOT) continue;
        float sc = gw[a];
        if (renorm) sc = sum >= eps ? (gw[a] - dot_w) / sum : gw[a] / eps;
        gl[expert[a]] += sc;
    }
    float dot = 0.0f;
    for (int e = 0; e < E; ++e) dot += p[e] * gl[e];
    float zs = z * lse[s];
    for (int e = 0; e < E; ++e) gl[e] = p[e] * (gl[e] - dot) + zs * p[e];
}
