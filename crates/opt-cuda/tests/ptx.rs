//! Every kernel source compiles with NVRTC for sm_90 (the H100) and defines the entry points the
//! backend loads. Needs the NVRTC library only, no GPU: `scripts/check_ptx.sh` installs the
//! `nvidia-cuda-nvrtc` wheel and runs this with `OPT_CUDA_REQUIRE_NVRTC=1`, so CI fails when
//! NVRTC is missing instead of skipping. Elsewhere the test is skipped when NVRTC is absent.
//!
//! With `OPT_CUDA_PTX_DIR=<dir>` the PTX and the ptxas resource report (registers, spills,
//! shared memory) of each file are written there for inspection.

use opt_cuda::compile::{compile_with, ensure_nvrtc, ptx_has_entry, KERNEL_FILES};

const ARCHS: &[&str] = &["sm_90"];

#[test]
fn every_kernel_compiles_for_hopper() {
    let required = std::env::var("OPT_CUDA_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let version = match ensure_nvrtc() {
        Ok(v) => v,
        Err(e) if !required => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("NVRTC is required here: {e}"),
    };
    eprintln!("NVRTC {}.{}", version.0, version.1);
    let out_dir = std::env::var_os("OPT_CUDA_PTX_DIR").map(std::path::PathBuf::from);
    let mut failures = Vec::new();
    for arch in ARCHS {
        for file in KERNEL_FILES {
            match compile_with(file, arch, &["--ptxas-options=--verbose"]) {
                Ok(c) => {
                    assert!(!c.ptx.is_empty(), "{}: empty PTX", file.name);
                    assert!(!c.cubin.is_empty(), "{}: no cubin for {arch}", file.name);
                    for f in file.functions {
                        if !ptx_has_entry(&c.ptx, f) {
                            failures.push(format!("{} ({arch}): no entry point {f}", file.name));
                        }
                    }
                    // Spills to local memory are slow; flag them (the report is in the log).
                    let spills = c
                        .log
                        .lines()
                        .filter(|l| {
                            l.contains("bytes spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
                        })
                        .count();
                    eprintln!(
                        "{arch} {:<16} ptx {:>7} B, cubin {:>7} B{}",
                        file.name,
                        c.ptx.len(),
                        c.cubin.len(),
                        if spills > 0 { "  (spills: see the ptxas report)" } else { "" }
                    );
                    if let Some(dir) = &out_dir {
                        let stem = file.name.trim_end_matches(".cu");
                        std::fs::create_dir_all(dir).expect("create OPT_CUDA_PTX_DIR");
                        std::fs::write(dir.join(format!("{stem}.{arch}.ptx")), &c.ptx).expect("write ptx");
                        std::fs::write(dir.join(format!("{stem}.{arch}.ptxas.txt")), &c.log).expect("write log");
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "kernel compilation failed:\n{}", failures.join("\n"));
}
