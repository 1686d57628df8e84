//! Multi-head attention on float32 rows: scores, mask, softmax and `@ v` per head, fused into
//! one task per head (or per block of queries in windowed attention) unless a hook asks for
//! the scores or the pattern, which are then materialised ([`attention_scores`],
//! [`attention_z`]). The products read each head's strided rows in place (see [`Products`]).

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{softmax_row, SharedOut};
use crate::packed_matmul::{self, small_product, Strided};

/// How the per-head products (`q · kᵀ`, `pattern · v`) are computed: with the packed matmul's
/// microkernels where they pay, as for the projections (see
/// [`packed_matmul::pays_on_this_cpu`]), with `gemm` elsewhere.
///
/// `gemm` packs both operands on every call and, in our build, runs its AVX2 kernels on
/// AVX-512 CPUs too: its packing, dispatch and kernels took about 4% of an all-MiniLM-L6-v2
/// `encode` (`perf`, Zen 4), whose attention is under 2% of the arithmetic. Here only `kᵀ` and
/// `v` are packed, `q` and the pattern are read in place. Measured on AMD EPYC Zen 4, 2
/// threads, [`attention_fused`] alone with a padding mask, 12 heads: 0.69x `gemm`'s time at
/// 32 x 16 positions and 0.83x at 32 x 40 (`d_head` 32, all-MiniLM-L6-v2's), 0.92x at 1 x 128
/// and 0.95x at 8 x 128 (`d_head` 64, bert-base's); with the same bits there (both add the
/// products over `d_head` in order, one FMA at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Products {
    Packed,
    Gemm,
}

impl Products {
    fn for_this_cpu() -> Self {
        if packed_matmul::pays_on_this_cpu() {
            Self::Packed
        } else {
            Self::Gemm
        }
    }
}

/// One task's [`Products`], with its buffer for the packed operand (reused from head to head).
struct TaskProducts {
    products: Products,
    packed: Vec<f32>,
}

impl TaskProducts {
    fn new(products: Products) -> Self {
        Self {
            products,
            packed: Vec::new(),
        }
    }
}

/// The shape of a multi-head attention computation.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Rows in the batch.
    pub batch: usize,
    /// Positions per row.
    pub pos: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of a head.
    pub d_head: usize,
}

/// Per-head vectors laid out `[batch, pos, ..., heads, d_head]`: the vector of head `h` at
/// `(b, p)` starts at `(b * pos + p) * row_stride + h * d_head`. The fused QKV projection gives
/// `row_stride = 3 * heads * d_head`; a `[batch, pos, heads, d_head]` tensor gives
/// `heads * d_head`.
#[derive(Debug, Clone, Copy)]
pub struct Heads<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Distance between consecutive positions.
    pub row_stride: usize,
}

/// What is added to the scaled scores: a bias, and where padding, causality and a window
/// forbid attention.
#[derive(Debug, Clone, Copy)]
pub struct KeyMask<'a> {
    /// `[batch, pos]`: 0 where a key may be attended to, `-inf` where it is padding.
    pub padding: Option<&'a [f32]>,
    /// Whether query `i` may only see keys `0..=i`.
    pub causal: bool,
    /// `[batch, heads, pos, pos]`, added before the mask (MPNet's relative position bias).
    pub bias: Option<&'a [f32]>,
    /// Query `i` may only see keys `j` with `|i - j| <= window` (ModernBERT's local layers).
    pub window: Option<usize>,
}

impl KeyMask<'_> {
    /// The keys that queries `queries` may see at all, of `pos`: every key, or the band the
    /// window leaves them.
    fn key_range(&self, queries: &Range<usize>, pos: usize) -> Range<usize> {
        match self.window {
            Some(w) => queries.start.saturating_sub(w)..(queries.end + w).min(pos),
            None => 0..pos,
        }
    }
}

/// Query rows per task in windowed attention: each task's keys are its queries' band, so the
/// work grows with `pos × window`, not `pos²`.
const WINDOW_QUERY_ROWS: usize = 64;

/// One head's attention problem: batch row `b`, head `h`, query rows `queries` against key
/// rows `keys` (absolute positions).
struct Tile {
    b: usize,
    h: usize,
    queries: Range<usize>,
    keys: Range<usize>,
}

/// `scores = q[b, queries, h] · k[b, keys, h]ᵀ * scale`, then the bias and key mask, into `out`
/// (`[queries, keys]`, row-major).
fn tile_scores(
    [q, k]: [Heads<'_>; 2],
    s: AttentionShape,
    tile: &Tile,
    scale: f32,
    mask: KeyMask<'_>,
    out: &mut [f32],
    task: &mut TaskProducts,
) {
    let (p, (b, h)) = (s.pos, (tile.b, tile.h));
    let (rows, width) = (tile.queries.len(), tile.keys.len());
    let offset = |heads: Heads<'_>, first: usize| (b * p + first) * heads.row_stride + h * s.d_head;
    let (q_start, k_start) = (offset(q, tile.queries.start), offset(k, tile.keys.start));
    let needed =
        |heads: Heads<'_>, start: usize, n: usize| start + (n - 1) * heads.row_stride + s.d_head;
    assert!(
        rows > 0
            && width > 0
            && tile.queries.end <= p
            && tile.keys.end <= p
            && needed(q, q_start, rows) <= q.data.len()
            && needed(k, k_start, width) <= k.data.len()
            && out.len() == rows * width
    );
    match task.products {
        // SAFETY: `out` is this caller's, rows * width contiguous; the reads are checked.
        Products::Packed => unsafe {
            small_product(
                Strided {
                    data: &q.data[q_start..],
                    row_stride: q.row_stride,
                    column_stride: 1,
                },
                // `kᵀ`: step `c` of key `j` at `j * row_stride + c`.
                Strided {
                    data: &k.data[k_start..],
                    row_stride: 1,
                    column_stride: k.row_stride,
                },
                (rows, s.d_head, width),
                out.as_mut_ptr(),
                width,
                &mut task.packed,
            )
        },
        // SAFETY: the assert above bounds every element gemm reads (`rows` query and `width`
        // key rows of one head's d_head columns) and writes (`out`, rows * width contiguous).
        Products::Gemm => unsafe {
            gemm::gemm(
                rows,
                width,
                s.d_head,
                out.as_mut_ptr(),
                1,
                width as isize,
                false,
                q.data.as_ptr().add(q_start),
                1,
                q.row_stride as isize,
                k.data.as_ptr().add(k_start),
                k.row_stride as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        },
    }
    for (i, row) in tile.queries.clone().zip(out.chunks_exact_mut(width)) {
        row.iter_mut().for_each(|x| *x *= scale);
        if let Some(bias) = mask.bias {
            let start = ((b * s.heads + h) * p + i) * p;
            let bias = &bias[start + tile.keys.start..start + tile.keys.end];
            row.iter_mut().zip(bias).for_each(|(x, add)| *x += add);
        }
        if let Some(padding) = mask.padding {
            let keys = &padding[b * p + tile.keys.start..b * p + tile.keys.end];
            row.iter_mut().zip(keys).for_each(|(x, m)| *x += m);
        }
        // Keys past the causal limit or outside the window, as offsets into this tile's keys.
        let mut last = tile.keys.end;
        if mask.causal {
            last = last.min(i + 1);
        }
        if let Some(w) = mask.window {
            last = last.min(i + w + 1);
            let first = i.saturating_sub(w).max(tile.keys.start);
            row[..first - tile.keys.start].fill(f32::NEG_INFINITY);
        }
        let last = last.max(tile.keys.start);
        row[last - tile.keys.start..].fill(f32::NEG_INFINITY);
    }
}

/// `z[b, queries, h] = pattern @ v[b, keys, h]` for one tile's pattern (`[queries, keys]`),
/// written into `z` (`[batch, pos, heads, d_head]`), which may be uninitialised there (with
/// `gemm` the tile's rows are zeroed first, in cache, just before it overwrites them: `gemm`
/// copies a partial tile's destination before it overwrites it, and that must not read
/// uninitialised memory).
fn tile_z(
    pattern: &[f32],
    v: Heads<'_>,
    s: AttentionShape,
    tile: &Tile,
    z: SharedOut,
    task: &mut TaskProducts,
) {
    let (p, (b, h)) = (s.pos, (tile.b, tile.h));
    let (rows, width) = (tile.queries.len(), tile.keys.len());
    let v_start = (b * p + tile.keys.start) * v.row_stride + h * s.d_head;
    assert!(
        rows > 0
            && width > 0
            && tile.queries.end <= p
            && v_start + (width - 1) * v.row_stride + s.d_head <= v.data.len()
            && pattern.len() == rows * width
    );
    let first = ((b * p + tile.queries.start) * s.heads + h) * s.d_head;
    let ldz = s.heads * s.d_head;
    // SAFETY (both): reads are bounded by the assert; the writes go to rows (b, queries) and
    // columns h * d_head .. (h + 1) * d_head of z, which no other task touches, and the caller
    // allocated z as [batch, pos, heads, d_head].
    if task.products == Products::Packed {
        unsafe {
            small_product(
                Strided {
                    data: pattern,
                    row_stride: width,
                    column_stride: 1,
                },
                Strided {
                    data: &v.data[v_start..],
                    row_stride: v.row_stride,
                    column_stride: 1,
                },
                (rows, width, s.d_head),
                z.at(first),
                ldz,
                &mut task.packed,
            )
        };
        return;
    }
    unsafe {
        for row in 0..rows {
            std::ptr::write_bytes(z.at(first + row * ldz), 0, s.d_head);
        }
        gemm::gemm(
            rows,
            s.d_head,
            width,
            z.at(first),
            1,
            ldz as isize,
            false,
            pattern.as_ptr(),
            1,
            width as isize,
            v.data.as_ptr().add(v_start),
            1,
            v.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The tile of a whole head: every query against every key.
fn whole_head(bh: usize, s: AttentionShape) -> Tile {
    Tile {
        b: bh / s.heads,
        h: bh % s.heads,
        queries: 0..s.pos,
        keys: 0..s.pos,
    }
}

/// Attention scores `[batch, heads, pos, pos]`, scaled and masked (for when they are hooked).
pub fn attention_scores(
    q: Heads<'_>,
    k: Heads<'_>,
    s: AttentionShape,
    scale: f32,
    mask: KeyMask<'_>,
) -> Vec<f32> {
    scores_with(q, k, s, scale, mask, Products::for_this_cpu())
}

fn scores_with(
    q: Heads<'_>,
    k: Heads<'_>,
    s: AttentionShape,
    scale: f32,
    mask: KeyMask<'_>,
    products: Products,
) -> Vec<f32> {
    let p = s.pos;
    let mut scores = vec![0f32; s.batch * s.heads * p * p];
    scores.par_chunks_mut(p * p).enumerate().for_each_init(
        || TaskProducts::new(products),
        |task, (bh, out)| tile_scores([q, k], s, &whole_head(bh, s), scale, mask, out, task),
    );
    scores
}

/// `z = pattern @ v` for every head, `[batch, pos, heads, d_head]`.
pub fn attention_z(pattern: &[f32], v: Heads<'_>, s: AttentionShape) -> Vec<f32> {
    z_with(pattern, v, s, Products::for_this_cpu())
}

fn z_with(pattern: &[f32], v: Heads<'_>, s: AttentionShape, products: Products) -> Vec<f32> {
    let p = s.pos;
    let len = s.batch * p * s.heads * s.d_head;
    let mut z: Vec<f32> = Vec::with_capacity(len);
    let out = SharedOut(z.as_mut_ptr());
    pattern.par_chunks(p * p).enumerate().for_each_init(
        || TaskProducts::new(products),
        |task, (bh, pattern)| tile_z(pattern, v, s, &whole_head(bh, s), out, task),
    );
    // SAFETY: one tile per (batch row, head), each writing all its queries' `d_head` columns.
    unsafe { z.set_len(len) };
    z
}

/// The whole attention (scores, mask, softmax, `@ v`) per head in one task, with the scores
/// living only in a per-task scratch buffer. With a window narrower than the sequence, each
/// task takes a block of queries and only the keys of their band. Returns z, `[batch, pos,
/// heads, d_head]`.
pub fn attention_fused(
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    s: AttentionShape,
    scale: f32,
    mask: KeyMask<'_>,
) -> Vec<f32> {
    fused_with([q, k, v], s, scale, mask, Products::for_this_cpu())
}

fn fused_with(
    [q, k, v]: [Heads<'_>; 3],
    s: AttentionShape,
    scale: f32,
    mask: KeyMask<'_>,
    products: Products,
) -> Vec<f32> {
    let p = s.pos;
    let query_rows = match mask.window {
        Some(w) if 2 * w + 1 < p => WINDOW_QUERY_ROWS.min(p),
        _ => p,
    };
    let blocks = p.div_ceil(query_rows);
    // Not zeroed here (see `rows_filled`): each tile writes its own rows (`tile_z`).
    let len = s.batch * p * s.heads * s.d_head;
    let mut z: Vec<f32> = Vec::with_capacity(len);
    let out = SharedOut(z.as_mut_ptr());
    (0..s.batch * s.heads * blocks)
        .into_par_iter()
        .for_each_init(
            || (vec![0f32; query_rows * p], TaskProducts::new(products)),
            |(scores, task_products), task| {
                let (bh, block) = (task / blocks, task % blocks);
                let queries = block * query_rows..((block + 1) * query_rows).min(p);
                let keys = mask.key_range(&queries, p);
                let tile = Tile {
                    b: bh / s.heads,
                    h: bh % s.heads,
                    queries,
                    keys,
                };
                let scores = &mut scores[..tile.queries.len() * tile.keys.len()];
                tile_scores([q, k], s, &tile, scale, mask, scores, task_products);
                scores
                    .chunks_exact_mut(tile.keys.len())
                    .for_each(softmax_row);
                tile_z(scores, v, s, &tile, out, task_products);
            },
        );
    // SAFETY: the tasks cover every (batch row, head, query block), and `tile_z` writes all
    // `d_head` columns of each of its queries' rows.
    unsafe { z.set_len(len) };
    z
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::softmax_rows_inplace;

    /// Deterministic fused q, k, v rows for `s`, `[batch * pos, 3 * heads * d_head]`, in
    /// [-1, 1).
    fn fused_qkv(s: AttentionShape) -> Vec<f32> {
        (0..s.batch * s.pos * 3 * s.heads * s.d_head)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect()
    }

    /// Part `i` (0: q, 1: k, 2: v) of a fused buffer from [`fused_qkv`].
    fn part(qkv: &[f32], s: AttentionShape, i: usize) -> Heads<'_> {
        let a = s.heads * s.d_head;
        Heads {
            data: &qkv[i * a..],
            row_stride: 3 * a,
        }
    }

    #[test]
    fn fused_attention_equals_its_parts() {
        let s = AttentionShape {
            batch: 2,
            pos: 5,
            heads: 3,
            d_head: 4,
        };
        let a = s.heads * s.d_head;
        let qkv = fused_qkv(s);
        let heads = |i: usize| part(&qkv, s, i);
        let padding: Vec<f32> = (0..10)
            .map(|i| {
                if i == 4 || i >= 8 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        // A bias [batch, heads, pos, pos] (MPNet's relative position bias), as in the model.
        let bias: Vec<f32> = (0..2 * 3 * 25)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let mask = KeyMask {
            bias: Some(&bias),
            padding: Some(&padding),
            causal: false,
            window: None,
        };
        let fused = attention_fused(heads(0), heads(1), heads(2), s, 0.5, mask);
        let mut pattern = attention_scores(heads(0), heads(1), s, 0.5, mask);
        softmax_rows_inplace(&mut pattern, s.pos);
        assert_eq!(fused, attention_z(&pattern, heads(2), s));
        // Check one element by hand: batch 1, head 2, query 3, dim 1.
        let (b, h, i, d) = (1, 2, 3, 1);
        let q = |p: usize, c: usize| qkv[(b * 5 + p) * 3 * a + h * 4 + c];
        let k = |p: usize, c: usize| qkv[(b * 5 + p) * 3 * a + a + h * 4 + c];
        let v = |p: usize, c: usize| qkv[(b * 5 + p) * 3 * a + 2 * a + h * 4 + c];
        let scores: Vec<f64> = (0..5)
            .map(|j| {
                (0..4).map(|c| (q(i, c) * k(j, c)) as f64).sum::<f64>() * 0.5
                    + bias[((b * 3 + h) * 5 + i) * 5 + j] as f64
                    + padding[b * 5 + j] as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let expected: f64 = (0..5).map(|j| weights[j] / total * v(j, d) as f64).sum();
        let got = fused[((b * 5 + i) * 3 + h) * 4 + d] as f64;
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn the_packed_kernels_and_gemm_give_the_same_attention() {
        // Heads of all-MiniLM-L6-v2's width (32) and bert-base's (64), and one narrower than a
        // panel; positions not a multiple of a tile or a panel; every kind of mask.
        for (d_head, pos) in [(32, 37), (64, 130), (20, 9)] {
            let s = AttentionShape {
                batch: 2,
                pos,
                heads: 3,
                d_head,
            };
            let qkv = fused_qkv(s);
            let heads = [0, 1, 2].map(|i| part(&qkv, s, i));
            let padding: Vec<f32> = (0..2 * pos)
                .map(|i| {
                    if i >= 2 * pos - 3 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let bias: Vec<f32> = (0..2 * 3 * pos * pos)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let masks = [
                (Some(&padding[..]), None, false, None),
                (Some(&padding[..]), Some(&bias[..]), false, None),
                (None, None, true, None),
                (None, None, false, Some(3)),
            ];
            for (padding, bias, causal, window) in masks {
                let mask = KeyMask {
                    padding,
                    bias,
                    causal,
                    window,
                };
                let [packed, gemm] = [Products::Packed, Products::Gemm].map(|products| {
                    let scores = scores_with(heads[0], heads[1], s, 0.17, mask, products);
                    let mut pattern = scores.clone();
                    softmax_rows_inplace(&mut pattern, pos);
                    let z = z_with(&pattern, heads[2], s, products);
                    let fused = fused_with(heads, s, 0.17, mask, products);
                    [scores, z, fused]
                });
                for (what, (a, b)) in ["scores", "z", "fused"]
                    .iter()
                    .zip(packed.iter().zip(&gemm))
                {
                    assert_eq!(a.len(), b.len());
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            x == y || (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                            "{what}, d_head {d_head}, pos {pos}, padding {}, bias {}, causal \
                             {causal}, window {window:?}: {x} vs {y}",
                            padding.is_some(),
                            bias.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn windowed_attention_sees_only_its_band_and_the_banded_kernel_agrees() {
        // Long enough that the fused kernel takes blocks of queries against their band only.
        let s = AttentionShape {
            batch: 2,
            pos: 150,
            heads: 2,
            d_head: 4,
        };
        let qkv = fused_qkv(s);
        let heads = |i: usize| part(&qkv, s, i);
        let padding: Vec<f32> = (0..s.batch * s.pos)
            .map(|i| if i > 280 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let mask = KeyMask {
            bias: None,
            padding: Some(&padding),
            causal: false,
            window: Some(10),
        };
        let scores = attention_scores(heads(0), heads(1), s, 0.5, mask);
        let p = s.pos;
        for (bh, head) in scores.chunks_exact(p * p).enumerate() {
            for (i, row) in head.chunks_exact(p).enumerate() {
                for (j, x) in row.iter().enumerate() {
                    let padded = (bh / s.heads) * p + j > 280;
                    assert_eq!(x.is_finite(), i.abs_diff(j) <= 10 && !padded, "{i} {j}");
                }
            }
        }
        let mut pattern = scores;
        softmax_rows_inplace(&mut pattern, p);
        let expected = attention_z(&pattern, heads(2), s);
        let fused = attention_fused(heads(0), heads(1), heads(2), s, 0.5, mask);
        let worst = fused
            .iter()
            .zip(&expected)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "{worst}");
    }
}
