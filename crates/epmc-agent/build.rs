//! Records the target triple the crate is built for (release manifests name it).

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=EPMC_BUILD_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
