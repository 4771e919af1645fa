//! Rebuild the kernel programs when bpf-linker changes (a new LLVM can change the output).
fn main() {
    // A missing bpf-linker is reported by the eBPF build itself; only track it when present.
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
