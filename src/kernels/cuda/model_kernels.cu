// The dense model's kernels (f32): embeddings, layer norm, attention's softmax and head layout,
// residual sums, cross-entropy, AdamW. Compiled after moe_kernels.cu, whose `block_sum` they use.
// Layout as in src/model/layers.rs: rows are positions of a group (N = sequences x T), row-major.
// No floating-point atomics: every sum runs in an order fixed by the code.

// The maximum of `v` over the block, returned to every thread (blockDim.x a power of two <= 1024,
// `red` shared memory of blockDim.x floats).
__device__ float block_max(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + half]);
        __syncthreads();
    }
    float m = red[0];
    __syncthreads();
    return m;
}

// x[r] = wte[idx[r]] + wpe[r % T], one block per row.
extern "C" __global__ void gpt_embed_forward(const unsigned* idx, const float* wte, const float* wpe,
                                             int T, int D, float* x) {
    int r = blockIdx.x;
    const float* e = wte + (size_t)idx[r] * D;
    const float* p = wpe + (size_t)(r % T) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) x[(size_t)r * D + d] = e[d] + p[d];
}

// The embeddings' gradients, one thread per (table row, column): gwte[v] += dx[r] for every row r
// with idx[r] == v, gwpe[p] += dx[b T + p] for every sequence b, rows in increasing order (the CPU
// model's order of additions). Threads 0 .. V*D-1 own gwte, the next T*D gwpe.
extern "C" __global__ void gpt_embed_backward(const unsigned* idx, const float* dx, int N, int T,
                                              int V, int D, float* gwte, float* gwpe) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long tokens = (long long)V * D;
    if (i < tokens) {
        unsigned v = (unsigned)(i / D);
        int d = (int)(i - (long long)v * D);
        float g = gwte[i];
        for (int r = 0; r < N; ++r)
            if (idx[r] == v) g += dx[(size_t)r * D + d];
        gwte[i] = g;
    } else if (i < tokens + (long long)T * D) {
        long long j = i - tokens;
        int p = (int)(j / D);
        int d = (int)(j - (long long)p * D);
        float g = gwpe[j];
        for (int r = p; r < N; r += T) g += dx[(size_t)r * D + d];
        gwpe[j] = g;
    }
}

// y = (x - mean) * rstd * w + b per row of D, keeping xhat and rstd; one block per row
// (blockDim.x a power of two, that many floats of shared memory).
extern "C" __global__ void gpt_layer_norm_forward(const float* x, const float* w, const float* b,
                                                  int D, float eps, float* y, float* xhat,
                                                  float* rstd) {
    extern __shared__ float red[];
    int r = blockIdx.x;
    const float* xr = x + (size_t)r * D;
    float inv_d = 1.0f / (float)D;
    float acc = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) acc += xr[d];
    float mean = block_sum(acc, red) * inv_d;
    acc = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float t = xr[d] - mean;
        acc += t * t;
    }
    float var = block_sum(acc, red) * inv_d;
    float rs = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float h = (xr[d] - mean) * rs;
        xhat[(size_t)r * D + d] = h;
        y[(size_t)r * D + d] = h * w[d] + b[d];
    }
}

// Layer norm's input gradient, added into dx: dx += rstd (dxhat - mean(dxhat) - xhat
// mean(dxhat xhat)) with dxhat = dy w; one block per row (as the forward).
extern "C" __global__ void gpt_layer_norm_backward(const float* xhat, const float* rstd,
                                                   const float* w, const float* dy, int D,
                                                   float* dx) {
    extern __shared__ float red[];
    int r = blockIdx.x;
    const float* xh = xhat + (size_t)r * D;
    const float* g = dy + (size_t)r * D;
    float inv_d = 1.0f / (float)D;
    float a1 = 0.0f, a2 = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float dxh = g[d] * w[d];
        a1 += dxh;
        a2 += dxh * xh[d];
    }
    float m1 = block_sum(a1, red) * inv_d;
    float m2 = block_sum(a2, red) * inv_d;
    float rs = rstd[r];
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        dx[(size_t)r * D + d] += rs * (g[d] * w[d] - m1 - xh[d] * m2);
}

// Layer norm's parameter gradients, one thread per column: dw += sum_r dy xhat, db += sum_r dy,
// rows in order.
extern "C" __global__ void gpt_layer_norm_param_grads(const float* xhat, const float* dy, int rows,
                                                      int D, float* dw, float* db) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    float gw = dw[d], gb = db[d];
    for (int r = 0; r < rows; ++r) {
        float g = dy[(size_t)r * D + d];
        gw += g * xhat[(size_t)r * D + d];
        gb += g;
    }
    dw[d] = gw;
    db[d] = gb;
}

// x += y over n elements.
extern "C" __global__ void gpt_add_into(float* x, const float* y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// [N][parts * H * dh] -> [parts][H][N][dh], one thread per element (grid stride).
extern "C" __global__ void gpt_split_heads(const float* x, long long total, int N, int H, int dh,
                                           int parts, float* out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)(i % dh);
        long long rest = i / dh;
        int r = (int)(rest % N);
        rest /= N;
        int h = (int)(rest % H);
        int part = (int)(rest / H);
        out[i] = x[(size_t)r * parts * H * dh + (size_t)part * H * dh + (size_t)h * dh + c];
    }
}

// [parts][H][N][dh] -> [N][parts * H * dh]: the inverse of gpt_split_heads.
extern "C" __global__ void gpt_merge_heads(const float* heads, long long total, int N, int H,
                                           int dh, int parts, float* out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int c = (int)(i % dh);
        long long rest = i / dh;
        int h = (int)(rest % H);
        rest /= H;
        int part = (int)(rest % parts);
        int r = (int)(rest / parts);
        out[i] = heads[(((size_t)part * H + h) * N + r) * dh + c];
    }
}

// Causal softmax in place of each T-wide row of scores (row index = (head, sequence, query i)):
// columns 0..=i become softmax(scale * s), the rest 0. One block per row (blockDim.x a power of
// two, that many floats of shared memory).
extern "C" __global__ void gpt_causal_softmax(float* scores, int T, float scale) {
    extern __shared__ float red[];
    long long row = blockIdx.x;
    int live = (int)(row % T) + 1;
    float* s = scores + row * T;
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < live; j += blockDim.x) m = fmaxf(m, s[j]);
    m = block_max(m, red);
    float acc = 0.0f;
    for (int j = threadIdx.x; j < live; j += blockDim.x) {
        float e = expf(scale * (s[j] - m));
        s[j] = e;
        acc += e;
    }
    float inv = 1.0f / block_sum(acc, red);
    for (int j = threadIdx.x; j < T; j += blockDim.x) s[j] = j < live ? s[j] * inv : 0.0f;
}

// The causal softmax's backward in place of dP: dS = P (dP - <dP, P>) * scale on the live columns,
// 0 beyond. One block per row (as the forward).
extern "C" __global__ void gpt_causal_softmax_backward(const float* probs, float* d, int T,
                                                       float scale) {
    extern __shared__ float red[];
    long long row = blockIdx.x;
    int live = (int)(row % T) + 1;
    const float* p = probs + row * T;
    float* g = d + row * T;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < live; j += blockDim.x) acc += p[j] * g[j];
    float dot = block_sum(acc, red);
    for (int j = threadIdx.x; j < T; j += blockDim.x) g[j] = j < live ? p[j] * (g[j] - dot) * scale : 0.0f;
}

// Softmax cross-entropy of each row of V logits against its target: losses[r] = lse - logit[t];
// dlogits = (softmax - onehot(t)) * grad_scale. One block per row (as the layer norm).
extern "C" __global__ void gpt_cross_entropy(const float* logits, const unsigned* targets, int V,
                                             float grad_scale, float* dlogits, float* losses) {
    extern __shared__ float red[];
    int r = blockIdx.x;
    const float* l = logits + (size_t)r * V;
    float* dl = dlogits + (size_t)r * V;
    unsigned t = targets[r];
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, l[j]);
    m = block_max(m, red);
    float acc = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) acc += expf(l[j] - m);
    float sum = block_sum(acc, red);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float g = expf(l[j] - m) * inv * grad_scale;
        dl[j] = (unsigned)j == t ? g - grad_scale : g;
    }
    if (threadIdx.x == 0) losses[r] = m + logf(sum) - l[t];
}

// AdamW on n elements (torch.optim.AdamW's single-tensor form, as src/kernels/math.rs): the
// gradient is scaled by `grad_scale` (global-norm clipping), then p *= keep; m += (1 - b1) (g - m);
// v = v b2 + (1 - b2) g^2; p -= step_size m / (sqrt(v) / bc2_sqrt + eps).
extern "C" __global__ void gpt_adamw(float* p, const float* grad, float* m, float* v, long long n,
                                     float grad_scale, float keep, float b1, float b2,
                                     float bc2_sqrt, float step_size, float eps) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = grad[i] * grad_scale;
        float pi = p[i] * keep;
        float mi = m[i] + (1.0f - b1) * (g - m[i]);
        float vi = v[i] * b2 + (1.0f - b2) * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + -step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

// out[slot] = the sum of squares of n floats, in double precision: one block (blockDim.x a power
// of two <= 1024, that many doubles of shared memory), each thread over a stride of the elements,
// then a fixed tree. Per tensor, for the global gradient norm.
extern "C" __global__ void gpt_sum_squares(const float* g, long long n, double* out, int slot) {
    extern __shared__ double squares[];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        double v = (double)g[i];
        acc += v * v;
    }
    squares[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) squares[threadIdx.x] += squares[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[slot] = squares[0];
}
