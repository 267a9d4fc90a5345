//! Generates the gRPC types and service from proto/clustermesh.proto (needs `protoc`,
//! Debian's protobuf-compiler; scripts/setup.sh installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/clustermesh.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(
            "isthmus.clustermesh.v1.ObjectKey",
            "#[derive(PartialOrd, Ord)]",
        )
        .compile_protos(&["proto/clustermesh.proto"], &["proto"])?;
    Ok(())
}
