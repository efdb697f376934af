#![no_std]
//! Empty library target of the eBPF crate.
//!
//! It exists so proxy-userspace can name this crate as a build-dependency: cargo then reruns
//! proxy-userspace's build script (which builds the real bpf binary) when this crate changes.
