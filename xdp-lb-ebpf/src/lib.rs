//! Present so that xdp-lb can name this crate as a build-dependency (cargo then rebuilds the
//! kernel programs when their sources change). The programs themselves live in the binary.
#![no_std]
