//! With the `mpi` feature, find OpenMPI's library folder through its compiler wrapper
//! (`mpicc --showme:libdirs`), so Debian's `libopenmpi-dev` links without extra flags.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_MPI").is_none() {
        return;
    }
    if let Ok(out) = std::process::Command::new("mpicc").arg("--showme:libdirs").output() {
        for dir in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            println!("cargo:rustc-link-search=native={dir}");
        }
    }
    println!("cargo:rustc-link-lib=dylib=mpi");
}
