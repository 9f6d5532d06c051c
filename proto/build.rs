fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Vendored protoc: a fresh machine needs no system protobuf compiler.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=ferry/ipam/v1/ipam.proto");
    tonic_prost_build::configure().compile_protos(&["ferry/ipam/v1/ipam.proto"], &["."])?;
    Ok(())
}
