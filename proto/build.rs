//! Compiles Luna's .proto files with protox (pure Rust), so a fresh machine
//! needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/luna/manifest.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
