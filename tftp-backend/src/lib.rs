//! The parts of `tftp-backend` that are pure logic over untrusted bytes, as a library: the
//! wire format and option negotiation. The binary (`main.rs`) uses them from here; the fuzz
//! targets (`fuzz/`) and the corpus replay test (`tests/fuzz_corpus.rs`) call them directly.

pub mod options;
pub mod wire;
