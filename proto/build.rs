//! Compiles Luna's .proto files with protox (pure Rust), so a fresh machine
//! needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/luna/manifest.proto",
        "proto/luna/journal.proto",
        "proto/luna/master.proto",
        "proto/luna/master_log.proto",
        "proto/luna/tablet.proto",
        "proto/luna/group.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // Services get both a client and a server; message-only files generate no gRPC code.
    tonic_prost_build::configure()
        // Raft messages pass through without a copy into `Vec<u8>`.
        .bytes(".luna.journal.v1.RaftBatch.messages")
        // Keys and values move between the network, the log and the MemStore without copies.
        .bytes(".luna.tablet.v1")
        .bytes(".luna.group.v1")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
