//! `y = x Wᵀ` against a weight packed once, when the model loads.
//!
//! `gemm` (Candle's CPU matmul) packs both operands on every call. For a layer's weight that is
//! the same work each forward repeats: at 128 rows `perf` puts 15% of a bert-base forward in
//! `gemm`'s packing, and ONNX Runtime's MLAS avoids it by packing each weight when a model
//! loads. [`PackedWeight`] does the same: the weight is stored only in the layout the
//! microkernel reads (panels of [`PANEL`] output columns, each `k` rows of 16 contiguous
//! floats). `x` is read where it lies, one broadcast per row and step of `k`, except with many
//! rows (see [`COPY_X_ROWS`]).
//!
//! The AVX2 microkernel keeps a 6 x 16 tile of the output in 12 registers (the shape of
//! OpenBLAS's and BLIS's Haswell kernels): per step of `k` it loads 16 weights, broadcasts 6
//! inputs and issues 12 FMAs. The AVX-512 one keeps an 8 x 16 tile in 8 registers of 16 lanes
//! (one load, 8 broadcasts, 8 FMAs per step). How the product is blocked depends on whether `x`
//! is copied (see [`Blocking`]).
//!
//! With few rows the product is bound by reading the weights from memory (bert-base's blocks
//! hold 340 MB of them): the first tile of every panel slice waits on memory while the other
//! tiles find the slice in cache. So the first tile also prefetches the next slice into L2, one
//! cache line per step of `k`, and the memory stream overlaps the arithmetic.
//! Other CPUs run a portable kernel on the same layout. [`small_product`] runs the same
//! microkernels on attention's per-head products, packing their right-hand operand per call.
//!
//! The constants were chosen by A/B runs alternated call by call in one process (the speed of
//! the shared machines they ran on swings by 10-40% between processes), bert-base's forward,
//! 2 threads. AMD EPYC Zen 3 (AVX2): prefetching sped 1x16 up by 11%, 1x128 by 3%, 8x128 by
//! 2% (two slices ahead, or into L2, measured the same there); one `k` block instead of
//! 256-step blocks without the copy, 1x128 by 4%; row blocks of 24 instead of 120 with it,
//! 8x128 by about 5%. AMD EPYC Zen 4 (AVX-512): prefetching into L2 rather than L1 made 1x16
//! 0.85x the time with the AVX-512 kernel and 0.89x with the AVX2 one, 1x128 0.96-0.97x, 8x128
//! 0.98-1.0x (into L1 the prefetches of a whole slice outrun the core's few L1 miss buffers),
//! and then the next slice beat the one after by 2-3% at 1x16; see also [`Kernel::Avx512`].

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{self, SharedOut};
use crate::simd::Simd;
use crate::Activation;

/// Output columns per packed panel: two AVX2 vectors.
pub const PANEL: usize = 16;
/// Rows of the output one AVX2 (or portable) microkernel call computes: 12 of the 16 AVX2
/// registers hold the 6 x 16 tile.
const TILE_ROWS: usize = 6;
/// Rows of the AVX-512 kernel's tile (one 16-lane register each, of 32). Measured on bert-base's
/// forward, Zen 4, alternated call by call in one process: 8 rows took 0.985-0.999x the time of
/// 6 (1x16 to 8x128; `packed_gflops` 1-5% faster on the layer shapes), 12 rows 1.05-1.10x the
/// time of 8; 16 rows ran the `k = 3072` layer at half speed (16 rows of `x` 12 KiB apart fall
/// in the same L1 set, which has 8 ways).
const AVX512_TILE_ROWS: usize = 8;
/// Above this many rows, each task copies its rows of `x` into the microkernel's order, except
/// with the AVX-512 kernel or a weight too big for L3 (see [`Blocking::new`]). (Measured on
/// bert-base's forward, Zen 3: copying slowed 1x16 and 1x128 by about 8%, and sped 8x128 up by
/// about 5%.)
const COPY_X_ROWS: usize = 256;
/// Weights above this many floats (32 MiB) are taken not to stay in L3 between row blocks.
const CACHED_WEIGHT_FLOATS: usize = 8 << 20;
/// Parallel tasks per thread: enough to even out the threads' finishing times.
const TASKS_PER_THREAD: usize = 8;

/// How a task walks its part of the product: rows in blocks of at most `row_block`, `k` in
/// blocks of `k_block` steps; every panel slice of a `k` block meets every row tile of a row
/// block before the next slice is read.
#[derive(Clone, Copy)]
struct Blocking {
    row_block: usize,
    k_block: usize,
    copy_x: bool,
}

impl Blocking {
    fn new(m: usize, n: usize, k: usize, kernel: Kernel) -> Self {
        if m > COPY_X_ROWS && kernel.copies_x() && n * k <= CACHED_WEIGHT_FLOATS {
            // Short row blocks (24 KiB of copied inputs per `k` block) measured faster than
            // blocks of 120 rows, though every row block re-reads the weight (from L2 or L3).
            Self {
                row_block: 24,
                k_block: 256,
                copy_x: true,
            }
        } else {
            // A weight too big for L3 (a vocabulary's unembedding) is read in place too: with
            // the copy, short row blocks re-read it from memory and `k` blocks store and reload
            // an output too big for L2 (bert-base's decoder, 89 MB, at 1024 rows: 446 ms in
            // blocks of 24 rows, 328 in blocks of 192, `gemm` 364; AVX2 kernel on Zen 4, 2
            // threads). Read in place in one `k` block, the logits at 8x128 and 32x128 took
            // 0.976-0.981x and 0.969-0.986x the time of blocks of 192 (Zen 4 held to AVX2,
            // alternated call by call in one process; a Zen 3 has not run it).
            //
            // Read in place, a `k` block costs nothing to set up but each block stores and
            // reloads the output tile: one block of all of `k`. Rows in blocks of 120 (two
            // blocks of 64 or 66 at 128 rows), whose inputs stay in L2.
            Self {
                row_block: 120,
                k_block: k.max(1),
                copy_x: false,
            }
        }
    }
}

/// How a product is cut into parallel tasks: row blocks (of at most about
/// [`Blocking::row_block`] rows, whole tiles) times groups of panels. Rows are cut first, and
/// columns only as far as the tasks are too few: every group of panels a task does not take
/// re-reads that task's rows of `x`, and every row block re-reads the weight.
///
/// Blocks and groups are as even as whole tiles and panels allow, and the task count is a
/// multiple of the thread count where the panels allow it, so that the threads finish together:
/// with about 8 tasks per thread, a last task left to one thread idles the other for a large
/// part of a task (on MiniLM's layers at 768 rows, 7 x 3 = 21 tasks of which the last row
/// block was 84 rows against 114).
struct TaskSplit {
    rows: usize,
    tile_rows: usize,
    tiles: usize,
    row_blocks: usize,
    panels: usize,
    groups: usize,
}

impl TaskSplit {
    fn new(rows: usize, tile_rows: usize, row_block: usize, panels: usize, threads: usize) -> Self {
        let (tiles, panels, threads) = (
            rows.div_ceil(tile_rows).max(1),
            panels.max(1),
            threads.max(1),
        );
        let mut row_blocks = rows.div_ceil(row_block).clamp(1, tiles);
        let wanted = TASKS_PER_THREAD * threads;
        let mut groups = wanted.div_ceil(row_blocks).clamp(1, panels);
        let fits = |blocks: usize, groups: usize| (blocks * groups).is_multiple_of(threads);
        if groups == 1 {
            // Rows alone make the tasks: cut them a little finer rather than re-read every
            // row twice for a second group of panels.
            if let Some(blocks) = (row_blocks..=tiles).find(|&b| fits(b, 1)) {
                row_blocks = blocks;
            }
        } else if let Some(even) = (groups..=panels).find(|&g| fits(row_blocks, g)) {
            groups = even;
        }
        Self {
            rows,
            tile_rows,
            tiles,
            row_blocks,
            panels,
            groups,
        }
    }

    fn tasks(&self) -> usize {
        self.row_blocks * self.groups
    }

    /// Task `task`'s rows and panels.
    fn task(&self, task: usize) -> (Range<usize>, Range<usize>) {
        let (block, group) = (task / self.groups, task % self.groups);
        let tiles = even_part(block, self.row_blocks, self.tiles);
        (
            tiles.start * self.tile_rows..(tiles.end * self.tile_rows).min(self.rows),
            even_part(group, self.groups, self.panels),
        )
    }
}

/// Part `i` of `0..total` cut into `parts` consecutive ranges whose lengths differ by at most 1.
fn even_part(i: usize, parts: usize, total: usize) -> Range<usize> {
    i * total / parts..(i + 1) * total / parts
}

/// A weight `W` (`[n, k]`, Hugging Face's `[out, in]` layout), stored as `ceil(n / 16)` panels
/// of `[k, 16]`, the last one padded with zeros.
#[derive(Clone)]
pub struct PackedWeight {
    panels: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Packs `w` (`[n, k]`, row-major).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "weight of {} floats is not [{n}, {k}]",
            w.len()
        );
        let mut panels = vec![0.0f32; n.div_ceil(PANEL) * PANEL * k];
        panels
            // (`max(1)`: with `k == 0` there are no panels to fill.)
            .par_chunks_mut((PANEL * k).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for column in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + column) * k..][..k];
                    for (step, &value) in row.iter().enumerate() {
                        panel[step * PANEL + column] = value;
                    }
                }
            });
        Self { panels, n, k }
    }

    /// Output features (`n`).
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features (`k`).
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// The weight in its original `[n, k]` layout.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(row, out)| self.copy_row(row, out));
        w
    }

    /// Rows `ids` of the weight, `[ids.len(), k]`: an embedding lookup in a table tied to an
    /// unembedding that is stored only packed (rows are gathered in parallel: see
    /// [`Self::copy_row`]).
    pub fn gather_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0.0f32; ids.len() * self.k];
        out.par_chunks_mut(self.k.max(1))
            .zip(ids)
            .for_each(|(row, &id)| self.copy_row(id as usize, row));
        out
    }

    /// Row `row` of the weight (`k` floats) into `out`. It is column `row % 16` of panel
    /// `row / 16`: `k` floats 16 apart, one cache line each.
    fn copy_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.n, "row {row} of a weight with {} rows", self.n);
        let k = self.k;
        let panel = &self.panels[(row / PANEL) * PANEL * k..][..PANEL * k];
        for (value, step) in out.iter_mut().zip(panel.chunks_exact(PANEL)) {
            *value = step[row % PANEL];
        }
    }

    /// `x Wᵀ` for `x` of `m` rows (`[m, k]`, row-major): `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Epilogue::default(), Kernel::best())
    }

    /// `act(x Wᵀ + bias)` (`bias` of `n`, `act` optional): the microkernel adds the bias to
    /// its tile's sums before it stores them, and each task applies the activation to its part
    /// of the output as soon as it has computed it, while it is in L2, instead of another pass
    /// over the whole output (see [`Epilogue::apply`]).
    pub fn matmul_bias_act(
        &self,
        x: &[f32],
        m: usize,
        bias: &[f32],
        act: Option<Activation>,
    ) -> Vec<f32> {
        assert_eq!(
            bias.len(),
            self.n,
            "bias of {} for {} outputs",
            bias.len(),
            self.n
        );
        let epilogue = Epilogue {
            bias: Some(bias),
            act,
        };
        self.matmul_with(x, m, epilogue, Kernel::best())
    }

    /// [`Self::matmul_bias_act`] with a given kernel (the tests run every one this CPU can).
    fn matmul_with(&self, x: &[f32], m: usize, epilogue: Epilogue<'_>, kernel: Kernel) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(
            x.len(),
            m * k,
            "input of {} floats is not [{m}, {k}]",
            x.len()
        );
        if m == 0 || k == 0 {
            let mut out = vec![0.0; m * n];
            if let Some(bias) = epilogue.bias {
                out.chunks_exact_mut(n.max(1))
                    .for_each(|row| kernels::bias_act_row(row, bias, epilogue.act));
            }
            return out;
        }
        // Not zeroed: the first `k` block of every tile overwrites its elements, and zeroing
        // ~m·n floats first cost 2% of a small-model forward (`memset` in `perf`).
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let (tile_kernel, tile_rows) = (kernel.tile_kernel(), kernel.tile_rows());
        let out_ptr = SharedOut(out.as_mut_ptr());
        // With many rows, each task's rows of `x` for one `k` block are copied tile by tile,
        // each `[steps, tile_rows]`, so that the microkernel's broadcasts read one sequential
        // stream; with few, the copy costs more than the strided reads it saves.
        let Blocking {
            row_block,
            k_block,
            copy_x,
        } = Blocking::new(m, n, k, kernel);
        let split = TaskSplit::new(
            m,
            tile_rows,
            row_block,
            n.div_ceil(PANEL),
            rayon::current_num_threads(),
        );
        (0..split.tasks()).into_par_iter().for_each(|task| {
            let (rows, panels) = split.task(task);
            let mut block = if copy_x {
                vec![0.0f32; rows.len().next_multiple_of(tile_rows) * k_block.min(k)]
            } else {
                Vec::new()
            };
            for k0 in (0..k).step_by(k_block) {
                let steps = k_block.min(k - k0);
                if copy_x {
                    for (tile, first) in rows.clone().step_by(tile_rows).enumerate() {
                        let packed = &mut block[tile * tile_rows * steps..][..tile_rows * steps];
                        let tile_x = first..(first + tile_rows).min(rows.end);
                        kernel.copy_x(x, k, tile_x, k0..k0 + steps, packed);
                    }
                }
                for p in panels.clone() {
                    let panel = &self.panels[p * PANEL * k + k0 * PANEL..][..steps * PANEL];
                    let columns = PANEL.min(n - p * PANEL);
                    // The same `k` block one panel on: this task's next slice, or (at its
                    // last panel) another task's, which is harmless.
                    let next_slice = self.panels.get((p + 1) * PANEL * k + k0 * PANEL..);
                    // The panel's columns of the bias, added once the last `k` block is summed.
                    let bias = epilogue
                        .bias
                        .filter(|_| k0 + steps == k)
                        .map(|bias| &bias[p * PANEL..][..columns]);
                    for (tile, first) in rows.clone().step_by(tile_rows).enumerate() {
                        let (x, row_stride, step_stride) = if copy_x {
                            (&block[tile * tile_rows * steps..], 1, tile_rows)
                        } else {
                            (&x[first * k + k0..], k, 1)
                        };
                        let tile = Tile {
                            x,
                            row_stride,
                            step_stride,
                            panel,
                            steps,
                            rows: tile_rows.min(rows.end - first),
                            columns,
                            out: out_ptr.at(first * n + p * PANEL),
                            ldo: n,
                            accumulate: k0 > 0,
                            bias,
                            prefetch: next_slice.filter(|_| tile == 0).map(<[f32]>::as_ptr),
                        };
                        // SAFETY: this task alone writes rows `rows` x panels `panels` of
                        // `out`; `kernel` is one this CPU can run (`Kernel::runs_here`).
                        unsafe { tile_kernel(&tile) };
                    }
                }
            }
            let columns = panels.start * PANEL..(panels.end * PANEL).min(n);
            // SAFETY: this task alone wrote (all of) these rows and columns of `out`.
            unsafe { epilogue.apply(out_ptr, n, rows, columns) };
        });
        // SAFETY: the tasks' rows and panels cover `[m, n]` (`TaskSplit`), and the first `k`
        // block of each tile wrote (`accumulate: false`, no read) every one of its elements.
        unsafe { out.set_len(m * n) };
        out
    }
}

/// A matrix read where it lies: element `(i, j)` is `data[i * row_stride + j * column_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) row_stride: usize,
    pub(crate) column_stride: usize,
}

impl Strided<'_> {
    /// Panics unless the matrix holds `rows` x `columns` elements.
    fn assert_holds(&self, rows: usize, columns: usize) {
        assert!(
            rows == 0
                || columns == 0
                || (rows - 1) * self.row_stride + (columns - 1) * self.column_stride
                    < self.data.len(),
            "a strided matrix of {} floats does not hold [{rows}, {columns}]",
            self.data.len()
        );
    }
}

/// `out = x · b` (`x`: `[m, k]`, `b`: `[k, n]`) on the calling thread, with the microkernel of
/// [`Simd::selected`]: attention's per-head products (`q · kᵀ` and `pattern · v`), which are
/// many, small, and each with its own `b`, so `b` is packed here (into `scratch`, `k` x `n`
/// floats: 1/m of the product's work) and the product is not split across threads. Row `r` of
/// the output is written (not added to) at `out + r * ldo`, `n` floats.
///
/// # Safety
/// `out` must be valid for writes of `m` rows of `n` floats, `ldo` apart, that no one else
/// reads or writes meanwhile.
pub(crate) unsafe fn small_product(
    x: Strided<'_>,
    b: Strided<'_>,
    (m, k, n): (usize, usize, usize),
    out: *mut f32,
    ldo: usize,
    scratch: &mut Vec<f32>,
) {
    // SAFETY: passed on from the caller.
    unsafe { small_product_with(x, b, (m, k, n), out, ldo, scratch, Kernel::best()) }
}

/// [`small_product`] with a given kernel (the tests run every one this CPU can).
///
/// # Safety
/// As [`small_product`].
unsafe fn small_product_with(
    x: Strided<'_>,
    b: Strided<'_>,
    (m, k, n): (usize, usize, usize),
    out: *mut f32,
    ldo: usize,
    scratch: &mut Vec<f32>,
    kernel: Kernel,
) {
    assert!(kernel.runs_here() && k > 0);
    x.assert_holds(m, k);
    b.assert_holds(k, n);
    // A last panel narrower than 16 keeps whatever its other lanes held: the kernels compute
    // them but store only the tile's columns.
    let len = n.div_ceil(PANEL) * k * PANEL;
    if scratch.len() < len {
        scratch.resize(len, 0.0);
    }
    let packed = &mut scratch[..len];
    for (p, panel) in packed.chunks_exact_mut(k * PANEL).enumerate() {
        let columns = p * PANEL..(p * PANEL + PANEL).min(n);
        #[cfg(target_arch = "x86_64")]
        if b.row_stride == 1 && kernel != Kernel::Portable {
            // SAFETY: `kernel` runs here (asserted), so the CPU has AVX2; `b` holds `k` x `n`
            // (asserted), so these columns' `k` steps are readable.
            unsafe {
                avx2::pack_transposed(
                    b.data.as_ptr().add(columns.start * b.column_stride),
                    b.column_stride,
                    columns.len(),
                    k,
                    panel,
                )
            };
            continue;
        }
        for (step, row) in panel.chunks_exact_mut(PANEL).enumerate() {
            let first = step * b.row_stride;
            if b.column_stride == 1 && columns.len() == PANEL {
                // (A constant length: a few vector moves, not a call to `memmove`.)
                row.copy_from_slice(&b.data[first + columns.start..][..PANEL]);
            } else {
                for (value, c) in row.iter_mut().zip(columns.clone()) {
                    *value = b.data[first + c * b.column_stride];
                }
            }
        }
    }
    let (tile_kernel, tile_rows) = (kernel.tile_kernel(), kernel.tile_rows());
    for (p, panel) in scratch[..len].chunks_exact(k * PANEL).enumerate() {
        for first in (0..m).step_by(tile_rows) {
            let tile = Tile {
                x: &x.data[first * x.row_stride..],
                row_stride: x.row_stride,
                step_stride: x.column_stride,
                panel,
                steps: k,
                rows: tile_rows.min(m - first),
                columns: PANEL.min(n - p * PANEL),
                // (`wrapping_add`: a pointer into the caller's buffer, which it vouches for.)
                out: out.wrapping_add(first * ldo + p * PANEL),
                ldo,
                accumulate: false,
                bias: None,
                prefetch: None,
            };
            // SAFETY: the tile's rows of `x` and its panel are in bounds (asserted above and
            // in the kernel), its part of `out` is the caller's, and the CPU runs the kernel.
            unsafe { tile_kernel(&tile) };
        }
    }
}

/// What is done to the product: add a bias (in the microkernel, see [`Tile::bias`]), then an
/// activation (see [`Epilogue::apply`]).
#[derive(Clone, Copy, Default)]
struct Epilogue<'a> {
    /// `[n]`; `None`: the product alone (then no activation either).
    bias: Option<&'a [f32]>,
    act: Option<Activation>,
}

impl Epilogue<'_> {
    /// Applies the activation to `rows` x `columns` of `out` (rows `n` apart): one task's part
    /// of the product, just computed, so still in L2 (each task's part is at most 120 rows x
    /// its group of panels). Per tile, in L1, measured 6% slower on MiniLM: the short loops did
    /// not vectorise as well. The bias is already in (same bits as adding it here; measured
    /// level, bert-base's forward 0.994-1.001x the time, Zen 4).
    ///
    /// # Safety
    /// `out` is the product's buffer; these rows and columns are this caller's alone, written.
    unsafe fn apply(&self, out: SharedOut, n: usize, rows: Range<usize>, columns: Range<usize>) {
        let Some(act) = self.act else { return };
        for row in rows {
            // SAFETY: the caller's contract.
            let row = unsafe {
                std::slice::from_raw_parts_mut(out.at(row * n + columns.start), columns.len())
            };
            kernels::act_row(row, act);
        }
    }
}

/// One microkernel call: `out[..rows, ..columns] (+)= x[..rows, ..steps] · panel[..steps, ..]`.
struct Tile<'a> {
    /// The tile's inputs: row `a` at step `s` is `x[a * row_stride + s * step_stride]`.
    x: &'a [f32],
    row_stride: usize,
    step_stride: usize,
    /// `[steps, 16]`.
    panel: &'a [f32],
    steps: usize,
    rows: usize,
    columns: usize,
    /// The tile's first output element; rows are `ldo` apart.
    out: *mut f32,
    ldo: usize,
    /// Add to the output (a later `k` block) instead of overwriting it.
    accumulate: bool,
    /// Added to the finished sums (in the last `k` block): the tile's `columns` of the bias,
    /// while they are in registers rather than in another pass over the output.
    bias: Option<&'a [f32]>,
    /// Where to prefetch one cache line per step (`steps` lines of 16 floats) into L2, if
    /// anywhere.
    prefetch: Option<*const f32>,
}

/// Computes one [`Tile`].
///
/// # Safety
/// `tile.out` must point at `rows` rows of `columns` floats, `ldo` apart, that no one else
/// touches meanwhile, and the CPU must run the kernel (see [`Kernel::runs_here`]).
type TileKernel = unsafe fn(&Tile<'_>);

/// Calls `$rows::<R>($tile)` with `R` = the tile's row count, as a constant: one instance of a
/// SIMD kernel per row count, so that its accumulators are registers.
macro_rules! by_row_count {
    ($rows:ident, $tile:expr) => {
        match $tile.rows {
            6 => $rows::<6>($tile),
            5 => $rows::<5>($tile),
            4 => $rows::<4>($tile),
            3 => $rows::<3>($tile),
            2 => $rows::<2>($tile),
            _ => $rows::<1>($tile),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use by_row_count;

impl Tile<'_> {
    /// Panics unless `rows` rows of `x` and the panel hold `steps` steps (what a SIMD kernel
    /// reads through raw pointers).
    #[cfg(target_arch = "x86_64")]
    fn assert_in_bounds(&self, rows: usize) {
        assert!(self.x.len() > (rows - 1) * self.row_stride + (self.steps - 1) * self.step_stride);
        assert!(self.panel.len() >= self.steps * PANEL);
        assert!(self.bias.is_none_or(|bias| bias.len() >= self.columns));
    }
}

/// Whether packing pays on this CPU: where an x86 kernel of ours runs. Elsewhere (Arm, old
/// x86) the portable kernel would lose to `gemm`'s SIMD, so the weights stay unpacked there.
///
/// With AVX-512 too: our `gemm` build has only its AVX2 (FMA) kernels, and packing measured
/// faster there (see [`Kernel::Avx512`]). `gemm`'s AVX-512 kernels sit behind its `x86-v4`
/// feature, which stays off: on Zen 4 (example `packed_gflops`, two builds, 2 threads, twice)
/// they ran bert-base's projections at 9.8-50 GFLOP/s against 38-98 for its AVX2 ones at 16
/// rows, 53-150 against 129-183 at 128 rows, and level to 6% faster at 1024 and 4096 rows.
pub fn pays_on_this_cpu() -> bool {
    Kernel::best() != Kernel::Portable
}

/// Which microkernel computes the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Portable,
    /// AVX2 and FMA (measured on AMD EPYC Zen 3).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F. Measured on AMD EPYC Zen 4 (2 threads, bert-base's encoder, alternated call
    /// by call against `gemm` and the AVX2 kernel): packed weights with this kernel took 0.75x
    /// of `gemm`'s time at 1x16, 0.85x at 1x128, 0.96x at 8x128 and 0.87x at 32x128; the AVX2
    /// kernel on the same layout was 1-2% slower (Zen 4 runs a 16-lane FMA as two 8-lane
    /// halves, so only the instruction count falls; CPUs with two 16-lane FMA units should
    /// gain more, unmeasured). There `x` is read in place at every size: the copy of
    /// [`COPY_X_ROWS`] made 8x128 3-4% and 32x128 about 3% slower one float at a time, and
    /// still measured level (0.99-1.006x, all-MiniLM-L6-v2's `encode` too) as a register
    /// transpose like the AVX2 one's.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The kernel of [`Simd::selected`]: the fastest this CPU runs, unless capped.
    fn best() -> Self {
        Self::of(Simd::selected())
    }

    /// The kernel of `level` (AVX-512 and AVX2 have their own; the portable one otherwise).
    fn of(level: Simd) -> Self {
        match level {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => Self::Avx512,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => Self::Avx2,
            _ => Self::Portable,
        }
    }

    fn runs_here(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => Simd::Avx2.runs_here(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => Simd::Avx512.runs_here(),
        }
    }

    /// Whether `x` is copied above [`COPY_X_ROWS`] rows (see [`Kernel::Avx512`]).
    fn copies_x(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => false,
        }
    }

    /// Copies `x`'s rows `rows` (at most a tile's), steps `steps`, into `packed` as
    /// `[steps.len(), tile_rows]`: the order the kernel's broadcasts read. The AVX2 kernel
    /// transposes whole tiles 8 steps at a time in registers: the copy one float at a time took
    /// 6% of an all-MiniLM-L6-v2 `encode` with that kernel (`perf`, Zen 4 capped to AVX2).
    fn copy_x(
        self,
        x: &[f32],
        k: usize,
        rows: Range<usize>,
        steps: Range<usize>,
        packed: &mut [f32],
    ) {
        let tile_rows = self.tile_rows();
        assert!(rows.len() <= tile_rows && packed.len() >= steps.len() * tile_rows);
        assert!(rows.is_empty() || (rows.end - 1) * k + steps.end <= x.len());
        #[cfg(target_arch = "x86_64")]
        if self == Self::Avx2 && rows.len() == TILE_ROWS && self.runs_here() {
            // SAFETY: the CPU has AVX2 (checked: a cached flag), and the asserts above bound
            // every read and write.
            unsafe {
                avx2::copy_x(
                    x.as_ptr().add(rows.start * k + steps.start),
                    k,
                    steps.len(),
                    packed,
                )
            };
            return;
        }
        for (a, r) in rows.enumerate() {
            for (step, &value) in x[r * k + steps.start..r * k + steps.end].iter().enumerate() {
                packed[step * tile_rows + a] = value;
            }
        }
    }

    /// Rows of the output tile the kernel keeps in registers.
    fn tile_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => AVX512_TILE_ROWS,
            _ => TILE_ROWS,
        }
    }

    fn tile_kernel(self) -> TileKernel {
        assert!(self.runs_here(), "this CPU cannot run the {self:?} kernel");
        match self {
            Self::Portable => portable_tile,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::tile,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => avx512::tile,
        }
    }
}

/// The portable [`TileKernel`].
///
/// # Safety
/// As [`TileKernel`].
unsafe fn portable_tile(tile: &Tile<'_>) {
    for row in 0..tile.rows {
        let mut acc = [0.0f32; PANEL];
        for step in 0..tile.steps {
            let xv = tile.x[row * tile.row_stride + step * tile.step_stride];
            for (a, &w) in acc.iter_mut().zip(&tile.panel[step * PANEL..][..PANEL]) {
                *a += xv * w;
            }
        }
        for (column, value) in acc.iter().enumerate().take(tile.columns) {
            // SAFETY: the caller's contract: this element is the tile's.
            unsafe {
                let out = tile.out.add(row * tile.ldo + column);
                let sum = if tile.accumulate {
                    *out + value
                } else {
                    *value
                };
                *out = tile.bias.map_or(sum, |bias| sum + bias[column]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, PANEL, TILE_ROWS};

    /// The AVX2 [`super::TileKernel`].
    ///
    /// # Safety
    /// As [`super::TileKernel`], and the CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(tile: &Tile<'_>) {
        // SAFETY: passed on from the caller.
        unsafe { super::by_row_count!(rows, tile) }
    }

    /// Copies 6 rows of `x` (`first[a * k + s]`, `s < steps`) into `packed` as `[steps, 6]`,
    /// 8 steps at a time: the 6 rows (and two zero ones) are an 8 x 8 block transposed in
    /// registers, whose 8 columns are stored 6 floats apart, each store's last two lanes
    /// overwritten by the next (the last store masked to 6).
    ///
    /// # Safety
    /// The CPU must have AVX2; `first` must be readable for `5 * k + steps` floats and
    /// `packed` hold `6 * steps`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn copy_x(first: *const f32, k: usize, steps: usize, packed: &mut [f32]) {
        debug_assert!(packed.len() >= TILE_ROWS * steps);
        let out = packed.as_mut_ptr();
        let six_lanes = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
        let mut s = 0;
        // SAFETY: `s + 8 <= steps`: the loads read steps `s..s + 8` of the 6 rows, and the
        // stores write floats `s * 6 .. (s + 8) * 6` of `packed` (the last one masked).
        unsafe {
            while s + 8 <= steps {
                let row = |a: usize| {
                    if a < TILE_ROWS {
                        _mm256_loadu_ps(first.add(a * k + s))
                    } else {
                        _mm256_setzero_ps()
                    }
                };
                // Column j: step s + j of rows 0..6, then two zeros.
                let columns = transpose(std::array::from_fn(row));
                for (j, column) in columns.into_iter().enumerate().take(7) {
                    _mm256_storeu_ps(out.add((s + j) * TILE_ROWS), column);
                }
                _mm256_maskstore_ps(out.add((s + 7) * TILE_ROWS), six_lanes, columns[7]);
                s += 8;
            }
            for s in s..steps {
                for a in 0..TILE_ROWS {
                    *out.add(s * TILE_ROWS + a) = *first.add(a * k + s);
                }
            }
        }
    }

    /// The 8 x 8 block `rows` transposed: lane `j` of result `i` is lane `i` of `rows[j]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn transpose(rows: [__m256; 8]) -> [__m256; 8] {
        let [r0, r1, r2, r3, r4, r5, r6, r7] = rows;
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// Packs the transpose of `columns` rows of `first` (`first[c * stride + s]`, `c <
    /// columns <= 16`, `s < steps`) as one panel, `panel[s * 16 + c]`, 8 x 8 blocks at a time
    /// through [`transpose`]; a panel's lanes past `columns` get zeros.
    ///
    /// # Safety
    /// The CPU must have AVX2; `first` must be readable for `(columns - 1) * stride + steps`
    /// floats and `panel` hold `16 * steps`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pack_transposed(
        first: *const f32,
        stride: usize,
        columns: usize,
        steps: usize,
        panel: &mut [f32],
    ) {
        debug_assert!(columns <= PANEL && panel.len() >= PANEL * steps);
        let out = panel.as_mut_ptr();
        for half in 0..PANEL / 8 {
            let keys = columns.saturating_sub(half * 8).min(8);
            let mut s = 0;
            // SAFETY: rows `half * 8 + c` for `c < keys` are among the `columns` readable
            // ones, steps `s..s + 8` within `steps`; the stores write lanes `half * 8..+8` of
            // steps `s..s + 8` of the panel.
            unsafe {
                while s + 8 <= steps {
                    let row = |c: usize| {
                        if c < keys {
                            _mm256_loadu_ps(first.add((half * 8 + c) * stride + s))
                        } else {
                            _mm256_setzero_ps()
                        }
                    };
                    for (j, lanes) in transpose(std::array::from_fn(row)).into_iter().enumerate() {
                        _mm256_storeu_ps(out.add((s + j) * PANEL + half * 8), lanes);
                    }
                    s += 8;
                }
                for s in s..steps {
                    for c in 0..8 {
                        *out.add(s * PANEL + half * 8 + c) = if c < keys {
                            *first.add((half * 8 + c) * stride + s)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }

    // Index loops mirror the R x 2 register tile; iterators would hide which register is which.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const R: usize>(tile: &Tile<'_>) {
        const { assert!(R <= TILE_ROWS) };
        tile.assert_in_bounds(R);
        let (x, w) = (tile.x.as_ptr(), tile.panel.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for step in 0..tile.steps {
            // SAFETY: `step < steps`, inside every row of `x` and inside `panel` (asserted).
            unsafe {
                if let Some(next) = tile.prefetch {
                    // A hint: no fault and no effect on results whatever the address.
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(step * PANEL).cast());
                }
                let w0 = _mm256_loadu_ps(w.add(step * PANEL));
                let w1 = _mm256_loadu_ps(w.add(step * PANEL + 8));
                for a in 0..R {
                    let xv =
                        _mm256_broadcast_ss(&*x.add(a * tile.row_stride + step * tile.step_stride));
                    acc[a][0] = _mm256_fmadd_ps(xv, w0, acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(xv, w1, acc[a][1]);
                }
            }
        }
        for a in 0..R {
            // SAFETY: the caller's contract: row `a` of the tile holds `columns` floats, as
            // does the bias (asserted).
            unsafe {
                let out = tile.out.add(a * tile.ldo);
                if tile.columns == PANEL {
                    let (mut lo, mut hi) = (acc[a][0], acc[a][1]);
                    if tile.accumulate {
                        lo = _mm256_add_ps(lo, _mm256_loadu_ps(out));
                        hi = _mm256_add_ps(hi, _mm256_loadu_ps(out.add(8)));
                    }
                    if let Some(bias) = tile.bias {
                        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias.as_ptr()));
                        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias.as_ptr().add(8)));
                    }
                    _mm256_storeu_ps(out, lo);
                    _mm256_storeu_ps(out.add(8), hi);
                } else {
                    let mut lanes = [0.0f32; PANEL];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[a][1]);
                    for (column, value) in lanes.iter().enumerate().take(tile.columns) {
                        let out = out.add(column);
                        let sum = if tile.accumulate {
                            *out + value
                        } else {
                            *value
                        };
                        *out = tile.bias.map_or(sum, |bias| sum + bias[column]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, AVX512_TILE_ROWS, PANEL};

    /// The AVX-512 [`super::TileKernel`]: one 16-lane register per row of the tile.
    ///
    /// # Safety
    /// As [`super::TileKernel`], and the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(tile: &Tile<'_>) {
        // SAFETY: passed on from the caller.
        unsafe {
            match tile.rows {
                8 => rows::<8>(tile),
                7 => rows::<7>(tile),
                _ => super::by_row_count!(rows, tile),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const R: usize>(tile: &Tile<'_>) {
        const { assert!(R <= AVX512_TILE_ROWS) };
        tile.assert_in_bounds(R);
        let (x, w) = (tile.x.as_ptr(), tile.panel.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        for step in 0..tile.steps {
            // SAFETY: `step < steps`, inside every row of `x` and inside `panel` (asserted).
            unsafe {
                if let Some(next) = tile.prefetch {
                    // A hint: no fault and no effect on results whatever the address.
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(step * PANEL).cast());
                }
                let weights = _mm512_loadu_ps(w.add(step * PANEL));
                for (a, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(a * tile.row_stride + step * tile.step_stride));
                    *acc = _mm512_fmadd_ps(xv, weights, *acc);
                }
            }
        }
        // The tile's columns as a lane mask: the last panel may be narrower than 16.
        let columns: __mmask16 = if tile.columns >= PANEL {
            !0
        } else {
            (1 << tile.columns) - 1
        };
        // SAFETY: the bias holds `columns` floats (asserted); the masked load reads no others.
        let bias = tile
            .bias
            .map(|bias| unsafe { _mm512_maskz_loadu_ps(columns, bias.as_ptr()) });
        for (a, acc) in acc.into_iter().enumerate() {
            // SAFETY: the caller's contract: row `a` of the tile holds `columns` floats, and
            // the masked load and store touch no others.
            unsafe {
                let out = tile.out.add(a * tile.ldo);
                let mut sum = if tile.accumulate {
                    _mm512_add_ps(acc, _mm512_maskz_loadu_ps(columns, out))
                } else {
                    acc
                };
                if let Some(bias) = bias {
                    sum = _mm512_add_ps(sum, bias);
                }
                _mm512_mask_storeu_ps(out, columns, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::libm_erf;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The portable kernel and every SIMD one this CPU has: all are checked wherever tests run.
    fn every_kernel_this_cpu_runs() -> Vec<Kernel> {
        Simd::ALL
            .into_iter()
            .filter(|level| level.runs_here())
            .map(Kernel::of)
            .collect()
    }

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_a_float64_reference_on_ragged_shapes() {
        // Rows not a multiple of the tile or the row block, columns not a multiple of a panel,
        // k across several blocks and not a multiple of one; more rows than `COPY_X_ROWS`.
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 40, 300),
            (125, 33, 600),
            (6, 16, 256),
            (301, 50, 270),
            (260, 20, 7),
            // Empty products: no rows, and an empty inner dimension (all zeros).
            (0, 16, 8),
            (3, 5, 0),
        ] {
            let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 4));
            let packed = PackedWeight::pack(&w, n, k);
            let product = reference(&x, m, &w, n, k);
            // + bias, then also exact GELU (its derivative is below 1.2, so the product's error
            // bound holds, plus erf's approximation error).
            let gelu = |v: f64| 0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2));
            let with_bias: Vec<f64> = product
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias[i % n.max(1)] as f64)
                .collect();
            let with_gelu: Vec<f64> = with_bias.iter().map(|&v| gelu(v)).collect();
            let epilogue = |act| Epilogue {
                bias: Some(&bias),
                act,
            };
            for kernel in every_kernel_this_cpu_runs() {
                for (epilogue, expected) in [
                    (Epilogue::default(), &product),
                    (epilogue(None), &with_bias),
                    (epilogue(Some(Activation::Gelu)), &with_gelu),
                ] {
                    let got = packed.matmul_with(&x, m, epilogue, kernel);
                    assert_eq!(got.len(), m * n);
                    for (g, e) in got.iter().zip(expected) {
                        assert!(
                            (*g as f64 - e).abs() <= 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6,
                            "[{m}, {k}] x [{k}, {n}] ({kernel:?} kernel, bias {}, {:?}): {g} vs {e}",
                            epilogue.bias.is_some(),
                            epilogue.act
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn small_products_match_a_float64_reference_and_write_only_their_rows() {
        // (m, k, n): one element; partial tiles and panels; attention's shapes.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 17),
            (37, 32, 37),
            (9, 130, 20),
            (128, 64, 128),
        ] {
            // `x` with rows 3 floats longer than `k`; `b` both as rows (`pattern · v`) and as
            // the transpose of rows (`q · kᵀ`), 2 floats longer than needed.
            let x = values(m * (k + 3), 11);
            let b_rows = values(k * (n + 2), 12);
            let b_columns = values(n * (k + 2), 13);
            let x = Strided {
                data: &x,
                row_stride: k + 3,
                column_stride: 1,
            };
            let as_rows = Strided {
                data: &b_rows,
                row_stride: n + 2,
                column_stride: 1,
            };
            let as_columns = Strided {
                data: &b_columns,
                row_stride: 1,
                column_stride: k + 2,
            };
            let at = |a: Strided<'_>, i: usize, j: usize| {
                a.data[i * a.row_stride + j * a.column_stride] as f64
            };
            // A scratch buffer used before, larger, holding stale values.
            let mut scratch = vec![f32::NAN; 3 * k * PANEL];
            for kernel in every_kernel_this_cpu_runs() {
                for b in [as_rows, as_columns] {
                    let ldo = n + 5;
                    let mut out = vec![f32::NAN; m * ldo];
                    // SAFETY: `out` holds `m` rows of `n` floats, `ldo` apart.
                    unsafe {
                        small_product_with(
                            x,
                            b,
                            (m, k, n),
                            out.as_mut_ptr(),
                            ldo,
                            &mut scratch,
                            kernel,
                        )
                    };
                    for (r, row) in out.chunks_exact(ldo).enumerate() {
                        for (c, &got) in row.iter().enumerate() {
                            if c >= n {
                                assert!(got.is_nan(), "wrote past the row ({kernel:?})");
                                continue;
                            }
                            let expected: f64 = (0..k).map(|s| at(x, r, s) * at(b, s, c)).sum();
                            assert!(
                                (got as f64 - expected).abs() <= 1e-5 * (k as f64).sqrt() * 4.0,
                                "[{m}, {k}] x [{k}, {n}] at ({r}, {c}), {kernel:?}: {got} vs \
                                 {expected}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn copying_x_puts_every_value_where_the_kernel_reads_it() {
        let k = 45;
        let x = values(20 * k, 7);
        for kernel in every_kernel_this_cpu_runs() {
            let tile_rows = kernel.tile_rows();
            // Whole and partial tiles; step ranges with and without a tail of a vector.
            for (rows, steps) in [(3..3 + tile_rows, 0..45), (14..20, 5..37), (2..5, 9..17)] {
                let rows = rows.start..rows.end.min(rows.start + tile_rows);
                let mut packed = vec![f32::NAN; steps.len() * tile_rows];
                kernel.copy_x(&x, k, rows.clone(), steps.clone(), &mut packed);
                for (a, r) in rows.clone().enumerate() {
                    for (i, step) in steps.clone().enumerate() {
                        assert_eq!(
                            packed[i * tile_rows + a].to_bits(),
                            x[r * k + step].to_bits(),
                            "{kernel:?}: row {r}, step {step}"
                        );
                    }
                }
                // Lanes of rows the tile lacks are not written.
                let written = |i: usize| i % tile_rows < rows.len();
                assert!((0..packed.len()).all(|i| written(i) || packed[i].is_nan()));
            }
        }
    }

    #[test]
    fn tasks_cover_the_product_once_evenly_and_in_a_multiple_of_the_threads() {
        let cases = [
            (768, 120, 72, 2),
            (1024, 24, 48, 2),
            (5, 120, 1, 2),
            (301, 120, 4, 3),
            (1344, 120, 96, 4),
            (4096, 120, 48, 2),
            (128, 120, 1813, 2),
            (1024, 192, 1813, 2),
        ];
        let tile_sizes = [TILE_ROWS, AVX512_TILE_ROWS];
        for (&(rows, row_block, panels, threads), tile_rows) in
            cases.iter().flat_map(|case| tile_sizes.map(|t| (case, t)))
        {
            let split = TaskSplit::new(rows, tile_rows, row_block, panels, threads);
            let mut seen = vec![0u8; rows * panels];
            let (mut rows_per_task, mut panels_per_task) = (Vec::new(), Vec::new());
            for task in 0..split.tasks() {
                let (task_rows, task_panels) = split.task(task);
                assert!(task_rows.start.is_multiple_of(tile_rows));
                rows_per_task.push(task_rows.len());
                panels_per_task.push(task_panels.len());
                for r in task_rows {
                    for p in task_panels.clone() {
                        seen[r * panels + p] += 1;
                    }
                }
            }
            let case = format!(
                "{rows} rows, tiles of {tile_rows}, blocks of {row_block}, {panels} panels"
            );
            assert!(
                seen.iter().all(|&n| n == 1),
                "{case}: not covered exactly once"
            );
            let spread = |v: &[usize]| v.iter().max().unwrap() - v.iter().min().unwrap();
            assert!(spread(&panels_per_task) <= 1, "{case}: uneven panel groups");
            // Row blocks differ by at most a tile, and the last may be a partial tile.
            assert!(
                spread(&rows_per_task) < 2 * tile_rows,
                "{case}: uneven row blocks"
            );
            if panels >= threads {
                assert!(
                    split.tasks().is_multiple_of(threads),
                    "{case}: {} tasks",
                    split.tasks()
                );
            }
        }
    }

    #[test]
    fn unpacking_and_gathering_return_the_weight_bit_for_bit() {
        for (n, k) in [(37, 19), (5, 0)] {
            let w = values(n * k, 3);
            let packed = PackedWeight::pack(&w, n, k);
            assert_eq!(packed.unpack(), w);
            // Rows in any order, repeated, from the last (padded) panel too.
            let ids = [n as u32 - 1, 0, 17 % n as u32, n as u32 - 1];
            let expected: Vec<f32> = ids
                .iter()
                .flat_map(|&id| w[id as usize * k..][..k].to_vec())
                .collect();
            assert_eq!(packed.gather_rows(&ids), expected);
            assert_eq!((packed.out_features(), packed.in_features()), (n, k));
        }
    }
}
