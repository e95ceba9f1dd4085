//! Compiles `proto/misaki/**.proto` with protox (pure Rust) so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/misaki/fleet/v1/fleet.proto"];
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small per-stream buffers (src/lib.rs, `codec`).
        .codec_path("crate::codec::SmallBuffers")
        .compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
