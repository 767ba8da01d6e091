//! Without a GPU (or driver, or libraries) opening the backend is an error with a message,
//! never a panic. Runs everywhere; on a GPU machine it checks a device ordinal that cannot exist.

use opt_cuda::CudaBackend;

#[test]
fn opening_a_missing_device_is_an_error() {
    let e = CudaBackend::new(4096).err().expect("device 4096 cannot exist");
    let msg = e.to_string();
    assert!(!msg.is_empty());
    eprintln!("as expected: {msg}");
    if let Err(e) = opt_cuda::device_count() {
        eprintln!("no CUDA here: {e}");
    }
}
