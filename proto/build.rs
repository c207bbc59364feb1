//! Compiles the .proto contract with protox (pure Rust), so a build needs no system `protoc`,
//! and writes the encoded descriptor set that server reflection serves.

use prost::Message;

const PROTOS: &[&str] = &[
    "refsys/auth/v1/auth.proto",
    "refsys/referral/v1/resources.proto",
    "refsys/referral/v1/referral_service.proto",
    "refsys/referral/v1/user_directory.proto",
    "refsys/referral/v1/admin_service.proto",
    "refsys/referral/v1/points_service.proto",
    "refsys/referral/v1/event_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out_dir.join("refsys_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
