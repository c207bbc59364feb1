//! The refsys gRPC contract, generated from the .proto files beside this crate.

#![allow(clippy::all, missing_docs)]

/// Encoded `FileDescriptorSet` of every refsys .proto (with source comments), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/refsys_descriptor.bin"));

pub mod auth {
    pub mod v1 {
        tonic::include_proto!("refsys.auth.v1");
    }
}

pub mod referral {
    pub mod v1 {
        tonic::include_proto!("refsys.referral.v1");
    }
}
