fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    // The UEFI build is a PE image the target's own linker settings make.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("uefi") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    // The binary only: build scripts and proc macros link normally.
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--no-dynamic-linker",
        "-Wl,-z,noexecstack",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/linker.ld");
}
