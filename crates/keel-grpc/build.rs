//! Compiles `proto/orchestrator_service.proto` into the tonic server and client, with
//! the `protoc` that the `protoc-bin-vendored` crate ships (no system protoc needed),
//! and Keel's codec (`src/codec.rs`: a message that does not decode is INVALID_ARGUMENT).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let includes = protoc_bin_vendored::include_path()?;
    // prost-build runs the compiler named by PROTOC.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/orchestrator_service.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .codec_path("crate::codec::Codec")
        .compile_protos(
            &[std::path::PathBuf::from("proto/orchestrator_service.proto")],
            &[std::path::PathBuf::from("proto"), includes],
        )?;
    Ok(())
}
