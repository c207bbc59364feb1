//! Redis Cluster hash slots, computed on our side: every script invocation is checked before it
//! is sent, on a single Redis as on a cluster, so keys of one script that would land on
//! different slots fail every test (and every request) the same way, as a CROSSSLOT bug
//! ([`super::StoreError::Corrupt`], INTERNAL), never as a lookalike outage.
//!
//! The slot of a key is CRC16 (XMODEM) of the key, or of its hash tag — the part between the
//! first `{` and the next `}`, when that is not empty — modulo 16384, as the Redis Cluster
//! specification defines it.

use redis::{Cmd, ErrorKind, RedisError};

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that decides its slot: its hash tag, or the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The hash slot of `key`.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

/// The keys of an `EVAL`/`EVALSHA` (`_RO` too) command; `None` for any other command.
pub fn script_keys(cmd: &Cmd) -> Option<Vec<&[u8]>> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => bytes,
        redis::Arg::Cursor => &b""[..],
    });
    let name = args.next()?;
    if !(name.eq_ignore_ascii_case(b"EVALSHA")
        || name.eq_ignore_ascii_case(b"EVAL")
        || name.eq_ignore_ascii_case(b"EVALSHA_RO")
        || name.eq_ignore_ascii_case(b"EVAL_RO"))
    {
        return None;
    }
    let _script = args.next()?;
    let count: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
    Some(args.take(count).collect())
}

/// Checks that every key of a script invocation hashes to one slot. Any other command passes.
pub fn check_script(cmd: &Cmd) -> Result<(), RedisError> {
    let Some(keys) = script_keys(cmd) else {
        return Ok(());
    };
    let mut slots = keys.iter().map(|key| (key, key_slot(key)));
    let Some((first_key, first)) = slots.next() else {
        return Ok(());
    };
    match slots.find(|(_, slot)| *slot != first) {
        None => Ok(()),
        Some((key, slot)) => Err(RedisError::from((
            ErrorKind::CrossSlot,
            "the keys of one script hash to different Redis Cluster slots",
            format!(
                "{} (slot {first}) and {} (slot {slot})",
                String::from_utf8_lossy(first_key),
                String::from_utf8_lossy(key)
            ),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_specification() {
        // The specification's CRC16 check value, and slots as `CLUSTER KEYSLOT` reports them.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b""), 0);
        // Tags: the first `{` up to the next `}`; an empty tag means the whole key.
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no-close{tag"), b"no-close{tag");
    }

    fn eval(keys: &[&str]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg("0123456789abcdef").arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd.arg("an argument").arg("{another}");
        cmd
    }

    #[test]
    fn a_script_whose_keys_span_slots_is_refused_before_it_is_sent() {
        let p = "refsys:auth:";
        let same = [
            format!("{p}{{+79601233017}}:otp"),
            format!("{p}{{+79601233017}}:cooldown"),
            format!("{p}{{+79601233017}}:fails:1.2.3.4"),
        ];
        let same: Vec<&str> = same.iter().map(String::as_str).collect();
        assert_eq!(script_keys(&eval(&same)).unwrap().len(), 3);
        check_script(&eval(&same)).unwrap();
        check_script(&eval(&[])).unwrap();
        check_script(&redis::cmd("DEL").arg("a").arg("b").clone()).unwrap();

        let spans = [
            format!("{p}{{+79601233017}}:otp"),
            format!("{p}{{client:192.0.2.1}}:sends"),
        ];
        let err = check_script(&eval(&[&spans[0], &spans[1]])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::CrossSlot);
        assert!(err.to_string().contains("client:192.0.2.1"), "{err}");
        // Arguments after the keys are not keys.
        check_script(&eval(&[&spans[0]])).unwrap();
        // Lower case and EVAL are scripts too.
        let mut lower = redis::cmd("eval");
        lower.arg("return 1").arg(2).arg("a").arg("b");
        assert!(check_script(&lower).is_err());
    }
}
