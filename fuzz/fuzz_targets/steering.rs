#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xdp_lb_fuzz::checks::steering(data));
