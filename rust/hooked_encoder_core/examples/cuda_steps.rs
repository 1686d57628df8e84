//! Runs the GPU path step by step, with no Python or torch in the process, printing each step
//! before it starts, so a hang names its step. Written to isolate the CUDA hang seen on repeated
//! bert-sized unembeddings (see the CUDA issue); also a quick health check of a CUDA build:
//!
//! ```text
//! cargo build --release -p hooked_encoder_core --features cuda --example cuda_steps
//! timeout 120 target/release/examples/cuda_steps
//! ```
//!
//! On a machine without a GPU, where `scripts/cuda_toolkit.sh` linked against an empty stub of
//! libcuda, an executable must be told to leave the driver's symbols to the loader:
//!
//! ```text
//! cargo rustc --release -p hooked_encoder_core --features cuda --example cuda_steps -- \
//!     -C link-arg=-Wl,--no-as-needed,-lcuda,--as-needed \
//!     -C link-arg=-Wl,--unresolved-symbols=ignore-all
//! ```
//!
//! and the GPU machine needs CUDA 13's cuBLAS and cuRAND on `LD_LIBRARY_PATH` (torch's
//! `nvidia/cu13/lib`).

use std::io::Write;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hooked_encoder_core::{BertConfig, ForwardInput, HookedBert, NoHooks, Output, Part, WeightMap};

fn step<T>(what: &str, f: impl FnOnce() -> hooked_encoder_core::Result<T>) -> T {
    print!("{what} ... ");
    std::io::stdout().flush().ok();
    let start = Instant::now();
    match f() {
        Ok(value) => {
            println!("{:.2} ms", start.elapsed().as_secs_f64() * 1e3);
            value
        }
        Err(e) => {
            println!("FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let device = step("open cuda:0", || Ok(Device::new_cuda(0)?));
    let sync = |t: &Tensor| -> hooked_encoder_core::Result<()> {
        t.device().synchronize()?;
        Ok(())
    };
    for vocab in [1000usize, 28996] {
        let x = Tensor::randn(0f32, 1., (16, 768), &device).unwrap();
        let w = Tensor::randn(0f32, 1., (vocab, 768), &device).unwrap();
        let b = Tensor::zeros(vocab, DType::F32, &device).unwrap();
        for call in 0..4 {
            step(&format!("vocab {vocab}: x @ w.T call {call}"), || {
                let y = x.matmul(&w.t()?)?;
                sync(&y)
            });
        }
        for call in 0..4 {
            step(&format!("vocab {vocab}: x @ w.T + b call {call}"), || {
                let y = x.matmul(&w.t()?)?.broadcast_add(&b)?;
                sync(&y)
            });
        }
        let wt = w.t().unwrap().contiguous().unwrap();
        for call in 0..4 {
            step(
                &format!("vocab {vocab}: x @ (w.T contiguous) call {call}"),
                || {
                    let y = x.matmul(&wt)?;
                    sync(&y)
                },
            );
        }
    }
    let cfg = BertConfig::bert_base();
    let (model, _) = step("load bert-base", || {
        let weights = WeightMap::random(&cfg, 0, &device)?;
        HookedBert::load(cfg.clone(), &weights, &device)
    });
    let x = Tensor::randn(0f32, 1., (1, 16, 768), &device).unwrap();
    for call in 0..4 {
        step(&format!("unembed [1, 16, 768] call {call}"), || {
            let y = model.apply(Part::Unembed, x.clone(), &mut NoHooks)?;
            sync(&y)
        });
    }
    for (batch, pos) in [(1usize, 16usize), (32, 128)] {
        let tokens: Vec<i64> = (0..batch * pos)
            .map(|i| (i * 7919 % 28000) as i64 + 1)
            .collect();
        let input = ForwardInput {
            batch,
            pos,
            tokens: &tokens,
            token_type_ids: None,
            attention_mask: None,
        };
        for call in 0..4 {
            step(&format!("logits {batch}x{pos} call {call}"), || {
                let y = model.forward(&input, Output::Logits, &mut NoHooks)?;
                sync(&y)
            });
        }
    }
    println!("all steps done");
}
