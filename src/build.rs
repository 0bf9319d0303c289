//! Link options for the `vigil` binary's release build (the one the .deb ships).
//!
//! - `src/hot-text.ld` places the functions an agent runs at the front of the text, in one
//!   run: most of an idle agent's RSS is its own code, and the kernel maps code a whole
//!   page-cache folio at a time (benches/hot-text.sh, README "Performance").
//! - Packed relative relocations (DT_RELR, glibc 2.36+): the dynamic linker reads 3 KiB
//!   of them at start instead of 200 KiB of RELA entries, which stayed resident.
//! - Stripped by the linker (`--strip-all`) unless `VIGIL_KEEP_SYMBOLS` is set: the same
//!   build with its symbols is what benches/hot-text.sh profiles. Cargo's `strip` would
//!   change every symbol's hash, so LTO would merge identical functions under other
//!   names and the profile would name functions the shipped binary does not have.
//!
//! Debug builds, tests and the fuzz targets link as cargo does by default.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src/hot-text.ld");
    println!("cargo:rerun-if-env-changed=VIGIL_KEEP_SYMBOLS");
    let release = env::var("PROFILE").as_deref() == Ok("release");
    let linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if !(release && linux) {
        return;
    }
    // Both are given to the linker through the compiler driver (cc), as rustc links.
    let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let script = Path::new(&dir).join("src/hot-text.ld");
    println!("cargo:rustc-link-arg-bin=vigil=-Wl,-T,{}", script.display());
    println!("cargo:rustc-link-arg-bin=vigil=-Wl,-z,pack-relative-relocs");
    if env::var_os("VIGIL_KEEP_SYMBOLS").is_none() {
        println!("cargo:rustc-link-arg-bin=vigil=-Wl,--strip-all");
    }
}
