//! MPNet's relative position bias: one `[n_heads]` vector per bucket of key-minus-query
//! distance, shared by every layer and added to each layer's attention scores before the mask.
//! Forward (the bias, through `hook_rel_pos_bias`) and backward (its gradient: the sum of every
//! layer's score gradients).

use super::*;

/// The buckets and the distance at which `transformers`' MPNet buckets relative positions,
/// whatever the config's `relative_attention_num_buckets` says (`compute_position_bias` calls
/// `relative_position_bucket` with its defaults).
const BUCKETS: i64 = 32;
const MAX_DISTANCE: i64 = 128;

/// Rows the bias table needs: every bucket [`bucket`] can return.
pub(crate) const TABLE_ROWS: usize = BUCKETS as usize;

/// The bucket of a key `relative = key - query` positions from its query, as `transformers`'
/// `MPNetEncoder.relative_position_bucket`: half the buckets for keys after the query, and in
/// each half exact distances below 8, then logarithmic bins up to 128.
fn bucket(relative: i64) -> u32 {
    let half = BUCKETS / 2;
    let n = -relative;
    let side = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    let within = if n < max_exact {
        n
    } else {
        // In float32, as torch computes it, so that the bins' edges fall where they do there;
        // `as i64` truncates as torch's `.to(torch.long)` does.
        let log_ratio = (n as f32 / max_exact as f32).ln();
        let log_range = ((MAX_DISTANCE as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact + (log_ratio / log_range * (half - max_exact) as f32) as i64;
        large.min(half - 1)
    };
    (side + within) as u32
}

impl HookedBert {
    /// The relative position bias `[batch, head, query, key]` (the same for every row: it
    /// depends on positions only, counted `0..pos` with padding included, as `transformers`
    /// counts them), passed through `hook_rel_pos_bias`; `None` for models without one.
    pub(super) fn relative_position_bias(
        &self,
        b: usize,
        p: usize,
        hooks: &mut dyn Hooks,
    ) -> Result<Option<Tensor>> {
        let Some(table) = &self.relative_attention_bias else {
            return Ok(None);
        };
        let h = self.cfg.n_heads;
        let buckets: Vec<u32> = (0..p as i64)
            .flat_map(|query| (0..p as i64).map(move |key| bucket(key - query)))
            .collect();
        let bias = table
            .index_select(&Tensor::from_vec(buckets, p * p, &self.device)?, 0)? // [q*k, h]
            .t()?
            .reshape((1, h, p, p))?
            .broadcast_as((b, h, p, p))?;
        // Contiguous once here, not in each of the layers that read it.
        Ok(Some(
            hook(hooks, HookPoint::RelPosBias, bias)?.contiguous()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_near_the_query_then_logarithmic_and_split_by_side() {
        // Keys before the query (relative < 0) use buckets 0..16, keys after it 16..32.
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(-7), 7);
        assert_eq!(bucket(7), 16 + 7);
        // 8 + floor(ln(n / 8) / ln(16) * 8): n = 12 -> 9, n = 127 -> 15, capped at 15 beyond.
        assert_eq!(bucket(-12), 9);
        assert_eq!(bucket(-127), 15);
        assert_eq!(bucket(-5000), 15);
        assert_eq!(bucket(5000), 31);
        assert!((-600..600).all(|r| (bucket(r) as usize) < TABLE_ROWS));
    }
}
