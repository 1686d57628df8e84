//! Which instruction sets the hand-written CPU kernels use.
//!
//! The packed matmul, the few-rows matmul and the GELU / `exp` rows each come as an AVX-512
//! and/or an AVX2 kernel and a portable one. They run the widest this CPU has, at most the level
//! named by the environment variable [`MAX_SIMD_VAR`] (`avx512`, `avx2` or `portable`), read
//! once per process, as oneDNN's `ONEDNN_MAX_CPU_ISA` and MKL's `MKL_ENABLE_INSTRUCTIONS` do:
//! to time or test the AVX2 kernels on an AVX-512 CPU, or the portable ones (what CPUs other
//! than x86-64 run) anywhere. At `portable` the weights also stay unpacked and `gemm` multiplies
//! them, as on those CPUs. Code the compiler vectorises is built for the wheel's target
//! (x86-64-v3) whatever the level.
//!
//! The kernels' own tests run every level the CPU has, whatever the variable says
//! ([`Simd::runs_here`]).

use std::sync::OnceLock;

/// The environment variable that caps [`Simd::selected`].
pub const MAX_SIMD_VAR: &str = "HOOKED_ENCODER_MAX_SIMD";

/// A level of hand-written kernels, narrowest first (so `min` caps one by another).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Simd {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 and FMA, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Simd {
    /// Every level, narrowest first.
    pub const ALL: [Simd; 3] = [Simd::Portable, Simd::Avx2, Simd::Avx512];

    /// The level's name, as [`MAX_SIMD_VAR`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// The level named `name` (case and surrounding spaces ignored).
    pub fn from_name(name: &str) -> Option<Simd> {
        let name = name.trim().to_ascii_lowercase();
        Simd::ALL.into_iter().find(|level| level.name() == name)
    }

    /// Whether this CPU has the level's instructions.
    pub fn runs_here(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest level this CPU has.
    pub fn detected() -> Simd {
        Simd::widest_up_to(Simd::Avx512)
    }

    /// The level the kernels use: the widest this CPU has of those up to [`MAX_SIMD_VAR`]'s
    /// level (a value that names no level is ignored here; [`max_from_env`] reports it).
    pub fn selected() -> Simd {
        static SELECTED: OnceLock<Simd> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            Simd::widest_up_to(max_from_env().ok().flatten().unwrap_or(Simd::Avx512))
        })
    }

    /// The widest level up to `max` that this CPU has.
    fn widest_up_to(max: Simd) -> Simd {
        Simd::ALL
            .into_iter()
            .rev()
            .find(|&level| level <= max && level.runs_here())
            .unwrap_or(Simd::Portable)
    }
}

/// The level [`MAX_SIMD_VAR`] names: `None` when it is unset or empty, an error message when it
/// names no level.
pub fn max_from_env() -> Result<Option<Simd>, String> {
    let Some(value) = std::env::var_os(MAX_SIMD_VAR) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    if value.trim().is_empty() {
        return Ok(None);
    }
    Simd::from_name(&value).map(Some).ok_or_else(|| {
        let names: Vec<_> = Simd::ALL.iter().rev().map(|level| level.name()).collect();
        format!(
            "{MAX_SIMD_VAR}={value:?} names no kernel level: expected one of {}",
            names.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for level in Simd::ALL {
            assert_eq!(Simd::from_name(level.name()), Some(level));
        }
        assert_eq!(Simd::from_name(" AVX2 "), Some(Simd::Avx2));
        assert_eq!(Simd::from_name("avx3"), None);
        assert_eq!(Simd::from_name(""), None);
    }

    #[test]
    fn a_cap_selects_the_widest_level_at_most_it_that_runs_here() {
        assert!(Simd::selected() <= Simd::detected() && Simd::selected().runs_here());
        for max in Simd::ALL {
            let level = Simd::widest_up_to(max);
            assert!(level <= max && level.runs_here());
            assert_eq!(level == max, max.runs_here());
        }
    }
}
