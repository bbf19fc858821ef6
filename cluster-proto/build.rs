//! Generates the tonic/prost code for `proto/cluster.proto` with a vendored `protoc`,
//! so that `cargo build` needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, setting the variable is sound.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        // Forward frames are read in place: no copy out of the receive buffer.
        .bytes(".flockmq.cluster.v1.ForwardFrame.entries")
        .compile_protos(&["proto/cluster.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    Ok(())
}
