//! Everything the kernel programs and the userspace agents must agree on, defined once.
//!
//! This crate is `no_std` and builds for both the host and `bpfel-unknown-none`. All types are
//! `#[repr(C)]`, have explicit padding and no `bool`, so they are bytemuck `Pod` and carry the
//! same layout on both sides. With the `user` feature they also implement `aya::Pod` so that
//! userspace can use them as map keys and values.
#![no_std]

#[cfg(any(test, feature = "status"))]
extern crate std;

pub mod checksum;
pub mod counters;
pub mod frame;
pub mod maps;
pub mod names;
#[cfg(feature = "status")]
pub mod status;
pub mod steering;
pub mod tftp;

pub use counters::{BalanceCounter, Counter, SwitchCounter};
pub use frame::FrameHeaders;
pub use maps::{Backend, BackendSeen, ClientKey, Health, KeptData, KeptRequest, LbConfig, LbSeen, Session, SessionEvent, SwitchConfig, SwitchRequest};
pub use steering::SteeringHeader;
pub use tftp::TFTP_PORT;

/// Implements `aya::Pod` for types that are already bytemuck `Pod`.
#[cfg(feature = "user")]
macro_rules! impl_aya_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            // SAFETY: the type is `bytemuck::Pod` (checked by the derive): `repr(C)`, no padding
            // holes, every bit pattern valid.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}

#[cfg(feature = "user")]
impl_aya_pod!(Counter, SteeringHeader, ClientKey, LbConfig, Backend, BackendSeen, Health, KeptData, KeptRequest, Session, SessionEvent, SwitchConfig, SwitchRequest);
