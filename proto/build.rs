//! Compiles `edgerelay/v1/*.proto` with protox (pure Rust, no system `protoc`) and prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["edgerelay/v1/edgerelay.proto", "edgerelay/v1/spool.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    prost_build::Config::new().bytes(["."]).compile_fds(descriptors)?;
    Ok(())
}
