//! Multi-head attention with its hook points (q, k, v, scores, pattern, z, result): forward
//! and backward.

use super::*;

/// Per-head projection weights, needed only by `use_split_qkv_input` (where every head has its
/// own input) and `use_attn_result` (where every head's output is exposed).
pub(super) struct HeadWeights {
    /// `[n_heads, d_model, d_head]` each, TransformerLens's `W_Q`/`W_K`/`W_V` layout.
    pub(super) w_qkv: [Tensor; 3],
    /// `[n_heads, d_head]` each.
    pub(super) b_qkv: [Tensor; 3],
    /// `[n_heads, d_head, d_model]`, TransformerLens's `W_O` layout.
    pub(super) w_o: Tensor,
}

/// Projected queries, keys and values.
pub(super) enum Qkv {
    /// One `[batch, pos, 3 * n_heads * d_head]` tensor from the fused projection.
    Fused(Tensor),
    /// q, k and v as `[batch, pos, n_heads, d_head]` tensors.
    Separate([Tensor; 3]),
}

impl Qkv {
    /// The fused projection, or q.
    fn first(&self) -> &Tensor {
        match self {
            Qkv::Fused(t) => t,
            Qkv::Separate([q, _, _]) => q,
        }
    }

    /// `(batch, pos)`.
    pub(super) fn dims(&self) -> Result<(usize, usize)> {
        let t = self.first();
        Ok((t.dim(0)?, t.dim(1)?))
    }
}

/// The attention mask of one forward pass.
pub(super) struct Mask {
    /// `[batch, pos]`: 0 for keys that may be attended to, -inf for padding.
    pub(super) padding: Option<Vec<f32>>,
    /// Whether the model is causal.
    pub(super) causal: bool,
    /// Padding and causality as one additive tensor `[batch or 1, 1, pos or 1, pos]`, built
    /// only for devices without our CPU kernels.
    pub(super) additive: Option<Tensor>,
    /// Whether some query may have every key masked (its softmax is then 0/0). False lets the
    /// portable path skip the NaN clean-up, two full passes over the pattern on a GPU.
    pub(super) may_empty_rows: bool,
    /// A bias added to every layer's scores before the mask, `[batch, head, query, key]`,
    /// contiguous (MPNet's relative position bias, after its hook).
    pub(super) bias: Option<Tensor>,
}

pub(super) fn missing_head_weights() -> Error {
    Error::Config("per-head weights were not prepared for this config".into())
}

/// Splits the stacked query, key and value projection (`[3 * h * dh, d]`) into
/// TransformerLens's per-head layout.
pub(super) fn head_weights(cfg: &BertConfig, qkv: &Linear, out: &Linear) -> Result<HeadWeights> {
    let (h, dh, d) = (cfg.n_heads, cfg.d_head, cfg.d_model);
    let a = h * dh;
    let w = |i: usize| -> Result<Tensor> {
        // [h*dh, d] -> [h, dh, d] -> [h, d, dh]
        Ok(qkv
            .weight()?
            .narrow(0, i * a, a)?
            .reshape((h, dh, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let b = |i: usize| -> Result<Tensor> { Ok(qkv.bias.narrow(0, i * a, a)?.reshape((h, dh))?) };
    Ok(HeadWeights {
        w_qkv: [w(0)?, w(1)?, w(2)?],
        b_qkv: [b(0)?, b(1)?, b(2)?],
        // [d, h*dh] -> [d, h, dh] -> [h, dh, d]
        w_o: out
            .weight()?
            .reshape((d, h, dh))?
            .permute((1, 2, 0))?
            .contiguous()?,
    })
}

/// 0 where `|query - key| <= window`, -inf elsewhere, `[1, 1, pos, pos]`: a local layer's
/// window, for devices without our CPU kernels (which apply it themselves).
fn window_mask(window: usize, p: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let values: Vec<f32> = (0..p * p)
        .map(|i| {
            if (i / p).abs_diff(i % p) <= window {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, (1, 1, p, p), device)?.to_dtype(dtype)?)
}

/// `x[b, p, h] @ w[h] + bias[h]` for `x: [b, p, h, d_model]`, `w: [h, d_model, d_head]`.
pub(super) fn per_head_projection(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, p, h, d) = x.dims4()?;
    let dh = w.dim(2)?;
    let x = x
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((h, b * p, d))?;
    let y = x.matmul(w)?.reshape((h, b, p, dh))?.permute((1, 2, 0, 3))?;
    Ok(y.broadcast_add(bias)?.contiguous()?)
}

impl HookedBert {
    /// Multi-head attention, as TransformerLens's `AbstractAttention` (with an additive key
    /// mask), on a block's input. Returns the output including `b_O`, at every position or, with
    /// `position`, at that one only (`[batch, 1, d_model]`; every position is still attended
    /// to).
    pub(super) fn attention(
        &self,
        layer: usize,
        block: &Block,
        resid_pre: &Tensor,
        mask: &Mask,
        position: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let qkv = if self.cfg.use_split_qkv_input {
            Qkv::Separate(self.split_qkv(layer, block, resid_pre, hooks)?)
        } else {
            Qkv::Fused(block.qkv.forward(resid_pre, None)?)
        };
        self.attention_from(layer, block, qkv, mask, position, hooks)
    }

    /// With `use_split_qkv_input`: every head gets its own copy of the input (hooked as
    /// `hook_q_input` ...), projected by its own slice of the weights. Returns q, k, v.
    pub(super) fn split_qkv(
        &self,
        layer: usize,
        block: &Block,
        resid_pre: &Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<[Tensor; 3]> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p, _) = resid_pre.dims3()?;
        let heads = block.heads.as_ref().ok_or_else(missing_head_weights)?;
        let per_head =
            resid_pre
                .unsqueeze(2)?
                .broadcast_as((b, p, self.cfg.n_heads, self.cfg.d_model))?;
        let kinds = [BlockHook::QInput, BlockHook::KInput, BlockHook::VInput];
        let mut out = Vec::with_capacity(3);
        for (i, kind) in kinds.into_iter().enumerate() {
            let input = hook(hooks, at(kind), per_head.clone())?;
            out.push(per_head_projection(
                &input,
                &heads.w_qkv[i],
                &heads.b_qkv[i],
            )?);
        }
        let [q, k, v]: [Tensor; 3] = out.try_into().map_err(|_| missing_head_weights())?;
        Ok([q, k, v])
    }

    /// Attention from projected queries, keys and values: hooks on q, k, v, the scores, the
    /// pattern and z, then the output projection (at `position` only, if given).
    pub(super) fn attention_from(
        &self,
        layer: usize,
        block: &Block,
        qkv: Qkv,
        mask: &Mask,
        position: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let z = if self.uses_cpu_kernels() {
            self.attention_z_cpu(layer, qkv, mask, hooks)?
        } else if cuda::kernels_on(qkv.first()) {
            self.attention_z_cuda(layer, qkv, mask, hooks)?
        } else {
            self.attention_z_generic(layer, qkv, mask, hooks)?
        };
        let z = at_position(&hook(hooks, at(BlockHook::Z), z)?, position)?;
        let (b, p) = (z.dim(0)?, z.dim(1)?);
        if self.cfg.use_attn_result {
            let heads = block.heads.as_ref().ok_or_else(missing_head_weights)?;
            // result[b, p, h] = z[b, p, h] @ W_O[h], without b_O.
            let z_heads = z.permute((2, 0, 1, 3))?.reshape((h, b * p, dh))?;
            let result = z_heads
                .matmul(&heads.w_o)?
                .reshape((h, b, p, self.cfg.d_model))?
                .permute((1, 2, 0, 3))?
                .contiguous()?;
            let result = hook(hooks, at(BlockHook::Result), result)?;
            Ok(result.sum(2)?.broadcast_add(&block.attn_out.bias)?)
        } else {
            block.attn_out.forward(&z.reshape((b, p, h * dh))?, None)
        }
    }

    /// q, k and v as `[batch, pos, heads, d_head]` tensors, each passed through its hook; with
    /// rotary positions, q and k then rotated and passed through `hook_rot_q`/`hook_rot_k`.
    pub(super) fn hooked_qkv(
        &self,
        layer: usize,
        qkv: Qkv,
        hooks: &mut dyn Hooks,
    ) -> Result<[Tensor; 3]> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p) = qkv.dims()?;
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let parts = match qkv {
            Qkv::Fused(fused) => {
                let a = h * dh;
                let part = |i: usize| -> Result<Tensor> {
                    Ok(fused
                        .narrow(2, i * a, a)?
                        .contiguous()?
                        .reshape((b, p, h, dh))?)
                };
                [part(0)?, part(1)?, part(2)?]
            }
            Qkv::Separate(parts) => parts,
        };
        let [q, k, v] = parts;
        let q = hook(hooks, at(BlockHook::Q), q)?.contiguous()?;
        let k = hook(hooks, at(BlockHook::K), k)?.contiguous()?;
        let v = hook(hooks, at(BlockHook::V), v)?.contiguous()?;
        let Some(tables) = self.rotary_tables(layer, p) else {
            return Ok([q, k, v]);
        };
        let q = hook(hooks, at(BlockHook::RotQ), self.rotate(&q, &tables)?)?;
        let k = hook(hooks, at(BlockHook::RotK), self.rotate(&k, &tables)?)?;
        Ok([q.contiguous()?, k.contiguous()?, v])
    }

    /// The attention of one pass over `batch` rows of `pos` positions.
    fn attention_shape(&self, batch: usize, pos: usize) -> AttentionShape {
        AttentionShape {
            batch,
            pos,
            heads: self.cfg.n_heads,
            d_head: self.cfg.d_head,
        }
    }

    /// Attention up to `z` with the CPU kernels. Unhooked, each head runs scores, mask, softmax
    /// and `@ v` in one task without materialising its scores; q, k and v are read straight out
    /// of the fused projection unless a hook wants them as tensors of their own.
    pub(super) fn attention_z_cpu(
        &self,
        layer: usize,
        qkv: Qkv,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p) = qkv.dims()?;
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let a = h * dh;
        let shape = self.attention_shape(b, p);
        let scale = 1.0 / (dh as f32).sqrt();
        let bias = mask.bias.as_ref().map(cpu::view).transpose()?;
        let key_mask = KeyMask {
            padding: mask.padding.as_deref(),
            causal: mask.causal,
            bias: bias.as_ref().map(|view| view.slice()),
            window: self.cfg.attention_window(layer),
        };
        let kinds = [
            BlockHook::Q,
            BlockHook::K,
            BlockHook::V,
            BlockHook::RotQ,
            BlockHook::RotK,
        ];
        let sources: Vec<Tensor> = match qkv {
            Qkv::Fused(fused) if !kinds.iter().any(|kind| wants(hooks, at(*kind))) => {
                match self.rotary_tables(layer, p) {
                    // q's and k's heads lie side by side at the start of each row: turn them
                    // all in one pass over a copy.
                    Some(tables) => {
                        let mut data = cpu::view(&fused.contiguous()?)?.slice().to_vec();
                        kernels::rotary_inplace(
                            &mut data,
                            3 * a,
                            (0, 2 * h, dh),
                            p,
                            (&tables.cos, &tables.sin),
                        );
                        vec![cpu::tensor(data, &[b, p, 3 * a])?]
                    }
                    None => vec![fused.contiguous()?],
                }
            }
            qkv => self.hooked_qkv(layer, qkv, hooks)?.to_vec(),
        };
        let views = sources.iter().map(cpu::view).collect::<Result<Vec<_>>>()?;
        let [q, k, v]: [Heads<'_>; 3] = match views.as_slice() {
            [fused] => [0, 1, 2].map(|i| Heads {
                data: &fused.slice()[i * a..],
                row_stride: 3 * a,
            }),
            separate => [0, 1, 2].map(|i| Heads {
                data: separate[i].slice(),
                row_stride: a,
            }),
        };

        let z = if wants(hooks, at(BlockHook::AttnScores)) || wants(hooks, at(BlockHook::Pattern)) {
            let scores = kernels::attention_scores(q, k, shape, scale, key_mask);
            let scores = hook(
                hooks,
                at(BlockHook::AttnScores),
                cpu::tensor(scores, &[b, h, p, p])?,
            )?;
            let mut pattern = cpu::view(&scores.contiguous()?)?.slice().to_vec();
            kernels::softmax_rows_inplace(&mut pattern, p);
            let pattern = hook(
                hooks,
                at(BlockHook::Pattern),
                cpu::tensor(pattern, &[b, h, p, p])?,
            )?;
            kernels::attention_z(cpu::view(&pattern.contiguous()?)?.slice(), v, shape)
        } else {
            kernels::attention_fused(q, k, v, shape, scale, key_mask)
        };
        cpu::tensor(z, &[b, p, h, dh])
    }

    /// Attention up to `z` on an NVIDIA GPU: cuBLAS reads q, k and v where they lie (in the
    /// fused projection unless a hook wants them as tensors of their own) and writes z in its
    /// hook's layout; one kernel adds the mask and takes the softmax between the two matmuls
    /// (two when the scores are hooked: the mask, then the softmax of what the hook returns).
    pub(super) fn attention_z_cuda(
        &self,
        layer: usize,
        qkv: Qkv,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p) = qkv.dims()?;
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let a = h * dh;
        let shape = self.attention_shape(b, p);
        let kinds = [BlockHook::Q, BlockHook::K, BlockHook::V];
        let (sources, row_stride, offsets) = match qkv {
            Qkv::Fused(fused)
                if self.rotary_tables(layer, p).is_none()
                    && !kinds.iter().any(|kind| wants(hooks, at(*kind))) =>
            {
                (vec![fused.contiguous()?], 3 * a, [0, a, 2 * a])
            }
            qkv => {
                let parts = self.hooked_qkv(layer, qkv, hooks)?;
                let parts = parts
                    .into_iter()
                    .map(|t| Ok(t.contiguous()?))
                    .collect::<Result<Vec<_>>>()?;
                (parts, a, [0, 0, 0])
            }
        };
        let heads = |i: usize| cuda::Heads {
            tensor: &sources[i.min(sources.len() - 1)],
            offset: offsets[i],
            row_stride,
        };
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = cuda::attention_scores(heads(0), heads(1), shape, scale)?;
        let score_mask = cuda::ScoreMask {
            additive: mask.additive.as_ref(),
            bias: mask.bias.as_ref(),
            window: self.cfg.attention_window(layer),
        };
        let pattern = if wants(hooks, at(BlockHook::AttnScores)) {
            let scores = cuda::attention_softmax(&scores, Some(&score_mask), false)?;
            let scores = hook(hooks, at(BlockHook::AttnScores), scores)?;
            cuda::attention_softmax(&scores, None, true)?
        } else {
            cuda::attention_softmax(&scores, Some(&score_mask), true)?
        };
        let pattern = hook(hooks, at(BlockHook::Pattern), pattern)?.contiguous()?;
        cuda::attention_z(&pattern, heads(2), shape)
    }

    /// Attention up to `z` in plain Candle ops (other devices, and `use_split_qkv_input`).
    pub(super) fn attention_z_generic(
        &self,
        layer: usize,
        qkv: Qkv,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let p = qkv.dims()?.1;
        let dh = self.cfg.d_head;
        let [q, k, v] = self.hooked_qkv(layer, qkv, hooks)?;
        let heads_first = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (heads_first(&q)?, heads_first(&k)?, heads_first(&v)?);
        let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        let scores = match &mask.bias {
            Some(bias) => (scores + bias)?,
            None => scores,
        };
        let scores = match &mask.additive {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let window = self.cfg.attention_window(layer);
        let scores = match window {
            Some(w) => {
                scores.broadcast_add(&window_mask(w, p, scores.device(), scores.dtype())?)?
            }
            None => scores,
        };
        let scores = hook(hooks, at(BlockHook::AttnScores), scores)?;
        let pattern = if cpu::kernels_on(scores.device(), scores.dtype()) {
            let mut pattern = cpu::view(&scores.contiguous()?)?.slice().to_vec();
            kernels::softmax_rows_inplace(&mut pattern, p);
            cpu::tensor(pattern, scores.dims())?
        } else {
            // In float32 whatever the model's dtype, as PyTorch's softmax computes half inputs.
            let pattern = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
            // A row whose every key is masked is all -inf, and its softmax is 0/0.
            // TransformerLens turns those NaNs into 0 (such a query attends to nothing).
            // (A hook on the scores may have masked whole rows itself.)
            // (So may a padding query whose window holds padding only.)
            let may_empty_rows =
                mask.may_empty_rows || (window.is_some() && mask.padding.is_some());
            let pattern = if may_empty_rows || wants(hooks, at(BlockHook::AttnScores)) {
                pattern
                    .ne(&pattern)?
                    .where_cond(&pattern.zeros_like()?, &pattern)?
            } else {
                pattern
            };
            pattern.to_dtype(scores.dtype())?
        };
        let pattern = hook(hooks, at(BlockHook::Pattern), pattern)?;
        Ok(pattern.matmul(&v)?.transpose(1, 2)?.contiguous()?) // [b, p, h, dh]
    }
}

impl HookedBert {
    /// The gradient to a block's input (`resid_pre`) through its attention, from the gradient
    /// `d_out` of the attention's output `[batch, pos, d_model]`; the gradients at z, the
    /// pattern, the scores, q, k, v (and, when enabled, `hook_result` and the split inputs) go
    /// through `hooks` on the way.
    pub(super) fn attention_backward(
        &self,
        layer: usize,
        block: &Block,
        d_out: &Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p, d) = d_out.dims3()?;
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let dz = if self.cfg.use_attn_result {
            let heads = block.heads.as_ref().ok_or_else(missing_head_weights)?;
            // The output is Σ_h result[:, :, h] + b_O: every head's result gets d_out.
            let d_result = d_out
                .unsqueeze(2)?
                .broadcast_as((b, p, h, d))?
                .contiguous()?;
            let d_result = grad_hook(hooks, at(BlockHook::Result), d_result)?;
            // result[b, p, h] = z[b, p, h] @ W_O[h], so dz[b, p, h] = d_result[b, p, h] @ W_O[h]ᵀ.
            d_result
                .permute((2, 0, 1, 3))?
                .contiguous()?
                .reshape((h, b * p, d))?
                .matmul(&heads.w_o.t()?.contiguous()?)?
                .reshape((h, b, p, dh))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
        } else {
            block.attn_out.backward(d_out)?.reshape((b, p, h, dh))?
        };
        let dz = grad_hook(hooks, at(BlockHook::Z), dz)?;

        // Heads first, [b, h, p, dh], as the matmuls want them.
        let heads_first = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let v = heads_first(&tape.take(at(BlockHook::V))?.after)?;
        let pattern = tape.take(at(BlockHook::Pattern))?;
        let dz = heads_first(&dz)?;
        // z = pattern @ v
        let d_pattern = dz.matmul(&v.t()?.contiguous()?)?;
        let dv = pattern.after.t()?.contiguous()?.matmul(&dz)?;
        drop(v);
        let d_pattern = grad_hook(hooks, at(BlockHook::Pattern), d_pattern)?;
        // pattern = softmax(scores): d_scores = P ⊙ (dP - Σ_k P dP). Masked keys have P = 0
        // and get no gradient, as do rows that attend to nothing.
        let p_soft = &pattern.before;
        let d_scores =
            (p_soft * d_pattern.broadcast_sub(&(p_soft * &d_pattern)?.sum_keepdim(D::Minus1)?)?)?;
        drop(pattern);
        let d_scores = grad_hook(hooks, at(BlockHook::AttnScores), d_scores)?;
        // scores = q kᵀ / sqrt(d_head) + bias + mask: the bias shared by every layer gets the
        // sum of their score gradients (kept only when asked for).
        if self.relative_attention_bias.is_some() && hooks.wants_grad(HookPoint::RelPosBias) {
            tape.d_relative_bias = Some(match tape.d_relative_bias.take() {
                Some(sum) => (sum + &d_scores)?,
                None => d_scores.clone(),
            });
        }
        let scale = 1.0 / (dh as f64).sqrt();
        // The scores were made from the rotated q and k where positions are rotary.
        let tables = self.rotary_tables(layer, p);
        let [q_point, k_point] = match tables {
            Some(_) => [BlockHook::RotQ, BlockHook::RotK],
            None => [BlockHook::Q, BlockHook::K],
        };
        let q = heads_first(&tape.take(at(q_point))?.after)?;
        let k = heads_first(&tape.take(at(k_point))?.after)?;
        let dq = (d_scores.matmul(&k)? * scale)?;
        let dk = (d_scores.t()?.contiguous()?.matmul(&q)? * scale)?;
        // Back to [b, p, h, dh], the layout of the q, k and v hook points.
        let back = |t: Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (dq, dk) = (back(dq)?, back(dk)?);
        let (dq, dk) = match tables {
            // A rotation's gradient is the gradient turned back.
            Some(tables) => {
                let dk = grad_hook(hooks, at(BlockHook::RotK), dk)?;
                let dq = grad_hook(hooks, at(BlockHook::RotQ), dq)?;
                let inverse = tables.inverse();
                (self.rotate(&dq, &inverse)?, self.rotate(&dk, &inverse)?)
            }
            None => (dq, dk),
        };
        let dv = grad_hook(hooks, at(BlockHook::V), back(dv)?)?;
        let dk = grad_hook(hooks, at(BlockHook::K), dk)?;
        let dq = grad_hook(hooks, at(BlockHook::Q), dq)?;
        if self.cfg.use_split_qkv_input {
            let heads = block.heads.as_ref().ok_or_else(missing_head_weights)?;
            let kinds = [BlockHook::QInput, BlockHook::KInput, BlockHook::VInput];
            let mut d_resid: Option<Tensor> = None;
            for (i, grad) in [dq, dk, dv].into_iter().enumerate().rev() {
                // q[b, p, h] = input[b, p, h] @ W_Q[h] + b_Q[h], W_Q[h]: [d_model, d_head].
                let d_input = grad
                    .permute((2, 0, 1, 3))?
                    .contiguous()?
                    .reshape((h, b * p, dh))?
                    .matmul(&heads.w_qkv[i].t()?.contiguous()?)?
                    .reshape((h, b, p, d))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?;
                let d_input = grad_hook(hooks, at(kinds[i]), d_input)?.sum(2)?;
                d_resid = Some(match d_resid {
                    Some(sum) => (sum + d_input)?,
                    None => d_input,
                });
            }
            d_resid.ok_or_else(missing_head_weights)
        } else {
            let a = h * dh;
            let d_qkv = Tensor::cat(
                &[
                    dq.reshape((b, p, a))?,
                    dk.reshape((b, p, a))?,
                    dv.reshape((b, p, a))?,
                ],
                2,
            )?;
            block.qkv.backward(&d_qkv)
        }
    }
}
