//! Kernel sources and their run-time compilation with NVRTC.
//!
//! The `.cu` files in `kernels/` are embedded in the binary. At start-up each one is compiled
//! for the device's own architecture (`sm_90` on an H100), so the machine code uses every
//! instruction the chip has and no CUDA toolkit is needed where the binary runs — only the
//! NVRTC library (it ships with the CUDA runtime libraries and as the `nvidia-cuda-nvrtc`
//! wheel). Results are cached on disk keyed by a hash of the source, the options and the NVRTC
//! version, so later starts skip the compiler.
//!
//! [`compile`] needs no GPU: CI uses it to check that every kernel compiles for sm_90.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{CudaError, Result};

/// Prepended to every kernel file: types, conversions, the RNG and block reductions.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// One kernel file and the entry points it defines (each is looked up after loading).
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

/// Every kernel file of the backend.
pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile { name: "memory.cu", source: include_str!("../kernels/memory.cu"), functions: &["fill", "copy2d"] },
    KernelFile {
        name: "elementwise.cu",
        source: include_str!("../kernels/elementwise.cu"),
        functions: &["bias_add", "add", "add_assign", "scale", "activation_forward", "activation_backward", "dropout"],
    },
    KernelFile {
        name: "reduce.cu",
        source: include_str!("../kernels/reduce.cu"),
        functions: &["colsum_partials", "colsum_finish", "sumsq_partials", "sumsq_finish"],
    },
    KernelFile {
        name: "embedding.cu",
        source: include_str!("../kernels/embedding.cu"),
        functions: &["embedding_forward", "embedding_backward"],
    },
    KernelFile {
        name: "layernorm.cu",
        source: include_str!("../kernels/layernorm.cu"),
        functions: &["layernorm_forward", "layernorm_backward_dx"],
    },
    KernelFile {
        name: "attention.cu",
        source: include_str!("../kernels/attention.cu"),
        functions: &[
            "attention_forward",
            "attention_dropout_probs",
            "attention_softmax_backward",
            "attention_softmax_mixed",
            "attention_probs_bf16",
        ],
    },
    KernelFile {
        name: "decode.cu",
        source: include_str!("../kernels/decode.cu"),
        functions: &["linear_small", "attention_decode"],
    },
    KernelFile {
        name: "loss.cu",
        source: include_str!("../kernels/loss.cu"),
        functions: &["cross_entropy", "log_softmax", "argmax_rows"],
    },
    KernelFile { name: "adamw.cu", source: include_str!("../kernels/adamw.cu"), functions: &["adamw"] },
];

/// The text handed to NVRTC for a file: the common header, then the file with line numbers
/// reset so compiler messages point into the right file.
pub fn full_source(file: &KernelFile) -> String {
    format!("{COMMON}\n#line 1 \"{}\"\n{}", file.name, file.source)
}

/// What NVRTC produced for one file.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text (always produced).
    pub ptx: String,
    /// Machine code for the requested `sm_XX` (what the backend loads: no JIT at start-up).
    pub cubin: Vec<u8>,
    /// Compiler messages (warnings), usually empty.
    pub log: String,
}

/// Open NVRTC, or say which library is missing instead of panicking (cudarc's loader panics
/// when it cannot find a library, so we probe first).
pub fn ensure_nvrtc() -> Result<(i32, i32)> {
    // SAFETY: only tries to dlopen the candidate names; no NVRTC function is called.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(CudaError::MissingLibrary {
            lib: "NVRTC",
            hint: "install the CUDA runtime libraries or the nvidia-cuda-nvrtc wheel and add its lib folder to \
                   LD_LIBRARY_PATH",
            names: "libnvrtc.so, libnvrtc.so.13".into(),
        });
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present; the out-pointers are valid for the call.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| nvrtc_err("nvrtcVersion", e))?;
    Ok((major, minor))
}

fn nvrtc_err(op: &str, e: nvrtc::NvrtcError) -> CudaError {
    CudaError::Compile { file: String::new(), arch: String::new(), msg: format!("{op}: {e:?}"), log: String::new() }
}

/// The options every kernel is compiled with. `arch` is a real architecture such as `sm_90`.
/// Precise division and square roots and no flush-to-zero (the defaults, spelled out) keep
/// results close to the CPU reference; FMA contraction stays on.
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
        "-lineinfo".into(),
    ]
}

/// An NVRTC program, destroyed on drop (errors on destroy are ignored: nothing to recover).
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn c_text(bytes: &[c_char]) -> String {
    let bytes: Vec<u8> = bytes.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compile one kernel file for `arch` (e.g. `sm_90`). Needs only the NVRTC library, no GPU.
pub fn compile(file: &KernelFile, arch: &str) -> Result<Compiled> {
    compile_with(file, arch, &[])
}

/// [`compile`] with extra NVRTC options, e.g. `--ptxas-options=--verbose` for the register and
/// spill report in [`Compiled::log`] (used by the PTX check; never by the backend, whose cache
/// key covers only [`options`]).
pub fn compile_with(file: &KernelFile, arch: &str, extra: &[&str]) -> Result<Compiled> {
    ensure_nvrtc()?;
    let fail =
        |msg: String, log: String| CudaError::Compile { file: file.name.to_string(), arch: arch.to_string(), msg, log };
    let src = CString::new(full_source(file)).map_err(|_| fail("source contains a NUL byte".into(), String::new()))?;
    let name = CString::new(file.name).map_err(|_| fail("name contains a NUL byte".into(), String::new()))?;
    let prog = Program(nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}"), String::new()))?);
    let mut opts = options(arch);
    opts.extend(extra.iter().map(|o| o.to_string()));
    // SAFETY: `prog` is a live program; the options are plain ASCII without NUL bytes.
    let compiled = unsafe { nvrtc::compile_program(prog.0, &opts) };
    // SAFETY: as above; the log exists after a compile attempt, successful or not.
    let log = unsafe { nvrtc::get_program_log(prog.0) }.map(|l| c_text(&l)).unwrap_or_default();
    if let Err(e) = compiled {
        return Err(fail(format!("{e:?} (options {opts:?})"), log));
    }
    // SAFETY: compiled successfully.
    let ptx = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| fail(format!("nvrtcGetPTX: {e:?}"), log.clone()))?;
    let mut size = 0usize;
    // SAFETY: `size` is a valid out-pointer; the program was compiled for a real architecture.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}"), log.clone()))?;
    let mut cubin = vec![0u8; size];
    if size > 0 {
        // SAFETY: the buffer holds `size` bytes, as NVRTC asked.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}"), log.clone()))?;
    }
    Ok(Compiled { ptx: c_text(&ptx), cubin, log })
}

/// FNV-1a, 64 bits: a stable hash for cache keys (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate the parts so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The default on-disk kernel cache: `$XDG_CACHE_HOME/opt-rs/kernels`, else
/// `~/.cache/opt-rs/kernels`; `None` when neither variable is set (then nothing is cached).
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("opt-rs").join("kernels"))
}

/// The cache file of a compiled kernel file.
fn cache_path(dir: &Path, file: &KernelFile, arch: &str, nvrtc_version: (i32, i32)) -> PathBuf {
    let src = full_source(file);
    let opts = options(arch).join(" ");
    let ver = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    let key = fnv1a(&[src.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    let stem = file.name.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{key:016x}.cubin"))
}

/// Machine code for `file` on `arch`: from the cache when present, else compiled (and then
/// cached; a cache that cannot be written is not an error, only slower next time).
pub fn cubin_cached(file: &KernelFile, arch: &str, cache: Option<&Path>) -> Result<Vec<u8>> {
    let version = ensure_nvrtc()?;
    let path = cache.map(|d| cache_path(d, file, arch, version));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let compiled = compile(file, arch)?;
    if let Some(p) = &path {
        // Write to a temporary name and rename, so a concurrent reader never sees half a file.
        if let Some(dir) = p.parent() {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let ok = std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, &compiled.cubin).is_ok();
            if !ok || std::fs::rename(&tmp, p).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(compiled.cubin)
}

/// The `sm_XX` name of a compute capability.
pub fn arch_name(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// Whether a PTX text defines the entry point `name`.
pub fn ptx_has_entry(ptx: &str, name: &str) -> bool {
    ptx.lines().any(|l| {
        let l = l.trim_start();
        (l.starts_with(".visible .entry") || l.starts_with(".entry"))
            && l.split(|c: char| c.is_whitespace() || c == '(').any(|w| w == name)
    })
}
