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

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn the_descriptor_set_keeps_the_comments_grpcurl_users_read() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let auth = set
            .file
            .iter()
            .find(|f| f.name() == "refsys/auth/v1/auth.proto")
            .expect("auth.proto is in the set");
        let comments: Vec<_> = auth
            .source_code_info
            .as_ref()
            .map(|info| {
                info.location
                    .iter()
                    .filter_map(|l| l.leading_comments.clone())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            comments
                .iter()
                .any(|c| c.contains("Sends a one-time numeric code")),
            "source comments are missing from the descriptor set"
        );
        for wanted in [
            "google/protobuf/timestamp.proto",
            "google/protobuf/field_mask.proto",
        ] {
            assert!(
                set.file.iter().any(|f| f.name() == wanted),
                "{wanted} is missing"
            );
        }
    }
}
