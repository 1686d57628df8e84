//! Where weights come from: safetensors files (Hugging Face checkpoints) or tensors in memory.
//!
//! Tensors are looked up by their Hugging Face BERT names (`encoder.layer.0.attention.self.query.weight`).
//! [`crate::HookedBert`] resolves the `bert.` prefix, old `gamma`/`beta` LayerNorm names and tied
//! decoder weights on top of this.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, SafeTensorError, TensorView};

use crate::{BertConfig, Error, Result};

/// A named collection of tensors.
pub trait TensorSource {
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// Shape of the tensor called `name`, if it exists.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Loads `name` as float32 on `device`.
    fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor>;
    /// Where the tensors come from, for error messages.
    fn describe(&self) -> String;
}

/// One or more safetensors files (a sharded checkpoint is several).
///
/// Opening reads and checks each file's header; a tensor's bytes are read from the file when it
/// is loaded, so loading holds one tensor's bytes at a time beside the model rather than the
/// whole checkpoint (bert-base: 440 MB). The files are read, not memory-mapped: a mapped file
/// that another process truncates while we read it would kill this process with SIGBUS, where a
/// short read is an error that names the file.
pub struct WeightFiles {
    files: Vec<CheckpointFile>,
    /// Tensor name -> index into `files`.
    routing: HashMap<String, usize>,
}

/// One safetensors file: its open handle and its parsed, checked header.
struct CheckpointFile {
    path: PathBuf,
    file: File,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: u64,
    header: Metadata,
}

impl CheckpointFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            Error::Checkpoint(format!("cannot read weights file {}: {e}", path.display()))
        })?;
        let (data_start, header) = read_header(&file).map_err(|e| {
            Error::Checkpoint(format!(
                "{} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            header,
        })
    }

    /// Reads tensor `name` from the file and converts it to a float32 tensor on `device`.
    fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let bad = |what: String| {
            Error::Checkpoint(format!(
                "tensor {name:?} in {}: {what}",
                self.path.display()
            ))
        };
        let info = self
            .header
            .info(name)
            .ok_or_else(|| bad("not in the file's header".into()))?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        read_at(&self.file, &mut bytes, self.data_start + start as u64)
            .map_err(|e| bad(format!("cannot read its bytes: {e}")))?;
        let view = TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .map_err(|e| bad(e.to_string()))?;
        use candle_core::safetensors::Load;
        let tensor = view.load(device).map_err(|e| bad(strip_candle_noise(&e)))?;
        if !tensor.dtype().is_float() {
            return Err(bad(format!(
                "has dtype {:?}, expected a floating-point type",
                info.dtype
            )));
        }
        // Candle counts storage-only formats (F4, F6_*, F8_E8M0) as floats but cannot convert
        // them; that is the checkpoint's problem, so say which tensor and file.
        tensor.to_dtype(DType::F32).map_err(|e| {
            bad(format!(
                "cannot convert {:?} to float32: {}",
                info.dtype,
                strip_candle_noise(&e)
            ))
        })
    }
}

impl WeightFiles {
    /// Opens `paths` and reads and checks their headers.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::Checkpoint("no weights files given".into()));
        }
        let mut files: Vec<CheckpointFile> = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file = CheckpointFile::open(path.as_ref())?;
            for name in file.header.tensors().into_keys() {
                if let Some(previous) = routing.insert(name.clone(), index) {
                    return Err(Error::Checkpoint(format!(
                        "tensor {name:?} appears in both {} and {}",
                        files[previous].path.display(),
                        file.path.display()
                    )));
                }
            }
            files.push(file);
        }
        Ok(Self { files, routing })
    }
}

/// A safetensors file's header and where its data starts, with the checks and errors of
/// `safetensors::SafeTensors::read_metadata` (which needs the whole file in memory).
fn read_header(file: &File) -> std::result::Result<(u64, Metadata), SafeTensorError> {
    /// safetensors' limit on the JSON header.
    const MAX_HEADER_LEN: u64 = 100_000_000;
    let file_len = file.metadata()?.len();
    let mut length = [0u8; 8];
    if file_len < 8 {
        return Err(SafeTensorError::HeaderTooSmall);
    }
    read_at(file, &mut length, 0)?;
    let header_len = u64::from_le_bytes(length);
    if header_len > MAX_HEADER_LEN {
        return Err(SafeTensorError::HeaderTooLarge);
    }
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(SafeTensorError::InvalidHeaderLength);
    }
    let mut header = vec![0u8; header_len as usize];
    read_at(file, &mut header, 8)?;
    let text = std::str::from_utf8(&header).map_err(SafeTensorError::InvalidHeader)?;
    // Parsing also checks that the tensors' byte ranges tile the data section and that each
    // holds its shape's elements.
    let header: Metadata =
        serde_json::from_str(text).map_err(SafeTensorError::InvalidHeaderDeserialization)?;
    if data_start + header.data_len() as u64 != file_len {
        return Err(SafeTensorError::MetadataIncompleteBuffer);
    }
    Ok((data_start, header))
}

/// Fills `buf` from `file` at `offset`, without moving a shared file position (tensors may be
/// loaded from several threads).
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    return std::os::unix::fs::FileExt::read_exact_at(file, buf, offset);
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let read = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += read;
        }
        Ok(())
    }
}

/// Candle errors carry a backtrace note and a path prefix; keep only the message.
fn strip_candle_noise(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().to_string()
}

impl TensorSource for WeightFiles {
    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routing.keys().cloned().collect();
        names.sort();
        names
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let file = &self.files[*self.routing.get(name)?];
        file.header.info(name).map(|info| info.shape.clone())
    }

    fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let index = *self
            .routing
            .get(name)
            .ok_or_else(|| Error::Checkpoint(format!("missing tensor {name:?}")))?;
        self.files[index].load_f32(name, device)
    }

    fn describe(&self) -> String {
        let paths: Vec<String> = self
            .files
            .iter()
            .map(|file| file.path.display().to_string())
            .collect();
        paths.join(", ")
    }
}

/// Tensors held in memory, by name.
#[derive(Default, Clone)]
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
}

impl WeightMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Freshly initialised weights for `cfg`, named as a Hugging Face checkpoint of its family
    /// (`BertForPreTraining` for BERT, `RobertaForMaskedLM` plus pooler for RoBERTa,
    /// `ModernBertForMaskedLM` for ModernBERT): matrices and embeddings drawn from N(0, 0.02²) (Hugging Face's
    /// `initializer_range`), biases 0, LayerNorm weights 1. The same `seed` gives the same
    /// weights on every platform.
    pub fn random(cfg: &BertConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = SplitMix64(seed);
        let mut map = Self::new();
        // Weights are described by their canonical (BERT) names; the family renames them, and
        // leaves out what it does not have (draws are made all the same, so that the same seed
        // gives the same encoder weights in every family).
        let family = cfg.family;
        let mut normal = |name: String, shape: &[usize], map: &mut Self| -> Result<()> {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| 0.02 * rng.next_normal() as f32).collect();
            if let Some(name) = family.checkpoint_name(&name) {
                map.insert(name, Tensor::from_vec(values, shape, device)?);
            }
            Ok(())
        };
        let constant = |name: String, len: usize, value: f32, map: &mut Self| -> Result<()> {
            if let Some(name) = family.checkpoint_name(&name) {
                map.insert(name, Tensor::full(value, len, device)?);
            }
            Ok(())
        };
        let (d, a, m, e) = (cfg.d_model, cfg.d_attn(), cfg.d_mlp, cfg.embed_width());
        let layer_norm = |prefix: &str, width: usize, map: &mut Self| -> Result<()> {
            constant(format!("{prefix}.LayerNorm.weight"), width, 1.0, map)?;
            constant(format!("{prefix}.LayerNorm.bias"), width, 0.0, map)
        };
        let emb = "bert.embeddings";
        normal(
            format!("{emb}.word_embeddings.weight"),
            &[cfg.d_vocab, e],
            &mut map,
        )?;
        normal(
            format!("{emb}.position_embeddings.weight"),
            &[cfg.position_rows(), e],
            &mut map,
        )?;
        if cfg.n_token_types > 0 {
            normal(
                format!("{emb}.token_type_embeddings.weight"),
                &[cfg.n_token_types, e],
                &mut map,
            )?;
        }
        layer_norm(emb, e, &mut map)?;
        if cfg.projects_embeddings() {
            normal("bert.embeddings_project.weight".into(), &[d, e], &mut map)?;
            constant("bert.embeddings_project.bias".into(), d, 0.0, &mut map)?;
        }
        if let Some(rows) = cfg.relative_attention_buckets {
            normal(
                "bert.encoder.relative_attention_bias.weight".into(),
                &[rows, cfg.n_heads],
                &mut map,
            )?;
        }
        // A gated MLP's first layer stacks its two halves.
        let mlp_rows = if family.gated_mlp() { 2 * m } else { m };
        for l in 0..cfg.n_layers {
            let p = format!("bert.encoder.layer.{l}");
            let mut layers = vec![
                ("attention.output.dense", d, a),
                ("intermediate.dense", mlp_rows, d),
                ("output.dense", d, m),
            ];
            if family.fused_qkv() {
                layers.insert(0, ("attention.self.qkv", 3 * a, d));
            } else {
                layers.splice(
                    0..0,
                    [
                        ("attention.self.query", a, d),
                        ("attention.self.key", a, d),
                        ("attention.self.value", a, d),
                    ],
                );
            }
            for (name, out, inp) in layers {
                normal(format!("{p}.{name}.weight"), &[out, inp], &mut map)?;
                constant(format!("{p}.{name}.bias"), out, 0.0, &mut map)?;
            }
            if family.has_attention_norm(l) {
                layer_norm(&format!("{p}.attention.output"), d, &mut map)?;
            }
            layer_norm(&format!("{p}.output"), d, &mut map)?;
        }
        if family.pre_layer_norm() {
            constant("bert.final_norm.weight".into(), d, 1.0, &mut map)?;
            constant("bert.final_norm.bias".into(), d, 0.0, &mut map)?;
        }
        normal(
            "cls.predictions.transform.dense.weight".into(),
            &[e, d],
            &mut map,
        )?;
        constant(
            "cls.predictions.transform.dense.bias".into(),
            e,
            0.0,
            &mut map,
        )?;
        layer_norm("cls.predictions.transform", e, &mut map)?;
        // The decoder weight is tied to the word embeddings, as in Hugging Face. Its bias is
        // `cls.predictions.bias` where the family has that name, else the decoder's own.
        let bias = if family.checkpoint_name("cls.predictions.bias").is_some() {
            "cls.predictions.bias"
        } else {
            "cls.predictions.decoder.bias"
        };
        constant(bias.into(), cfg.d_vocab, 0.0, &mut map)?;
        normal("bert.pooler.dense.weight".into(), &[d, d], &mut map)?;
        constant("bert.pooler.dense.bias".into(), d, 0.0, &mut map)?;
        normal("cls.seq_relationship.weight".into(), &[2, d], &mut map)?;
        constant("cls.seq_relationship.bias".into(), 2, 0.0, &mut map)?;
        Ok(map)
    }
}

impl TensorSource for WeightMap {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    fn load_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::Checkpoint(format!("missing tensor {name:?}")))?;
        Ok(tensor.to_dtype(DType::F32)?.to_device(device)?)
    }

    fn describe(&self) -> String {
        "the weights given in memory".into()
    }
}

/// SplitMix64 (Steele et al., 2014): a tiny, well-mixed, platform-independent generator, enough
/// for initialising weights reproducibly without another dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1], 53 bits.
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller.
    fn next_normal(&mut self) -> f64 {
        let (u, v) = (self.next_unit(), self.next_unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_normals_have_the_right_moments() {
        let mut rng = SplitMix64(7);
        let xs: Vec<f64> = (0..200_000).map(|_| rng.next_normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn unreadable_and_corrupt_files_are_checkpoint_errors() {
        let dir = scratch("w");
        let missing = dir.join("missing.safetensors");
        let err = WeightFiles::open(&[&missing]).err().unwrap().to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
        let garbage = dir.join("garbage.safetensors");
        std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
        let err = WeightFiles::open(&[&garbage]).err().unwrap().to_string();
        assert!(
            err.contains("garbage.safetensors") && err.contains("not a valid"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A scratch directory of this test's own.
    fn scratch(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hooked_encoder_{test}_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tensors_are_read_one_by_one_in_any_float_type() {
        let dir = scratch("read");
        let path = dir.join("model.safetensors");
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
        let f32s = Tensor::from_vec(values.clone(), (4, 6), &Device::Cpu).unwrap();
        let tensors = HashMap::from([
            ("a.weight".to_string(), f32s.clone()),
            ("b.bf16".to_string(), f32s.to_dtype(DType::BF16).unwrap()),
            (
                "c.f16".to_string(),
                f32s.to_dtype(DType::F16).unwrap().reshape(24).unwrap(),
            ),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let files = WeightFiles::open(&[&path]).unwrap();
        assert_eq!(files.names(), ["a.weight", "b.bf16", "c.f16"]);
        assert_eq!(files.shape("c.f16"), Some(vec![24]));
        for name in files.names() {
            let loaded = files.load_f32(&name, &Device::Cpu).unwrap();
            assert_eq!(loaded.dtype(), DType::F32);
            // Every value here is exact in half precision.
            assert_eq!(
                loaded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                values,
                "{name}"
            );
        }
        let err = files.load_f32("d", &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("missing tensor \"d\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_short_file_is_refused_at_open_and_one_cut_later_at_the_tensor() {
        let dir = scratch("short");
        let path = dir.join("model.safetensors");
        let tensor = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), tensor)]), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // Opened while whole, then cut by someone else: the load fails, naming tensor and file.
        let files = WeightFiles::open(&[&path]).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let err = files.load_f32("w", &Device::Cpu).err().unwrap().to_string();
        assert!(
            err.contains("\"w\"") && err.contains("model.safetensors"),
            "{err}"
        );
        // Opened when short: refused, as safetensors refuses it.
        let err = WeightFiles::open(&[&path]).err().unwrap().to_string();
        assert!(
            err.contains("not a valid safetensors file: incomplete metadata"),
            "{err}"
        );
        // A header length past the end of the file.
        std::fs::write(&path, &bytes[..20]).unwrap();
        let err = WeightFiles::open(&[&path]).err().unwrap().to_string();
        assert!(err.contains("invalid header length"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
