//! The bodies of the fuzz targets, shared with the stable corpus replay test
//! (`tftp-backend/tests/fuzz_corpus.rs` includes `checks.rs` by path).

pub mod checks;
