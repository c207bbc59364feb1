//! The caller's deadline (`grpc-timeout`), so work done on its behalf downstream gets no more
//! time than the caller will wait.

use std::time::Duration;

/// The `grpc-timeout` of an incoming request, if it has a valid one.
pub fn requested_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    // At most 8 digits and a unit, per the gRPC HTTP/2 spec.
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> tonic::metadata::MetadataMap {
        let mut map = tonic::metadata::MetadataMap::new();
        map.insert("grpc-timeout", value.parse().unwrap());
        map
    }

    #[test]
    fn timeouts_parse_with_every_unit_and_garbage_is_ignored() {
        assert_eq!(
            requested_timeout(&metadata("1500m")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            requested_timeout(&metadata("2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            requested_timeout(&metadata("1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(requested_timeout(&metadata("10x")), None);
        assert_eq!(requested_timeout(&metadata("m")), None);
        assert_eq!(requested_timeout(&metadata("123456789S")), None);
        assert_eq!(
            requested_timeout(&tonic::metadata::MetadataMap::new()),
            None
        );
    }
}
