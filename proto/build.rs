//! Compiles the `.proto` files with protox (a pure-Rust protobuf compiler), so building
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/statemesh/v1/api.proto",
        "proto/statemesh/mesh/v1/mesh.proto",
        "proto/statefun/v3/request-reply.proto",
        "proto/statefun/v2/request-reply.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
