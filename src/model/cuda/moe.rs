//! The MoE layer on one GPU: forward and backward with every tensor in device memory.
//!
//! The same layer as [`crate::model::moe::MoeLayer`] (same routing, same losses, same gradients),
//! computed on the GPU: matrix products through cuBLAS, the routing and element-wise work in the
//! NVRTC kernels of `moe_kernels.cu`. Two differences in layout, none in meaning:
//!
//! - the expert batch is padded to `C` rows per expert (`C` = the capacity, or the largest expert
//!   load when dropless), so that each of the six expert products is one strided batched cuBLAS
//!   call for all experts (grouped products without padding are the next step where loads are
//!   uneven); the padding rows are zero in every gradient;
//! - dropless routing reads the experts' loads back to the host once per forward (to size the
//!   batch); with a capacity, the forward reads back only the loads and losses at its end, for the
//!   statistics.
//!
//! What stays on the host: nothing of the computation. The drop policy `probs` (a sort per expert)
//! is not implemented on the GPU and is refused by [`check_moe_config`].
//!
//! Bits: the results agree with the CPU layer within float32 rounding (cuBLAS sums in its own
//! order); on one GPU a run repeats bit for bit (no floating-point atomics, one stream).

use super::check_moe_config;
use crate::error::{Error, Result};
use crate::kernels::cuda::gpu::{driver, elementwise, grid, int, launch, per_element, Gpu, Product, BLOCK, WIDE_BLOCK};
use crate::kernels::cuda::{cuda_error, guarded_try, CudaDevice, Precision};
use crate::model::moe::{MoeConfig, MoeParams, MoeStats};
use cudarc::driver::{CudaSlice, PushKernelArg};
use std::sync::Arc;

/// A float buffer in the GPU's memory, `len` elements.
pub struct DeviceBuffer {
    pub(crate) data: CudaSlice<f32>,
    pub(crate) len: usize,
}

impl DeviceBuffer {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The layer's five parameter groups on the device (the same layout as [`MoeParams`]).
struct DeviceParams {
    wg: CudaSlice<f32>,
    w1: CudaSlice<f32>,
    b1: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    b2: CudaSlice<f32>,
}

impl DeviceParams {
    fn download(&self, gpu: &Gpu) -> Result<MoeParams<f32>> {
        Ok(MoeParams {
            wg: gpu.download(&self.wg)?,
            w1: gpu.download(&self.w1)?,
            b1: gpu.download(&self.b1)?,
            w2: gpu.download(&self.w2)?,
            b2: gpu.download(&self.b2)?,
        })
    }
}

/// What the backward pass needs from the forward pass, on the device, and the forward's
/// statistics on the host.
pub struct CudaMoeCache {
    tokens: usize,
    /// Rows per expert in the padded batch.
    slots: usize,
    gates: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    expert: CudaSlice<u32>,
    slot: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    first_counts: CudaSlice<i32>,
    xe: CudaSlice<f32>,
    h: CudaSlice<f32>,
    act: CudaSlice<f32>,
    ye: CudaSlice<f32>,
    /// The auxiliary load-balancing loss.
    pub l_aux: f32,
    /// The router z-loss.
    pub z_loss: f32,
    /// Per-expert loads and drops, as the CPU layer reports them.
    pub stats: MoeStats,
}

impl CudaMoeCache {
    /// Rows per expert in the padded expert batch (the capacity, or the largest load when dropless).
    pub fn slots_per_expert(&self) -> usize {
        self.slots
    }
}

/// The MoE layer on one GPU, with its parameters and gradient buffers in device memory.
pub struct CudaMoeLayer {
    config: MoeConfig,
    gpu: Arc<Gpu>,
    params: DeviceParams,
    grads: DeviceParams,
}

impl CudaMoeLayer {
    /// The layer with `params` on GPU `device`, products in `precision` (a stream of its own).
    pub fn new(device: &CudaDevice, config: MoeConfig, params: &MoeParams<f32>, precision: Precision) -> Result<Self> {
        check_moe_config(&config)?;
        params.check(&config)?;
        let gpu = Gpu::new(device, precision)?;
        Self::on(&gpu, config, params)
    }

    /// The layer with `params` on `gpu`'s stream (the model's MoE blocks share one).
    pub fn on(gpu: &Arc<Gpu>, config: MoeConfig, params: &MoeParams<f32>) -> Result<Self> {
        guarded_try("copying the MoE layer to the GPU", || {
            check_moe_config(&config)?;
            params.check(&config)?;
            let upload = |v: &[f32]| gpu.upload(v);
            let params_on_device = DeviceParams {
                wg: upload(&params.wg)?,
                w1: upload(&params.w1)?,
                b1: upload(&params.b1)?,
                w2: upload(&params.w2)?,
                b2: upload(&params.b2)?,
            };
            let (d, f, e) = (config.d_model, config.d_ff, config.experts);
            let grads = DeviceParams {
                wg: gpu.alloc_zeros(d * e)?,
                w1: gpu.alloc_zeros(e * d * f)?,
                b1: gpu.alloc_zeros(e * f)?,
                w2: gpu.alloc_zeros(e * f * d)?,
                b2: gpu.alloc_zeros(e * d)?,
            };
            Ok(CudaMoeLayer {
                config,
                gpu: gpu.clone(),
                params: params_on_device,
                grads,
            })
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Copy `data` to the GPU.
    pub fn upload(&self, data: &[f32]) -> Result<DeviceBuffer> {
        guarded_try("copying to the GPU", || {
            Ok(DeviceBuffer {
                data: self.gpu.upload(data)?,
                len: data.len(),
            })
        })
    }

    /// Copy a device buffer back to the host (waits for the work queued before it).
    pub fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>> {
        guarded_try("copying from the GPU", || {
            let mut v = self.gpu.download(&buf.data)?;
            v.truncate(buf.len);
            Ok(v)
        })
    }

    /// Wait until every queued kernel and product has finished.
    pub fn synchronize(&self) -> Result<()> {
        guarded_try("waiting for the GPU", || self.gpu.synchronize())
    }

    /// The accumulated parameter gradients, copied to the host.
    pub fn gradients(&self) -> Result<MoeParams<f32>> {
        guarded_try("copying the gradients from the GPU", || self.grads.download(&self.gpu))
    }

    /// The parameters, copied to the host.
    pub fn parameters(&self) -> Result<MoeParams<f32>> {
        guarded_try("copying the parameters from the GPU", || {
            self.params.download(&self.gpu)
        })
    }

    /// Each parameter group with its name and gradient, in [`MoeParams::named`]'s order (what an
    /// optimizer on the GPU updates).
    pub(crate) fn parameters_and_gradients(&mut self) -> [(&'static str, &mut CudaSlice<f32>, &CudaSlice<f32>); 5] {
        let (p, g) = (&mut self.params, &self.grads);
        [
            ("wg", &mut p.wg, &g.wg),
            ("w1", &mut p.w1, &g.w1),
            ("b1", &mut p.b1, &g.b1),
            ("w2", &mut p.w2, &g.w2),
            ("b2", &mut p.b2, &g.b2),
        ]
    }

    /// Set every gradient to zero.
    pub fn zero_gradients(&mut self) -> Result<()> {
        guarded_try("zeroing the gradients on the GPU", || {
            let g = &mut self.grads;
            for buf in [&mut g.wg, &mut g.w1, &mut g.b1, &mut g.w2, &mut g.b2] {
                self.gpu.zero(buf)?;
            }
            Ok(())
        })
    }

    /// Forward pass over the tokens `x` (`[S][d_model]` on the device): returns `y` and the cache.
    pub fn forward(&self, x: &DeviceBuffer) -> Result<(DeviceBuffer, CudaMoeCache)> {
        guarded_try("the MoE layer's forward on the GPU", || {
            let c = &self.config;
            let (d, f, e_count, k) = (c.d_model, c.d_ff, c.experts, c.k);
            if x.len == 0 || !x.len.is_multiple_of(d) {
                return Err(Error::shape(
                    "CUDA MoE input",
                    format!("{} elements are not one or more rows of d_model={d}", x.len),
                ));
            }
            let s = x.len / d;
            let ks = k * s;
            let (s_i, e_i, k_i, d_i, f_i) = (
                int(s, "tokens")?,
                int(e_count, "experts")?,
                int(k, "k")?,
                int(d, "d_model")?,
                int(f, "d_ff")?,
            );
            int(ks, "assignments")?;
            let st = &self.gpu.stream;
            let gpu = &self.gpu;

            let mut logits = self.gpu.alloc::<f32>(s * e_count)?;
            let gemm = |m, n, kk, a_t, b_t| Product::new(m, n, kk, a_t, b_t, false);
            self.gpu
                .product(gemm(s, e_count, d, false, false), &x.data, &self.params.wg, &mut logits)?;

            let mut gates = self.gpu.alloc::<f32>(s * e_count)?;
            let mut lse = self.gpu.alloc::<f32>(s)?;
            let mut expert = self.gpu.alloc::<u32>(ks)?;
            let mut nonfinite = self.gpu.upload(&[s_i])?;
            // SAFETY: the arguments follow moe_gate_topk's parameters (moe_kernels.cu), and each buffer
            // holds the elements it indexes for these sizes; so for every launch below.
            unsafe {
                st.launch_builder(gpu.kernel("moe_gate_topk")?)
                    .arg(&logits)
                    .arg(&s_i)
                    .arg(&e_i)
                    .arg(&k_i)
                    .arg(&mut gates)
                    .arg(&mut lse)
                    .arg(&mut expert)
                    .arg(&mut nonfinite)
                    .launch(per_element(s as u64))
            }
            .map_err(launch("moe_gate_topk"))?;

            let mut loc = self.gpu.alloc::<i32>(ks)?;
            let mut counts = self.gpu.alloc::<i32>(e_count)?;
            let mut first_counts = self.gpu.alloc::<i32>(e_count)?;
            // SAFETY: the arguments follow moe_route_positions's parameters; the buffers hold what it indexes.
            unsafe {
                st.launch_builder(gpu.kernel("moe_route_positions")?)
                    .arg(&expert)
                    .arg(&s_i)
                    .arg(&k_i)
                    .arg(&mut loc)
                    .arg(&mut counts)
                    .arg(&mut first_counts)
                    .launch(grid(e_count as u32, WIDE_BLOCK, WIDE_BLOCK * 4))
            }
            .map_err(launch("moe_route_positions"))?;

            let read_ints = |buf: &CudaSlice<i32>| st.clone_dtoh(buf).map_err(driver("cannot read the routing back"));
            let capacity = c.capacity(s);
            let slots = match capacity {
                // More slots than assignments would only be padding.
                Some(cap) => cap.min(ks),
                None => {
                    let loads = read_ints(&counts)?;
                    self.check_finite(&read_ints(&nonfinite)?, s)?;
                    loads.iter().map(|&n| n.max(0) as usize).max().unwrap_or(0)
                }
            };
            let rows = e_count * slots;
            let c_i = int(slots, "slots per expert")?;
            int(rows, "expert batch rows")?;

            let mut weights = self.gpu.alloc::<f32>(ks)?;
            let mut slot = self.gpu.alloc::<i32>(ks)?;
            let normalize = i32::from(c.normalize);
            let eps = f32::EPSILON;
            // SAFETY: the arguments follow moe_assign's parameters; the buffers hold what it indexes.
            unsafe {
                st.launch_builder(gpu.kernel("moe_assign")?)
                    .arg(&gates)
                    .arg(&expert)
                    .arg(&loc)
                    .arg(&s_i)
                    .arg(&e_i)
                    .arg(&k_i)
                    .arg(&c_i)
                    .arg(&normalize)
                    .arg(&eps)
                    .arg(&mut weights)
                    .arg(&mut slot)
                    .launch(per_element(s as u64))
            }
            .map_err(launch("moe_assign"))?;

            let mut losses = self.gpu.alloc::<f32>(2)?;
            // SAFETY: the arguments follow moe_router_losses's parameters; the buffers hold what it indexes.
            unsafe {
                st.launch_builder(gpu.kernel("moe_router_losses")?)
                    .arg(&gates)
                    .arg(&lse)
                    .arg(&first_counts)
                    .arg(&s_i)
                    .arg(&e_i)
                    .arg(&mut losses)
                    .launch(grid(1, WIDE_BLOCK, WIDE_BLOCK * 4))
            }
            .map_err(launch("moe_router_losses"))?;

            let mut xe = self.gpu.alloc_zeros::<f32>(rows * d)?;
            // SAFETY: the arguments follow moe_dispatch's parameters; the buffers hold what it indexes.
            unsafe {
                st.launch_builder(gpu.kernel("moe_dispatch")?)
                    .arg(&x.data)
                    .arg(&slot)
                    .arg(&s_i)
                    .arg(&d_i)
                    .arg(&mut xe)
                    .launch(grid(ks as u32, BLOCK, 0))
            }
            .map_err(launch("moe_dispatch"))?;

            let batched =
                |m, n, kk, a_t, b_t, accumulate| Product::new(m, n, kk, a_t, b_t, accumulate).batched(e_count);
            let mut h = self.gpu.alloc::<f32>(rows * f)?;
            let mut act = self.gpu.alloc::<f32>(rows * f)?;
            let mut ye = self.gpu.alloc::<f32>(rows * d)?;
            let tanh_form = i32::from(c.gelu == crate::kernels::Gelu::Tanh);
            let rows_l = rows as i64;
            if rows > 0 {
                self.gpu
                    .product(batched(slots, f, d, false, false, false), &xe, &self.params.w1, &mut h)?;
                // SAFETY: the arguments follow moe_bias_gelu_forward's parameters; the buffers hold what it indexes.
                unsafe {
                    st.launch_builder(gpu.kernel("moe_bias_gelu_forward")?)
                        .arg(&mut h)
                        .arg(&mut act)
                        .arg(&self.params.b1)
                        .arg(&rows_l)
                        .arg(&c_i)
                        .arg(&f_i)
                        .arg(&tanh_form)
                        .launch(elementwise((rows * f) as u64))
                }
                .map_err(launch("moe_bias_gelu_forward"))?;
                self.gpu.product(
                    batched(slots, d, f, false, false, false),
                    &act,
                    &self.params.w2,
                    &mut ye,
                )?;
                // SAFETY: the arguments follow moe_add_expert_bias's parameters; the buffers hold what it indexes.
                unsafe {
                    st.launch_builder(gpu.kernel("moe_add_expert_bias")?)
                        .arg(&mut ye)
                        .arg(&self.params.b2)
                        .arg(&rows_l)
                        .arg(&c_i)
                        .arg(&d_i)
                        .launch(elementwise((rows * d) as u64))
                }
                .map_err(launch("moe_add_expert_bias"))?;
            }

            let mut y = self.gpu.alloc::<f32>(s * d)?;
            self.combine(&ye, Some(&weights), &slot, s, &mut y)?;

            // The statistics: loads, the first non-finite token, the losses (one small read, which
            // also waits for the forward to finish).
            let loads = read_ints(&counts)?;
            self.check_finite(&read_ints(&nonfinite)?, s)?;
            let loss = st
                .clone_dtoh(&losses)
                .map_err(driver("cannot read the router losses"))?;
            let kept: Vec<usize> = loads.iter().map(|&n| (n.max(0) as usize).min(slots)).collect();
            let assigned: usize = loads.iter().map(|&n| n.max(0) as usize).sum();
            let stats = MoeStats {
                dropped: assigned - kept.iter().sum::<usize>(),
                expert_tokens: kept,
                capacity,
            };
            let cache = CudaMoeCache {
                tokens: s,
                slots,
                gates,
                lse,
                expert,
                slot,
                weights,
                first_counts,
                xe,
                h,
                act,
                ye,
                l_aux: loss.first().copied().unwrap_or(f32::NAN),
                z_loss: loss.get(1).copied().unwrap_or(f32::NAN),
                stats,
            };
            Ok((DeviceBuffer { data: y, len: s * d }, cache))
        })
    }

    fn check_finite(&self, first_bad: &[i32], tokens: usize) -> Result<()> {
        match first_bad.first() {
            Some(&t) if (t as usize) < tokens => Err(Error::NonFinite {
                context: "the MoE gate (CUDA)".into(),
                detail: format!("gate logit of token {t}"),
            }),
            _ => Ok(()),
        }
    }

    /// `out[s] = sum_j w[j S + s] ye[slot[j S + s]]` (weight 1 when `weights` is `None`).
    fn combine(
        &self,
        rows: &CudaSlice<f32>,
        weights: Option<&CudaSlice<f32>>,
        slot: &CudaSlice<i32>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let c = &self.config;
        let (s_i, k_i, d_i) = (int(tokens, "tokens")?, int(c.k, "k")?, int(c.d_model, "d_model")?);
        let mut builder = self.gpu.stream.launch_builder(self.gpu.kernel("moe_combine")?);
        builder.arg(rows);
        let null: u64 = 0;
        match weights {
            Some(w) => builder.arg(w),
            // A null pointer: the kernel then weighs every row by 1.
            None => builder.arg(&null),
        };
        builder.arg(slot).arg(&s_i).arg(&k_i).arg(&d_i).arg(out);
        // SAFETY: the arguments match moe_combine's parameters; `rows` holds every slot's row,
        // `slot` k * tokens entries, `out` tokens rows.
        unsafe { builder.launch(grid(tokens as u32, BLOCK, 0)) }
            .map(|_| ())
            .map_err(|e| cuda_error(format!("kernel moe_combine: {e}")))
    }

    /// Backward pass: given the forward's input `x`, its cache and `gy = dL/dy`, add the parameter
    /// gradients of `sum(y * gy) + router_scale * (aux_coef * l_aux + z_coef * z_loss)` into the
    /// layer's gradient buffers and return `dL/dx`.
    pub fn backward(
        &mut self,
        x: &DeviceBuffer,
        cache: CudaMoeCache,
        gy: &DeviceBuffer,
        router_scale: f32,
    ) -> Result<DeviceBuffer> {
        guarded_try("the MoE layer's backward on the GPU", || {
            let c = self.config.clone();
            let (d, f, e_count, k) = (c.d_model, c.d_ff, c.experts, c.k);
            let s = cache.tokens;
            for (name, buf) in [("x", x), ("gy", gy)] {
                if buf.len != s * d {
                    return Err(Error::shape(
                        format!("CUDA MoE backward {name}"),
                        format!("expected {} elements ({s} tokens of {d}), got {}", s * d, buf.len),
                    ));
                }
            }
            let CudaMoeCache {
                slots,
                gates,
                lse,
                expert,
                slot,
                weights,
                first_counts,
                xe,
                h,
                act,
                mut ye,
                ..
            } = cache;
            let ks = k * s;
            let rows = e_count * slots;
            // The kernels index the cache by this layer's shape: a cache of another layer (other
            // k, experts or widths) would be read and written out of bounds. (A buffer of no
            // elements is allocated as one: `Gpu::alloc`.)
            for (name, len, want) in [
                ("gates", gates.len(), s * e_count),
                ("lse", lse.len(), s),
                ("expert", expert.len(), ks),
                ("slot", slot.len(), ks),
                ("weights", weights.len(), ks),
                ("first_counts", first_counts.len(), e_count),
                ("xe", xe.len(), rows * d),
                ("h", h.len(), rows * f),
                ("act", act.len(), rows * f),
                ("ye", ye.len(), rows * d),
            ] {
                if len != want.max(1) {
                    return Err(Error::shape(
                        format!("CUDA MoE backward cache {name}"),
                        format!("expected {want} elements for this layer ({s} tokens, {e_count} experts, top-{k}, {slots} rows each), got {len}: a cache of another layer"),
                    ));
                }
            }
            let (s_i, e_i, k_i, d_i) = (
                int(s, "tokens")?,
                int(e_count, "experts")?,
                int(k, "k")?,
                int(d, "d_model")?,
            );
            let batched =
                |m, n, kk, a_t, b_t, accumulate| Product::new(m, n, kk, a_t, b_t, accumulate).batched(e_count);

            let mut gw = self.gpu.alloc::<f32>(ks)?;
            let mut gye = self.gpu.alloc_zeros::<f32>(rows * d)?;
            // SAFETY: the arguments follow moe_combine_backward's parameters; the buffers hold what it
            // indexes.
            unsafe {
                self.gpu
                    .stream
                    .launch_builder(self.gpu.kernel("moe_combine_backward")?)
                    .arg(&gy.data)
                    .arg(&ye)
                    .arg(&weights)
                    .arg(&slot)
                    .arg(&s_i)
                    .arg(&d_i)
                    .arg(&mut gw)
                    .arg(&mut gye)
                    .launch(grid(ks as u32, BLOCK, BLOCK * 4))
            }
            .map_err(launch("moe_combine_backward"))?;

            // The experts, all at once: gw2 += a^T gye; gb2 += colsum(gye); g = gye w2^T; g *= gelu'(h);
            // gw1 += xe^T g; gb1 += colsum(g); gxe = g w1^T (into ye's buffer, no longer needed).
            let mut g = act;
            if rows > 0 {
                self.gpu
                    .product(batched(f, d, slots, true, false, true), &g, &gye, &mut self.grads.w2)?;
                self.column_sums(&gye, slots, d, true)?;
                self.gpu
                    .product(batched(slots, f, d, false, true, false), &gye, &self.params.w2, &mut g)?;
                let n = (rows * f) as i64;
                let tanh_form = i32::from(c.gelu == crate::kernels::Gelu::Tanh);
                // SAFETY: the arguments follow moe_gelu_backward's parameters; the buffers hold what it indexes.
                unsafe {
                    self.gpu
                        .stream
                        .launch_builder(self.gpu.kernel("moe_gelu_backward")?)
                        .arg(&h)
                        .arg(&mut g)
                        .arg(&n)
                        .arg(&tanh_form)
                        .launch(elementwise(n as u64))
                }
                .map_err(launch("moe_gelu_backward"))?;
                self.gpu
                    .product(batched(d, f, slots, true, false, true), &xe, &g, &mut self.grads.w1)?;
                self.column_sums(&g, slots, f, false)?;
                self.gpu
                    .product(batched(slots, d, f, false, true, false), &g, &self.params.w1, &mut ye)?;
            }
            let gxe = ye;
            let mut gx = self.gpu.alloc::<f32>(s * d)?;
            self.combine(&gxe, None, &slot, s, &mut gx)?;

            let mut g_logits = self.gpu.alloc::<f32>(s * e_count)?;
            let normalize = i32::from(c.normalize);
            let eps = f32::EPSILON;
            let aux_scale = if c.aux_coef != 0.0 {
                (c.aux_coef as f32) * router_scale * e_count as f32 / (s as f32 * s as f32)
            } else {
                0.0
            };
            let z = (c.z_coef as f32) * router_scale * 2.0 / s as f32;
            // SAFETY: the arguments follow moe_gate_backward's parameters; the buffers hold what it indexes.
            unsafe {
                self.gpu
                    .stream
                    .launch_builder(self.gpu.kernel("moe_gate_backward")?)
                    .arg(&gates)
                    .arg(&lse)
                    .arg(&expert)
                    .arg(&slot)
                    .arg(&gw)
                    .arg(&first_counts)
                    .arg(&s_i)
                    .arg(&e_i)
                    .arg(&k_i)
                    .arg(&normalize)
                    .arg(&eps)
                    .arg(&aux_scale)
                    .arg(&z)
                    .arg(&mut g_logits)
                    .launch(per_element(s as u64))
            }
            .map_err(launch("moe_gate_backward"))?;
            let single = |m, n, kk, a_t, b_t| Product::new(m, n, kk, a_t, b_t, true);
            self.gpu.product(
                single(d, e_count, s, true, false),
                &x.data,
                &g_logits,
                &mut self.grads.wg,
            )?;
            self.gpu
                .product(single(s, d, e_count, false, true), &g_logits, &self.params.wg, &mut gx)?;
            Ok(DeviceBuffer { data: gx, len: s * d })
        })
    }

    /// Add each expert's column sums of `m` (`[E][slots][width]`) into the gradient of b2
    /// (`second`) or b1.
    fn column_sums(&mut self, m: &CudaSlice<f32>, slots: usize, width: usize, second: bool) -> Result<()> {
        let e_count = self.config.experts;
        let (e_i, c_i, w_i) = (int(e_count, "experts")?, int(slots, "slots")?, int(width, "width")?);
        let acc = if second { &mut self.grads.b2 } else { &mut self.grads.b1 };
        let n = (e_count * width) as u64;
        // SAFETY: the arguments match moe_expert_column_sums; `m` holds E * slots rows of `width`,
        // `acc` E * width elements.
        unsafe {
            self.gpu
                .stream
                .launch_builder(self.gpu.kernel("moe_expert_column_sums")?)
                .arg(m)
                .arg(&e_i)
                .arg(&c_i)
                .arg(&w_i)
                .arg(acc)
                .launch(grid(n.div_ceil(BLOCK as u64) as u32, BLOCK, 0))
        }
        .map(|_| ())
        .map_err(|e| cuda_error(format!("kernel moe_expert_column_sums: {e}")))
    }

    /// Seconds per repetition of the six expert products alone at this layer's shapes for `slots`
    /// rows per expert (the products of one forward and backward, batched over the experts):
    /// median of `rounds` rounds of `iters` repetitions, after one untimed round.
    pub fn expert_products_seconds(&mut self, slots: usize, iters: usize, rounds: usize) -> Result<f64> {
        guarded_try("timing the expert products on the GPU", || {
            let c = self.config.clone();
            let (d, f, e_count) = (c.d_model, c.d_ff, c.experts);
            let rows = e_count * slots;
            let xe = self.gpu.alloc_zeros::<f32>(rows * d)?;
            let mut h = self.gpu.alloc_zeros::<f32>(rows * f)?;
            let mut ye = self.gpu.alloc_zeros::<f32>(rows * d)?;
            let mut gw1 = self.gpu.alloc_zeros::<f32>(e_count * d * f)?;
            let mut gw2 = self.gpu.alloc_zeros::<f32>(e_count * f * d)?;
            let b = |m, n, kk, a_t, b_t, accumulate| Product::new(m, n, kk, a_t, b_t, accumulate).batched(e_count);
            let (gpu, p) = (&self.gpu, &self.params);
            self.time_rounds(iters, rounds, || {
                gpu.product(b(slots, f, d, false, false, false), &xe, &p.w1, &mut h)?;
                gpu.product(b(slots, d, f, false, false, false), &h, &p.w2, &mut ye)?;
                gpu.product(b(f, d, slots, true, false, true), &h, &ye, &mut gw2)?;
                gpu.product(b(slots, f, d, false, true, false), &ye, &p.w2, &mut h)?;
                gpu.product(b(d, f, slots, true, false, true), &xe, &h, &mut gw1)?;
                gpu.product(b(slots, d, f, false, true, false), &h, &p.w1, &mut ye)
            })
        })
    }

    /// Seconds per plain row-major product `[m][k] @ [k][n]` in this layer's precision (the
    /// matrix rate the expert products are judged against), timed as
    /// [`CudaMoeLayer::expert_products_seconds`].
    pub fn plain_product_seconds(&self, m: usize, n: usize, k: usize, iters: usize, rounds: usize) -> Result<f64> {
        guarded_try("timing a product on the GPU", || {
            let a = self.gpu.alloc_zeros::<f32>(m * k)?;
            let b = self.gpu.alloc_zeros::<f32>(k * n)?;
            let mut out = self.gpu.alloc_zeros::<f32>(m * n)?;
            let p = Product::new(m, n, k, false, false, false);
            self.time_rounds(iters, rounds, || self.gpu.product(p, &a, &b, &mut out))
        })
    }

    /// Median seconds per call of `f` over `rounds` rounds of `iters` calls, each round bracketed by
    /// synchronisations; one untimed round first (cuBLAS picks its kernels and workspace there).
    fn time_rounds(&self, iters: usize, rounds: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        let iters = iters.max(1);
        let mut times = Vec::with_capacity(rounds);
        for round in 0..=rounds.max(1) {
            self.synchronize()?;
            let start = std::time::Instant::now();
            for _ in 0..iters {
                f()?;
            }
            self.synchronize()?;
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() / iters as f64);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}
